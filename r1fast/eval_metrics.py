"""Evaluation metrics as pure functions of per-prompt results (no model, no I/O).

Conventions (DeepSeek-R1, section 3.1 and the Codex paper):

- **pass@1** is averaged over the k samples of each prompt, then over prompts: mean_i (c_i / n_i).
- **pass@k** is the unbiased Codex estimator 1 - C(n-c, k) / C(n, k) per prompt (n samples, c correct),
  computed as a product so large n never overflows; it needs n >= k.
- **cons@k** (majority vote): each sample's answer is the text of its ``<answer>`` block; samples without
  an answer do not vote. Votes are grouped by the **grader's equivalence**: every answer graded correct
  equals the gold, so all correct answers share one vote ("7", "07" and "+7" for an addition whose sum
  is 7), and a correct answer never shares a vote with a wrong one. Wrong answers are grouped by a vote
  key: the grader's canonical form where the caller supplies one (``r1fast.eval`` does: the task's
  canonical answer, or math-verify clusters), else ``normalize_answer`` (whitespace runs collapsed to
  one space, never deleted: "1 3 12" and "13 12" are different sortings). The group with most votes
  wins; a tie goes to the tied group whose first sample comes **first** in sample order (deterministic,
  independent of hashing). The prompt is solved when the winning group is the correct one. A prompt
  where no sample gave an answer is not solved.
- **Exact sums**: pass@1 and format rate are integer counts divided once (correctly rounded), other means
  use ``math.fsum``, so a metric does not depend on the order of the prompts and two runs with the
  same exact score report the same float.
- **Bootstrap standard deviation**: prompts are resampled with replacement ``num_resamples`` times and
  the metric recomputed as a mean over the resample; the std of those means (ddof 1) is reported.
- **Reflection words**: case-insensitive whole-word matches ("wait" counts in "Wait," but not in
  "awaits"); reported as mean occurrences per response and the share of responses with at least one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from r1fast.seeding import generator_seed

__all__ = [
    "REFLECTION_WORDS", "pass_at_k", "normalize_answer", "majority_vote", "reflection_stats", "bootstrap_std",
    "summarize", "markdown_table",
]

REFLECTION_WORDS = ("wait", "verify", "check", "recheck", "mistake", "however", "alternatively", "hmm")
"""Words whose frequency R1 tracked as a sign of reflection ("aha moment")."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples of which ``c`` are correct: 1 - C(n-c,k)/C(n,k)."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: expected an int, got {v!r}")
    if not 0 <= c <= n:
        raise ValueError(f"c: expected 0 <= c <= n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= n={n}, got {k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), without big binomials.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def normalize_answer(answer: str | None) -> str | None:
    """The default vote key: whitespace runs collapsed to one space and stripped, lower case; None/empty ->
    None. Whitespace is collapsed, not deleted: deleting it made "1 3 12" and "13 12" one answer."""
    if answer is None:
        return None
    key = " ".join(answer.split()).lower()
    return key or None


_CORRECT = ("correct",)  # the one vote group of every answer graded correct; wrong keys are ("wrong", key)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool],
                  keys: Sequence[str | None] | None = None) -> tuple[str | None, bool]:
    """(winning answer, normalized, and whether it is correct) under the rules of the module docstring.

    ``keys``: the grader's vote key of each answer, used for the answers graded wrong (correct answers
    always share one vote); None = ``normalize_answer``. A sample votes only when it has an answer.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers and correct differ in length ({len(answers)} vs {len(correct)})")
    if keys is not None and len(keys) != len(answers):
        raise ValueError(f"keys: expected one per answer ({len(answers)}), got {len(keys)}")
    counts: dict[tuple, int] = {}
    first: dict[tuple, int] = {}
    for i, a in enumerate(answers):
        shown = normalize_answer(a)
        if shown is None:
            continue
        if correct[i]:
            group = _CORRECT
        else:
            key = keys[i] if keys is not None and keys[i] is not None else shown
            group = ("wrong", key)
        counts[group] = counts.get(group, 0) + 1
        first.setdefault(group, i)
    if not counts:
        return None, False
    winner = min(counts, key=lambda group: (-counts[group], first[group]))
    return normalize_answer(answers[first[winner]]), winner == _CORRECT


_WORD_PATTERNS: dict[str, re.Pattern] = {}


def reflection_stats(texts: Sequence[str], words: Sequence[str] = REFLECTION_WORDS) -> dict[str, float]:
    """Per word: ``reflect_<w>_per_response`` (mean count); plus ``reflection_rate`` (share with any word)."""
    words = tuple(w.lower() for w in words)
    if any(not w or not re.fullmatch(r"[\w' -]+", w) for w in words):
        raise ValueError(f"words: expected plain words, got {list(words)!r}")
    n = max(len(texts), 1)
    out = {}
    any_hit = [False] * len(texts)
    for w in words:
        if w not in _WORD_PATTERNS:  # whole words only: "wait" in "Wait," but not in "awaits"
            _WORD_PATTERNS[w] = re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE)
        pattern = _WORD_PATTERNS[w]
        counts = [len(pattern.findall(t)) for t in texts]
        out[f"reflect_{w}_per_response"] = sum(counts) / n
        any_hit = [h or c > 0 for h, c in zip(any_hit, counts, strict=True)]
    out["reflection_rate"] = sum(any_hit) / n
    return out


def bootstrap_std(values: Sequence[float], *, num_resamples: int = 1000, seed: int = 0) -> float:
    """Std (ddof 1) of the mean of ``values`` over bootstrap resamples of the prompts; 0 for < 2 values."""
    if num_resamples < 2:
        raise ValueError(f"num_resamples: expected >= 2, got {num_resamples}")
    n = len(values)
    if n < 2:
        return 0.0
    vals = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(generator_seed(seed)).integers(0, n, size=(num_resamples, n))
    return float(vals[picks].mean(axis=1).std(ddof=1))


def summarize(records: Sequence[dict], *, ks: Sequence[int] = (1,), reflection_words: Sequence[str] = REFLECTION_WORDS,
              num_resamples: int = 1000, seed: int = 0) -> dict:
    """Aggregate per-prompt records into the evaluation report.

    Each record: ``correct`` (list of bools, one per sample), ``answers`` (extracted answers),
    ``formatted`` (bools), ``lengths`` (token counts), ``texts`` (completion texts) and optionally
    ``greedy_correct`` / ``greedy_formatted`` / ``greedy_length`` and ``vote_keys`` (the grader's vote key
    per answer, see ``majority_vote``). Every record needs the same number of
    samples n. pass@k is reported for each k in ``ks`` with k <= n; cons@n uses all n samples.
    Metrics with a ``_std`` twin carry the bootstrap std over prompts.
    """
    if not records:
        raise ValueError("records: nothing to summarize (no evaluated prompts)")
    n = len(records[0]["correct"])
    if n < 1 or any(len(r["correct"]) != n for r in records):
        raise ValueError("records: every prompt needs the same, positive number of samples")
    boot = {"num_resamples": num_resamples, "seed": seed}
    out: dict = {"num_prompts": len(records), "samples_per_prompt": n}

    def add(name: str, per_prompt: list[float], count: int | None = None) -> None:
        # An integer count divided once is the correctly rounded exact mean; fsum is order-independent.
        # A plain float sum in prompt order put "+0.0 points" between two arms with the same exact pass@1.
        out[name] = count / (n * len(records)) if count is not None else math.fsum(per_prompt) / len(per_prompt)
        out[f"{name}_std"] = bootstrap_std(per_prompt, **boot)

    num_correct = [int(sum(map(bool, r["correct"]))) for r in records]
    add("pass@1", [c / n for c in num_correct], count=sum(num_correct))
    for k in sorted(set(ks)):
        if 1 < k <= n:
            add(f"pass@{k}", [pass_at_k(n, c, k) for c in num_correct])
    add(f"cons@{n}", [float(majority_vote(r["answers"], r["correct"], r.get("vote_keys"))[1]) for r in records])
    num_formatted = [int(sum(map(bool, r["formatted"]))) for r in records]
    add("format_rate", [f / n for f in num_formatted], count=sum(num_formatted))
    out["response_length_mean"] = sum(sum(r["lengths"]) for r in records) / (n * len(records))
    if all("greedy_correct" in r for r in records):
        add("greedy_accuracy", [float(r["greedy_correct"]) for r in records])
        out["greedy_format_rate"] = sum(bool(r["greedy_formatted"]) for r in records) / len(records)
        out["greedy_length_mean"] = sum(r["greedy_length"] for r in records) / len(records)
    out.update(reflection_stats([t for r in records for t in r["texts"]], reflection_words))
    return out


def markdown_table(results: dict, *, title: str | None = None) -> str:
    """Metric | value (± bootstrap std) as a markdown table; non-numeric entries are skipped."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for name, value in results.items():
        if name.endswith("_std") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        std = results.get(f"{name}_std")
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if std is not None:
            shown += f" ± {std:.4f}"
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines) + "\n"
