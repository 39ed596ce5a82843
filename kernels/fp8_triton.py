"""Triton kernels of the FP8 quantizers: 1x128 / 128x1 tiles (``_quantize_rows_cols_kernel``) and 128x128
blocks (``_quantize_blocks_kernel``) and their jit helpers. Semantics, tilings and the rounding notes are in ``fp8.py``, which launches these.

Imports Triton: ``fp8.py`` imports this module only inside the branch that launches a kernel, so the
quantizers' reference path works on installs without Triton (see ``dispatch.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_to_e4m3_grid(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest E4M3 value, ties to even, staying in fp32."""
    bits = y.to(tl.int32, bitcast=True)
    mag = tl.abs(y)
    biased_exp = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # E4M3 spacing: 2^(e-3) for normals (e >= -6), 2^-9 for subnormals.
    ulp_exp = tl.maximum(biased_exp, 127 - 6) - 3
    ulp = (ulp_exp << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((254 - ulp_exp) << 23).to(tl.float32, bitcast=True)
    steps = mag * inv_ulp  # exact: power-of-two scaling, result < 16
    steps = (steps + 8388608.0) - 8388608.0  # round to integer, ties to even (fp32 add is RTNE)
    rounded = steps * ulp  # >= 0
    # y's sign bit set on the magnitude, so a negative value that rounds to zero is -0.0 (E4M3 0x80, as PyTorch
    # gives). Not ``-rounded``: Triton 3.6's interpreter negates 0.0 to +0.0, which wrote 0x00 (10 byte tests off)
    return (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along ``axis``, NaN when the tile holds a NaN (as PyTorch's amax): tl.max would skip it, and a
    NaN input would then quantize to finite values instead of poisoning the result."""
    amax = tl.max(tl.abs(x), axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), amax)


@triton.jit
def _scale_from_amax(amax, amax_floor, POWER_OF_TWO: tl.constexpr):
    scale = tl.math.div_rn(tl.where(amax != amax, amax, tl.maximum(amax, amax_floor)), 448.0)  # keep a NaN amax
    if POWER_OF_TWO:
        # round a finite scale up to 2^e; NaN / inf kept: the trick took NaN to -0.0 (the tile's finite values -> -0)
        bits = scale.to(tl.int32, bitcast=True)
        finite_with_mantissa = ((bits & 0x7FFFFF) != 0) & ((bits & 0x7F800000) != 0x7F800000)
        bits = tl.where(finite_with_mantissa, (bits & 0x7F800000) + 0x800000, bits)
        scale = bits.to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _quantize_tile(x, scale):
    """fp32 tile and a broadcastable scale -> e4m3 tile."""
    y = tl.math.div_rn(x, scale)
    q = _round_to_e4m3_grid(tl.minimum(tl.maximum(y, -448.0), 448.0)).to(tl.float8e4nv).to(tl.int8, bitcast=True)
    # NaN (a NaN input, or inf / inf) becomes E4M3's NaN 0x7F whatever its sign, as ref_fp8._cast writes: min/max
    # would turn it into +-448, and the interpreter's fp8 cast does not keep NaN either
    q = tl.where(y != y, 0x7F, q).to(tl.int8)
    return q.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _quantize_rows_cols_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, group_sizes_ptr,
    M, K, NUM_GROUPS,
    stride_xm, stride_qm, stride_sm, stride_qtk, stride_stk, amax_floor,
    EMIT_ROWS: tl.constexpr, EMIT_COLS: tl.constexpr, POWER_OF_TWO: tl.constexpr, GROUPED: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, 128] tile of x: 1x128 row tiles and/or 128x1 column tiles (stored transposed).

    GROUPED (column tiles only): program m is the m-th 128-token tile of the group-aligned layout, i.e. a tile
    of one group's own rows (a group's tiles restart at its first row); programs past the last group's
    tiles write the zero tail of that layout."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    local = tl.arange(0, BLOCK_M)
    if GROUPED:
        groups = tl.arange(0, G_PAD)
        # clamped: an unvalidated negative size made rows before x's start look valid (out-of-bounds reads)
        sizes = tl.maximum(tl.load(group_sizes_ptr + groups, mask=groups < NUM_GROUPS, other=0), 0)
        tiles = (sizes + BLOCK_M - 1) // BLOCK_M
        group = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), axis=0)
        before = groups < group
        local += (pid_m - tl.sum(tl.where(before, tiles, 0), axis=0)) * BLOCK_M
        rows = tl.sum(tl.where(before, sizes, 0), axis=0).to(tl.int64) + local
        row_ok = (local < tl.sum(tl.where(groups == group, sizes, 0), axis=0)) & (rows < M)  # size 0 past the last
    else:
        rows = pid_m.to(tl.int64) * BLOCK_M + local
        row_ok = rows < M
    cols = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if EMIT_ROWS:
        row_scale = _scale_from_amax(_amax(x, 1), amax_floor, POWER_OF_TWO)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], _quantize_tile(x, row_scale[:, None]), mask=mask)
        tl.store(s_ptr + rows * stride_sm + pid_k, row_scale, mask=row_ok)
    if EMIT_COLS:
        # BLOCK_M == 128 here: one scale per column over this 128-row tile
        col_scale = _scale_from_amax(_amax(x, 0), amax_floor, POWER_OF_TWO)
        q = _quantize_tile(x, col_scale[None, :])
        # rows past M or past the group (zeros) fill the padding of qt's storage: one whole 128-token tile per
        # program, at token position pid_m * 128 (== rows without groups)
        tokens = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(qt_ptr + cols[None, :] * stride_qtk + tokens[:, None], q, mask=col_ok[None, :])
        tl.store(st_ptr + cols * stride_stk + pid_m, col_scale, mask=col_ok)


@triton.jit
def _quantize_blocks_kernel(
    w_ptr, q_ptr, s_ptr,
    N, K,
    stride_wb, stride_wn, stride_qb, stride_qn, stride_sb, stride_sn,
    POWER_OF_TWO: tl.constexpr, BLOCK: tl.constexpr,
):
    """One 128x128 block of w[b]: a single scale for the whole block."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + pid_b * stride_wb + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    has_nan = tl.max(tl.max((w != w).to(tl.int32), axis=1), axis=0) > 0
    amax = tl.where(has_nan, float("nan"), tl.max(tl.max(tl.abs(w), axis=1), axis=0))  # see _amax
    scale = _scale_from_amax(amax, 1e-4, POWER_OF_TWO)  # AMAX_FLOOR: weights
    tl.store(q_ptr + pid_b * stride_qb + rows[:, None] * stride_qn + cols[None, :], _quantize_tile(w, scale), mask=mask)
    tl.store(s_ptr + pid_b * stride_sb + pid_n * stride_sn + pid_k, scale)
