"""Token routing for the MoE FFN: expert histogram, permutation by expert, gate-weighted combine.

Everything stays on the device (no ``.item()``/``.tolist()``), so the layer can be captured in a
CUDA graph. The M = T*k routed copies of the tokens are laid out expert by expert ("permuted rows");
``route_tokens`` returns

* ``group_sizes`` int32 [E]: rows per expert (Triton histogram, integer atomics: deterministic),
* ``token_of_row`` int64 [M]: source token of each permuted row (gather index of the permute),
* ``row_of_slot`` int64 [T*k]: permuted row of slot (t, j) (gather index of the combine).

The order inside an expert is token order (``torch.argsort(stable=True)``, a device sort), so every
run produces the same permutation and the per-expert sums in the wgrad are bitwise reproducible.
``combine`` gathers (it never scatters with atomics), so it is deterministic too.

Each launcher is a ``torch.ops.r1fast.moe_*`` operator (fake included, so torch.compile traces the
layer); off the Triton backends the ops run ``ref_moe_permute``.
"""

from __future__ import annotations

import torch

from . import ref_moe_permute as ref
from .dispatch import use_triton
from .launch_math import cdiv, next_power_of_2
from .registration import register_op

# ----------------------------------------------------------------------------------------------- launchers


def _histogram_impl(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    if not use_triton(topk_ids.device):
        return ref.expert_histogram(topk_ids, num_experts)
    from .moe_permute_triton import _histogram_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    ids = topk_ids.reshape(-1).contiguous()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    if ids.numel():
        block = 1024
        _histogram_kernel[(cdiv(ids.numel(), block),)](ids, counts, ids.numel(), num_experts, BLOCK=block)
    return counts


def _gather_rows_impl(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if not use_triton(src.device):
        return ref.gather_rows(src, index)
    from .moe_permute_triton import _gather_rows_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    src = src.contiguous()
    out = torch.empty(index.numel(), src.shape[1], dtype=src.dtype, device=src.device)
    if out.numel():
        block_h = min(1024, next_power_of_2(src.shape[1]))
        grid = (index.numel(), cdiv(src.shape[1], block_h))
        _gather_rows_kernel[grid](src, index, out, src.shape[1], src.stride(0), out.stride(0), BLOCK_H=block_h)
    return out


def _combine_impl(y: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor | None, topk: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    if not use_triton(y.device):
        return ref.combine(y, row_of_slot, weights, topk, out_dtype)
    from .moe_permute_triton import _combine_fwd_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    y = y.contiguous()
    T = row_of_slot.numel() // topk
    H = y.shape[1]
    out = torch.empty(T, H, dtype=out_dtype, device=y.device)
    if out.numel():
        block_h = min(1024, next_power_of_2(H))
        w = weights.contiguous() if weights is not None else y  # dummy pointer when unweighted
        _combine_fwd_kernel[(T, cdiv(H, block_h))](
            y, row_of_slot, w, out, H, y.stride(0), out.stride(0),
            TOPK=topk, HAS_WEIGHTS=weights is not None, BLOCK_H=block_h,
        )
    return out


def _combine_backward_impl(dout: torch.Tensor, y: torch.Tensor, row_of_slot: torch.Tensor,
                           weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(y.device):
        return ref.combine_backward(dout, y, row_of_slot, weights)
    from .moe_permute_triton import _combine_bwd_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    T, topk = weights.shape
    H = y.shape[1]
    dout, y = dout.contiguous(), y.contiguous()
    dy = torch.empty_like(y)
    dweights = torch.empty(T, topk, dtype=torch.float32, device=y.device)
    if T:
        block_h = min(1024, next_power_of_2(H))
        _combine_bwd_kernel[(T,)](
            dout, y, row_of_slot, weights.float().contiguous(), dy, dweights,
            H, dout.stride(0), y.stride(0), dy.stride(0), TOPK=topk, BLOCK_H=block_h,
        )
    return dy, dweights


# --------------------------------------------------------------------------------------------- registration

_histogram_op = register_op(
    "moe_expert_histogram", _histogram_impl,
    fake=lambda topk_ids, num_experts: topk_ids.new_empty(num_experts, dtype=torch.int32))
_gather_rows_op = register_op(
    "moe_gather_rows", _gather_rows_impl,
    fake=lambda src, index: src.new_empty(index.numel(), src.shape[1]))
_combine_op = register_op(
    "moe_combine", _combine_impl,
    fake=lambda y, row_of_slot, weights, topk, out_dtype: y.new_empty(row_of_slot.numel() // topk, y.shape[1],
                                                                      dtype=out_dtype))
_combine_backward_op = register_op(
    "moe_combine_backward", _combine_backward_impl,
    # new_empty, not empty_like: the kernel path returns a contiguous dy whatever y's strides
    fake=lambda dout, y, row_of_slot, weights: (y.new_empty(y.shape),
                                                weights.new_empty(weights.shape, dtype=torch.float32)))


# ----------------------------------------------------------------------------------------------- public


def expert_histogram(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E] count of each expert id in ``topk_ids`` (ids outside [0, E) are not counted)."""
    return _histogram_op(topk_ids, num_experts)


def route_tokens(topk_ids: torch.Tensor, num_experts: int):
    """(group_sizes int32 [E], token_of_row int64 [M], row_of_slot int64 [T*k]) for topk_ids [T, k]."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    group_sizes = expert_histogram(flat, num_experts)
    slot_of_row = torch.argsort(flat, stable=True)
    token_of_row = torch.div(slot_of_row, k, rounding_mode="floor")
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(flat.numel(), device=flat.device)
    return group_sizes, token_of_row, row_of_slot


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[index]`` for a 2-D src (any dtype, fp8 included) in Triton."""
    return _gather_rows_op(src, index)


def combine(y: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor | None, topk: int, out_dtype):
    """[T, H] = sum over the k slots of each token of (weight *) y[row_of_slot]; fp32 accumulation."""
    return _combine_op(y, row_of_slot, weights, topk, out_dtype)


def combine_backward(dout: torch.Tensor, y: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor):
    """Gradients of ``combine(y, row_of_slot, weights)``: (dy [M, H] in y's dtype, dweights fp32 [T, k])."""
    return _combine_backward_op(dout, y, row_of_slot, weights)
