"""Grading for evaluation (not training rewards): is each completion correct, well formatted, and what did it
answer. One mechanism for every stage that evaluates (``r1fast.eval``, the trainer's held-out evaluation through
``Scorer.check_batch``, rejection sampling's default score), so a code task is graded by its tests everywhere."""

from __future__ import annotations

from r1fast.rewards.accuracy import accuracy_batch
from r1fast.rewards.code import code_verdicts
from r1fast.rewards.format import extract_answer, format_reward, prefix_for

__all__ = ["grade"]


def grade(samples: list[dict], texts: list[str], require_answer_tag: bool, prefix="",
          code_params: dict | None = None) -> tuple[list, list, list, list]:
    """(accuracy or None per text, format flag per text, extracted answer per text, code vote key per text),
    each text graded with ``prefix`` (the prompt's open think tag, ``stage_io.completion_prefix``: a str or a
    callable of the prompt) in front; math-verify runs once for the whole batch. A sample with ``tests`` is
    graded by its tests in the sandbox pool (``code_params``: timeout_s, memory_mb): its answer is the program
    and its vote key ``code_vote_key`` (None for the other samples, whose keys ``r1fast.eval`` finds)."""
    prompts = [s.get("prompt", "") for s in samples]
    texts = [prefix_for(prefix, p) + t for p, t in zip(prompts, texts, strict=True)]
    scores, answers = [None] * len(texts), [extract_answer(t) for t in texts]
    keys: list[str | None] = [None] * len(texts)
    code = [i for i, s in enumerate(samples) if "tests" in s]
    other = [i for i, s in enumerate(samples) if "tests" not in s]
    if other:
        graded = accuracy_batch([prompts[i] for i in other], [texts[i] for i in other], [samples[i] for i in other],
                                require_answer_tag=require_answer_tag)
        for i, score in zip(other, graded, strict=True):
            scores[i] = score
    if code:
        verdicts = code_verdicts([prompts[i] for i in code], [texts[i] for i in code], [samples[i] for i in code],
                                 vote_key=True, **(code_params or {}))
        for i, (correct, program, key) in zip(code, verdicts, strict=True):
            scores[i], answers[i], keys[i] = float(correct), program, key
    formatted = [format_reward("", t, {}) == 1.0 for t in texts]
    return scores, formatted, answers, keys
