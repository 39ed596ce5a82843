"""Rule-based rewards: a registry of name -> reward function, and their weighted combination.

Every reward is a function ``(prompt: str, completion: str, meta: dict) -> float``; ``meta`` is the
sample (``"answer"``, ``"task"``, ``"tests"``, ``"language"``, ...). Keyword-only parameters of a
reward are set through ``combine(..., params={name: {...}})``. A reward may also offer
``fn.batch(prompts, completions, metas, **params) -> list[float | None | Exception]`` (math-verify's
worker pool, the sandbox's thread pool); the registry uses it when present. An exception in that list is
the one its sample raised: handled like a single call's, for that sample alone (a batch function that
raises instead makes the registry score every sample again, one at a time, to find the culprit).

``combine`` validates names, weights and parameter values (a reward's ``fn.check_params(**params)``)
before any training (unknown name -> ValueError listing the known ones). When scoring, a reward that raises is logged and scores the sample 0, and the run goes
on (so does one that returns NaN or an infinity); a reward that raises ``SkipSample`` (unparsable gold
answer) marks the sample skipped instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .accuracy import STATS, SkipSample, accuracy_reward, math_accuracy_reward, task_accuracy_reward
from .code import code_reward
from .format import format_score
from .language import language_consistency_reward
from .length import cosine_length_reward, repetition_penalty

__all__ = ["REWARDS", "RewardFn", "Reward", "RewardBatch", "CombinedReward", "SkipSample", "STATS",
           "get_reward", "combine"]

RewardFn = Callable[[str, str, dict], float]

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,            # generated tasks by exact match, else math-verify
    "math_accuracy": math_accuracy_reward,  # math-verify only
    "task_accuracy": task_accuracy_reward,  # exact match only
    "format": format_score,                 # params: partial
    "language": language_consistency_reward,  # params: language
    "code": code_reward,                    # params: limits, timeout_s, memory_mb, all_or_nothing
    "length_cosine": cosine_length_reward,  # params: max_len, min/max_value_correct/wrong
    "repetition": repetition_penalty,       # params: ngram_size, max_penalty, unit
}

logger = logging.getLogger("r1fast.rewards")
_MAX_LOGGED_ERRORS = 20  # per reward and CombinedReward; later ones are only counted


def _sample_id(metas, i: int):
    """How a log line names sample ``i``: its ``"id"`` when it has one, else its index."""
    return metas[i].get("id", i) if isinstance(metas[i], dict) else i


def _unknown(name: str) -> ValueError:
    return ValueError(f"reward: unknown reward name {name!r}; known: {sorted(REWARDS)}")


class Reward:
    """One named reward with its parameters bound; scores one sample or a batch."""

    def __init__(self, name: str, **params) -> None:
        if name not in REWARDS:
            raise _unknown(name)
        fn = REWARDS[name]
        accepted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        for key in params:
            if key not in accepted:
                raise ValueError(f"params.{name}.{key}: unknown parameter; accepted: {accepted}")
        check = getattr(fn, "check_params", None)
        if check is not None:  # bad values fail before any training, not at the first scored sample
            try:
                check(**params)
            except ValueError as exc:
                raise ValueError(f"params.{name}.{exc}") from None
        self.name, self.params = name, params
        self.fn = functools.partial(fn, **params)
        batch = getattr(fn, "batch", None)
        self.batch_fn = functools.partial(batch, **params) if batch is not None else None

    def __call__(self, prompt: str, completion: str, meta: dict) -> float:
        return float(self.fn(prompt, completion, meta))

    def score_batch(self, prompts, completions, metas, on_error: Callable[[int, BaseException], None]) -> list[float | None]:
        """Per sample: a float, or None when skipped. ``on_error(i, exc)`` is told of each failure (score 0)."""
        scores: list | None = None
        if self.batch_fn is not None:
            try:
                scores = [s if s is None or isinstance(s, Exception) else float(s)
                          for s in self.batch_fn(prompts, completions, metas)]
            except Exception:  # find the culprit sample by scoring one at a time
                pass
        if scores is None:
            scores = []
            for prompt, completion, meta in zip(prompts, completions, metas, strict=True):
                try:
                    s = self(prompt, completion, meta)
                except Exception as exc:  # collected, then handled below like a batch function's
                    s = exc
                scores.append(s)
        for i, s in enumerate(scores):  # a sample's own failure: skipped, or reported and scored 0
            if isinstance(s, SkipSample):
                scores[i] = None
            elif isinstance(s, Exception):
                on_error(i, s)
                scores[i] = 0.0
        for i, s in enumerate(scores):  # one NaN would poison its whole group's advantages
            if s is not None and not math.isfinite(s):
                on_error(i, ValueError(f"reward {self.name!r} returned a non-finite score {s}"))
                scores[i] = 0.0
        return scores


@dataclass
class RewardBatch:
    """Scores of one batch. ``total[i]`` is the weighted sum (0 for a skipped sample);
    ``per_reward[name][i]`` the raw score (NaN when skipped); ``errors[name]`` the number of samples on
    which that reward raised (``errors["total"]``: samples whose weighted sum overflowed, scored 0);
    ``skipped[i]`` True when some reward could not grade sample i; ``verify_failures`` the math answers
    scored 0 because math-verify overran its timeout on them or its worker died twice (wrong answers to
    the loss, but a count that rises says the verifier is too slow or failing, not the model)."""

    total: list[float]
    per_reward: dict[str, list[float]]
    skipped: list[bool]
    errors: dict[str, int] = field(default_factory=dict)
    verify_failures: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped)


class CombinedReward:
    """Weighted sum of named rewards: ``score(prompts, completions, metas) -> RewardBatch``."""

    def __init__(self, weights: dict[str, float], params: dict[str, dict] | None = None) -> None:
        params = params or {}
        for name in params:
            if name not in weights:
                raise ValueError(f"params.{name}: parameters given for a reward that has no weight")
        self.weights = dict(weights)
        self.rewards = {name: Reward(name, **params.get(name, {})) for name in weights}
        self.error_counts = {name: 0 for name in weights}

    def _on_error(self, name: str, completions, metas):
        def report(i: int, exc: BaseException) -> None:
            self.error_counts[name] += 1
            if self.error_counts[name] <= _MAX_LOGGED_ERRORS:
                logger.warning("reward %r raised on sample %r (scored 0): %r", name, _sample_id(metas, i), exc)
        return report

    def score(self, prompts: list[str], completions: list[str], metas: list[dict]) -> RewardBatch:
        n = len(completions)
        if len(prompts) != n or len(metas) != n:
            raise ValueError(f"prompts/metas: expected {n} items to match completions, got {len(prompts)}/{len(metas)}")
        per_reward, errors, skipped = {}, {}, [False] * n
        verify_failures = STATS["verify_timeout"] + STATS["verify_died"]
        for name, reward in self.rewards.items():
            before = self.error_counts[name]
            scores = reward.score_batch(prompts, completions, metas, self._on_error(name, completions, metas))
            errors[name] = self.error_counts[name] - before
            per_reward[name] = [math.nan if s is None else s for s in scores]
            for i, s in enumerate(scores):
                skipped[i] |= s is None
        total = [0.0 if skipped[i] else sum(self.weights[k] * per_reward[k][i] for k in self.rewards) for i in range(n)]
        for i, value in enumerate(total):
            if not math.isfinite(value):  # each score is finite, their weighted sum overflowed (1e308 x 10)
                errors["total"] = errors.get("total", 0) + 1
                logger.warning("the weighted reward total of sample %r is %r (scored 0)", _sample_id(metas, i), value)
                total[i] = 0.0
        verify_failures = STATS["verify_timeout"] + STATS["verify_died"] - verify_failures
        return RewardBatch(total=total, per_reward=per_reward, skipped=skipped, errors=errors,
                           verify_failures=verify_failures)

    def check_metas(self, metas: list[dict]) -> None:
        """ValueError naming the first sample whose metadata a reward cannot use (a reward's ``check_meta``),
        so bad data fails when it loads rather than scoring 0 at every step."""
        for name in self.rewards:
            check = getattr(REWARDS[name], "check_meta", None)
            if check is None:
                continue
            for i, meta in enumerate(metas):
                try:
                    check(meta)
                except ValueError as exc:
                    raise ValueError(f"sample {_sample_id(metas, i)!r}: reward {name!r}: {exc}") from None

    def __call__(self, prompt: str, completion: str, meta: dict) -> float:
        """Weighted total for one sample (0.0 when it is skipped; use ``score`` to see skips)."""
        return self.score([prompt], [completion], [meta]).total[0]


def get_reward(name: str, **params) -> Reward:
    """The reward ``name`` with its keyword parameters bound; ValueError for an unknown name or parameter."""
    return Reward(name, **params)


def combine(names_to_weights: dict[str, float], params: dict[str, dict] | None = None) -> CombinedReward:
    """Validate and build the weighted sum of rewards; call this before training starts."""
    if not isinstance(names_to_weights, dict) or not names_to_weights:
        raise ValueError("names_to_weights: expected a non-empty dict of reward name -> weight")
    for name, weight in names_to_weights.items():
        if name not in REWARDS:
            raise _unknown(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"names_to_weights[{name!r}]: expected a finite number, got {weight!r}")
    return CombinedReward(names_to_weights, params)
