"""The run's reward function from its config: weighted rule-based rewards plus the evaluation check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from r1fast.config import Config, ConfigError
from r1fast.config_io import DataError
from r1fast.data.tasks import TASKS
from r1fast.rewards import REWARDS, CombinedReward, RewardBatch, combine
from r1fast.rewards.accuracy import SkipSample, accuracy_reward, default_verifier
from r1fast.rewards.code import check_tests
from r1fast.rewards.format import format_score, prefix_for
from r1fast.rewards.grading import grade

GOLD_PROBE = 64
"""Distinct gold answers parsed per chunk by ``Scorer.unparsable_golds`` before it stops at a parsable one."""


@dataclass
class Scorer:
    """``score`` grades a batch for training; ``check`` says (correct, well formatted) for evaluation.
    Both grade the prompt's ``prefix`` + the completion (``stage_io.completion_prefix``: a prompt's open
    ``<think>``; a str, or a callable of the prompt under template 'none'). ``code_params``: the sandbox
    settings (``timeout_s``, ``memory_mb``) ``check`` runs a code sample's tests with. ``require_answer_tag``:
    math answers only from the ``<answer>`` block (``rewards.require_answer_tag``), in rewards and checks alike."""

    combined: CombinedReward
    completion_prefix: str | Callable[[str], str] = ""
    code_params: dict = field(default_factory=dict)
    require_answer_tag: bool = True

    def prefix(self, prompt: str) -> str:
        """What this prompt's completions are graded (and cold-start targets written) after."""
        return prefix_for(self.completion_prefix, prompt)

    def score(self, prompts: list[str], completions: list[str], metas: list[dict]) -> RewardBatch:
        texts = [self.prefix(p) + c for p, c in zip(prompts, completions, strict=True)]
        return self.combined.score(prompts, texts, metas)

    def check_samples(self, samples: list[dict]) -> None:
        """DataError naming the first sample a configured reward cannot grade (e.g. an unsupported
        ``language`` column, malformed ``tests``), before any training. ``tests`` are checked whenever a
        sample has them, code reward or not: ``check`` grades such a sample by them."""
        try:
            check_tests(samples)  # first: a malformed tests list is the line's own error, whatever the rewards
            self.combined.check_metas(samples)
        except ValueError as exc:
            raise DataError(f"data: {exc}") from None

    def unparsable_golds(self, samples: list[dict]) -> str | None:
        """None when some math gold answer of ``samples`` parses (or math-verify grades none of them), else a
        one-line reason naming the examples. One unparsable gold skips its sample (counted); when none parses,
        every step skipped all samples and made no update, and the run still exited 0. Distinct golds go through
        the math-verify pool in chunks of ``GOLD_PROBE`` (pred ''; each gold's fate is then cached for training),
        stopping at the first chunk with a parsable one: a normal file costs one chunk."""
        if not {"accuracy", "math_accuracy"} & set(self.combined.weights):
            return None
        golds = list(dict.fromkeys(str(s["answer"]) for s in samples
                                   if "tests" not in s and s.get("task") not in TASKS and "answer" in s))
        if not golds:
            return None
        verifier = default_verifier()
        for start in range(0, len(golds), GOLD_PROBE):
            chunk = golds[start:start + GOLD_PROBE]
            if any(ok is not None for ok in verifier.check(chunk, [""] * len(chunk))):
                return None
        shown = ", ".join(repr(g) for g in golds[:3]) + (", ..." if len(golds) > 3 else "")
        return (f"math-verify parses none of the {len(golds)} distinct gold answers of the training prompts "
                f"({shown}): every sample would be skipped and no step would train; give each \"answer\" as a "
                "number or LaTeX expression (e.g. \"7\", \"\\frac{1}{2}\")")

    def check(self, sample: dict, completion: str) -> tuple[bool | None, bool]:
        """(correct, well formatted); correct is None when the sample cannot be graded (``SkipSample``: an
        unparsable gold), so evaluation skips the prompt as ``r1fast.eval`` does rather than count it wrong.
        A sample with ``tests`` is a code task: correct when its program passes every test (``check_batch``
        under ``code_params``), not when an ``answer`` matches. Any other error is a bug and propagates."""
        if "tests" in sample:
            return self.check_batch([sample], [completion])[0]
        completion = self.prefix(sample.get("prompt", "")) + completion
        try:
            correct: bool | None = accuracy_reward(sample.get("prompt", ""), completion, sample,
                                                   require_answer_tag=self.require_answer_tag) > 0.5
        except SkipSample:
            correct = None
        return correct, format_score("", completion, sample) >= 1.0

    def check_batch(self, samples: list[dict], completions: list[str]) -> list[tuple[bool | None, bool]]:
        """``check`` of each (sample, completion) through ``rewards.grading.grade``, as ``r1fast.eval`` grades: one
        math-verify call, the code samples' programs together in the sandbox pool (one by one, a hung program cost
        the timeout per completion: 32 s of a 40 s code run's evaluation)."""
        scores, formatted, _, _ = grade(samples, completions, self.require_answer_tag, self.completion_prefix,
                                        self.code_params)
        return [(None if s is None else s > 0.5, f) for s, f in zip(scores, formatted, strict=True)]


def build_scorer(cfg: Config, *, completion_prefix: str | Callable[[str], str] = "") -> Scorer:
    """Validate reward names and parameters before any training starts."""
    r = cfg.rewards
    unknown = [name for name in r.weights if name not in REWARDS]
    if unknown:
        raise ConfigError(f"rewards.weights.{unknown[0]}: unknown reward; known: {', '.join(sorted(REWARDS))}")
    params: dict[str, dict] = {}
    for name in ("accuracy", "math_accuracy"):  # without it a chat/R1-Distill model's every accuracy was 0
        if name in r.weights:
            params[name] = {"require_answer_tag": r.require_answer_tag}
    if "format" in r.weights:
        params["format"] = {"partial": r.format_partial_credit}
    if "language" in r.weights:
        params["language"] = {"language": r.language}
    sandbox = {"timeout_s": r.sandbox_timeout_s, "memory_mb": r.sandbox_memory_mb}  # also grades code evaluation
    if "code" in r.weights:
        params["code"] = {**sandbox, "all_or_nothing": r.code_all_or_nothing}
    if "length_cosine" in r.weights:
        names = ("min_value_wrong", "max_value_wrong", "min_value_correct", "max_value_correct")
        params["length_cosine"] = {"max_len": cfg.rollout.max_new_tokens,
                                   **dict(zip(names, r.length_cosine_values, strict=True)),
                                   "require_answer_tag": r.require_answer_tag}  # it grades correctness itself
    if "repetition" in r.weights:
        params["repetition"] = {"unit": r.repetition_unit, "ngram_size": r.repetition_ngram_size}
    try:
        return Scorer(combine(dict(r.weights), params), completion_prefix, sandbox, r.require_answer_tag)
    except ValueError as exc:  # one line naming the config section, not a traceback (empty weights: validate())
        raise ConfigError(f"rewards: {exc}") from None
