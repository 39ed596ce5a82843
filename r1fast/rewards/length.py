"""Length-shaping rewards: cosine-scaled length reward and an n-gram repetition penalty.

Both follow "Demystifying Long Chain-of-Thought Reasoning in LLMs" (Yeo et al., 2025), as used by
Open-R1. The cosine reward pays short correct answers most and short wrong answers least, so a
wrong model is pushed to think longer and a right one to stop early:

    progress = min(L / max_len, 1);  r = lo + (hi - lo) * (1 + cos(pi * progress)) / 2
    correct: lo, hi = min_value_correct, max_value_correct   (1.0 at L = 0 down to 0.5 at max_len)
    wrong:   lo, hi = max_value_wrong, min_value_wrong       (-1.0 at L = 0 up to -0.5 at max_len)

L is ``meta['completion_tokens']`` when the trainer provides it, else the completion's characters
(= tokens for the character-level tiny model). Correctness is ``meta['_correct']`` when it is a bool
(a caller that graded the sample already), else the accuracy reward is computed (its SkipSample
propagates; ``require_answer_tag`` as for the accuracy reward: ``rewards.require_answer_tag``). Not
``meta['correct']``: data rows keep their extra keys, and a dataset column of that name ("no" is truthy)
made every wrong answer pay as correct (+0.997 instead of -0.997).

The repetition penalty is ``max_penalty * (1 - distinct n-grams / n-grams)`` over words (or
characters with ``unit="char"``): 0 for no repeats, approaching ``max_penalty`` for a loop.
"""

from __future__ import annotations

import math

from .accuracy import accuracy_reward, check_answer_meta

__all__ = ["cosine_length_reward", "repetition_penalty"]


def cosine_length_reward(prompt: str, completion: str, meta: dict, *, max_len: int = 1000,
                         min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                         min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                         require_answer_tag: bool = True) -> float:
    """Cosine-scaled length reward (see module docstring)."""
    _check_cosine(max_len=max_len, min_value_wrong=min_value_wrong, max_value_wrong=max_value_wrong,
                  min_value_correct=min_value_correct, max_value_correct=max_value_correct)
    length = meta.get("completion_tokens", len(completion))
    given = meta.get("_correct")
    correct = given if isinstance(given, bool) else accuracy_reward(prompt, completion, meta,
                                                                      require_answer_tag=require_answer_tag) >= 1.0
    lo, hi = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    progress = min(length / max_len, 1.0)
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))


def repetition_penalty(prompt: str, completion: str, meta: dict, *, ngram_size: int = 3,
                       max_penalty: float = -1.0, unit: str = "word") -> float:
    """``max_penalty`` times the share of repeated n-grams; 0 when the text is shorter than one n-gram."""
    _check_repetition(ngram_size=ngram_size, max_penalty=max_penalty, unit=unit)
    items = completion.lower().split() if unit == "word" else list(completion)
    if len(items) < ngram_size:
        return 0.0
    ngrams = [tuple(items[i:i + ngram_size]) for i in range(len(items) - ngram_size + 1)]
    return max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))


def _check_cosine(*, max_len=1000, require_answer_tag=True, **values) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _check_repetition(*, ngram_size=3, max_penalty=-1.0, unit="word") -> None:
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"ngram_size: expected an int >= 1, got {ngram_size!r}")
    if isinstance(max_penalty, bool) or not isinstance(max_penalty, (int, float)) or not -math.inf < max_penalty <= 0:
        raise ValueError(f"max_penalty: expected a finite number <= 0 (it is a penalty), got {max_penalty!r}")
    if unit not in ("word", "char"):
        raise ValueError(f"unit: expected 'word' or 'char', got {unit!r}")


def _check_cosine_meta(meta: dict) -> None:
    if not isinstance(meta.get("_correct"), bool):  # correctness is graded from the answer
        check_answer_meta(meta)


# the registry checks parameters when a run is configured, not at the first scored sample
cosine_length_reward.check_params = _check_cosine
cosine_length_reward.check_meta = _check_cosine_meta
repetition_penalty.check_params = _check_repetition
