"""GPU memory the rollout's KV cache must leave to training.

The trainer builds the rollout engine, which sizes its KV cache from free GPU memory, before the first
optimizer step: at that moment AdamW holds no moments, no parameter has a gradient and, under FSDP2, every
parameter is still sharded. All three arrive later, and the cache stays allocated through them:
- AdamW's moments stay from the first step on;
- generation gathers the whole model (``parallelize.unsharded_for_rollout``) and frees it after;
- gradients live from the first backward to the update (``zero_grad(set_to_none=True)``), never during
  generation, so they and the gathered weights need room at different times: the larger of the two.
A 14B model on 8 H100s in bf16 (fp32 masters, 7 GB per GPU) leaves 73 GB free at build time; a memory_fraction
of 0.5 gave the cache 36 GB, and the second rollout then needed 7 + 14 GB of moments + 36 + 28 GB gathered =
85 GB of an 80 GB GPU.

With parallel.fp8_experts the FP8 weight cache adds, from the first forward on, two e4m3 copies of every
routed expert weight (as is and block-transposed, whole, not sharded) of the policy and of the reference:
2 bytes per expert parameter and model, its largest allocation for an MoE policy.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["training_reserve_bytes", "fp8_expert_copy_bytes"]


_TILE = 128  # the recipe's 128x128 weight blocks: one fp32 scale each


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard on this rank


def training_reserve_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           compute_dtype: torch.dtype) -> int:
    """Bytes this rank will still need for training and generation beyond what ``model`` and ``optimizer``
    hold now: moments + max(gathered, gradients), where

    - moments: AdamW's exp_avg and exp_avg_sq of each trainable parameter not yet in ``optimizer.state``, in
      the parameter's dtype and of its local (sharded) size;
    - gradients: one of the same size for each trainable parameter that has none (FSDP2 reduces into a
      sharded gradient in the parameter's dtype);
    - gathered: each parameter sharded by FSDP2 (a DTensor) whole, in ``compute_dtype``.
    """
    in_state = set() if optimizer is None else {id(p) for p in optimizer.state}
    trainable = set() if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
    item = torch.empty((), dtype=compute_dtype).element_size()
    moments = grads = gathered = 0
    for p in model.parameters():
        local = _local(p)
        local_bytes = local.numel() * local.element_size()
        if id(p) in trainable and p.requires_grad:
            moments += 0 if id(p) in in_state else 2 * local_bytes
            grads += 0 if p.grad is not None else local_bytes
        if local is not p:
            gathered += p.numel() * item
    return moments + max(gathered, grads)


def fp8_expert_copy_bytes(*models: nn.Module | None) -> int:
    """Bytes of the FP8 copies ``kernels.moe_layer.Fp8WeightCache`` keeps of the routed experts of ``models``
    (None entries skipped): per stacked weight [E, N, K], e4m3 as is and transposed plus their fp32 scales."""
    from r1fast.moe import Experts

    total = 0
    for model in models:
        for experts in () if model is None else (m for m in model.modules() if isinstance(m, Experts)):
            for w in (experts.w_gate_up, experts.w_down):
                e, n, k = w.shape  # a DTensor's shape is the whole tensor's
                total += 2 * (e * n * k + e * -(-n // _TILE) * -(-k // _TILE) * 4)
    return total
