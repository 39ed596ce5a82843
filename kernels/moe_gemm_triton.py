"""Triton kernels of the grouped FP8 GEMMs: forward/dgrad (``_grouped_gemm_kernel``) and wgrad
(``_grouped_wgrad_kernel``). Layouts, scaling and the Hopper tuning notes are in ``moe_gemm.py``, which
launches these.

Imports Triton: ``moe_gemm.py`` imports this module only inside the branch that launches a kernel, so the
GEMMs' reference path works on installs without Triton (see ``dispatch.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_utils import cast_rne, dot


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, group_sizes_ptr, out_ptr,
    M, N, K, NUM_EXPERTS,
    stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_om,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, E_PAD)
    sizes = tl.maximum(tl.load(group_sizes_ptr + experts, mask=experts < NUM_EXPERTS, other=0), 0)  # see fp8_triton.py
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    if expert >= NUM_EXPERTS:  # past the last tile of the upper-bound grid
        return
    before = experts < expert
    tile_in_expert = pid_m - tl.sum(tl.where(before, tiles, 0), axis=0)
    row_start = tl.sum(tl.where(before, sizes, 0), axis=0).to(tl.int64)
    size = tl.sum(tl.where(experts == expert, sizes, 0), axis=0)

    local = tile_in_expert * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_start + local
    row_ok = (local < size) & (rows < M)  # rows < M guards group sizes that overshoot M
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    e64 = expert.to(tl.int64)
    b_base = b_ptr + e64 * stride_be
    b_scale_row = b_scale_ptr + e64 * stride_bse + (pid_n * BLOCK_N // 128) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K % 128 == 0 (checked by the launcher): no K mask
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(b_base + cols[None, :] * stride_bn + ks[:, None], mask=col_ok[None, :], other=0.0)
        chunk = dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), tl.float32))  # fresh fp32 accumulator per 128 of K
        a_scale = tl.load(a_scale_ptr + rows * stride_asm + k0 // BLOCK_K, mask=row_ok, other=0.0)
        b_scale = tl.load(b_scale_row + k0 // BLOCK_K)
        acc += chunk * (a_scale[:, None] * b_scale)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], cast_rne(acc, out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    at_ptr, at_scale_ptr, bt_ptr, bt_scale_ptr, group_sizes_ptr, out_ptr,
    M, N, K, NUM_EXPERTS,
    stride_atn, stride_asn, stride_btk, stride_bsk, stride_oe, stride_on,
    ACCUMULATE: tl.constexpr, GROUP_ALIGNED: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    experts = tl.arange(0, E_PAD)
    sizes = tl.maximum(tl.load(group_sizes_ptr + experts, mask=experts < NUM_EXPERTS, other=0), 0)  # see fp8_triton.py
    if GROUP_ALIGNED:  # each expert's tokens start at a whole tile: no tile is shared with another expert
        tiles = (sizes + BLOCK_T - 1) // BLOCK_T
        row_start = tl.sum(tl.where(experts < expert, tiles, 0), axis=0).to(tl.int64) * BLOCK_T
    else:
        row_start = tl.sum(tl.where(experts < expert, sizes, 0), axis=0).to(tl.int64)
    row_end = tl.minimum(row_start + tl.sum(tl.where(experts == expert, sizes, 0), axis=0), M)
    ns = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for tile in range(row_start // BLOCK_T, (row_end + BLOCK_T - 1) // BLOCK_T):  # global 128-token tiles
        toks = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = (toks >= row_start) & (toks < row_end)
        # Whole-tile loads along tokens (the launcher guarantees storage padded to 128 tokens): a mask along
        # the contiguous token axis keeps Triton from pipelining the loads (compiled for sm_90a: no async
        # copies and 64 KB of shared memory, against 4 stages and 128 KB without it). Tokens of the
        # neighbouring expert and the padding are zeroed in registers instead (A may feed wgmma from there).
        a = tl.load(at_ptr + ns[:, None] * stride_atn + toks[None, :], mask=n_ok[:, None], other=0.0)
        a = tl.where(t_ok[None, :], a, tl.zeros_like(a))
        b = tl.load(bt_ptr + ks[None, :] * stride_btk + toks[:, None], mask=k_ok[None, :], other=0.0)
        chunk = dot(a, b, tl.zeros((BLOCK_N, BLOCK_K), tl.float32))  # fresh fp32 accumulator per 128 tokens
        a_scale = tl.load(at_scale_ptr + ns * stride_asn + tile, mask=n_ok, other=0.0)
        b_scale = tl.load(bt_scale_ptr + ks * stride_bsk + tile, mask=k_ok, other=0.0)
        acc += chunk * (a_scale[:, None] * b_scale[None, :])
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ns[:, None] * stride_on + ks[None, :]
    mask = n_ok[:, None] & k_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)
