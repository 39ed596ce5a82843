"""Supervised fine-tuning: ``torchrun [--nproc_per_node N] -m r1fast.sft --data FILE [--config X.toml] [--a.b v]``.

R1's cold start, the SFT on rejection-sampled traces, and distillation into a smaller student are all
this one loop: packed variable-length (prompt, completion) sequences, loss on completion tokens only,
computed from hidden states by the fused log-prob kernel (``PolicyHead(mode="nll")``, no [N, V] logits),
the same model / FSDP2 / HF-checkpoint path as GRPO, AdamW with warmup + cosine, gradient clipping.

Data: JSONL, one object per line, either ``{"prompt": ..., "completion": ...}`` or chat
``{"messages": [..., {"role": "assistant", "content": ...}]}`` (the last message is the target).
Prompts are rendered by ``render_prompt``: ``template = "auto"`` uses the template the checkpoint was
trained with, else the tokenizer's chat template, else R1-Zero's. Each target ends with the tokenizer's EOS.

Loss normalization: every optimizer step takes ``batch_size`` sequences from a seeded stream of epoch
permutations (full batches only, so every rank runs the same number of forward passes under FSDP); the
loss is summed over the step's completion tokens on all ranks and divided by their global count, so the
update does not depend on the number of ranks or micro-batches.

Outputs under ``<out_dir>/<name>/``: config.toml, metrics.jsonl, summary.json, model/ (HF safetensors +
tokenizer; written to model.tmp and renamed, so an existing model/ is always complete). An SFT does not resume:
a run into a directory that holds an earlier one (a finished or a crashed run) first moves it to
``<name>.prev-<time>``.
The helpers every stage shares (checkpoint checks, prompt rendering) live in ``r1fast.stage_io``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from r1fast import distributed as D
from r1fast.checkpoint import resolve_dtype
from r1fast.config import ModelConfig, ParallelConfig, check_dir_name, check_master_weights
from r1fast.config_checks import check_fp8_experts
from r1fast.config_dump import save_config
from r1fast.config_io import ConfigError, DataError, _check_tree, bounded, load_config, parse_cli, run_cli
from r1fast.data.order import batch_indices
from r1fast.data_setup import build_tokenizer, model_positions
from r1fast.metrics import MetricsLogger
from r1fast.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    build_mesh,
    clip_and_step,
    enable_fp8_experts,
    master_and_compute_dtypes,
    release_one_rank_group,
)
from r1fast.policy import PolicyHead, pack
from r1fast.progress import progress
from r1fast.run_dir import lock_beside, set_aside_earlier_run
from r1fast.safe_write import remove_tree, write_file
from r1fast.schedule import build_scheduler
from r1fast.seeding import SEED_MAX, SEED_MIN
from r1fast.sft_data import (  # noqa: F401  (re-exported: callers import them from r1fast.sft)
    SFTRecord,
    encode_sft_examples,
    fit_sft_examples,
    read_sft_records,
    tokenize_sft_records,
)
from r1fast.stage_io import (  # noqa: F401  (re-exported for callers of the SFT stage)
    build_model,
    check_chat_template,
    check_checkpoint,
    check_file,
    check_template,
    checked_template,
    data_errors,
    empty_data_error,
    encode_prompt,
    load_policy,
    pick_device_dtype,
    render_prompt,
    resolve_template,
)
from r1fast.train_state import save_hf

MAX_NONFINITE_IN_A_ROW = 3  # consecutive non-finite losses or gradients after which SFT aborts (one: skipped, logged)


@dataclass
class SFTConfig:
    """One supervised fine-tuning run."""

    data: str = ""
    """JSONL file of {"prompt", "completion"} or {"messages"} records (required)."""
    template: str = "auto"
    """Prompt rendering: 'auto' (the template the checkpoint was trained with, else its chat template, else
    r1_zero), 'chat', or a named template: r1_zero, compact, none. The model it writes records the one used."""
    limit: int | None = bounded(None, ge=1)
    """Use only the first N records; none = all."""
    max_seq_len: int | None = bounded(None, ge=2)
    """Drop (and count) examples whose prompt + completion + EOS is longer; none = the model's
    max_position_embeddings, which it may not exceed (a ConfigError: longer positions were never trained)."""
    name: str = "sft"
    """Run name; outputs go to out_dir/name."""
    out_dir: str = "runs"
    """Directory holding one subdirectory per run."""
    epochs: int = bounded(1, ge=1)
    """Passes over the data when steps is 0."""
    steps: int = bounded(0, ge=0)
    """Optimizer steps; 0 = epochs x ceil(examples / batch_size)."""
    batch_size: int = bounded(16, ge=1)
    """Sequences per optimizer step, over all ranks (must be divisible by the number of ranks)."""
    micro_batch_size: int = bounded(8, ge=1)
    """Sequences per forward/backward pass on one rank (gradient accumulation)."""
    lr: float = bounded(1e-4, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW decoupled weight decay, applied to every parameter (norm gains and biases too, as torchtitan and
    verl do). AdamW's eps is torch's 1e-8."""
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    """AdamW (beta1, beta2)."""
    grad_clip: float = bounded(1.0, ge=0)
    """Clip the global gradient norm to this value (0 = off)."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear learning-rate warmup steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule after warmup."""
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    seed: int = bounded(0, ge=SEED_MIN, le=SEED_MAX)
    """Seed of model init (tiny) and data order."""
    log_every: int = bounded(1, ge=1)
    """Write metrics every N steps."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train: 'tiny' (built in code) or a local HF directory (base or teacher-distilled student)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distribution (FSDP2 over all ranks when parallel.fsdp)."""

    def validate(self) -> SFTConfig:
        _check_tree(self, "")
        if not self.data:
            raise ConfigError("data: a JSONL file of training records is required (--data FILE)")
        check_dir_name(self.name, "name")  # out_dir/name ('.' or '..' escaped or replaced out_dir)
        check_master_weights(self.model.dtype, self.parallel.fsdp)
        check_template(self.template, "template")
        return self


# ---------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------


def _save_model(root, model, tokenizer, final: str, dtype: torch.dtype | None = None) -> None:
    """HF checkpoint of the (possibly sharded) model into ``final`` (in ``dtype``, default the parameters'),
    atomically; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    tmp = final + ".tmp"
    sharded = any(isinstance(m, FSDPModule) for m in root.modules())
    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if sharded else None
    if D.rank() == 0:
        remove_tree(tmp, ignore_errors=True)
        if full is None:
            model.save_pretrained(tmp)
        else:
            save_hf(model, {k[len("model."):]: v for k, v in full.items()}, tmp, dtype=dtype)
        tokenizer.save(tmp)
        remove_tree(final)  # a symlinked model/ is unlinked (rmtree left it, and the rename then failed)
        os.replace(tmp, final)
    D.barrier()


def run_sft(cfg: SFTConfig) -> dict:
    """Train with ``cfg``; returns the summary (also written to summary.json). Bad paths fail before any work."""
    with contextlib.ExitStack() as held:  # the run-directory lock, released on an error too
        try:
            return _run_sft(cfg, held)
        finally:  # on an error too: a programmatic (pipeline) run leaves no 1-rank process group behind
            release_one_rank_group()


def _run_sft(cfg: SFTConfig, held: contextlib.ExitStack) -> dict:
    cfg.validate()
    check_file(cfg.data, "data")
    if cfg.model.name_or_path != "tiny":
        check_checkpoint(cfg.model.name_or_path, "model.name_or_path")
    check_fp8_experts(cfg.parallel.fp8_experts, cfg.model.name_or_path)
    records = read_sft_records(cfg.data, limit=cfg.limit)  # bad data fails before the model is built
    tokenizer = build_tokenizer(cfg.model)
    tokenized = tokenize_sft_records(records, tokenizer, cfg.template)  # so does unencodable data
    # the positions from config.json (tiny: model.max_seq_len): checked after the model's load before (minutes: 7B)
    positions = model_positions(cfg.model)
    if cfg.max_seq_len is not None and cfg.max_seq_len > positions:
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} exceeds the model's max_position_embeddings={positions} "
                          "(positions past it are outside the range its RoPE was trained or scaled for); "
                          "set it <= that, or none for the model's limit")
    limit = cfg.max_seq_len or positions
    if not fit_sft_examples(tokenized, tokenizer.eos_id, limit)[0]:  # only lengths count here
        used = repr(resolve_template(tokenizer, cfg.template)) + (" from auto" if cfg.template == "auto" else "")
        raise DataError(f"data: all {len(tokenized)} records of {cfg.data!r} are longer than max_seq_len={limit} "
                        f"tokens (prompts rendered with template {used})")  # auto's r1_zero text alone is long
    dist = D.init_distributed(cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    world, rank = dist.world_size, dist.rank
    template_used = checked_template(tokenizer, cfg.template, "template")  # rank 0 warns; the model records it
    # once the ranks are known (all agree on a refusal): two SFTs into one directory mixed their metrics.jsonl
    held.enter_context(lock_beside(os.path.join(cfg.out_dir, cfg.name), ConfigError) or contextlib.nullcontext())
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    torch.manual_seed(cfg.seed)
    compute = resolve_dtype(cfg.model.dtype)  # bf16: fp32 master weights that FSDP2 gathers in bf16
    master, param_dtype = master_and_compute_dtypes(compute)
    tokenizer, model = build_model(cfg.model, dist.device, seed=cfg.seed, dtype=master, tokenizer=tokenizer)
    examples, dropped = fit_sft_examples(tokenized, tokenizer.eos_id, limit)  # eos: build_model may set it
    if dropped and dist.is_main:  # a smaller training set is said, as the cold start, eval and rejection say theirs
        print(f"r1fast.sft: dropped {dropped} of {len(tokenized)} records of {cfg.data!r}: prompt + completion + EOS "
              f"is longer than max_seq_len={limit} tokens (dropped_too_long={dropped})", file=sys.stderr)
    steps = cfg.steps or cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    mesh = build_mesh(dist.device.type, world, dist.local_world_size,
                      one_rank=param_dtype is not None) if cfg.parallel.fsdp else None
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    root = apply_fsdp(PolicyHead(model), mesh, param_dtype=param_dtype)
    optimizer = torch.optim.AdamW(root.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.parallel.fp8_experts:
        enable_fp8_experts(model, optimizer)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=steps, schedule=cfg.schedule,
                                min_lr_ratio=cfg.min_lr_ratio)
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    # an SFT does not resume: a rerun after a crash (or of a finished run) appended its steps to the earlier
    # run's metrics.jsonl (steps 1, 2, 1, 2, 3) and kept its summary.json until the end
    set_aside_earlier_run(run_dir, "r1fast.sft", "")
    if dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.toml"))
    history, nonfinite, tokens_total, start = [], 0, 0.0, time.perf_counter()
    with (MetricsLogger(run_dir, rank=rank) as logger,  # closed on an error too: a pipeline runs many stages
          progress(steps, f"SFT {cfg.name}", enabled=None if dist.is_main else False) as bar):
        for step in range(steps):
            t0 = time.perf_counter()
            mine = batch_indices(step, cfg.batch_size, len(examples), cfg.seed)[rank::world]
            local = torch.tensor([float(sum(len(examples[i][1]) for i in mine))], device=dist.device)
            tokens = D.all_reduce_sum(local).item()
            nll = torch.zeros((), device=dist.device)
            for first in range(0, len(mine), cfg.micro_batch_size):
                chunk = [examples[i] for i in mine[first:first + cfg.micro_batch_size]]
                packed = pack([p for p, _ in chunk], [c for _, c in chunk], device=dist.device)
                loss = root(packed, mode="nll", normalizer=tokens / world)
                loss.backward()
                nll += loss.detach()
            nll = D.all_reduce_sum(nll).item() / world
            grad_norm = clip_and_step(root, optimizer, cfg.grad_clip, mesh is None and world > 1) \
                if math.isfinite(nll) else float("nan")
            # a finite loss whose backward overflowed was skipped too (clip_and_step kept the weights) but not counted
            finite = math.isfinite(grad_norm)
            nonfinite = 0 if finite else nonfinite + 1
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if nonfinite >= MAX_NONFINITE_IN_A_ROW:
                raise RuntimeError(f"SFT {cfg.name}: {nonfinite} non-finite losses or gradients in a row at step {step}")
            tokens_total += tokens
            history.append(nll)
            bar.advance(1, nll=f"{nll:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                logger.log(step + 1, phase="sft", nll=nll if math.isfinite(nll) else None,
                           skipped_nonfinite=not finite, grad_norm=grad_norm, lr=lr, tokens=tokens,
                           tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
    model_dir = os.path.join(run_dir, "model")
    tokenizer.prompt_template = template_used  # 'auto' in later stages uses it
    _save_model(root, model, tokenizer, model_dir, dtype=compute)
    first, final = (x if math.isfinite(x) else None for x in (history[0], history[-1]))  # NaN is no JSON
    summary = {"steps": steps, "examples": len(examples), "dropped_too_long": dropped, "tokens_trained": tokens_total,
               "first_nll": first, "final_nll": final, "model_dir": model_dir, "data": cfg.data,
               "base_model": cfg.model.name_or_path, "world_size": world, "time_s": time.perf_counter() - start}
    if dist.is_main:
        write_file(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))  # never via a link
    return summary


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        path, overrides = parse_cli(argv, schema=SFTConfig)
        summary = run_sft(load_config(path, overrides, schema=SFTConfig))
        if D.rank() == 0:
            print(json.dumps(summary, indent=1))
        D.shutdown()
        return 0

    return run_cli("r1fast.sft", body, user_errors=(FileNotFoundError, PermissionError))


if __name__ == "__main__":
    sys.exit(main())
