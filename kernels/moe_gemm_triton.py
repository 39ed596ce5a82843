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
def _wgrad_tile(acc, tile, at_ptrs, n_ok, bt_ptrs, k_ok, scales, row_start, row_end,
                MASK_TOKENS: tl.constexpr, BLOCK_T: tl.constexpr):
    """``acc`` plus one 128-token tile's product, rescaled: ``_grouped_wgrad_kernel``'s loop body.

    ``scales``: the tile's [BLOCK, 2] scales (column 0: at's of row n, column 1: bt's of column k).
    ``MASK_TOKENS``: the tile holds tokens outside [row_start, row_end) (the previous expert's, or those past
    the last token), which both loads read as zeros: padding may hold any bytes (a caller's torch.empty
    buffer; 0x7F and 0xFF are e4m3 NaN, and 0 x NaN is NaN), so zeroing one operand is not enough. Only an
    expert's first and last tiles can: the pipelined loop over the others has no token mask (a mask along the
    contiguous token axis keeps Triton from issuing async copies, and a ``where`` on A routed it
    shared -> registers -> shared before every wgmma).
    """
    toks = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    a_ok = n_ok[:, None]
    b_ok = k_ok[None, :]
    if MASK_TOKENS:
        t_ok = (toks >= row_start) & (toks < row_end)
        a_ok = a_ok & t_ok[None, :]
        b_ok = b_ok & t_ok[:, None]
    a = tl.load(at_ptrs + toks[None, :], mask=a_ok, other=0.0)
    b = tl.load(bt_ptrs + toks[:, None], mask=b_ok, other=0.0)
    a_scale, b_scale = tl.split(scales)
    chunk = dot(a, b, tl.zeros((a.shape[0], b.shape[1]), tl.float32))  # fresh fp32 accumulator per 128 tokens
    return acc + chunk * (a_scale[:, None] * b_scale[None, :])


@triton.jit
def _tile_scales(scale_ptrs, scale_ok, tile, end):
    """``tile``'s [BLOCK, 2] scales if ``tile < end``, else zeros (no read past the scales' last tile)."""
    # the bound as a full tensor: the interpreter makes `bool tensor & bool scalar` an int32 mask, which
    # tl.load refuses
    in_range = (tl.zeros(scale_ok.shape, tl.int64) + tile) < end
    return tl.load(scale_ptrs + tile, mask=scale_ok & in_range, other=0.0)


@triton.jit
def _grouped_wgrad_kernel(
    at_ptr, at_scale_ptr, bt_ptr, bt_scale_ptr, group_sizes_ptr, out_ptr,
    M, N, K, NUM_EXPERTS,
    stride_atn, stride_asn, stride_btk, stride_bsk, stride_oe, stride_on,
    ACCUMULATE: tl.constexpr, GROUP_ALIGNED: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tl.static_assert(BLOCK_N == BLOCK_K)  # the [BLOCK, 2] scale tile pairs row n with column k
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
    # Whole-tile loads along tokens (the launcher guarantees storage padded to 128 tokens).
    at_ptrs = at_ptr + ns[:, None] * stride_atn
    bt_ptrs = bt_ptr + ks[None, :] * stride_btk
    # Both scale vectors of a tile in one [BLOCK, 2] load: 256 values, one per thread, which Triton keeps in
    # that blocked layout and hands to the accumulator's layout through shared memory. As two [BLOCK] loads
    # they were made in the accumulator's layout, where every thread keeps the addresses and masks of its 32
    # columns live across the loop: most of what made this kernel spill (255 registers; 797 B of spills under
    # Triton 3.6, 225 B under 3.9; now 237-248 registers and none under either, compiled for sm_90a).
    side = tl.arange(0, 2)[None, :]
    scale_ptrs = tl.where(side == 0, at_scale_ptr + ns[:, None] * stride_asn, bt_scale_ptr + ks[:, None] * stride_bsk)
    scale_ok = ((side == 0) & n_ok[:, None]) | ((side == 1) & k_ok[:, None])  # tl.where of bools: int64 interpreted

    # The expert's global 128-token tiles are first .. last - 1. The boundary ones, which need the token
    # mask, run first, out of the loop: the head (a tile shared with the previous expert: unaligned layout
    # only) and the tail (the partial tile holding row_end, unless it is the head). Then the inner tiles.
    # Each tile's fp32 product is the one a single masked loop computed; only the order of the fp32
    # additions into acc differs (the tail before the inner tiles: after the loop, its operands' addresses
    # stayed live through the loop: 249-254 registers against 237-239, before B got its boundary mask).
    first = row_start // BLOCK_T
    # an expert with no tokens has no tiles: one starting inside a tile (unaligned layout) added that tile's
    # all-masked product times its scales, NaN when another expert's NaN / inf had set them (0 x NaN)
    last = tl.where(row_end > row_start, (row_end + BLOCK_T - 1) // BLOCK_T, first)
    inner_start = first
    inner_end = row_end // BLOCK_T  # tiles before it end at or before row_end
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if not GROUP_ALIGNED:
        if (row_start % BLOCK_T != 0) & (first < last):
            head_scales = tl.load(scale_ptrs + first, mask=scale_ok, other=0.0)
            acc = _wgrad_tile(acc, first, at_ptrs, n_ok, bt_ptrs, k_ok, head_scales, row_start, row_end, True, BLOCK_T)
            inner_start = first + 1
    if (inner_end < last) & (inner_end >= inner_start):
        tail_scales = tl.load(scale_ptrs + inner_end, mask=scale_ok, other=0.0)
        acc = _wgrad_tile(acc, inner_end, at_ptrs, n_ok, bt_ptrs, k_ok, tail_scales, row_start, row_end, True, BLOCK_T)
    # The scales are prefetched one tile ahead: the load's latency hides behind the MMA.
    scales = _tile_scales(scale_ptrs, scale_ok, inner_start, inner_end)
    for tile in range(inner_start, inner_end):
        next_scales = _tile_scales(scale_ptrs, scale_ok, tile + 1, inner_end)
        acc = _wgrad_tile(acc, tile, at_ptrs, n_ok, bt_ptrs, k_ok, scales, row_start, row_end, False, BLOCK_T)
        scales = next_scales
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ns[:, None] * stride_on + ks[None, :]
    mask = n_ok[:, None] & k_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)
