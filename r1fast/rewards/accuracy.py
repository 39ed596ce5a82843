"""Accuracy rewards: math answers through math-verify, exact match for the generated tasks.

Math: the gold answer is parsed first; if math-verify finds nothing in it, the sample cannot be
graded, so the reward raises ``SkipSample`` (the registry marks the sample skipped and counts it)
instead of scoring a wrong 0. The model's answer is the text of its ``<answer>`` block; without a
well-formed block the reward is 0 (``require_answer_tag=False`` grades the whole completion instead).
Parsing and comparing run in the worker-process pool of ``math_verify_pool`` (timeouts, restarts,
``STATS`` counters).
"""

from __future__ import annotations

from ..data.tasks import TASKS, verify_answer
from .format import extract_answer
from .math_verify_pool import STATS, MathVerifier, default_verifier

__all__ = [
    "STATS", "SkipSample", "MathVerifier", "math_accuracy_reward", "task_accuracy_reward", "accuracy_reward",
    "default_verifier", "math_accuracy_batch", "accuracy_batch", "check_answer_meta",
]


class SkipSample(Exception):
    """Raised by a reward when the sample itself cannot be graded (e.g. an unparsable gold answer)."""


def _math_pred(completion: str, require_answer_tag: bool) -> str | None:
    answer = extract_answer(completion)
    if answer is None and not require_answer_tag:
        answer = completion
    return answer


def math_accuracy_batch(prompts, completions, metas, *, require_answer_tag: bool = True) -> list[float | None]:
    """Batched math accuracy: 1.0 / 0.0 per sample, None for a skipped sample (unparsable gold)."""
    scores: list[float | None] = [0.0] * len(completions)
    todo = [(i, _math_pred(c, require_answer_tag)) for i, c in enumerate(completions)]
    todo = [(i, pred) for i, pred in todo if pred]
    # The gold is parsed even when the prediction is missing, so an ungradable sample is always
    # reported as skipped rather than sometimes as a plain 0.
    have_pred = {i for i, _ in todo}
    todo += [(i, "") for i in range(len(completions)) if i not in have_pred]
    results = default_verifier().check([metas[i]["answer"] for i, _ in todo], [p for _, p in todo])
    for (i, pred), ok in zip(todo, results, strict=True):
        scores[i] = None if ok is None else float(bool(ok) and bool(pred))
    return scores


def math_accuracy_reward(prompt: str, completion: str, meta: dict, *, require_answer_tag: bool = True) -> float:
    """1.0 when math-verify finds the answer equal to ``meta['answer']``; SkipSample if the gold is unparsable."""
    score = math_accuracy_batch([prompt], [completion], [meta], require_answer_tag=require_answer_tag)[0]
    if score is None:
        raise SkipSample(f"unparsable gold answer {meta['answer']!r}")
    return score


math_accuracy_reward.batch = math_accuracy_batch


def task_accuracy_reward(prompt: str, completion: str, meta: dict) -> float:
    """Exact-match accuracy for the generated tasks: the ``<answer>`` text checked by the task's verifier."""
    answer = extract_answer(completion)
    return 0.0 if answer is None else float(verify_answer(meta, answer))


def accuracy_batch(prompts, completions, metas, *, require_answer_tag: bool = True) -> list[float | None]:
    """Generated tasks by exact match, everything else through math-verify (batched)."""
    scores: list[float | None] = [0.0] * len(completions)
    math_idx = [i for i, m in enumerate(metas) if m.get("task") not in TASKS]
    for i, m in enumerate(metas):
        if m.get("task") in TASKS:
            scores[i] = task_accuracy_reward(prompts[i], completions[i], m)
    if math_idx:
        sub = math_accuracy_batch([prompts[i] for i in math_idx], [completions[i] for i in math_idx],
                                  [metas[i] for i in math_idx], require_answer_tag=require_answer_tag)
        for i, s in zip(math_idx, sub, strict=True):
            scores[i] = s
    return scores


def accuracy_reward(prompt: str, completion: str, meta: dict, *, require_answer_tag: bool = True) -> float:
    """Exact match when ``meta['task']`` is a generated task, math-verify otherwise."""
    if meta.get("task") in TASKS:
        return task_accuracy_reward(prompt, completion, meta)
    return math_accuracy_reward(prompt, completion, meta, require_answer_tag=require_answer_tag)


accuracy_reward.batch = accuracy_batch


def check_answer_meta(meta: dict) -> None:
    """A sample must carry the ``answer`` these rewards compare: a code line (``tests``, no answer) raised
    KeyError('answer') at every step instead, scored 0 while the run went on training on the other rewards."""
    if "answer" not in meta:
        hint = " (a code task, with 'tests': use the reward 'code')" if "tests" in meta else ""
        raise ValueError(f"no 'answer' to grade{hint}")


def _check_task_meta(meta: dict) -> None:
    """task_accuracy grades generated tasks only: any other line raised at every step."""
    if meta.get("task") not in TASKS:
        raise ValueError(f"task {meta.get('task')!r} is not a generated task (known: {sorted(TASKS)}); "
                         "use the reward 'accuracy' (math-verify for the others)")
    check_answer_meta(meta)


# checked on every sample when the data loads (``CombinedReward.check_metas``)
accuracy_reward.check_meta = math_accuracy_reward.check_meta = check_answer_meta
task_accuracy_reward.check_meta = _check_task_meta
