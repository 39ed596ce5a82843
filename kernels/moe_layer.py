"""The FP8 MoE FFN layer (DeepSeek-V3 recipe): weight cache, autograd Function, ``moe_ffn_fp8``.

Forward, for x [T, H], top-k routing (topk_weights fp32 [T, k], topk_ids [T, k]) and stacked expert
weights ``w_gate_up`` [E, 2I, H] (gate rows first) / ``w_down`` [E, H, I]:

    route (histogram + stable device sort) -> permute x rows by expert (Triton gather, bf16)
    -> quantize 1x128 (+128x1 kept for wgrad) -> h = grouped fc1 [M, 2I] -> quantize h, keep it in
    FP8 for backward -> act = silu(gate) * up (fp32 math) -> quantize 1x128 -> y = grouped fc2 [M, H]
    -> out[t] = sum_j w[t, j] * y[row(t, j)] (Triton gather-combine, fp32 accumulation)

Backward recomputes the SwiGLU from the FP8 copy of h (the recipe's "SwiGLU input cached in FP8"),
quantizes the incoming gradients 1x128 for dgrad (``fp8_grouped_gemm`` against the transposed weight
blocks) and 128x1 along tokens for wgrad (``fp8_grouped_gemm_wgrad``, fp32). No host sync anywhere.
Gradients: x (x's dtype), topk_weights (fp32), w_gate_up and w_down (fp32; autograd accumulates them
into ``.grad``, casting to the master weight's dtype).

``Fp8WeightCache``: master weights (fp32 or bf16) are quantized once per optimizer step. The cache
keys an entry by the parameter object (weakly) and remembers its ``_version`` counter and storage
pointer: any in-place update (``optimizer.step()``, ``copy_``, ``.data =``) bumps or changes one of
them, and the next ``get`` re-quantizes. One cache per model (or per layer) is enough; it holds
each weight's FP8 copy twice (as is and transposed for dgrad), i.e. 2 bytes per parameter.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import use_triton
from .fp8 import quantize_fp8_1x128, quantize_fp8_1x128_dual, quantize_fp8_128x1, quantize_fp8_128x128
from .moe_gemm import fp8_grouped_gemm, fp8_grouped_gemm_wgrad
from .moe_permute import combine, combine_backward, gather_rows, route_tokens
from .ref_fp8 import dequantize_fp8

TILE = 128


@dataclass(frozen=True)
class Fp8Weight:
    """A stacked expert weight [E, N, K] in 128x128-block FP8, as is and with blocks transposed."""

    q: torch.Tensor
    """e4m3 [E, N, K]: the forward operand."""
    scale: torch.Tensor
    """fp32 [E, ceil(N/128), ceil(K/128)]."""
    q_t: torch.Tensor
    """e4m3 [E, K, N] = q transposed: the dgrad operand (K-major for the tensor cores)."""
    scale_t: torch.Tensor
    """fp32 [E, ceil(K/128), ceil(N/128)] = scale transposed (a 128x128 block keeps its scale)."""

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Weight:
        with torch.no_grad():
            q, scale = quantize_fp8_128x128(weight.detach())
            return cls(q, scale, q.transpose(1, 2).contiguous(), scale.transpose(1, 2).contiguous())


class Fp8WeightCache:
    """Quantized copies of master weights, reused until the weight is modified in place.

    ``get(weight)`` returns an ``Fp8Weight``; it re-quantizes when ``weight`` was never seen, was
    garbage collected, or its ``_version`` or ``data_ptr()`` changed since the cached copy was made.
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, int, int, Fp8Weight]] = {}
        self.quantizations = 0
        """How many times a weight was (re)quantized: a cheap check that reuse works."""

    def get(self, weight: torch.Tensor) -> Fp8Weight:
        key = id(weight)
        entry = self._entries.get(key)
        if entry is not None:
            ref, version, ptr, value = entry
            if ref() is weight and version == weight._version and ptr == weight.data_ptr():
                return value
        value = Fp8Weight.quantize(weight)
        self.quantizations += 1
        self._entries[key] = (weakref.ref(weight, lambda _, k=key: self._entries.pop(k, None)),
                              weight._version, weight.data_ptr(), value)
        return value

    def clear(self) -> None:
        self._entries.clear()


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.float().chunk(2, dim=1)
    return F.silu(gate) * up


def _swiglu_backward(h: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    gate, up = h.float().chunk(2, dim=1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_act = d_act.float()
    d_gate = d_act * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, d_act * silu], dim=1)


class _MoeFfnFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, w_gate_up, w_down, topk_ids, fc1: Fp8Weight, fc2: Fp8Weight):
        T, H = x.shape
        topk = topk_ids.shape[1]
        group_sizes, token_of_row, row_of_slot = route_tokens(topk_ids, fc1.q.shape[0])
        x_rows = gather_rows(x.to(torch.bfloat16), token_of_row)  # [M, H] permuted by expert
        xq, xs, xtq, xts = quantize_fp8_1x128_dual(x_rows)
        del x_rows
        h = fp8_grouped_gemm(xq, xs, fc1.q, fc1.scale, group_sizes, validate=False)  # [M, 2I]
        hq, hs = quantize_fp8_1x128(h)  # the SwiGLU input, kept in FP8 for backward
        act = _swiglu(h).to(torch.bfloat16)
        del h
        aq, as_ = quantize_fp8_1x128(act)
        y = fp8_grouped_gemm(aq, as_, fc2.q, fc2.scale, group_sizes, validate=False)  # [M, H]
        weights = topk_weights.float().contiguous()
        out = combine(y, row_of_slot, weights, topk, x.dtype)
        ctx.save_for_backward(weights, xtq, xts, hq, hs, y, group_sizes, token_of_row, row_of_slot)
        ctx.fp8 = (fc1, fc2)
        ctx.meta = (T, topk, x.dtype, w_gate_up.dtype, w_down.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        weights, xtq, xts, hq, hs, y, group_sizes, token_of_row, row_of_slot = ctx.saved_tensors
        fc1, fc2 = ctx.fp8
        T, topk, x_dtype, gu_dtype, down_dtype = ctx.meta
        # combine: dy rows = w * dout[token]; d topk_weights = <dout[token], y[row]>
        dy, dweights = combine_backward(dout.to(torch.bfloat16), y, row_of_slot, weights)
        del y
        dyq, dys, dytq, dyts = quantize_fp8_1x128_dual(dy)
        del dy
        # fc2: d act = dy @ w_down (dgrad through the transposed blocks); dW_down = dy^T @ act
        d_act = fp8_grouped_gemm(dyq, dys, fc2.q_t, fc2.scale_t, group_sizes, validate=False)
        h = dequantize_fp8(hq, hs, (1, TILE))  # recompute SwiGLU from its FP8 copy
        act = _swiglu(h).to(torch.bfloat16)
        atq, ats = quantize_fp8_128x1(act)
        del act
        dw_down = fp8_grouped_gemm_wgrad(dytq, dyts, atq, ats, group_sizes, validate=False)
        dh = _swiglu_backward(h, d_act).to(torch.bfloat16)
        del h, d_act
        dhq, dhs, dhtq, dhts = quantize_fp8_1x128_dual(dh)
        del dh
        # fc1: dx rows = dh @ w_gate_up; dW_gate_up = dh^T @ x rows
        dx_rows = fp8_grouped_gemm(dhq, dhs, fc1.q_t, fc1.scale_t, group_sizes, validate=False)
        dw_gate_up = fp8_grouped_gemm_wgrad(dhtq, dhts, xtq, xts, group_sizes, validate=False)
        dx = combine(dx_rows, row_of_slot, None, topk, x_dtype)  # sum the k copies of each token
        return dx, dweights, dw_gate_up, dw_down, None, None, None


def _check_inputs(x, topk_weights, topk_ids, w_gate_up, w_down):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    T, H = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H={H}], got shape {tuple(w_gate_up.shape)}")
    E, two_i, _ = w_gate_up.shape
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"w_down must be [E={E}, H={H}, I={two_i // 2}] to match w_gate_up, got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer [T={T}, k] tensor, got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")


def moe_ffn_fp8(x, topk_weights, topk_ids, w_gate_up, w_down, *, cache: Fp8WeightCache | None = None):
    """FP8 MoE expert FFN: out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

    x [T, H] (bf16 or fp32), topk_weights [T, k] (fp32), topk_ids [T, k] int (ids in [0, E)),
    w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I]. Returns [T, H] in x's dtype; gradients
    flow to x, topk_weights, w_gate_up, w_down. ``cache``: an ``Fp8WeightCache`` so the weights are
    quantized once per optimizer step (None: quantize on every call). Off the Triton backends this is
    the unquantized reference (``ref_fp8.moe_ffn_fp8``).
    """
    _check_inputs(x, topk_weights, topk_ids, w_gate_up, w_down)
    if not use_triton(x.device):
        from .ref_fp8 import moe_ffn_fp8 as ref

        return ref(x, topk_weights, topk_ids, w_gate_up, w_down)
    fc1 = cache.get(w_gate_up) if cache is not None else Fp8Weight.quantize(w_gate_up)
    fc2 = cache.get(w_down) if cache is not None else Fp8Weight.quantize(w_down)
    return _MoeFfnFp8.apply(x, topk_weights, w_gate_up, w_down, topk_ids.contiguous(), fc1, fc2)
