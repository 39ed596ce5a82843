"""PyTorch references of the MoE routing kernels in ``moe_permute.py``: CPU fallback and test oracle.

Same contracts and same results: the histogram and the gathers are exact; ``combine`` accumulates the
k weighted slots of a token in fp32 in slot order, as the kernel does, so it matches bit for bit.
"""

from __future__ import annotations

import torch


def expert_histogram(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E] count of each expert id (ids outside [0, E) are not counted)."""
    ids = topk_ids.reshape(-1)
    valid = ids[(ids >= 0) & (ids < num_experts)]
    return torch.bincount(valid, minlength=num_experts).to(torch.int32)


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[index]`` (fp8 rows are moved as bytes: indexing is not defined for float8 on every device)."""
    if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return src.view(torch.uint8)[index].view(src.dtype)
    return src[index]


def combine(y: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor | None, topk: int, out_dtype):
    """[T, H] = sum_j (weights[t, j] *) y[row_of_slot[t*k + j]], fp32 accumulation in slot order."""
    T = row_of_slot.numel() // topk
    slots = y[row_of_slot].float().view(T, topk, y.shape[1])
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(topk):  # slot order, like the kernel's fp32 accumulator
        acc += slots[:, j] * weights[:, j, None].float() if weights is not None else slots[:, j]
    return acc.to(out_dtype)


def combine_backward(dout: torch.Tensor, y: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor):
    """(dy [M, H] in y's dtype, dweights fp32 [T, k]) of ``combine(y, row_of_slot, weights)``."""
    T, topk = weights.shape
    d = dout.float()
    dy = y.new_empty(y.shape)  # contiguous, as the kernel returns it (the op's fake says so)
    H = y.shape[1]  # not -1: zero tokens (an empty micro-batch) leave nothing to infer it from
    dy[row_of_slot] = (d[:, None, :] * weights.float()[:, :, None]).reshape(T * topk, H).to(y.dtype)
    dweights = (d[:, None, :] * y[row_of_slot].float().view(T, topk, H)).sum(-1)
    return dy, dweights
