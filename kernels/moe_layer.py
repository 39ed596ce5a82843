"""The FP8 MoE FFN layer (DeepSeek-V3 recipe): weight cache, autograd Function, ``moe_ffn_fp8``.

Forward, for x [T, H], top-k routing (topk_weights fp32 [T, k], topk_ids [T, k]) and stacked expert
weights ``w_gate_up`` [E, 2I, H] (gate rows first) / ``w_down`` [E, H, I]:

    route (histogram + stable device sort) -> permute x rows by expert (Triton gather, bf16)
    -> quantize 1x128 (+128x1 kept for wgrad, tiles per expert) -> h = grouped fc1 [M, 2I] -> quantize h, keep it in
    FP8 for backward -> act = silu(gate) * up (fp32 math) -> quantize 1x128 -> y = grouped fc2 [M, H]
    -> out[t] = sum_j w[t, j] * y[row(t, j)] (Triton gather-combine, fp32 accumulation)

Backward recomputes the SwiGLU from the FP8 copy of h (the recipe's "SwiGLU input cached in FP8"),
quantizes the incoming gradients 1x128 for dgrad (``fp8_grouped_gemm`` against the transposed weight
blocks) and 128x1 along tokens for wgrad (``fp8_grouped_gemm_wgrad``, fp32; the token tiles restart at
every expert, so one expert's outlier never sets another's scales). No host sync anywhere.
Gradients: x (x's dtype), topk_weights (fp32), w_gate_up and w_down (fp32): the wgrad kernel adds
them straight into an existing fp32 ``.grad`` (the gradient-accumulation case), otherwise autograd
receives them (and casts to the master weight's dtype).

Off the Triton backends the same Function runs with every op's PyTorch reference (reference
quantizers, fp64 GEMMs of the dequantized operands): the recipe in exact arithmetic. Measured on
the CI machine, the Triton layer equals that emulation to >= 80 dB SQNR (mostly bit for bit), and
both sit 22.2-25.0 dB from the unquantized layer on Gaussian data: the recipe's own error.

``Fp8WeightCache``: master weights (fp32 or bf16) are quantized once per optimizer step. The cache
keys an entry by the parameter object (weakly) and remembers its ``_version`` counter; a detached
cache also remembers its storage pointer. Detached, an in-place update through autograd's view of the
weight (``w.copy_``, ``w.mul_`` under no_grad, an optimizer step) bumps the version and a ``.data =``
swap changes the pointer, so the next ``get`` re-quantizes; a write through ``w.data`` (``w.data.copy_``)
bumps neither and needs ``invalidate()`` (checking the values instead would cost a read of every weight
per forward). Attached to an optimizer (as training
uses it, ``attach(optimizer)``) it re-quantizes after every ``optimizer.step()`` and on version bumps
but no longer keys on the address (FSDP2 gathers into fresh storage every forward), so a ``.data =``
swap or an FSDP ``load_state_dict`` needs ``invalidate()``. Re-quantization writes into the copy's
existing storage, so a CUDA graph captured on it stays valid. One cache per model (or per layer) is
enough; it holds each weight's FP8 copy twice (as is and transposed for dgrad), i.e. 2 bytes per
parameter.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import check_same_device
from .fp8 import GRAD_AMAX_FLOOR, quantize_fp8_1x128, quantize_fp8_1x128_dual, quantize_fp8_128x1, quantize_fp8_128x128
from .moe_gemm import fp8_grouped_gemm, fp8_grouped_gemm_wgrad
from .moe_permute import combine, combine_backward, gather_rows, route_tokens
from .ref_fp8 import dequantize_fp8
from .registration import host_checks_enabled

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

    def refilled(self, weight: torch.Tensor) -> Fp8Weight:
        """``weight`` quantized into this copy's storage (self), or a new copy when its shape changed. In
        place because a captured decode graph reads these addresses: re-quantized into fresh tensors after
        an optimizer step, the graph (keyed on the parameters' addresses, which the step keeps) went on
        reading the freed ones. A backward still pending on the old copy then fails autograd's version
        check instead of using the new values."""
        if weight.shape != self.q.shape or weight.device != self.q.device:
            return Fp8Weight.quantize(weight)
        with torch.no_grad():  # straight into the copies: no fresh transposed weight to copy from
            q, scale = quantize_fp8_128x128(weight.detach())
            self.q.copy_(q)
            self.scale.copy_(scale)
            self.q_t.copy_(q.transpose(1, 2))
            self.scale_t.copy_(scale.transpose(1, 2))
        return self


class Fp8WeightCache:
    """Quantized copies of master weights, reused until the weights change.

    ``get(weight)`` returns an ``Fp8Weight``; it re-quantizes when ``weight`` was never seen, was
    garbage collected, its ``_version`` or ``data_ptr()`` changed since the cached copy was made, or
    ``invalidate()`` ran since (``attach(optimizer)`` runs it after every ``optimizer.step()``). A weight it
    has seen is re-quantized into the same storage (``Fp8Weight.refilled``: CUDA graphs stay valid).

    Why the optimizer hook and not only the version counter: FSDP2 all-gathers new values into the
    unsharded parameter without bumping its ``_version`` (measured: 0 after every gather), and the
    caching allocator may hand the gather the same address again, so after a step neither key would
    change and the cache would serve the previous step's weights. Training with FSDP must attach the
    optimizer (``r1fast.parallelize.enable_fp8_experts(model, optimizer)`` does).

    An attached cache also stops keying on the address: FSDP2 gathers into fresh storage for nearly
    every forward, so an address key would re-quantize on every micro-batch instead of once per step.
    It then trusts the step hook and the version counter: weights changed any other way without a
    version bump (``.data`` writes, ``load_state_dict`` into a sharded model) need ``invalidate()``.
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, int, int, int, Fp8Weight]] = {}
        self._generation = 0
        self._attached = 0  # optimizers whose steps invalidate: then the address is not part of the key
        self.quantizations = 0
        """How many times a weight was (re)quantized: a cheap check that reuse works."""

    def get(self, weight: torch.Tensor) -> Fp8Weight:
        key = id(weight)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight:
            _, generation, version, ptr, value = entry
            if (generation == self._generation and version == weight._version
                    and (self._attached or ptr == weight.data_ptr())):
                return value
            value = value.refilled(weight)
        else:
            value = Fp8Weight.quantize(weight)
        self.quantizations += 1
        self._entries[key] = (weakref.ref(weight, lambda _, k=key: self._entries.pop(k, None)),
                              self._generation, weight._version, weight.data_ptr(), value)
        return value

    def invalidate(self) -> None:
        """Every cached copy is stale from now on (the weights changed in a way the keys cannot see); each is
        re-quantized in place by its next ``get``."""
        self._generation += 1

    def attach(self, optimizer: torch.optim.Optimizer):
        """Invalidate after every ``optimizer.step()``; returns the hook handle (``.remove()`` detaches)."""
        self._attached += 1
        return _Attachment(self, optimizer.register_step_post_hook(lambda *_: self.invalidate()))


class _Attachment:
    """``Fp8WeightCache.attach``'s handle: ``remove()`` unhooks the optimizer (once)."""

    def __init__(self, cache: Fp8WeightCache, hook):
        self._cache, self._hook = cache, hook

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._cache._attached -= 1


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


def _fused_grad_buffer(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight.grad`` when the wgrad kernel may add into it in place (and hand autograd no gradient).

    That saves the separate read-add-write of an fp32 [E, N, K] gradient per micro-batch under
    gradient accumulation. Only for a plain fp32 ``.grad`` of a leaf that nothing observes: a hook on
    the weight, a tensor subclass (FSDP2's DTensor), ``create_graph``, torch.compile, ``autograd.grad``
    and ``backward(inputs=...)`` all need autograd to see the gradient, so they take the returned-gradient path (the first micro-batch does too,
    ``.grad`` being None; autograd then adopts the fp32 buffer without a copy).
    """
    grad = weight.grad
    if (grad is None or type(grad) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter)
            or not weight.is_leaf or grad.dtype != torch.float32 or grad.shape != weight.shape
            or not grad.is_contiguous() or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None)):
        return None
    # Only when this backward accumulates into ``.grad``: ``torch.autograd.grad`` captures the gradient
    # instead (the engine refuses the question then) and ``backward(inputs=...)`` without the weight
    # leaves ``.grad`` alone; an in-place add would corrupt ``.grad`` and hand autograd nothing.
    try:
        if not torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(weight).node):
            return None
    except RuntimeError:
        return None
    return grad


def _forward(x, topk_weights, topk_ids, q1, s1, q2, s2, *, for_backward: bool):
    """(out, what backward needs or None). Without a backward (rollout, the frozen KL reference) x is quantized
    1x128 only and h is not kept: the 128x1 tiles and the FP8 copy of h were built and dropped; out is the same
    bits either way (the dual quantizer's 1x128 half is the plain one)."""
    topk = topk_ids.shape[1]
    group_sizes, token_of_row, row_of_slot = route_tokens(topk_ids, q1.shape[0])
    x_rows = gather_rows(x.to(torch.bfloat16), token_of_row)  # [M, H] permuted by expert
    xtq = xts = hq = hs = None
    if for_backward:
        # the 128x1 tiles for wgrad in the group-aligned layout: a tile shared by two experts gave them one
        # scale per column, so a NaN token of one expert poisoned another's weight gradient (and a x1e5 outlier
        # cost it 9.6 dB: 24.6 -> 15.0)
        xq, xs, xtq, xts = quantize_fp8_1x128_dual(x_rows, group_sizes=group_sizes, validate=False)
    else:
        xq, xs = quantize_fp8_1x128(x_rows)
    del x_rows
    h = fp8_grouped_gemm(xq, xs, q1, s1, group_sizes, validate=False)  # [M, 2I]
    if for_backward:
        hq, hs = quantize_fp8_1x128(h)  # the SwiGLU input, kept in FP8 for backward
    act = _swiglu(h).to(torch.bfloat16)
    del h
    aq, as_ = quantize_fp8_1x128(act)
    y = fp8_grouped_gemm(aq, as_, q2, s2, group_sizes, validate=False)  # [M, H]
    weights = topk_weights.float().contiguous()
    out = combine(y, row_of_slot, weights, topk, x.dtype)
    if not for_backward:
        return out, None
    return out, (weights, xtq, xts, hq, hs, y, group_sizes, token_of_row, row_of_slot)


class _MoeFfnFp8(torch.autograd.Function):
    """Inputs: x, topk_weights, the master weights (differentiated), topk_ids, then the weights' FP8 copies
    (``Fp8Weight`` fields: q, scale, q_t, scale_t of fc1, then of fc2) as plain tensors, so the Function
    traces under torch.compile."""

    @staticmethod
    def forward(ctx, x, topk_weights, w_gate_up, w_down, topk_ids, q1, s1, q1t, s1t, q2, s2, q2t, s2t):
        out, saved = _forward(x, topk_weights, topk_ids, q1, s1, q2, s2, for_backward=True)
        ctx.save_for_backward(*saved, q1t, s1t, q2t, s2t, w_gate_up, w_down)
        ctx.meta = (x.shape[0], topk_ids.shape[1], x.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        (weights, xtq, xts, hq, hs, y, group_sizes, token_of_row, row_of_slot,
         q1t, s1t, q2t, s2t, w_gate_up, w_down) = ctx.saved_tensors
        T, topk, x_dtype = ctx.meta
        # combine: dy rows = w * dout[token]; d topk_weights = <dout[token], y[row]>
        dy, dweights = combine_backward(dout.to(torch.bfloat16), y, row_of_slot, weights)
        del y
        dyq, dys, dytq, dyts = quantize_fp8_1x128_dual(dy, amax_floor=GRAD_AMAX_FLOOR,  # gradients: see fp8.py
                                                       group_sizes=group_sizes, validate=False)
        del dy
        # fc2: d act = dy @ w_down (dgrad through the transposed blocks); dW_down = dy^T @ act
        d_act = fp8_grouped_gemm(dyq, dys, q2t, s2t, group_sizes, validate=False)
        h = dequantize_fp8(hq, hs, (1, TILE))  # recompute SwiGLU from its FP8 copy
        act = _swiglu(h).to(torch.bfloat16)
        atq, ats = quantize_fp8_128x1(act, group_sizes=group_sizes, validate=False)
        del act
        dw_down = _wgrad(dytq, dyts, atq, ats, group_sizes, w_down, ctx.needs_input_grad[3])
        dh = _swiglu_backward(h, d_act).to(torch.bfloat16)
        del h, d_act
        dhq, dhs, dhtq, dhts = quantize_fp8_1x128_dual(dh, amax_floor=GRAD_AMAX_FLOOR, group_sizes=group_sizes,
                                                       validate=False)
        del dh
        # fc1: dx rows = dh @ w_gate_up; dW_gate_up = dh^T @ x rows
        dx_rows = fp8_grouped_gemm(dhq, dhs, q1t, s1t, group_sizes, validate=False)
        dw_gate_up = _wgrad(dhtq, dhts, xtq, xts, group_sizes, w_gate_up, ctx.needs_input_grad[2])
        dx = combine(dx_rows, row_of_slot, None, topk, x_dtype)  # sum the k copies of each token
        return (dx, dweights, dw_gate_up, dw_down) + (None,) * 9


def _wgrad(at, at_scale, bt, bt_scale, group_sizes, weight, needed: bool):
    """The fp32 weight gradient: added in place into ``weight.grad`` (returns None) or returned."""
    if not needed:
        return None
    buffer = _fused_grad_buffer(weight)
    if buffer is not None:
        fp8_grouped_gemm_wgrad(at, at_scale, bt, bt_scale, group_sizes, out=buffer, accumulate=True,
                               group_aligned=True, validate=False)
        return None
    return fp8_grouped_gemm_wgrad(at, at_scale, bt, bt_scale, group_sizes, group_aligned=True, validate=False)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(x, topk_weights, topk_ids, w_gate_up, w_down):
    for name, t in (("x", x), ("topk_weights", topk_weights), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:  # fp8 or integer in, garbage out
            raise ValueError(f"{name} must be a float32, bfloat16 or float16 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be an int32/int64 tensor, got {getattr(topk_ids, 'dtype', type(topk_ids).__name__)}")
    # the kernels take raw pointers: topk_weights on meta beside a CPU x gave a garbage output (zeros, NaN), no error
    check_same_device("x", x, (("topk_weights", topk_weights), ("topk_ids", topk_ids), ("w_gate_up", w_gate_up),
                               ("w_down", w_down)))
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    T, H = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H={H}], got shape {tuple(w_gate_up.shape)}")
    E, two_i, _ = w_gate_up.shape
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"w_down must be [E={E}, H={H}, I={two_i // 2}] to match w_gate_up, got {tuple(w_down.shape)}")
    if H % TILE or (two_i // 2) % TILE:
        # fc1 and fc2's dgrad reduce over H, fc2 over I, fc1's dgrad over 2I: whole 128-wide K chunks
        raise ValueError(f"w_gate_up: the FP8 recipe needs H and I to be multiples of {TILE} (the GEMMs reduce "
                         f"over them in 128-wide chunks), got H={H}, I={two_i // 2}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be an integer [T={T}, k >= 1] tensor, got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")


def moe_ffn_fp8(x, topk_weights, topk_ids, w_gate_up, w_down, *, cache: Fp8WeightCache | None = None,
                validate: bool | None = None):
    """FP8 MoE expert FFN: out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

    x [T, H] (bf16 or fp32), topk_weights [T, k] (fp32), topk_ids [T, k] int (ids in [0, E)),
    w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I]; H and I multiples of 128. Returns [T, H]
    in x's dtype; gradients flow to x, topk_weights, w_gate_up, w_down (the weights' fp32 gradients
    are added straight into an existing fp32 ``.grad``; see ``_fused_grad_buffer``). ``cache``: an
    ``Fp8WeightCache`` so the weights are quantized once per optimizer step (None: quantize on every
    call). Off the Triton backends every step runs its PyTorch reference (same quantization points,
    fp64 GEMMs): the recipe in exact arithmetic, so CPU runs see FP8 numerics too.
    ``validate``: check that every id lies in [0, E) (reads them on the host; an id outside would make the
    kernels read past the weights). None = check unless torch.compile traces or a CUDA graph is being
    captured; the model's hook passes False (its router's ids are in range by construction).
    """
    _check_inputs(x, topk_weights, topk_ids, w_gate_up, w_down)
    if validate is None:
        validate = host_checks_enabled(topk_ids)
    if validate and topk_ids.numel() and bool(((topk_ids < 0) | (topk_ids >= w_gate_up.shape[0])).any()):
        raise ValueError(f"topk_ids must lie in [0, {w_gate_up.shape[0]}) (the experts of w_gate_up), got values "
                         f"from {int(topk_ids.min())} to {int(topk_ids.max())}")
    fc1 = cache.get(w_gate_up) if cache is not None else Fp8Weight.quantize(w_gate_up)
    fc2 = cache.get(w_down) if cache is not None else Fp8Weight.quantize(w_down)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w_gate_up, w_down))):
        return _forward(x, topk_weights, topk_ids.contiguous(), fc1.q, fc1.scale, fc2.q, fc2.scale,
                        for_backward=False)[0]
    return _MoeFfnFp8.apply(x, topk_weights, w_gate_up, w_down, topk_ids.contiguous(),
                            fc1.q, fc1.scale, fc1.q_t, fc1.scale_t, fc2.q, fc2.scale, fc2.q_t, fc2.scale_t)
