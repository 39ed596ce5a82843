"""PyTorch references of the FP8 quantizers, the grouped FP8 GEMMs and the MoE FFN.

They are the test oracle and the CPU fallback of ``fp8.py`` / ``moe_gemm.py``. Quantizers match the
Triton kernels byte for byte (same fp32 division, same round-to-nearest-even cast), on NaN / inf tiles too
(one NaN byte, 0x7F; see ``fp8.py``'s docstring for what a non-finite value does to its tile). The GEMM
references compute in fp64 from the dequantized operands, which is what the kernels approximate
with their fp32 accumulators (promoted every 128 of K). ``moe_ffn_fp8`` here is the *unquantized*
MoE FFN (fp32 math, autograd): the function the FP8 layer approximates, so the CPU fallback is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
TILE = 128


def _scale_from_amax(amax: torch.Tensor, power_of_two: bool, amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    scale = amax.float().clamp(min=amax_floor) / FP8_MAX
    if power_of_two:
        # round up to 2^e by bit manipulation (same integer ops as the kernel, exact); only finite scales: the
        # trick took a NaN (0x7FC00000) to 0x80000000 = -0.0, zeroing the tile's finite values. inf stays inf
        bits = scale.view(torch.int32)
        finite_with_mantissa = ((bits & 0x7FFFFF) != 0) & ((bits & 0x7F800000) != 0x7F800000)
        bits = torch.where(finite_with_mantissa, (bits & 0x7F800000) + 0x800000, bits)
        scale = bits.view(torch.float32)
    return scale


def _pad_to(x: torch.Tensor, dims: dict[int, int]) -> torch.Tensor:
    pad = [0, 0] * x.dim()
    for d, mult in dims.items():
        size = x.shape[d]
        pad[2 * (x.dim() - 1 - d) + 1] = (-size) % mult
    return F.pad(x, pad)


NAN_BYTE = 0x7F
"""The one E4M3 NaN byte both paths write (PyTorch's cast of a positive NaN)."""


def _cast(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 saturating at +-448, every NaN as ``NAN_BYTE``: x86's inf / inf is a negative NaN, which
    the cast alone makes 0xFF (the kernel wrote 0x7F for it, so an inf tile was not bit-equal)."""
    q = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q.view(torch.uint8).masked_fill_(y.isnan(), NAN_BYTE)
    return q


def quantize_fp8_1x128(x: torch.Tensor, *, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """x [M, K] -> (fp8 [M, K], scale fp32 [M, ceil(K/128)]); ragged last tile allowed."""
    M, K = x.shape
    if M == 0 or K == 0:  # view(M, -1, TILE) cannot infer -1 from zero elements
        return (torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device),
                torch.empty(M, -(-K // TILE), dtype=torch.float32, device=x.device))
    xf = _pad_to(x.float(), {1: TILE}).view(M, -1, TILE)
    scale = _scale_from_amax(xf.abs().amax(dim=2), power_of_two, amax_floor)
    q = _cast(xf / scale[:, :, None]).view(M, -1)[:, :K]
    return q.contiguous(), scale.contiguous()


def quantize_fp8_128x128(w: torch.Tensor, *, power_of_two: bool = False):
    """w [N, K] or [E, N, K] -> (fp8 same shape, scale [(E,) ceil(N/128), ceil(K/128)])."""
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    B, N, K = w3.shape
    wf = _pad_to(w3.float(), {1: TILE, 2: TILE})
    nn, nk = wf.shape[1] // TILE, wf.shape[2] // TILE
    blocks = wf.view(B, nn, TILE, nk, TILE)
    scale = _scale_from_amax(blocks.abs().amax(dim=(2, 4)), power_of_two)
    q = _cast(blocks / scale[:, :, None, :, None]).view(B, nn * TILE, nk * TILE)[:, :N, :K].contiguous()
    return (q[0], scale[0]) if squeeze else (q, scale)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 ``q * scale``; each scale entry covers ``block`` = (rows, cols) of the last two dims."""
    rows, cols = q.shape[-2:]
    s = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return q.float() * s


def group_aligned_rows(group_sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int64 [M]: the token position of each of x's M rows in the group-aligned 128x1 layout, where group e
    starts at 128 * sum_{j<e} ceil(size_j / 128) (device ops only). Unvalidated sizes are read as the kernel reads
    them: negative ones as 0, and rows past the sizes' sum (in no group) get -1."""
    sizes = group_sizes.long().clamp(min=0)
    tiles = (sizes + TILE - 1) // TILE
    ends = sizes.cumsum(0)
    shift = (tiles.cumsum(0) - tiles) * TILE - (ends - sizes)  # aligned start - packed start
    rows = torch.arange(num_rows, device=sizes.device)
    if sizes.numel() == 0:  # no group: every row is in none
        return torch.full_like(rows, -1)
    # searchsorted, not repeat_interleave(output_size=M): that raised RuntimeError on sizes not summing to M
    group_of_row = torch.searchsorted(ends, rows, right=True)
    in_group = group_of_row < sizes.numel()
    return torch.where(in_group, rows + shift[group_of_row.clamp(max=sizes.numel() - 1)], -1)


def _aligned_offsets(group_sizes: torch.Tensor) -> list[int]:
    tiles = [-(-int(v) // TILE) * TILE for v in group_sizes.tolist()]
    return [0] + torch.tensor(tiles, dtype=torch.long).cumsum(0).tolist()


def _offsets(group_sizes: torch.Tensor) -> list[int]:
    sizes = [int(v) for v in group_sizes.tolist()]
    return [0] + torch.tensor(sizes).cumsum(0).tolist()


def fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out=None, validate=None):
    """out[rows of e] = dequant(a_e) @ dequant(b_e).T, computed in fp64, returned in bf16."""
    a64 = dequantize_fp8(a, a_scale, (1, TILE)).double()
    b64 = dequantize_fp8(b, b_scale, (TILE, TILE)).double()
    result = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    off = _offsets(group_sizes)
    for e in range(b.shape[0]):
        result[off[e]:off[e + 1]] = a64[off[e]:off[e + 1]] @ b64[e].T
    result = result.to(torch.bfloat16)
    if out is not None:
        out.copy_(result)
        return out
    return result


def fp8_grouped_gemm_wgrad(at, at_scale, bt, bt_scale, group_sizes, *, out=None, accumulate=False,
                           group_aligned=False):
    """out[e] (+)= dequant(at)[:, rows of e] @ dequant(bt)[:, rows of e].T in fp32.

    ``at`` [N, M] and ``bt`` [K, M] are the 128x1 (token-axis) tilings stored transposed, as
    returned by ``quantize_fp8_128x1`` (``group_aligned``: in its group-aligned layout, where expert e's
    tokens start at 128 * sum_{j<e} ceil(size_j/128)); the result is [E, N, K] fp32.
    """
    a64 = dequantize_fp8(at, at_scale, (1, TILE)).double()
    b64 = dequantize_fp8(bt, bt_scale, (1, TILE)).double()
    E = group_sizes.shape[0]
    start = _aligned_offsets(group_sizes) if group_aligned else _offsets(group_sizes)
    size = [int(v) for v in group_sizes.tolist()]
    result = torch.stack([a64[:, start[e]:start[e] + size[e]] @ b64[:, start[e]:start[e] + size[e]].T
                          for e in range(E)])
    if out is None:
        return result.float()
    if accumulate:  # as the kernel: its fp32 result added to out in fp32 (micro-batch sums then equal a + b)
        out.add_(result.float())
    else:
        out.copy_(result)
    return out


def fp8_grouped_gemm_dgrad(dy, dy_scale, w, w_scale, group_sizes):
    """dx[rows of e] = dequant(dy_e) @ dequant(w_e) for w [E, N, K] (the forward's weight), fp64 -> bf16."""
    a64 = dequantize_fp8(dy, dy_scale, (1, TILE)).double()
    w64 = dequantize_fp8(w, w_scale, (TILE, TILE)).double()
    off = _offsets(group_sizes)
    result = torch.zeros(dy.shape[0], w.shape[2], dtype=torch.float64, device=dy.device)
    for e in range(w.shape[0]):
        result[off[e]:off[e + 1]] = a64[off[e]:off[e + 1]] @ w64[e]
    return result.to(torch.bfloat16)


def moe_ffn_fp8(x, topk_weights, topk_ids, w_gate_up, w_down, *, cache=None, compute_dtype=torch.float32):
    """The MoE FFN the FP8 layer approximates, unquantized, differentiable by autograd.

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j];
    ``w_gate_up`` [E, 2I, H] (gate rows first), ``w_down`` [E, H, I]. Computed in ``compute_dtype``
    (fp32 by default; pass bf16 for the bf16 MoE layer) and returned in x's dtype. ``cache`` is
    accepted for signature compatibility with the FP8 layer and ignored.
    """
    T, H = x.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    xc = x.to(compute_dtype)
    out = torch.zeros(T, H, dtype=compute_dtype, device=x.device)
    for e in range(E):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xc[tok] @ w_gate_up[e].to(compute_dtype).T
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = act @ w_down[e].to(compute_dtype).T
        weight = topk_weights[tok, slot].to(compute_dtype)[:, None]
        out = out.index_add(0, tok, y * weight)
    return out.to(x.dtype)
