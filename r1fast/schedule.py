"""Learning-rate schedules: linear warmup, then constant or cosine decay to ``min_lr_ratio``."""

from __future__ import annotations

import math
import warnings

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup ramps (step + 1) / warmup_steps, so step warmup_steps - 1 already runs at the peak; the cosine
    then starts at the peak and would reach ``min_lr_ratio`` at step ``total_steps``, one past the last
    (Hugging Face's ``get_cosine_schedule_with_warmup`` convention): the last step runs slightly above the
    floor, by a factor 1 + (1 - r)(1 - cos(pi / n)) / 2r for n decay steps (1.014x at n = 40, r = 0.1; 5.5x
    at n = 2).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_factor`` (its state_dict is the step counter, so resume is exact). Warns when the
    warmup is longer than the run: the rate then never reaches its peak (5 steps, warmup 10: 0.1-0.5x) and
    never decays. A warning, not an error: a smoke run shortens a recipe's steps and keeps its warmup."""
    warmup, total = kwargs.get("warmup_steps", 0), kwargs.get("total_steps", 0)
    if 0 < total < warmup:
        warnings.warn(f"warmup_steps={warmup} exceeds the run's {total} steps: the learning rate peaks at "
                      f"{total / warmup:.2g}x its configured value and the {kwargs.get('schedule')} schedule "
                      "never starts", stacklevel=2)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))


def apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, *,
                           lr: float, betas, weight_decay: float) -> None:
    """After a resume, this run's config sets the learning rate and AdamW's hyperparameters, not the
    checkpoint's: its saved param groups and the scheduler's base_lrs would otherwise keep an old
    --train.lr for good, and a longer --train.steps would run one step at the old schedule's rate.
    With the config unchanged every value is what the scheduler had set (resume stays bit-exact)."""
    for group in optimizer.param_groups:
        group.update(initial_lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * fn(scheduler.last_epoch)
