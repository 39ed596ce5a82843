"""FP8 (E4M3) quantizers of the DeepSeek-V3 recipe, in Triton.

Tilings (scale = max(amax, amax_floor) / 448 per tile, dequant = fp8 * scale):

* ``quantize_fp8_1x128(x)``      activations: one scale per row and 128 columns -> scale [M, ceil(K/128)]
* ``quantize_fp8_128x1(x)``      one scale per 128 rows of a column (along the token axis), emitted
                                 transposed: ``(xt_fp8 [K, M], scale [K, ceil(M/128)])``, equal to
                                 ``quantize_fp8_1x128(x.T)``; with ``group_sizes`` the tiles restart at every
                                 group (expert) and the output is in the group-aligned layout (see there)
* ``quantize_fp8_128x128(w)``    weights: one scale per 128x128 block -> [ceil(N/128), ceil(K/128)];
                                 also accepts stacked expert weights [E, N, K]
* ``quantize_fp8_1x128_dual(x)`` the 1x128 tiling and, from the same read of ``x``, the 128x1 tiling
                                 along the token axis that the weight gradient needs, emitted
                                 transposed: ``(x_fp8, x_scale, xt_fp8 [K, M], xt_scale [K, ceil(M/128)])``,
                                 i.e. the second pair equals ``quantize_fp8_1x128(x.T)`` bit for bit.
                                 Token-contiguous ``xt`` is the K-major operand layout Hopper's FP8
                                 tensor cores want for the token-reduction GEMM.

``amax_floor`` (the 1x128 / 128x1 quantizers) is the smallest amax a tile's scale is computed from:
``AMAX_FLOOR`` = 1e-4, the recipe's, for activations (the default) and always for 128x128 weight blocks;
``GRAD_AMAX_FLOOR`` = 1e-20 for gradients, which are routinely far below 1e-4.
``power_of_two=True`` rounds each scale up to a power of two (dequant is then exact scaling by 2^e).
The last tile may be ragged (K or M not a multiple of 128): its scale covers the valid elements only.
Non-finite input poisons exactly its tile, on the kernels and ``ref_fp8`` alike (bytes bit for bit): a NaN makes
the tile's scale NaN and every byte E4M3's NaN; a +-inf makes the scale inf, its own byte NaN and the tile's
finite values +-0, so the whole tile dequantizes to NaN (0 * inf). ``isfinite(scale)`` catches both, also with
``power_of_two``. The NaN byte is always 0x7F, whatever the NaN's sign (x86's inf / inf is negative).

Rounding. Triton 3.9's interpreter converts fp32 -> fp8 wrongly (round-half-up instead of
round-half-to-even, and a mantissa carry that overflows into the wrong exponent: 127.99 -> 64,
measured on this repo's CI machine). The kernels therefore round ``x / scale`` to the E4M3 grid in
fp32 themselves (``fp8_triton._round_to_e4m3_grid``: exact power-of-two rescaling plus the 2^23 magic-number
round-to-nearest-even), after which the cast to fp8 is exact in any rounding mode, so compiled and
interpreted kernels produce the same bytes as PyTorch's ``.to(torch.float8_e4m3fn)``. Divisions use
``div_rn`` (IEEE) so the scales and quotients match PyTorch's fp32 division bit for bit.
"""

from __future__ import annotations

import numbers

import torch

from .dispatch import check_same_device, use_triton
from .launch_math import cdiv, next_power_of_2
from .registration import host_checks_enabled, register_op

FP8_MAX = 448.0
"""Largest finite E4M3 value."""
AMAX_FLOOR = 1e-4
"""Tiles whose amax is below this get the scale of this amax (keeps all-zero tiles finite). The recipe's
value, right for activations and weights."""
GRAD_AMAX_FLOOR = 1e-20
"""The floor for gradients (the MoE layer's dy and dh). A loss normalized by millions of tokens gives
gradients far below 1e-4: with that floor a tile of amax 1e-8 was 15% off, 1e-9 75% and 1e-10 flushed
to zero. 1e-20 keeps every scale, and its product with a weight scale (>= 1e-4 / 448), a normal fp32;
gradients smaller than that are below anything AdamW's eps lets through."""
_MIN_AMAX_FLOOR = FP8_MAX * torch.finfo(torch.float32).tiny  # smaller floors give subnormal scales
TILE = 128
"""Scale-tile length of the recipe."""


# ----------------------------------------------------------------------------------------------- launchers


def _check_float(name: str, t: torch.Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def aligned_tokens(num_tokens: int, num_groups: int) -> int:
    """Token length of the group-aligned 128x1 layout: every group's tokens start at a multiple of 128, so the
    layout holds at most ceil(M/128) + E tiles (an upper bound: sizing it needs no host sync)."""
    return TILE * (cdiv(num_tokens, TILE) + num_groups)


def _empty_outputs(x: torch.Tensor, emit_rows: bool, emit_cols: bool, group_sizes: torch.Tensor | None = None):
    """Outputs of ``_rows_cols_impl``. The 128x1 tiling ``qt`` [K, M] lives in storage padded to whole
    128-token tiles (row stride ceil(M/128)*128, the padding quantized zero rows: zeros, NaN bytes in a
    column tile holding a NaN), so the weight-gradient GEMM reads whole tiles without a mask along tokens
    (see ``moe_gemm_triton._grouped_wgrad_kernel``). With ``group_sizes`` it is [K, aligned_tokens(M, E)], already
    whole tiles."""
    M, K = x.shape
    tokens = M if group_sizes is None else aligned_tokens(M, group_sizes.shape[0])
    nk, nm = cdiv(K, TILE), cdiv(tokens, TILE)
    fp8 = dict(dtype=torch.float8_e4m3fn, device=x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    qt = torch.empty((K, nm * TILE), **fp8)[:, :tokens] if emit_cols else torch.empty((0, 0), **fp8)
    return (torch.empty((M, K) if emit_rows else (0, 0), **fp8), torch.empty((M, nk) if emit_rows else (0, 0), **f32),
            qt, torch.empty((K, nm) if emit_cols else (0, 0), **f32))


def _rows_cols_impl(x: torch.Tensor, emit_rows: bool, emit_cols: bool, power_of_two: bool, amax_floor: float,
                    group_sizes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1x128 tiles of x (if emit_rows) and 128x1 tiles stored transposed (if emit_cols); empty when not asked.
    ``group_sizes`` (with emit_cols): the 128x1 tiles in the group-aligned layout."""
    if not use_triton(x.device):
        from .ref_fp8 import group_aligned_rows
        from .ref_fp8 import quantize_fp8_1x128 as ref

        q, s, qt, st = _empty_outputs(x, False, False)  # the (0, 0) placeholders of what is not asked
        if emit_rows:
            q, s = ref(x, power_of_two=power_of_two, amax_floor=amax_floor)
        if emit_cols:
            # x's rows (each group's at its aligned position) in whole 128-token tiles, zeros between: the storage's
            # padding quantized as the kernel does (NaN bytes in a NaN column tile, else zeros), bit for bit
            M = x.shape[0]
            tokens = M if group_sizes is None else aligned_tokens(M, group_sizes.shape[0])
            # one spare row last, where the rows in no group (unvalidated sizes summing below M: position -1) go
            cols = x.new_zeros(cdiv(tokens, TILE) * TILE + 1, x.shape[1])
            cols[slice(None, M) if group_sizes is None else group_aligned_rows(group_sizes, M)] = x
            cols = cols[:-1]
            padded_qt, st = ref(cols.t(), power_of_two=power_of_two, amax_floor=amax_floor)
            qt = padded_qt[:, :tokens]  # the padded layout the op promises
        return q, s, qt, st
    from .fp8_triton import _quantize_rows_cols_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    q, s, qt, st = _empty_outputs(x, emit_rows, emit_cols, group_sizes)
    x = x.contiguous()
    M, K = x.shape
    grouped = group_sizes is not None and emit_cols
    if K and (M or grouped):  # grouped: the zero tiles of the layout are written even for M = 0
        block_m = TILE if emit_cols else 32
        groups = group_sizes.shape[0] if grouped else 0
        grid = (cdiv(M, block_m) + groups, cdiv(K, TILE))
        _quantize_rows_cols_kernel[grid](
            x, q, s, qt, st, group_sizes if grouped else x, M, K, groups,
            x.stride(0), max(q.stride(0), 1), max(s.stride(0), 1), max(qt.stride(0), 1), max(st.stride(0), 1),
            amax_floor, EMIT_ROWS=emit_rows, EMIT_COLS=emit_cols, POWER_OF_TWO=power_of_two, GROUPED=grouped,
            G_PAD=next_power_of_2(max(groups, 1)),
            # the 128x128 tile of the column tiling spills at 4 warps (255 registers, 352 B of spill
            # stores compiling for sm_90a); 8 warps: 164 registers, no spills
            BLOCK_M=block_m, BLOCK_K=TILE, num_warps=8 if emit_cols else 4,
        )
    return q, s, qt, st


def _blocks_impl(w: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked w [B, N, K] -> (e4m3 [B, N, K], scale [B, ceil(N/128), ceil(K/128)]), one scale per 128x128 block."""
    if not use_triton(w.device):
        from .ref_fp8 import quantize_fp8_128x128 as ref

        return ref(w, power_of_two=power_of_two)
    from .fp8_triton import _quantize_blocks_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    w = w.contiguous()
    B, N, K = w.shape
    nn, nk = cdiv(N, TILE), cdiv(K, TILE)
    q = torch.empty((B, N, K), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((B, nn, nk), dtype=torch.float32, device=w.device)
    if B and N and K:
        _quantize_blocks_kernel[(B, nn, nk)](
            w, q, s, N, K,
            w.stride(0), w.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
            POWER_OF_TWO=power_of_two, BLOCK=TILE, num_warps=8,
        )
    return q, s


# -------------------------------------------------------------------------------------------- registration

_rows_cols_op = register_op(
    "fp8_quantize_rows_cols", _rows_cols_impl,
    fake=lambda x, emit_rows, emit_cols, power_of_two, amax_floor, group_sizes: _empty_outputs(
        x, emit_rows, emit_cols, group_sizes))
_blocks_op = register_op(
    "fp8_quantize_blocks", _blocks_impl,
    # new_empty, not empty_like: the op returns contiguous q whatever w's strides (empty_like kept a
    # transposed w's strides, so compiling quantize(w.t())[0].view(-1) failed at trace time)
    fake=lambda w, power_of_two: (w.new_empty(w.shape, dtype=torch.float8_e4m3fn),
                                  w.new_empty(w.shape[0], cdiv(w.shape[1], TILE), cdiv(w.shape[2], TILE),
                                              dtype=torch.float32)))


# -------------------------------------------------------------------------------------- public functions


def _check_amax_floor(amax_floor) -> float:
    # numbers.Real: numpy scalars are no Python float (np.float32(1e-4) was refused as "not a finite number")
    if isinstance(amax_floor, bool) or not isinstance(amax_floor, numbers.Real) or \
            not _MIN_AMAX_FLOOR <= amax_floor < float("inf"):
        raise ValueError(f"amax_floor must be a finite number >= {_MIN_AMAX_FLOOR:.3g} (smaller ones give subnormal "
                         f"scales), got {amax_floor!r}")
    return float(amax_floor)


@torch.no_grad()  # quantized values and scales have no gradient (straight-through is the caller's)
def quantize_fp8_1x128(x: torch.Tensor, *, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """x [M, K] float -> (x_fp8 [M, K] e4m3, scale fp32 [M, ceil(K/128)]), one scale per 1x128 tile.

    scale = max(amax, ``amax_floor``) / 448: the recipe's 1e-4 for activations, ``GRAD_AMAX_FLOOR`` for
    gradients (which are routinely far below 1e-4). A NaN (inf) in a tile: scale NaN (inf), tile NaN once
    dequantized (module docstring)."""
    _check_float("x", x, (2,))
    q, s, _, _ = _rows_cols_op(x, True, False, power_of_two, _check_amax_floor(amax_floor), None)
    return q, s


def _check_groups(group_sizes, x: torch.Tensor, validate: bool | None):
    """``group_sizes`` of the 128x1 tilings: None, or an int32/int64 [E] tensor on x's device summing to M."""
    if group_sizes is None:
        return None
    if not isinstance(group_sizes, torch.Tensor) or group_sizes.dtype not in (torch.int32, torch.int64) \
            or group_sizes.dim() != 1:
        raise ValueError(f"group_sizes must be a 1-D int32/int64 tensor (rows per group), got "
                         f"{getattr(group_sizes, 'dtype', type(group_sizes).__name__)} "
                         f"{tuple(getattr(group_sizes, 'shape', ()))}")
    # the kernel reads the sizes through a raw pointer: on meta (value checks skipped) it quantized garbage
    check_same_device("x", x, (("group_sizes", group_sizes),))
    num_rows = x.shape[0]
    if validate is None:
        validate = host_checks_enabled(group_sizes)
    if validate and (bool((group_sizes < 0).any()) or int(group_sizes.sum()) != num_rows):  # E = 0 with rows too
        raise ValueError(f"group_sizes must be non-negative and sum to {num_rows} (the rows of x), "
                         f"got {group_sizes.tolist()}")
    return group_sizes.contiguous()


@torch.no_grad()
def quantize_fp8_128x1(x: torch.Tensor, *, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR,
                       group_sizes: torch.Tensor | None = None, validate: bool | None = None):
    """x [M, K] -> (xt_fp8 [K, M], scale [K, ceil(M/128)]): 128x1 tiles along M, stored transposed.

    Equals ``quantize_fp8_1x128(x.T)`` without materializing the transpose in high precision, NaN / inf tiles too.

    ``group_sizes`` int32/int64 [E] (x's rows contiguous per group, e.g. per expert): no tile mixes two groups.
    The tiles restart at every group's first row and the result is in the **group-aligned layout**:
    xt [K, aligned_tokens(M, E)] with group e's tokens starting at token 128 * sum_{j<e} ceil(size_j/128),
    zeros elsewhere (NaN bytes in the padding of a column whose tile holds a NaN, whose scale is NaN), scale
    [K, aligned_tokens(M, E) / 128]; ``fp8_grouped_gemm_wgrad(..., group_aligned=True)`` reads it. Why: a tile
    shared by two experts gives them one scale per column, so one expert's outlier (or NaN) coarsens (or
    poisons) another expert's weight gradient.
    ``validate``: check that group_sizes are non-negative and sum to M (a host read; None = unless compiling or
    capturing). With ``validate=False`` the caller guarantees it: rows past the sizes' sum are not quantized
    (nor the dual's 1x128 rows), negative sizes count as 0, and nothing outside x and the outputs is touched.
    """
    _check_float("x", x, (2,))
    groups = _check_groups(group_sizes, x, validate)
    _, _, qt, st = _rows_cols_op(x, False, True, power_of_two, _check_amax_floor(amax_floor), groups)
    return qt, st


@torch.no_grad()
def quantize_fp8_1x128_dual(x: torch.Tensor, *, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR,
                            group_sizes: torch.Tensor | None = None, validate: bool | None = None):
    """Both tilings from one read of x: ``(*quantize_fp8_1x128(x), *quantize_fp8_128x1(x, group_sizes=...))``."""
    _check_float("x", x, (2,))
    groups = _check_groups(group_sizes, x, validate)
    return _rows_cols_op(x, True, True, power_of_two, _check_amax_floor(amax_floor), groups)


@torch.no_grad()
def quantize_fp8_128x128(w: torch.Tensor, *, power_of_two: bool = False):
    """w [N, K] or stacked [E, N, K] -> (w_fp8 same shape, scale [(E,) ceil(N/128), ceil(K/128)]).

    A NaN (inf) in a block: scale NaN (inf), the block NaN once dequantized (module docstring)."""
    _check_float("w", w, (2, 3))
    if w.dim() == 2:
        q, s = _blocks_op(w.unsqueeze(0), power_of_two)
        return q[0], s[0]
    return _blocks_op(w, power_of_two)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 ``q * scale`` with each scale entry covering a ``block`` of the last two dims (ragged ok).

    ValueError unless ``scale`` has q's leading dims and ceil(rows / block[0]) x ceil(cols / block[1]) entries
    last: a wider scale was silently cut to fit (the wrong tiling read as the right one), a narrower one raised
    a broadcasting RuntimeError."""
    from .ref_fp8 import dequantize_fp8 as ref

    if q.dim() < 2:
        raise ValueError(f"q must have at least 2 dims, got shape {tuple(q.shape)}")
    rows, cols = q.shape[-2:]
    expected = (*q.shape[:-2], cdiv(rows, block[0]), cdiv(cols, block[1]))
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale must have shape {expected} for q of shape {tuple(q.shape)} in {tuple(block)} blocks, "
                         f"got {tuple(scale.shape)}")
    return ref(q, scale, block)
