"""Grouped FP8 GEMMs of the DeepSeek-V3 recipe (Triton): forward/dgrad and wgrad.

``fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes)``: rows of ``a`` [M, K] are contiguous per
expert (``group_sizes`` int32 [E] on the device, any sizes incl. 0); ``b`` [E, N, K] with 128x128
block scales. out[rows of e] = dequant(a_e) @ dequant(b_e).T in bf16. FP32 promotion every 128 of K:
each 128-wide K chunk is multiplied into a fresh fp32 accumulator (the tensor-core MMA), which is
then scaled by a_scale (per row) x b_scale (per block) and added to the main fp32 accumulator.
The same kernel is the **dgrad**: dx = dy @ W needs b = W^T [E, K, N], the 128x128 blocks of which
are the transposed blocks of W with the same scales (``Fp8Weight.t``), so dgrad is exact reuse.

No host sync: the grid is sized by the upper bound ceil(M/BLOCK_M) + E row tiles; each program
computes the per-expert tile prefix sums from ``group_sizes`` in registers and finds its
(expert, row block), and programs past the last tile exit.

``fp8_grouped_gemm_wgrad(at, at_scale, bt, bt_scale, group_sizes)``: dW[e] = dy_e^T @ x_e in fp32,
reduced over the tokens of expert e, both operands in the 128x1 token-axis tiling stored transposed
(``quantize_fp8_128x1``). Token tiles are the global 128-row tiles of the permuted buffer, so an
expert that starts inside a tile uses that tile's scales and masks the other expert's rows out; with
``group_aligned=True`` (the MoE layer's choice) the operands are in the group-aligned layout of
``quantize_fp8_128x1(..., group_sizes=)``, where every expert starts on a tile of its own.

Hopper tuning (reasoned, not yet measured: no GPU in the session that wrote this): BLOCK_K = 128 is
fixed by the recipe (one scale pair per K chunk); BLOCK_M = BLOCK_N = 128 gives one 128x128 B scale
per program and a 128x128 wgmma tile; 4 stages x (16 KiB A + 16 KiB B) = 128 KiB of shared memory;
8 warps (two warpgroups) so the rescale FMA of one chunk can overlap the next chunk's MMA. The
plain loop still serializes MMA and rescale (the ~650 TFLOP/s of ANCHORS.md); the warp-specialized /
persistent schedule that reaches >= 1,250 is not done.
The autograd layer ``moe_ffn_fp8`` and its weight cache live in ``moe_layer.py`` (re-exported here).
"""

from __future__ import annotations

import torch

from .dispatch import check_same_device, use_triton
from .fp8 import aligned_tokens
from .launch_math import cdiv, next_power_of_2
from .registration import host_checks_enabled, register_op

TILE = 128


# ----------------------------------------------------------------------------------------------- launchers


def _check_fp8(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name} must be a torch.float8_e4m3fn tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_scale(name: str, t, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be float32 of shape {shape}, got {getattr(t, 'dtype', None)} "
                         f"{tuple(getattr(t, 'shape', ()))}")


def _check_group_sizes(group_sizes, num_experts: int, total: int, validate: bool | None, aligned: bool = False) -> None:
    """``aligned``: ``total`` is the token length of the group-aligned layout (``fp8.aligned_tokens``)."""
    if not isinstance(group_sizes, torch.Tensor) or group_sizes.dtype not in (torch.int32, torch.int64):
        raise ValueError("group_sizes must be an int32/int64 tensor")
    if num_experts < 0 and group_sizes.dim() != 1:  # the wgrad takes E from group_sizes: no E to name
        raise ValueError(f"group_sizes must be 1-D [E] (one size per expert), got shape {tuple(group_sizes.shape)}")
    if tuple(group_sizes.shape) != (num_experts,):
        raise ValueError(f"group_sizes must have shape ({num_experts},) (one per expert), got {tuple(group_sizes.shape)}")
    if validate is None:  # default: check whenever it costs no graph break (reads the sizes on the host)
        validate = host_checks_enabled(group_sizes)
    if validate:
        if bool((group_sizes < 0).any()):
            raise ValueError(f"group_sizes must be non-negative, got {group_sizes.tolist()}")
        rows = int(group_sizes.sum())
        if aligned and aligned_tokens(rows, num_experts) != total:
            raise ValueError(f"group_sizes sum to {rows}, whose group-aligned layout has "
                             f"{aligned_tokens(rows, num_experts)} tokens, but the token operand has {total}")
        if not aligned and rows != total:
            raise ValueError(f"group_sizes must be non-negative and sum to {total} (rows of the token operand), "
                             f"got {group_sizes.tolist()}")


def _grouped_gemm_impl(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       group_sizes: torch.Tensor, out: torch.Tensor) -> None:
    if not use_triton(a.device):
        from .ref_fp8 import fp8_grouped_gemm as ref

        ref(a, a_scale, b, b_scale, group_sizes, out=out)
        return
    M, K = a.shape
    E, N, _ = b.shape
    if M == 0 or N == 0 or E == 0:
        return
    from .moe_gemm_triton import _grouped_gemm_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    a, b, a_scale, b_scale = a.contiguous(), b.contiguous(), a_scale.contiguous(), b_scale.contiguous()
    group_sizes = group_sizes.contiguous()  # read as sizes_ptr + e: a strided view gave garbage sizes
    block_m, block_n = 128, 128
    grid = (cdiv(M, block_m) + E, cdiv(N, block_n))
    _grouped_gemm_kernel[grid](
        a, a_scale, b, b_scale, group_sizes, out, M, N, K, E,
        a.stride(0), a_scale.stride(0), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1), out.stride(0),
        E_PAD=next_power_of_2(E), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=TILE,
        num_warps=8, num_stages=4,
    )


def _token_padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` [R, M] (128x1 tiling, tokens contiguous) readable in whole 128-token tiles: as is when its storage
    already holds the padding (``quantize_fp8_128x1`` allocates it, zero-filled), else a zero-padded copy."""
    rows, m = t.shape
    m_pad = cdiv(m, TILE) * TILE
    if t.stride(1) == 1 and rows and (m == m_pad or t.stride(0) >= m_pad):
        needed = (t.storage_offset() + (rows - 1) * t.stride(0) + m_pad) * t.element_size()
        if t.untyped_storage().nbytes() >= needed:
            return t
    padded = torch.zeros(max(rows, 1), m_pad, dtype=t.dtype, device=t.device)[:rows]
    padded[:, :m].copy_(t)
    return padded


def _grouped_wgrad_impl(at: torch.Tensor, at_scale: torch.Tensor, bt: torch.Tensor, bt_scale: torch.Tensor,
                        group_sizes: torch.Tensor, out: torch.Tensor, accumulate: bool, group_aligned: bool) -> None:
    if not use_triton(at.device):
        from .ref_fp8 import fp8_grouped_gemm_wgrad as ref

        ref(at, at_scale, bt, bt_scale, group_sizes, out=out, accumulate=accumulate, group_aligned=group_aligned)
        return
    if out.numel() == 0:
        return
    from .moe_gemm_triton import _grouped_wgrad_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    N, M = at.shape
    K = bt.shape[0]
    E = group_sizes.shape[0]
    at, bt, at_scale, bt_scale = _token_padded(at), _token_padded(bt), at_scale.contiguous(), bt_scale.contiguous()
    group_sizes = group_sizes.contiguous()  # read as sizes_ptr + e: a strided view gave garbage sizes
    block_n, block_k = 128, 128
    grid = (E, cdiv(N, block_n), cdiv(K, block_k))
    _grouped_wgrad_kernel[grid](
        at, at_scale, bt, bt_scale, group_sizes, out, M, N, K, E,
        at.stride(0), at_scale.stride(0), bt.stride(0), bt_scale.stride(0), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, GROUP_ALIGNED=group_aligned, E_PAD=next_power_of_2(E),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_T=TILE, num_warps=8, num_stages=4,
    )


# -------------------------------------------------------------------------------------------- registration

# Both ops fill a caller-provided ``out`` (mutated, nothing returned): the public functions take ``out=``.
_grouped_gemm_op = register_op("fp8_grouped_gemm", _grouped_gemm_impl, fake=lambda *args: None,
                               mutates_args=("out",))
_grouped_wgrad_op = register_op("fp8_grouped_gemm_wgrad", _grouped_wgrad_impl, fake=lambda *args: None,
                                mutates_args=("out",))


# ----------------------------------------------------------------------------------------------- public


def fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out=None, validate: bool | None = None):
    """Grouped block-scaled FP8 GEMM: bf16 [M, N], out[rows of e] = dequant(a_e) @ dequant(b[e]).T.

    a [M, K] e4m3 + a_scale fp32 [M, K/128] (1x128 tiles); b [E, N, K] e4m3 + b_scale fp32
    [E, ceil(N/128), K/128] (128x128 blocks); group_sizes int32 [E] on a's device. K must be a multiple
    of 128: the recipe promotes every 128 of K, one scale pair per chunk, and whole chunks keep the
    inner loop free of masks (pad the reduction dim with zeros if a model's is not). ``validate``:
    check that group_sizes sums to M (reads it on the host). None = check unless a CUDA graph is being
    captured or torch.compile traces; internal callers whose sizes come from ``route_tokens`` pass
    False so the training step never syncs.
    """
    _check_fp8("a", a, 2)
    _check_fp8("b", b, 3)
    M, K = a.shape
    E, N, Kb = b.shape
    if Kb != K:
        raise ValueError(f"b must have K = {K} (a's last dim) as its last dim, got {Kb}")
    if K % TILE:
        raise ValueError(f"a: K = {K} is not a multiple of {TILE}; the 1x128 / 128x128 recipe reduces whole "
                         f"{TILE}-wide K chunks (pad K with zeros to {cdiv(K, TILE) * TILE})")
    _check_scale("a_scale", a_scale, (M, K // TILE))
    _check_scale("b_scale", b_scale, (E, cdiv(N, TILE), K // TILE))
    check_same_device("a", a, (("a_scale", a_scale), ("b", b), ("b_scale", b_scale), ("group_sizes", group_sizes),
                               ("out", out)))
    _check_group_sizes(group_sizes, E, M, validate)
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    elif out.shape != (M, N) or out.dtype != torch.bfloat16 or out.stride(1) != 1:
        raise ValueError(f"out must be a bf16 [{M}, {N}] tensor with contiguous rows")
    _grouped_gemm_op(a, a_scale, b, b_scale, group_sizes, out)
    return out


def fp8_grouped_gemm_wgrad(at, at_scale, bt, bt_scale, group_sizes, *, out=None, accumulate=False,
                           group_aligned: bool = False, validate: bool | None = None):
    """Per-expert weight gradient in fp32: out[e] (+)= dequant(at)[:, rows e] @ dequant(bt)[:, rows e].T.

    at [N, M] and bt [K, M] are e4m3 in the 128x1 token-axis tiling stored transposed (scales
    [N, ceil(M/128)] and [K, ceil(M/128)], from ``quantize_fp8_128x1``); group_sizes int32 [E] splits
    the M tokens (any sizes: the reduction runs over each expert's own rows). Returns out fp32
    [E, N, K]; ``accumulate=True`` adds into ``out`` (a gradient buffer) instead of overwriting it.
    Experts with no tokens get zeros (or keep ``out``).
    ``group_aligned=True``: at and bt are in the group-aligned layout of ``quantize_fp8_128x1(x,
    group_sizes=group_sizes)`` (M = ``aligned_tokens(sum of sizes, E)``; expert e's tokens start at
    128 * sum_{j<e} ceil(size_j/128)), whose tiles never mix two experts: what the MoE layer uses.
    """
    _check_fp8("at", at, 2)
    _check_fp8("bt", bt, 2)
    N, M = at.shape
    K, Mb = bt.shape
    if Mb != M:
        raise ValueError(f"bt must have M = {M} tokens (at's last dim) as its last dim, got {Mb}")
    _check_scale("at_scale", at_scale, (N, cdiv(M, TILE)))
    _check_scale("bt_scale", bt_scale, (K, cdiv(M, TILE)))
    E = group_sizes.shape[0] if isinstance(group_sizes, torch.Tensor) and group_sizes.dim() == 1 else -1
    check_same_device("at", at, (("at_scale", at_scale), ("bt", bt), ("bt_scale", bt_scale),
                                 ("group_sizes", group_sizes), ("out", out)))
    _check_group_sizes(group_sizes, E, M, validate, aligned=group_aligned)
    if out is None:
        if accumulate:
            raise ValueError("out is required when accumulate=True")
        out = torch.empty(E, N, K, dtype=torch.float32, device=at.device)
    elif out.shape != (E, N, K) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{E}, {N}, {K}] tensor")
    _grouped_wgrad_op(at, at_scale, bt, bt_scale, group_sizes, out, accumulate, bool(group_aligned))
    return out


def __getattr__(name):
    # The layer imports this module, so it is re-exported lazily (no import cycle).
    if name in ("moe_ffn_fp8", "Fp8WeightCache", "Fp8Weight"):
        from . import moe_layer

        return getattr(moe_layer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
