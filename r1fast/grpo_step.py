"""One GRPO step after generation: rewards -> advantages -> masks -> micro-batched fused-loss updates.

Loss normalization across micro-batches and ranks. FSDP averages gradients over ranks, and each
micro-batch's kernel call normalizes by what it sees, so each loss type gets the scale that makes
the accumulated gradient equal the one of the whole global batch in one call:
    grpo, dr_grpo  per-sequence terms: scale each micro-batch by B_micro / B_rank (ranks hold equal B);
    bnpo           the kernel's ``dapo`` reduction with normalizer = this rank's active tokens over
                   the rollout batch (TRL divides by each micro-batch's tokens; here micro-batching
                   does not change the step, but the rank count does: bnpo is a per-rank mean);
    dapo           normalizer = global active tokens / world size (computed once per rollout batch).
A 1-rank run and a 2-rank run of the same global batch therefore take the same step, for every loss
type but bnpo (on one rank bnpo equals dapo). FP8 experts (parallel.fp8_experts) also break the
equality: the weight gradient's 128-token tiles group tokens differently when the batch is split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from r1fast import distributed as D
from r1fast.config import Config
from r1fast.grpo import (
    dynamic_sampling_mask,
    group_advantages,
    overlong_filter_mask,
    soft_overlong_penalty,
)
from r1fast.kernels.registration import trusted_inputs
from r1fast.policy import PackedBatch, pack, pad_rows


@dataclass
class RolloutBatch:
    """This rank's completions of one step, flattened prompt-major (G consecutive samples per prompt)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    rollout_logps: list[list[float]]
    advantages: torch.Tensor
    """[B] fp32 on the device."""
    keep: list[bool]
    """False for completions excluded from the loss (dynamic sampling, overlong filter, ungradable)."""
    metrics: dict = field(default_factory=dict)
    reward_seconds: float = 0.0
    generated_tokens: int = 0


def _global_means(named: dict[str, list[float]], counts: dict[str, int]) -> dict[str, float | int]:
    """Mean over all ranks of each list (NaN entries ignored) and the global sum of each count, in one all-reduce
    (fp64 sums of ints are exact)."""
    sums = torch.zeros(2 * len(named) + len(counts), dtype=torch.float64)
    for i, values in enumerate(named.values()):
        finite = [v for v in values if not math.isnan(v)]
        sums[2 * i], sums[2 * i + 1] = sum(finite), len(finite)
    sums[2 * len(named):] = torch.tensor(list(counts.values()), dtype=torch.float64)
    D.all_reduce_sum(sums)
    means = {name: (sums[2 * i] / sums[2 * i + 1]).item() if sums[2 * i + 1] > 0 else float("nan")
             for i, name in enumerate(named)}
    return {**means, **{name: int(v) for name, v in zip(counts, sums[2 * len(named):].tolist(), strict=True)}}


def build_rollout_batch(cfg: Config, tokenizer, scorer, samples: list[dict], prompts: list[list[int]],
                        completions, device) -> RolloutBatch:
    """Score this rank's completions and compute advantages with statistics over the global batch."""
    g, r = cfg.grpo, cfg.rollout
    group = g.samples_per_prompt
    flat = [(s, p, c) for s, p, comps in zip(samples, prompts, completions, strict=True) for c in comps]
    texts = [tokenizer.decode(c.token_ids) for _, _, c in flat]
    t0 = time.perf_counter()
    metas = [{**s, "completion_tokens": len(c.token_ids)} for s, _, c in flat]  # length rewards count tokens
    graded = scorer.score([s["prompt"] for s, _, _ in flat], texts, metas)
    reward_seconds = time.perf_counter() - t0
    rewards = torch.tensor(graded.total, dtype=torch.float64)
    lengths = torch.tensor([len(c.token_ids) for _, _, c in flat], dtype=torch.float64)
    # a skipped sample enters no statistic: its other rewards' raw scores are not logged either, so reward_mean
    # (over the unskipped samples) is the weighted sum of the reward_<name> means
    per_reward = {f"reward_{name}": [math.nan if skip else v for v, skip in zip(values, graded.skipped, strict=True)]
                  for name, values in graded.per_reward.items()}
    if g.soft_overlong_penalty:  # DAPO: linear penalty over the last overlong_cache_len tokens
        penalty = soft_overlong_penalty(lengths, r.max_new_tokens, g.overlong_cache_len).double()
        rewards += penalty
        # logged like a reward (skipped samples not counted), so reward_mean is the sum of the logged parts
        per_reward["reward_overlong_penalty"] = [p if not skip else math.nan
                                                 for p, skip in zip(penalty.tolist(), graded.skipped, strict=True)]
    # groups never straddle ranks; "batch" scaling all-reduces its statistics inside
    ok = [not skipped for skipped in graded.skipped]
    valid = torch.tensor(ok, dtype=torch.bool)
    advantages = group_advantages(rewards, group, scale_rewards=g.scale_rewards, valid=valid)
    keep = ok
    if g.dynamic_sampling:  # DAPO: a group whose valid rewards are all equal carries no signal
        signal = dynamic_sampling_mask(rewards, group, valid=valid)  # skipped samples' stand-in 0 not compared
        keep = [k and bool(m) for k, m in zip(keep, signal.tolist(), strict=True)]
    if g.overlong_filter:
        truncated = torch.tensor([c.finish_reason == "length" for _, _, c in flat], dtype=torch.bool)
        keep = [k and bool(m) for k, m in zip(keep, overlong_filter_mask(truncated).tolist(), strict=True)]
    per_reward_sq = {f"{key}_sq": [v * v for v in values] for key, values in per_reward.items()}
    # NaN: not counted. Skipped samples only: samples the loss filters drop still count, as in reward_<name>
    scored = [float(x) if v else math.nan for x, v in zip(rewards.tolist(), ok, strict=True)]
    means = _global_means({"reward_mean": scored, "reward_sq": [x * x for x in scored],
                           **per_reward, **per_reward_sq,
                           "response_length_mean": lengths.tolist(),
                           "kept_fraction": [float(k) for k in keep],
                           "truncated_fraction": [float(c.finish_reason == "length") for _, _, c in flat]},
                          # global counts, as every other rollout metric (rank 0's own were logged before)
                          {"reward_skipped": sum(graded.skipped), "reward_errors": sum(graded.errors.values()),
                           "reward_verify_failures": graded.verify_failures})
    longest = torch.tensor([float(lengths.max()) if lengths.numel() else 0.0], dtype=torch.float64)
    D.all_reduce_max(longest)
    reward_std = math.sqrt(max(means.pop("reward_sq") - means["reward_mean"] ** 2, 0.0))
    for key in per_reward:  # population std over the global batch, per reward function
        means[f"{key}_std"] = math.sqrt(max(means.pop(f"{key}_sq") - means[key] ** 2, 0.0))
    metrics = {**means, "reward_std": reward_std,
               "response_length_max": longest.item()}
    # the first accuracy-type reward present; for code runs the mean code reward (the fraction of tests
    # passed, unless rewards.code_all_or_nothing), which was NaN before as GSM8K/MATH runs' once were
    accuracy = [means[k] for k in ("reward_accuracy", "reward_task_accuracy", "reward_math_accuracy",
                                   "reward_code") if k in means]
    metrics["accuracy"] = accuracy[0] if accuracy else float("nan")
    if "reward_format" in means:
        metrics["format_rate"] = means["reward_format"]
    return RolloutBatch(prompts=[p for _, p, _ in flat], completions=[list(c.token_ids) for _, _, c in flat],
                        rollout_logps=[list(c.logprobs) for _, _, c in flat], advantages=advantages.float().to(device),
                        keep=keep, metrics=metrics, reward_seconds=reward_seconds,
                        generated_tokens=int(lengths.sum().item()))


def _micro_batches(cfg: Config, batch: RolloutBatch, device) -> list[tuple[slice, PackedBatch, int]]:
    """(slice, packed micro-batch, its active-token count from the host lengths: no device read)."""
    size = cfg.grpo.micro_batch_size
    out = []
    for start in range(0, len(batch.completions), size):
        sl = slice(start, min(start + size, len(batch.completions)))
        packed = pack(batch.prompts[sl], batch.completions[sl], device=device)
        keep = torch.tensor(batch.keep[sl], dtype=torch.float32, device=device)
        packed.mask = packed.mask * keep[:, None]
        tokens = sum(len(c) for c, k in zip(batch.completions[sl], batch.keep[sl], strict=True) if k)
        out.append((sl, packed, tokens))
    return out


def train_on_batch(cfg: Config, root, ref_root, batch: RolloutBatch, clip_and_step, optimizer, world: int) -> dict:
    """``updates_per_rollout`` optimizer updates on this rollout batch; returns loss-side metrics.

    Host reads: one per update (the all-reduced non-finite flag, with the metrics on the last update)
    plus one for the global token count; the loss, metrics and finite flag accumulate on the device,
    token counts come from the host lengths, and the loss op skips its device-value checks
    (``trusted_inputs``: the trainer built these inputs). Before: ~14 reads per micro-batch.
    """
    with trusted_inputs():
        return _train_on_batch(cfg, root, ref_root, batch, clip_and_step, optimizer, world)


def _train_on_batch(cfg: Config, root, ref_root, batch: RolloutBatch, clip_and_step, optimizer, world: int) -> dict:
    g = cfg.grpo
    device = batch.advantages.device
    micro = _micro_batches(cfg, batch, device)
    b_rank = len(batch.completions)
    local_tokens = float(sum(tokens for _, _, tokens in micro))
    # the all-reduce of a host count: the same fp64 sum as global_active_tokens over the masks
    global_tokens = D.all_reduce_sum(torch.tensor([local_tokens], dtype=torch.float64)).item()
    if global_tokens == 0:
        # Every group dropped (dynamic sampling) or filtered: nothing to learn from, and an optimizer step on
        # a zero gradient still moves the weights (AdamW's momentum: 6.8e-4 in the probe). The same on every
        # rank, so no collective is skipped by some and run by others.
        return {"active_tokens": 0.0, "skipped_empty": 1}
    temperature = cfg.rollout.temperature
    old, ref = [], []
    with torch.no_grad():
        for sl, packed, _ in micro:
            if g.updates_per_rollout > 1:  # the policy moves between updates: freeze pi_old once
                old.append(root(packed, mode="logps", temperature=temperature))
            else:  # one update: the rollout's own log-probs are pi_old
                old.append(pad_rows(batch.rollout_logps[sl], packed.completion_ids.shape[1]).to(device))
            ref.append(ref_root(packed, mode="logps", temperature=temperature) if ref_root is not None else None)
    loss_type, normalizer = g.loss_type, None
    if g.loss_type == "bnpo":
        loss_type, normalizer = "dapo", max(local_tokens, 1.0)
    elif g.loss_type == "dapo":
        normalizer = max(global_tokens, 1.0) / world
    # on the device, fp64 (the Python floats they replace were fp64): [non-finite count, loss, kl, clip, entropy]
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    grad_norms, skipped = [], 0
    for update in range(g.updates_per_rollout):
        nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        for (sl, packed, tokens), old_logps, ref_logps in zip(micro, old, ref, strict=True):
            loss, m = root(packed, mode="loss", advantages=batch.advantages[sl], old_logps=old_logps,
                           ref_logps=ref_logps, beta=g.beta, eps_low=g.eps_low, eps_high=g.eps_high, delta=g.delta,
                           temperature=temperature, loss_type=loss_type, importance_level=g.importance_level,
                           max_completion_length=cfg.rollout.max_new_tokens, normalizer=normalizer)
            scale = (sl.stop - sl.start) / b_rank if loss_type in ("grpo", "dr_grpo") else 1.0
            # entropy too: a NaN hidden (unchecked under trusted_inputs) can leave the clipped loss finite
            # where min/max drop NaN (GPU), never the entropy's sums
            nonfinite += (~torch.isfinite(loss.detach())).double() + (~torch.isfinite(m.get("entropy", loss.detach()))).double()
            (loss * scale).backward()
            share = tokens / max(global_tokens, 1.0)
            sums[1] += loss.detach().double() * scale
            for i, key in ((2, "kl"), (3, "clip_frac"), (4, "entropy")):
                if key in m:
                    sums[i] += m[key].double() * share
        last = update == g.updates_per_rollout - 1
        # one read per update; the last one carries the metrics' all-reduce too
        flags = torch.cat([nonfinite[None], sums[1:] / torch.tensor([world, 1, 1, 1], dtype=torch.float64,
                                                                     device=device)]) if last else nonfinite[None]
        flags = D.all_reduce_sum(flags).tolist()
        if flags[0] > 0:
            optimizer.zero_grad(set_to_none=True)  # a non-finite loss: skip this update, keep the weights
            skipped += 1
        else:
            norm = clip_and_step()  # the global norm: the same on every rank
            # a finite loss with an overflowing backward: clip_and_step kept the weights, so this update is
            # skipped too (uncounted, the schedule stepped and the run never aborted on it: grad_norm NaN forever)
            if math.isfinite(norm):
                grad_norms.append(norm)
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    loss_sum, kl_sum, clip_sum, entropy_sum = flags[1:]
    n = g.updates_per_rollout
    metrics = {"loss": loss_sum / n, "clip_frac": clip_sum / n, "entropy": entropy_sum / n,
               "active_tokens": global_tokens,
               "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")}
    if g.beta > 0:
        metrics["kl"] = kl_sum / n
    if skipped:
        metrics["skipped_nonfinite"] = skipped
    return metrics
