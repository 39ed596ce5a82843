"""Evaluation metrics as pure functions of per-prompt results (no model, no I/O).

Conventions (DeepSeek-R1, section 3.1 and the Codex paper):

- **pass@1** is averaged over the k samples of each prompt, then over prompts: mean_i (c_i / n_i).
- **pass@k** is the unbiased Codex estimator 1 - C(n-c, k) / C(n, k) per prompt (n samples, c correct),
  computed as a product so large n never overflows; it needs n >= k.
- **cons@k** (majority vote): each sample's answer is the text of its ``<answer>`` block, normalized by
  ``normalize_answer``; samples without an answer do not vote. The most frequent answer wins; a tie
  goes to the tied answer that appeared **first** in sample order (so the result is deterministic and
  does not depend on hashing). The prompt counts as solved when the winning answer's first sample is
  correct. A prompt where no sample gave an answer is not solved.
- **Bootstrap standard deviation**: prompts are resampled with replacement ``num_resamples`` times and
  the metric recomputed as a mean over the resample; the std of those means (ddof 1) is reported.
- **Reflection words**: case-insensitive whole-word matches ("wait" counts in "Wait," but not in
  "awaits"); reported as mean occurrences per response and the share of responses with at least one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

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
    """The key majority voting groups answers by: whitespace removed, lower case; None/empty -> None."""
    if answer is None:
        return None
    key = re.sub(r"\s+", "", answer).lower()
    return key or None


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """(winning normalized answer, whether it is correct) under the tie rule of the module docstring."""
    if len(answers) != len(correct):
        raise ValueError(f"answers and correct differ in length ({len(answers)} vs {len(correct)})")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        key = normalize_answer(a)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None, False
    winner = min(counts, key=lambda key: (-counts[key], first[key]))
    return winner, bool(correct[first[winner]])


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
    picks = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))
    return float(vals[picks].mean(axis=1).std(ddof=1))


def summarize(records: Sequence[dict], *, ks: Sequence[int] = (1,), reflection_words: Sequence[str] = REFLECTION_WORDS,
              num_resamples: int = 1000, seed: int = 0) -> dict:
    """Aggregate per-prompt records into the evaluation report.

    Each record: ``correct`` (list of bools, one per sample), ``answers`` (extracted answers),
    ``formatted`` (bools), ``lengths`` (token counts), ``texts`` (completion texts) and optionally
    ``greedy_correct`` / ``greedy_formatted`` / ``greedy_length``. Every record needs the same number of
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

    def add(name: str, per_prompt: list[float]) -> None:
        out[name] = sum(per_prompt) / len(per_prompt)
        out[f"{name}_std"] = bootstrap_std(per_prompt, **boot)

    add("pass@1", [sum(r["correct"]) / n for r in records])
    for k in sorted(set(ks)):
        if 1 < k <= n:
            add(f"pass@{k}", [pass_at_k(n, int(sum(r["correct"])), k) for r in records])
    add(f"cons@{n}", [float(majority_vote(r["answers"], r["correct"])[1]) for r in records])
    add("format_rate", [sum(r["formatted"]) / n for r in records])
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
