"""GRPO math outside the kernel: advantages, sample masks, length penalties, global normalizers.

Layout: a rollout batch holds P prompts x G samples, flattened prompt-major (the G samples of prompt p
are rows p*G .. p*G+G-1), or shaped [P, G]. Every rank rolls out its own prompts, so groups never
straddle ranks; only ``scale_rewards="batch"`` and the ``dapo`` normalizer need the other ranks, and
they all-reduce when ``torch.distributed`` is initialized (with ``process_group`` or the default group).

Advantages follow TRL's GRPOTrainer: A = (r - group mean) / (std + 1e-4), std unbiased, taken over the
group (``"group"``, DeepSeekMath/R1), over the whole global batch (``"batch"``), or not at all
(``"none"``, Dr. GRPO, which removes the difficulty bias of dividing by a small group std).

The loss itself is ``r1fast.kernels.fused_linear_grpo_loss``; ``grpo_loss`` only applies the
sample-level keep mask to the token mask and checks the dapo normalizer is there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import r1fast.kernels as K

__all__ = [
    "SCALE_REWARDS", "group_advantages", "equal_reward_groups", "dynamic_sampling_mask", "overlong_filter_mask",
    "soft_overlong_penalty", "global_active_tokens", "dapo_normalizer", "grpo_loss",
]

SCALE_REWARDS = ("group", "batch", "none")


def _distributed(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _all_reduce_sum(values: torch.Tensor, process_group) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (a copy on the backend's device; unchanged when not distributed)."""
    if not _distributed(process_group):
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(process_group) == "nccl" \
        else torch.device("cpu")
    reduced = values.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=process_group)
    return reduced.to(values.device)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: expected an int >= 2 (a group of one has no baseline), got {group_size!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        raise ValueError("rewards: expected a 1-D [P*G] or 2-D [P, G] tensor")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards: shape {tuple(rewards.shape)} does not have group_size={group_size} columns")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} values are not a whole number of groups of {group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: contains NaN or Inf (score skipped samples 0 and drop them with a mask)")
    return rewards.reshape(-1, group_size).to(torch.float64)


def _valid_grouped(valid: torch.Tensor | None, grouped: torch.Tensor) -> torch.Tensor:
    """``valid`` as a bool [P, G] like ``grouped`` (all True when None), checked."""
    if valid is None:
        return torch.ones(grouped.shape, dtype=torch.bool, device=grouped.device)
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.numel() != grouped.numel():
        raise ValueError("valid: expected a bool tensor with one entry per reward")
    return valid.reshape(grouped.shape).to(grouped.device)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str = "group", eps: float = 1e-4,
                     process_group=None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A = (r - group mean) / (std + eps); fp32, shaped like ``rewards``.

    ``scale_rewards``: "group" (std of each group), "batch" (std of all rewards of the global batch,
    all ranks), "none" (no division). Stds are unbiased (Bessel), as ``torch.std`` in TRL.
    ``valid`` (bool, shaped like ``rewards``): samples whose reward exists (a reward that skipped a sample,
    e.g. an unparsable gold answer, scores it a stand-in 0): only valid samples enter the means and stds,
    and the others get advantage 0. Their stand-in zeros moved other samples' advantages before (+-0.707 ->
    +-0.9998 under batch scaling with one skipped prompt in the batch).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = _grouped(rewards, group_size)
    ok = _valid_grouped(valid, grouped).to(grouped)
    if bool(ok.all()):  # today's formulas, bit for bit
        centered = grouped - grouped.mean(dim=1, keepdim=True)
        group_std = grouped.std(dim=1, keepdim=True) if scale_rewards == "group" else None
    else:
        count = ok.sum(dim=1, keepdim=True)
        centered = (grouped - (grouped * ok).sum(dim=1, keepdim=True) / count.clamp_min(1)) * ok
        group_std = (((centered * centered).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
                     if scale_rewards == "group" else None)
    if scale_rewards == "group":
        centered = centered / (group_std + eps)
    elif scale_rewards == "batch":
        # Global unbiased std from (count, sum, sum of squares) of the valid rewards; fp64 keeps the
        # cancellation harmless for rewards of order one and batches of millions.
        stats = torch.stack([ok.sum(), (grouped * ok).sum(), (grouped * grouped * ok).sum()])
        count, total, total_sq = _all_reduce_sum(stats, process_group).unbind()
        variance = ((total_sq - total * total / count.clamp_min(1)) / (count - 1).clamp_min(1)).clamp_min(0.0)
        centered = centered / (variance.sqrt() + eps)
    return centered.to(torch.float32).reshape(rewards.shape)


def equal_reward_groups(rewards: torch.Tensor, group_size: int, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [P]: True for groups with no learning signal: their valid rewards are all equal (so all their
    advantages are 0), or fewer than 2 of their samples are valid (no baseline).

    ``valid`` as in ``group_advantages``: a skipped sample's stand-in reward 0 is not compared, else a
    group scored 1, 1, (skipped), 1 counted as "not all equal" and was kept with all-zero advantages.
    """
    grouped = _grouped(rewards, group_size)
    ok = _valid_grouped(valid, grouped)
    highest = grouped.masked_fill(~ok, -torch.inf).amax(dim=1)
    lowest = grouped.masked_fill(~ok, torch.inf).amin(dim=1)
    return (ok.sum(dim=1) < 2) | (highest == lowest)


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: int, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool, shaped like ``rewards``: True for samples of groups to keep (DAPO's filter): groups whose
    valid rewards differ (see ``equal_reward_groups``). Groups never straddle ranks, so no collective."""
    keep = ~equal_reward_groups(rewards, group_size, valid=valid)
    return keep[:, None].expand(-1, group_size).reshape(rewards.shape)


def overlong_filter_mask(truncated: torch.Tensor) -> torch.Tensor:
    """Bool: True for samples to keep, i.e. those that ended by themselves (DAPO overlong filtering).

    ``truncated[i]`` is True when sample i hit ``max_new_tokens`` without an end-of-sequence token; its
    reward says nothing reliable about its reasoning, so it is masked out of the loss.
    """
    if not isinstance(truncated, torch.Tensor) or truncated.dtype != torch.bool:
        raise ValueError("truncated: expected a bool tensor")
    return ~truncated


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward (fp32, shaped like ``lengths``):

    0 up to ``max_len - cache_len`` tokens, then a linear ramp to -1 at ``max_len``, -1 beyond.
    """
    if not isinstance(max_len, int) or not isinstance(cache_len, int) or not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len: expected ints with 0 < cache_len <= max_len, got {cache_len!r}, {max_len!r}")
    excess = lengths.to(torch.float64) - (max_len - cache_len)
    return (-excess / cache_len).clamp(min=-1.0, max=0.0).to(torch.float32)


def global_active_tokens(masks, *, process_group=None) -> torch.Tensor:
    """Active (mask != 0) completion tokens over all micro-batches in ``masks`` and all ranks (fp64 scalar).

    ``masks``: one [B, T] tensor or an iterable of them (the rollout batch's micro-batches), already
    multiplied by any sample keep mask. Call once per rollout batch: it is a collective.
    """
    masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    if not masks:
        raise ValueError("masks: expected at least one mask tensor")
    local = sum((m != 0).sum().to(torch.float64) for m in masks)
    return _all_reduce_sum(local.reshape(1), process_group)[0]


def dapo_normalizer(masks, *, grads_averaged_over_ranks: bool = True, process_group=None) -> float:
    """The ``normalizer`` to pass to the ``dapo`` loss of every micro-batch of this rollout batch.

    The dapo loss is Σ_global mℓ / N_global. Each rank computes Σ_microbatch mℓ / normalizer and the
    trainer *sums* its micro-batch losses (no division by their number). FSDP and DDP average
    gradients over the W ranks, which divides the sum by W, so with ``grads_averaged_over_ranks``
    the normalizer is N_global / W; with summed gradients it is N_global. Never below 1/W, so an
    all-masked batch gives a zero loss, not 0/0.
    """
    total = float(global_active_tokens(masks, process_group=process_group))
    world = dist.get_world_size(process_group) if _distributed(process_group) else 1
    total = max(total, 1.0)
    return total / world if grads_averaged_over_ranks else total


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, *, sample_mask: torch.Tensor | None = None, process_group=None,
              **loss_kwargs):
    """``r1fast.kernels.fused_linear_grpo_loss`` with the per-sample keep mask folded into ``mask``.

    ``sample_mask`` (bool or 0/1, [B]): samples dropped by dynamic sampling, overlong filtering or a
    skipped reward contribute no tokens (and no tokens to the dapo count, if ``mask`` fed it).
    ``loss_kwargs`` go to the kernel unchanged (old_logps, ref_logps, beta, eps_low, eps_high, delta,
    temperature, loss_type, importance_level, max_completion_length, normalizer, rollout_is_ratio).
    Returns the kernel's ``(loss, metrics)``.
    """
    if sample_mask is not None:
        if sample_mask.shape != mask.shape[:1]:
            raise ValueError(f"sample_mask: expected shape {tuple(mask.shape[:1])}, got {tuple(sample_mask.shape)}")
        keep = sample_mask.to(device=mask.device)
        mask = mask & keep.bool()[:, None] if mask.dtype == torch.bool else mask * keep.to(mask.dtype)[:, None]
    if loss_kwargs.get("loss_type") == "dapo" and loss_kwargs.get("normalizer") is None and _distributed(process_group):
        raise ValueError("normalizer: the dapo loss on several ranks needs the global token count; "
                         "pass normalizer=dapo_normalizer(masks) computed once per rollout batch")
    return K.fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages, **loss_kwargs)
