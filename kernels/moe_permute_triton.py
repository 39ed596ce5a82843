"""Triton kernels of MoE token routing: expert histogram, row gather, gate-weighted combine and its backward.
Semantics are in ``moe_permute.py``, which launches these.

Imports Triton: ``moe_permute.py`` imports this module only inside the branch that launches a kernel, so the
routing's reference path works on installs without Triton (see ``dispatch.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_utils import cast_rne


@triton.jit
def _histogram_kernel(ids_ptr, counts_ptr, n, NUM_EXPERTS, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
    valid = (ids >= 0) & (ids < NUM_EXPERTS)
    tl.atomic_add(counts_ptr + ids, tl.full((BLOCK,), 1, tl.int32), mask=valid)


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, dst_ptr, H, stride_src, stride_dst, BLOCK_H: tl.constexpr):
    """dst[r] = src[index[r]]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    src_row = tl.load(index_ptr + row).to(tl.int64)
    vals = tl.load(src_ptr + src_row * stride_src + cols, mask=cols < H)
    tl.store(dst_ptr + row * stride_dst + cols, vals, mask=cols < H)


@triton.jit
def _combine_fwd_kernel(
    y_ptr, row_of_slot_ptr, weights_ptr, out_ptr, H, stride_y, stride_out,
    TOPK: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[row_of_slot[t*k + j]], accumulated in fp32 in slot order."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(row_of_slot_ptr + token * TOPK + j).to(tl.int64)
        y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y = y * tl.load(weights_ptr + token * TOPK + j)
        acc += y
    tl.store(out_ptr + token * stride_out + cols, cast_rne(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(
    dout_ptr, y_ptr, row_of_slot_ptr, weights_ptr, dy_ptr, dweights_ptr,
    H, stride_dout, stride_y, stride_dy,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dy[row] = w[t, j] * dout[t]; dweights[t, j] = <dout[t], y[row]> (fp32), row = row_of_slot[t*k+j]."""
    token = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(TOPK):
        row = tl.load(row_of_slot_ptr + token * TOPK + j).to(tl.int64)
        w = tl.load(weights_ptr + token * TOPK + j)
        dot_acc = tl.zeros((BLOCK_H,), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            d = tl.load(dout_ptr + token * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + row * stride_dy + cols, cast_rne(d * w, dy_ptr.dtype.element_ty), mask=mask)
            dot_acc += d * y
        tl.store(dweights_ptr + token * TOPK + j, tl.sum(dot_acc, axis=0))
