"""Rejection sampling: ``python -m r1fast.rejection --checkpoint DIR --data FILE --out FILE [...]``.

DeepSeek-R1's third stage: sample ``k`` completions per prompt from the RL checkpoint with the rollout
engine, keep the correct ones, filter them, and write the kept traces as SFT data. Filters run in this
order and each reports how many samples it removed (``r1fast.rejection_filters`` defines them):

    ungradable       the gold answer could not be parsed (math-verify)
    incorrect        accuracy reward below 1 (or, with require_format, not in the R1 template)
    length           truncated at max_new_tokens, or outside [min_tokens, max_tokens]
    mixed_language   under min_language_share of the chain of thought's words in the target language
    unreadable       the chain of thought holds a code block, or a paragraph over max_paragraph_words words
    repetition       more than max_repeated_fraction of the word n-grams are repeats
    contaminated     shares a word n-gram with (equals, or contains a shorter) prompt of a decontamination set
    exact_duplicate  same prompt and completion (case and whitespace runs ignored) as a kept trace
    near_duplicate   word-shingle Jaccard >= near_duplicate_threshold with a kept trace of the same prompt
    per_prompt_cap   beyond max_per_prompt kept traces for one prompt

Output: a JSONL of ``{"prompt", "completion", "answer", "task", "id", "rewards", "provenance"}`` (SFT reads
prompt/completion; a completion starts with the think tag its rendered prompt left open, so the trace is whole;
provenance holds the checkpoint, the sampling settings, the sample's seed and index, token count (without the
stop token) and finish reason), written to ``out + ".tmp"`` and
renamed, so an existing output is complete; plus ``<out>.stats.json`` with the counts
(``dropped_too_long``: prompts skipped, and said on stderr, because prompt + max_new_tokens exceeds the
model's positions or KV cache). An empty kept set raises ``EmptyKeptSetError`` naming the stage and
the counts; a missing checkpoint or data file fails before any model is loaded, and so does bad data
(an empty file, a malformed line: a one-line ``r1fast.config_io.DataError``; so is a file of which no
prompt fits the model, found after it loads).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from r1fast import distributed as D
from r1fast import rejection_filters as F
from r1fast import stage_io
from r1fast.config_io import ConfigError, _check_tree, bounded, load_config, parse_cli, run_cli
from r1fast.data import load_jsonl
from r1fast.rewards import combine
from r1fast.rewards.code import check_tests
from r1fast.rewards.format import prefix_for
from r1fast.safe_write import write_file
from r1fast.seeding import SEED_MAX, SEED_MIN, sample_seeds
from r1fast.stage_io import (
    check_chat_template,
    check_checkpoint,
    check_file,
    check_sampling_temperature,
    check_template,
    checked_template,
    completion_prefix,
    data_errors,
    empty_data_error,
    encode_prompt,
    encode_prompts_that_fit,
    load_policy,
    nearest_existing,
    pick_device_dtype,
    render_prompt,
    resolve_template,
    stop_token_ids,
    write_jsonl,
)

FILTER_STAGES = ("ungradable", "incorrect", "length", "mixed_language", "unreadable", "repetition",
                 "contaminated", "exact_duplicate", "near_duplicate", "per_prompt_cap")
"""Filter names, in the order they run; each is a key of the counts."""


class EmptyKeptSetError(RuntimeError):
    """No trace survived rejection sampling; the message names the stage and every filter count."""


@dataclass
class RejectionConfig:
    """Rejection sampling of reasoning traces from a checkpoint."""

    checkpoint: str = ""
    """HF checkpoint directory (with its tokenizer) to sample from (required)."""
    data: str = ""
    """JSONL of {"prompt", "answer"} records to sample on (required)."""
    out: str = ""
    """Output JSONL of kept traces (required)."""
    template: str = "auto"
    """Prompt rendering: 'auto' (the template the checkpoint was trained with, else its chat template, else
    r1_zero), 'chat', r1_zero, compact, none."""
    limit: int | None = bounded(None, ge=1)
    """Use only the first N prompts; none = all."""
    k: int = bounded(4, ge=1)
    """Samples per prompt."""
    temperature: float = bounded(0.7, ge=0)
    """Sampling temperature; 0 = greedy (then the k samples are identical), else at least 1e-5 (the smallest the
    engine samples at)."""
    top_p: float = bounded(0.95, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = bounded(0, ge=0)
    """Top-k truncation (0 = off)."""
    max_new_tokens: int = bounded(256, ge=1)
    """Longest completion; a trace cut here is dropped by the length filter."""
    seed: int = bounded(0, ge=SEED_MIN, le=SEED_MAX)
    """Sampling seed; completion j of prompt i gets seed * 1000003 + i * k + j."""
    require_format: bool = True
    """Keep only traces in the R1 template <think>...</think><answer>...</answer>."""
    require_answer_tag: bool = True
    """Grade math answers only in the <answer> block (False: searched in the whole completion, for a model that
    answers outside the R1 tags; then set require_format=false too). Training's rewards.require_answer_tag."""
    min_tokens: int = bounded(1, ge=0)
    """Shortest kept trace, in tokens, not counting the stop token (so 1 drops a trace that is only EOS)."""
    max_tokens: int | None = bounded(None, ge=1)
    """Longest kept trace, in tokens, not counting the stop token; none = max_new_tokens (truncated traces are
    dropped in any case)."""
    language: str = "en"
    """Target language of the chain of thought (en or zh); a sample's own "language" column overrides it."""
    min_language_share: float = bounded(0.95, ge=0, le=1)
    """Least share of chain-of-thought words in the target language."""
    filter_code_blocks: bool = True
    """Drop traces whose chain of thought holds a code block (``` / ~~~ fence or indented block): R1 filtered
    them out of its SFT data for readability (section 2.3.3)."""
    max_paragraph_words: int | None = bounded(300, ge=1)
    """Drop traces with a chain-of-thought paragraph (between blank lines) over this many words; none = off.
    300 is about twice a long prose paragraph; the tiny recipe's worked solutions are about 10 words."""
    repetition_ngram: int = bounded(4, ge=1)
    """Word n-gram size of the repetition filter."""
    max_repeated_fraction: float = bounded(0.5, ge=0, le=1)
    """Most word n-grams that may repeat an earlier one."""
    decontaminate: tuple[str, ...] = ()
    """JSONL evaluation sets whose prompts must not leak into the kept traces."""
    decontamination_ngram: int = bounded(8, ge=1)
    """Word n-gram size of the decontamination overlap test."""
    near_duplicate_threshold: float = bounded(0.8, gt=0, le=1)
    """Jaccard similarity of word shingles at or above which a trace is a near duplicate."""
    shingle_size: int = bounded(3, ge=1)
    """Word shingle size of the near-duplicate test."""
    max_per_prompt: int = bounded(0, ge=0)
    """Most kept traces per prompt (0 = no cap)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
    block_size: int = bounded(16, ge=8, le=128)
    """KV-cache block size of the rollout engine."""
    max_batch_tokens: int = bounded(4096, ge=1)
    """Token budget of one engine step."""

    def validate(self) -> RejectionConfig:
        _check_tree(self, "")
        for key in ("checkpoint", "data", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required (--{key} PATH)")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two (the paged-attention page)")
        check_sampling_temperature(self.temperature, "temperature")
        check_template(self.template, "template")
        if self.language not in ("en", "zh"):
            raise ConfigError(f"language: expected en or zh, got {self.language!r}")
        for key, path in [("data", self.data), *(("decontaminate", p) for p in self.decontaminate)]:
            if os.path.abspath(path) == os.path.abspath(self.out):  # run_rejection removes out before sampling
                raise ConfigError(f"out: {self.out!r} is also the {key} input; it would be deleted")
        # a directory at out was an IsADirectoryError traceback (removing it), a file above it one after sampling
        existing = nearest_existing(self.out)
        if os.path.isdir(existing) == (existing == os.path.abspath(self.out)):
            raise ConfigError(f"out: {existing!r} is a {'directory' if os.path.isdir(existing) else 'file'}; out names "
                              "the JSONL file of kept traces, in a directory")
        return self


def default_score(samples: list[dict], texts: list[str], *, require_answer_tag: bool = True,
                  language: str = "en") -> list[dict[str, float | None]]:
    """Reward values per text: accuracy (None when ungradable; a code task's 1/0 when its program passes every
    test, as r1fast.eval grades it; math from the <answer> block only with ``require_answer_tag``), format,
    language consistency (target: the sample's ``language`` column, else ``language``)."""
    from r1fast.rewards.format import format_reward
    from r1fast.rewards.grading import grade
    from r1fast.rewards.language import language_consistency_reward

    acc = grade(samples, texts, require_answer_tag=require_answer_tag)[0]  # code samples have no answer: KeyError before
    return [{"accuracy": a, "format": format_reward("", t, {}),
             "language_consistency": language_consistency_reward("", t, s, language=language)}
            for a, t, s in zip(acc, texts, samples, strict=True)]


def config_score(cfg: RejectionConfig) -> Callable[[list[dict], list[str]], list[dict]]:
    """``default_score`` with ``cfg.require_answer_tag`` (a chat or R1-Distill model's traces all scored 0 before) and
    ``cfg.language`` (the target the mixed_language filter uses; language=zh recorded consistency against en)."""
    return functools.partial(default_score, require_answer_tag=cfg.require_answer_tag, language=cfg.language)


def filter_traces(traces: list[dict], cfg: RejectionConfig, *, eval_texts: list[str] = (),
                  completion_prefix="") -> tuple[list[dict], dict]:
    """(kept traces, counts) after the filters of the module docstring, in order; traces come in prompt order.
    The text filters read ``completion_prefix`` (the prompt's open ``<think>``; a str or a callable of the prompt,
    ``stage_io.completion_prefix``) + each completion, as rewards do.

    A trace: ``prompt``, ``completion``, ``prompt_index``, ``rewards`` ({"accuracy": float | None,
    "format": float, ...}), ``num_tokens`` (without the stop token), ``finish_reason``, optionally ``language``:
    its sample's own target language, which overrides ``cfg.language`` as it does for the language reward (an
    en/zh mixed data set otherwise lost every correct zh trace to mixed_language).
    """
    counts = {"samples": len(traces), **dict.fromkeys(FILTER_STAGES, 0)}
    index = F.NgramIndex(eval_texts, n=cfg.decontamination_ngram) if eval_texts else None
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else cfg.max_new_tokens
    seen: set[str] = set()
    kept_shingles: dict[int, list[set]] = {}
    per_prompt: dict[int, int] = {}
    kept = []
    for t in traces:
        text, r = prefix_for(completion_prefix, t["prompt"]) + t["completion"], t["rewards"]
        shingles = None
        if r["accuracy"] is None:
            stage = "ungradable"
        elif r["accuracy"] < 1.0 or (cfg.require_format and r.get("format", 0.0) < 1.0):
            stage = "incorrect"
        elif F.bad_length(t["num_tokens"], t["finish_reason"], min_tokens=cfg.min_tokens, max_tokens=max_tokens):
            stage = "length"
        elif F.mixed_language(text, language=t.get("language") or cfg.language, min_share=cfg.min_language_share):
            stage = "mixed_language"
        elif F.unreadable(text, code_blocks=cfg.filter_code_blocks, max_paragraph_words=cfg.max_paragraph_words):
            stage = "unreadable"
        elif F.too_repetitive(text, n=cfg.repetition_ngram, max_fraction=cfg.max_repeated_fraction):
            stage = "repetition"
        elif index is not None and index.contaminated(t["prompt"], text):
            stage = "contaminated"
        elif F.exact_key(t["prompt"], text) in seen:
            stage = "exact_duplicate"
        elif F.near_duplicate_of(shingles := F.ngrams(F.words(text), cfg.shingle_size),
                                 kept_shingles.get(t["prompt_index"], []), threshold=cfg.near_duplicate_threshold):
            stage = "near_duplicate"
        elif cfg.max_per_prompt and per_prompt.get(t["prompt_index"], 0) >= cfg.max_per_prompt:
            stage = "per_prompt_cap"
        else:
            stage = None
        if stage is not None:
            counts[stage] += 1
            continue
        seen.add(F.exact_key(t["prompt"], text))
        kept_shingles.setdefault(t["prompt_index"], []).append(shingles)
        per_prompt[t["prompt_index"]] = per_prompt.get(t["prompt_index"], 0) + 1
        kept.append(t)
    counts["kept"] = len(kept)
    return kept, counts


def trace_tokens(completion) -> int:
    """Tokens of the trace the SFT data will hold: the stop token that ended a 'stop' completion is not text
    (decode drops it, and SFT appends its own EOS), so an EOS-only sample counts 0, not 1."""
    ids = completion.token_ids
    return len(ids) - int(completion.finish_reason == "stop" and len(ids) > 0)


def sample_traces(engine, tokenizer, samples: list[dict], cfg: RejectionConfig,
                  score: Callable[[list[dict], list[str]], list[dict]] = default_score, *,
                  prompt_ids: dict[int, list[int]] | None = None, completion_prefix=None) -> list[dict]:
    """This rank's shard of prompts sampled k times and scored; gathered in prompt order on every rank.

    ``prompt_ids``: the encoded prompts to sample, by sample index (``stage_io.encode_prompts_that_fit``,
    as run_rejection passes them; None: every sample encoded here, and a too-long one is the engine's
    ValueError). Every rank holds them all, so the shards agree without a collective and a prompt's seeds
    depend only on its index. ``completion_prefix``: ``stage_io.completion_prefix`` of the template, as
    run_rejection passes it (None: computed here)."""
    world = D.world_size()
    if prompt_ids is None:
        prompt_ids = {i: encode_prompt(tokenizer, render_prompt(tokenizer, cfg.template, prompt=s["prompt"]),
                                       cfg.template) for i, s in enumerate(samples)}
    mine = sorted(prompt_ids)[D.rank()::world]
    traces = []
    if mine:
        prompts = [prompt_ids[i] for i in mine]
        seeds = sample_seeds(cfg.seed, mine, cfg.k)
        groups = engine.generate(prompts, n=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, top_k=cfg.top_k, seed=seeds, stop_token_ids=stop_token_ids(tokenizer, engine.args))
        flat = [(i, j, c) for i, group in zip(mine, groups, strict=True) for j, c in enumerate(group)]
        texts = [tokenizer.decode(c.token_ids) for _, _, c in flat]
        if completion_prefix is None:  # the prompt's open <think>: graded (and written by _write_jsonl), not sampled
            completion_prefix = stage_io.completion_prefix(tokenizer, cfg.template)
        graded = [prefix_for(completion_prefix, samples[i]["prompt"]) + t for (i, _, _), t in zip(flat, texts, strict=True)]
        rewards = score([samples[i] for i, _, _ in flat], graded)
        for (i, j, c), text, r, seed in zip(flat, texts, rewards, seeds, strict=True):
            s = samples[i]
            traces.append({"prompt": s["prompt"], "completion": text, "answer": s.get("answer"), "task": s.get("task"),
                           "id": s.get("id"), "language": s.get("language"), "prompt_index": i, "sample_index": j,
                           "rewards": r,
                           "seed": seed, "num_tokens": trace_tokens(c),
                           "finish_reason": c.finish_reason})
    traces = [t for part in D.all_gather_object(traces) for t in part]
    return sorted(traces, key=lambda t: (t["prompt_index"], t["sample_index"]))


def _write_jsonl(path: str, kept: list[dict], cfg: RejectionConfig, template_used: str,
                 completion_prefix="") -> None:
    """The kept traces as SFT records. Each completion is written with the think tag its prompt left open
    (``completion_prefix``, as the filters read it): a student whose template opens no think block (distillation
    from an R1-Distill-style teacher) otherwise trained on '...</think><answer>' without its '<think>', and every
    stage graded it format 0. r1fast.sft drops the tag again under a template that opens it (continue_open_think),
    so the same template trains the same tokens as before. provenance.num_tokens counts the sampled tokens only."""
    sampling = {k: getattr(cfg, k) for k in ("k", "temperature", "top_p", "top_k", "max_new_tokens", "seed")}

    def record(t: dict) -> dict:
        provenance = {"checkpoint": os.path.abspath(cfg.checkpoint), "data": os.path.abspath(cfg.data),
                      "template": template_used, "sampling": sampling, "sample_index": t["sample_index"],
                      "seed": t["seed"], "num_tokens": t["num_tokens"], "finish_reason": t["finish_reason"]}
        rec = {k: t[k] for k in ("prompt", "completion", "answer", "task", "id", "rewards")}
        rec["completion"] = prefix_for(completion_prefix, t["prompt"]) + t["completion"]
        return {**rec, "provenance": provenance}

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, (record(t) for t in kept))


def run_rejection(cfg: RejectionConfig, *, score: Callable[[list[dict], list[str]], list[dict]] | None = None) -> dict:
    """Sample, filter and write the kept traces; returns {"out", "stats", "counts"}. All ranks call it.

    ``score(samples, texts)`` gives each text's reward dict (needs "accuracy": float or None, and "format"
    when require_format); None: ``config_score(cfg)``. Raises EmptyKeptSetError when no trace survives (nothing is written then; an earlier
    run's ``out`` and stats file are removed before sampling, so none is left behind by a failed run).
    """
    cfg.validate()
    score = score or config_score(cfg)  # default_score with the config's grading rule
    check_checkpoint(cfg.checkpoint, "checkpoint")
    check_file(cfg.data, "data")
    for path in cfg.decontaminate:
        check_file(path, "decontaminate")
    stats = cfg.out + ".stats.json"
    if D.rank() == 0:  # a run that fails must not leave an earlier run's traces for the next step to train on
        for path in (cfg.out, stats):
            if os.path.exists(path):
                os.remove(path)
    from r1fast.rollout import Engine

    with data_errors():  # a bad line (named path:line) is the user's data, reported before the model loads
        samples = load_jsonl(cfg.data, limit=cfg.limit)
        # default_score grades language consistency: an unsupported "language" column fails here, not after sampling
        combine({"language": 1.0}).check_metas(samples)
        check_tests(samples)  # code tasks are graded by their tests (default_score): malformed ones fail here
        eval_texts = [s["prompt"] for path in cfg.decontaminate for s in load_jsonl(path)]
    if not samples:
        raise empty_data_error(cfg.data, "data", '{"prompt": ..., "answer": ...}')
    device, dtype = pick_device_dtype(cfg.dtype)
    tokenizer, model = load_policy(cfg.checkpoint, device=device, dtype=dtype, key="checkpoint")
    check_chat_template(tokenizer, cfg.template, "template")  # one line, not the first render's traceback
    checked_template(tokenizer, cfg.template, "template")  # sampled in a format the checkpoint never learned?
    model.eval()
    engine = Engine(model, block_size=cfg.block_size, max_batch_tokens=cfg.max_batch_tokens)
    prompt_ids, dropped = encode_prompts_that_fit("r1fast.rejection", engine, tokenizer, samples, cfg.template,
                                                  max_new_tokens=cfg.max_new_tokens, path=cfg.data)
    prefix = completion_prefix(tokenizer, cfg.template)  # the prompt's open <think>: graded and written, not sampled
    with torch.no_grad():
        traces = sample_traces(engine, tokenizer, samples, cfg, score, prompt_ids=prompt_ids, completion_prefix=prefix)
    kept, counts = filter_traces(traces, cfg, eval_texts=eval_texts, completion_prefix=prefix)
    counts["prompts"] = len(samples)
    counts["dropped_too_long"] = dropped
    counts["prompts_with_kept"] = len({t["prompt_index"] for t in kept})
    if not kept:
        raise EmptyKeptSetError(f"rejection sampling from {cfg.checkpoint!r}: no trace survived the filters "
                                f"(counts: {json.dumps(counts)})")
    if D.rank() == 0:
        _write_jsonl(cfg.out, kept, cfg, resolve_template(tokenizer, cfg.template), prefix)  # what 'auto' became
        # atomically, as the traces: a kill mid-write left a torn stats file beside a complete output
        write_file(stats, json.dumps({"counts": counts, "checkpoint": os.path.abspath(cfg.checkpoint),
                                      "data": cfg.data}, indent=2))
    D.barrier()
    return {"out": cfg.out, "stats": stats, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        path, overrides = parse_cli(argv, schema=RejectionConfig)
        cfg = load_config(path, overrides, schema=RejectionConfig)
        D.init_distributed()
        result = run_rejection(cfg)
        if D.rank() == 0:
            print(json.dumps(result["counts"], indent=1))
        D.shutdown()
        return 0

    return run_cli("r1fast.rejection", body, user_errors=(FileNotFoundError, PermissionError, EmptyKeptSetError))


if __name__ == "__main__":
    sys.exit(main())
