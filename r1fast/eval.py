"""Evaluation of a checkpoint: ``python -m r1fast.eval --model DIR --data FILE [--k 16] [--out DIR] [...]``.

Samples ``k`` completions per prompt with the rollout engine (temperature 0.6, top-p 0.95 by default,
as DeepSeek-R1 evaluated) plus one greedy completion, grades them with the accuracy reward (exact
match for r1fast's generated tasks, math-verify otherwise) and the R1 format rule, and reports pass@1
averaged over the k samples, unbiased pass@k, cons@k (majority vote over the grader's equivalence
classes of the answers: ``_vote_keys``), greedy accuracy, format rate,
mean response length, reflection-word frequency and bootstrap standard deviations
(``r1fast.eval_metrics`` defines each). Under torchrun each rank evaluates its shard of the prompts
and rank 0 aggregates; sample seeds depend only on the prompt's index, so results do not depend on
the number of ranks.

Data: JSONL of ``{"prompt", "answer"}`` (``r1fast.data.load_jsonl``; a ``"task"`` naming a generated task
selects its exact verifier). A record with ``"tests"`` is a code task, graded by the code reward's sandbox
(``sandbox_timeout_s``/``sandbox_memory_mb``): correct when the program passes every test; its answer is the
program, and wrong programs vote in cons@k by their outputs (``rewards.code.code_vote_key``). Outputs in ``--out`` (when given): eval.json, eval.md, samples.jsonl.
A prompt whose gold answer math-verify cannot parse is skipped and counted (``skipped_prompts``); one too
long for the model (prompt + max_new_tokens past max_position_embeddings or the KV cache) is dropped,
counted (``dropped_too_long``) and reported on stderr. Bad data (an empty file, a malformed line, a
missing field, no prompt that fits, no gradable prompt) is a one-line ``DataError``, the first three
before the model loads.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from r1fast import distributed as D
from r1fast.config_io import ConfigError, DataError, _check_tree, bounded, load_config, parse_cli, run_cli
from r1fast.data import load_jsonl
from r1fast.eval_metrics import REFLECTION_WORDS, markdown_table, normalize_answer, summarize
from r1fast.rewards.grading import grade as _grade
from r1fast.safe_write import replace_atomically, write_file
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
    encode_prompts_that_fit,
    load_policy,
    nearest_existing,
    pick_device_dtype,
    stop_token_ids,
)

DEFAULT_PASS_K = (1, 2, 4, 8, 16, 32, 64)
"""pass@k values reported when ``pass_k`` is not given (those <= k)."""


@dataclass
class EvalConfig:
    """One evaluation of a checkpoint on a prompt set."""

    model: str = ""
    """HF checkpoint directory with its tokenizer (required)."""
    data: str = ""
    """JSONL file of {"prompt", "answer"} records (required)."""
    template: str = "auto"
    """Prompt rendering: 'auto' (the template the checkpoint was trained with, else its chat template, else
    r1_zero), 'chat', r1_zero, compact, none."""
    limit: int | None = bounded(None, ge=1)
    """Evaluate only the first N prompts; none = all."""
    k: int = bounded(4, ge=1)
    """Samples per prompt for pass@1 (averaged), pass@k and cons@k."""
    pass_k: tuple[int, ...] | None = bounded(None, ge=1)
    """k values of the pass@k metrics, each <= k; none = those of 1, 2, 4, ..., 64 that are <= k."""
    temperature: float = bounded(0.6, ge=0)
    """Sampling temperature of the k samples (R1: 0.6); 0 = greedy (then the k samples are identical), else at least 1e-5 (the smallest the
    engine samples at)."""
    top_p: float = bounded(0.95, gt=0, le=1)
    """Nucleus mass of the k samples (R1: 0.95)."""
    top_k: int = bounded(0, ge=0)
    """Top-k truncation of the k samples (0 = off)."""
    max_new_tokens: int = bounded(256, ge=1)
    """Longest completion."""
    greedy: bool = True
    """Also decode one greedy completion per prompt (greedy accuracy)."""
    require_answer_tag: bool = True
    """Grade only the <answer> block (False: math answers are searched in the whole completion)."""
    reflection_words: tuple[str, ...] = REFLECTION_WORDS
    """Words counted as reflection (whole-word, case-insensitive)."""
    bootstrap_resamples: int = bounded(1000, ge=2)
    """Bootstrap resamples of the prompts for the standard deviations."""
    seed: int = bounded(0, ge=SEED_MIN, le=SEED_MAX)
    """Seed of sampling and of the bootstrap."""
    out: str | None = None
    """Directory for eval.json, eval.md and samples.jsonl; none = print only."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
    block_size: int = bounded(16, ge=8, le=128)
    """KV-cache block size of the rollout engine."""
    max_batch_tokens: int = bounded(4096, ge=1)
    """Token budget of one engine step."""
    sandbox_timeout_s: float = bounded(5.0, gt=0)
    """Wall-clock limit of one program run of a code task (training's rewards.sandbox_timeout_s)."""
    sandbox_memory_mb: int = bounded(512, ge=16)
    """Memory limit of one program run of a code task (training's rewards.sandbox_memory_mb)."""

    def validate(self) -> EvalConfig:
        _check_tree(self, "")
        if not self.model:
            raise ConfigError("model: a checkpoint directory is required (--model DIR)")
        if not self.data:
            raise ConfigError("data: a JSONL file of prompts and answers is required (--data FILE)")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two (the paged-attention page)")
        check_sampling_temperature(self.temperature, "temperature")
        if self.pass_k is not None and max(self.pass_k, default=0) > self.k:
            raise ConfigError(f"pass_k: {max(self.pass_k)} exceeds k={self.k} (pass@k needs at least k samples "
                              "per prompt); raise --k or drop it from --pass_k")
        check_template(self.template, "template")
        return self

    def pass_ks(self) -> tuple[int, ...]:
        """The k values of the pass@k metrics: ``pass_k``, or the defaults that fit in ``k`` samples."""
        return self.pass_k if self.pass_k is not None else tuple(k for k in DEFAULT_PASS_K if k <= self.k)


MAX_VOTE_COMPARISONS = 256
"""Most math-verify comparisons spent per prompt on grouping wrong answers for cons@k. Distinct wrong
answers per prompt are few (each is compared with the groups found so far: d(d-1)/2 calls for d), and
256 covers d = 23 in full; past it an answer keeps its own text as key. Comparisons run in the grading
pool (about 1-10 ms each), so a prompt costs at most about 2.5 s more, and usually nothing."""


def _vote_keys(sample: dict, answers: list, correct: list[bool]) -> list[str | None]:
    """The grader's vote key of each answer (``eval_metrics.majority_vote``): the task's canonical answer for
    a generated task; for math, answers math-verify finds equal share the key of the group's first answer.

    Only wrong answers need keys (correct ones share one vote), and they are grouped only when together
    they could outvote the correct group: otherwise no grouping changes cons@k.
    """
    from r1fast.data.tasks import TASKS, canonical_answer
    from r1fast.rewards.accuracy import default_verifier

    if sample.get("task") in TASKS:
        return [canonical_answer(sample, a) for a in answers]
    # math: case is kept (math-verify tells "X" from "x"), whitespace runs are one space
    texts = [None if ok or a is None else " ".join(a.split()) or None for a, ok in zip(answers, correct, strict=True)]
    correct_voters = sum(bool(ok) and normalize_answer(a) is not None for a, ok in zip(answers, correct, strict=True))
    if sum(t is not None for t in texts) < correct_voters:  # no grouping of the wrong ones can win or tie
        return texts
    group: dict[str, str] = {}  # distinct wrong text -> its group's first text
    reps: list[str] = []
    budget = MAX_VOTE_COMPARISONS
    for text in dict.fromkeys(t for t in texts if t is not None):
        if 0 < len(reps) <= budget:
            budget -= len(reps)
            # None (math-verify cannot read the representative as a gold) is not "equal"
            same = default_verifier().check(reps, [text] * len(reps))
            match = next((rep for rep, ok in zip(reps, same, strict=True) if ok), None)
            if match is not None:
                group[text] = match
                continue
        group[text] = text
        reps.append(text)
    return [group[t] if t is not None else None for t in texts]


def _code_params(cfg: EvalConfig) -> dict:
    """The sandbox settings code tasks are graded under."""
    return {"timeout_s": cfg.sandbox_timeout_s, "memory_mb": cfg.sandbox_memory_mb}


def _check_tests(samples: list[dict], path: str) -> None:
    """DataError naming the first code task whose ``tests`` are malformed (before the model loads)."""
    from r1fast.rewards.code import check_tests

    try:
        check_tests(samples)
    except ValueError as exc:
        raise DataError(f"data: {path!r}: {exc}") from None


def evaluate_policy(engine, tokenizer, samples: list[dict], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """(metrics, per-prompt records) of the model behind ``engine`` on ``samples`` (all ranks call it).

    Prompts too long for the model (prompt + max_new_tokens past its positions or KV cache) are dropped
    and counted (``dropped_too_long``); every rank encodes every prompt (cheap next to sampling), so all
    agree on which are kept without a collective, and a kept prompt keeps its index (and sample seeds)."""
    fitting, dropped = encode_prompts_that_fit("r1fast.eval", engine, tokenizer, samples, cfg.template,
                                               max_new_tokens=cfg.max_new_tokens, path=cfg.data)
    mine = sorted(fitting)[D.rank()::D.world_size()]
    prompts = [fitting[i] for i in mine]
    prefix = completion_prefix(tokenizer, cfg.template)
    stop = stop_token_ids(tokenizer, engine.args)
    records = []
    if mine:
        seeds = sample_seeds(cfg.seed, mine, cfg.k)
        sampled = engine.generate(prompts, n=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=cfg.top_k, seed=seeds, stop_token_ids=stop)
        greedy = engine.generate(prompts, n=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                 stop_token_ids=stop) if cfg.greedy else [None] * len(mine)
        per_prompt = [list(group) + ([g[0]] if g is not None else []) for group, g in zip(sampled, greedy, strict=True)]
        # this rank's completions graded in one call: math-verify batches them, the sandbox pool runs the programs
        # together (per prompt, each prompt's hung program cost a timeout after the previous one's)
        flat_samples = [samples[i] for i, cs in zip(mine, per_prompt, strict=True) for _ in cs]
        flat_texts = [tokenizer.decode(c.token_ids) for cs in per_prompt for c in cs]
        grades = _grade(flat_samples, flat_texts, cfg.require_answer_tag, prefix, _code_params(cfg))
        offsets = [0, *itertools.accumulate(len(cs) for cs in per_prompt)]
        for j, (i, group, g) in enumerate(zip(mine, sampled, greedy, strict=True)):
            lo, hi = offsets[j], offsets[j + 1]
            texts = flat_texts[lo:hi]
            scores, formatted, answers, keys = (column[lo:hi] for column in grades)
            rec = {"index": i, "id": samples[i].get("id"), "prompt": samples[i]["prompt"],
                   "answer": samples[i].get("answer"), "skipped": any(s is None for s in scores),
                   "correct": [bool(s) for s in scores[:cfg.k]], "formatted": formatted[:cfg.k],
                   "answers": answers[:cfg.k], "texts": texts[:cfg.k],
                   "lengths": [len(c.token_ids) for c in group]}
            if not rec["skipped"]:  # a code task's keys came with its grading (its programs' outputs)
                rec["vote_keys"] = (keys[:cfg.k] if "tests" in samples[i]
                                    else _vote_keys(samples[i], rec["answers"], rec["correct"]))
            if g is not None:
                rec.update(greedy_correct=bool(scores[-1]), greedy_formatted=formatted[-1],
                           greedy_length=len(g[0].token_ids), greedy_text=texts[-1])
            records.append(rec)
    records = sorted((r for part in D.all_gather_object(records) for r in part), key=lambda r: r["index"])
    graded = [r for r in records if not r["skipped"]]
    if not graded:
        raise DataError(f"data: none of the {len(records)} prompts of {cfg.data!r} could be graded (math-verify "
                        "cannot parse their gold answers)")
    metrics = summarize(graded, ks=cfg.pass_ks(), reflection_words=cfg.reflection_words,
                        num_resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    metrics["skipped_prompts"] = len(records) - len(graded)
    metrics["dropped_too_long"] = dropped
    return metrics, records


def write_outputs(out_dir: str, metrics: dict, records: list[dict], cfg: EvalConfig,
                  template_used: str | None = None) -> None:
    """eval.json (metrics + settings, with ``template_used``: what 'auto' resolved to), eval.md (table),
    samples.jsonl (per prompt)."""
    os.makedirs(out_dir, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in ("model", "data", "template", "k", "temperature", "top_p", "top_k",
                                            "max_new_tokens", "seed")}
    settings["template_used"] = template_used or cfg.template
    # each replaced, never written through a symlink at its name (r1fast.safe_write)
    write_file(os.path.join(out_dir, "eval.json"), json.dumps({"metrics": metrics, "settings": settings}, indent=2))
    title = f"{os.path.basename(os.path.normpath(cfg.model))} on {os.path.basename(cfg.data)}"
    write_file(os.path.join(out_dir, "eval.md"), markdown_table(metrics, title=title))
    with replace_atomically(os.path.join(out_dir, "samples.jsonl")) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.data``; returns the metrics. Missing paths fail before any work."""
    cfg.validate()
    if cfg.out is not None:  # a file at out (or above it) failed os.makedirs only after the whole evaluation
        existing = nearest_existing(cfg.out)
        if not os.path.isdir(existing):
            raise ConfigError(f"out: {existing!r} is a file; out names a directory (eval.json, eval.md, samples.jsonl)")
    check_checkpoint(cfg.model, "model")
    check_file(cfg.data, "data")
    from r1fast.rollout import Engine

    with data_errors():  # a bad line (named path:line) or an empty file is reported before the model loads
        samples = load_jsonl(cfg.data, limit=cfg.limit)
    if not samples:
        raise empty_data_error(cfg.data, "data", '{"prompt": ..., "answer": ...}')
    _check_tests(samples, cfg.data)
    device, dtype = pick_device_dtype(cfg.dtype)
    tokenizer, model = load_policy(cfg.model, device=device, dtype=dtype)
    check_chat_template(tokenizer, cfg.template, "template")  # one line, not the first render's traceback
    used = checked_template(tokenizer, cfg.template, "template")  # a format the checkpoint never learned? (rank 0)
    model.eval()
    engine = Engine(model, block_size=cfg.block_size, max_batch_tokens=cfg.max_batch_tokens)
    with torch.no_grad():
        metrics, records = evaluate_policy(engine, tokenizer, samples, cfg)
    if cfg.out is not None and D.rank() == 0:
        write_outputs(cfg.out, metrics, records, cfg, used)
    return metrics


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        path, overrides = parse_cli(argv, schema=EvalConfig)
        cfg = load_config(path, overrides, schema=EvalConfig)
        D.init_distributed()
        metrics = run_eval(cfg)
        if D.rank() == 0:
            print(markdown_table(metrics, title=f"{cfg.model} on {cfg.data}"))
        D.shutdown()
        return 0

    return run_cli("r1fast.eval", body, user_errors=(FileNotFoundError, PermissionError))


if __name__ == "__main__":
    sys.exit(main())
