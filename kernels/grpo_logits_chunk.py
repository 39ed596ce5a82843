"""The [C, V] logits chunk of the fused GRPO sweeps: its dtype, its row count, and the GEMM that fills it.

bf16 and fp32 inputs keep one buffer in their own dtype: the logits GEMM writes it and the dlogits kernel
overwrites it in place (bf16 has fp32's exponent range, so a logit cannot overflow it).

fp16 inputs get an fp32 logits buffer. fp16 stops at 65504, and finite fp16 hidden/weight easily make
larger logits (the probe: |h|, |W| ~ 100, H = 64 gave |z| = 2.4e5): an fp16 buffer held inf, the row max
became inf, inf − inf = NaN, and log-probs, loss, entropy and gradients all came out NaN with no error
(the reference, fp32 inside, gave -1.8e5). Measured on in-range fp16 inputs (tests/test_grpo_loss_fp16.py,
|z| ~ 10, interpreter): hidden.grad relative error vs fp64 is 3.3e-3 with an fp16 buffer (11-bit logits),
1.4e-2 with a bf16 buffer (fp32's range, 8-bit logits), 9.5e-4 with an fp32 buffer, the same as the fp32
reference; log-prob max error 3.1e-3 (fp16 buffer) vs 2.6e-6 (fp32). So fp32 is both the safe and the
most precise choice; it costs 2 more bytes per logit written and read.
The GEMM writes fp32 directly: on CUDA ``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS, fp16 inputs,
fp32 accumulate and output: aten::mm.dtype_out, whose CUDA kernel takes fp16/bf16 with fp32 out); the CPU build has no ``mm.dtype_out`` (torch 2.13), so there
the sweep upcasts W once per call (V·H·4 bytes; CPU runs only the interpreter tests) and the chunk's rows.
The gradient GEMMs still need fp16 dlogits (cuBLAS takes one input dtype), so the dlogits kernel writes a
second, fp16 [C, V] buffer, as the in-place fp16 path always had: |dlogits| <= |coef| / T, so it
overflows only for a coefficient past 65504·T, where the fp16 gradients returned would overflow too.
Byte budget: the chunk's rows are sized on the bytes per logit of BOTH buffers (4, or 4 + 2 with grads,
against 2 for the fp16 buffer), so the [C, V] memory stays at its budget (512 MiB loss / 256 MiB
log-probs) and fp16 runs 3x (loss) or 2x (log-probs) as many chunks. Estimated at shape A (N = 16k,
V = 152k, H = 3584, fp16): 29 instead of 10 chunks, each after the first a 2.2 GB read-modify-write of
grad_W (~0.7 ms at 3 TB/s: ~14 ms), plus 6·V more bytes per token of [C, V] traffic (15 GB: ~5 ms):
~+19 ms, ~20% of the step, for fp16 only. Unmeasured on a GPU (none lent to this change); sub-chunking
the fp32 logits under one large fp16 dlogits chunk would win most of it back if fp16 runs matter.
bf16 and fp32 inputs are untouched: same buffer, same chunk rows, same kernels.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .ref_grpo_loss import _chunk_logits, compute_dtype, default_chunk_tokens


def logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logits buffer's dtype for inputs of ``dtype``: fp32 for fp16 (range), else the input dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


def chunk_rows(rows: int, vocab: int, dtype: torch.dtype, chunk_tokens: int | None, chunk_bytes: int | None,
               with_dlogits: bool) -> int:
    """Rows per chunk: ``chunk_tokens`` when given, else what fits the logits (+ dlogits) buffers in budget."""
    if not chunk_tokens:
        logit_bytes = logits_dtype(dtype).itemsize
        if with_dlogits and logits_dtype(dtype) != dtype:  # the separate dlogits buffer (fp16)
            logit_bytes += dtype.itemsize
        chunk_tokens = default_chunk_tokens(vocab, logit_bytes, chunk_bytes)
    return max(1, min(chunk_tokens, rows))


def dlogits_buffer(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the dlogits kernel writes: ``logits`` itself (in place) when it already has ``dtype``."""
    return logits if logits.dtype == dtype else torch.empty(logits.shape, dtype=dtype, device=logits.device)


def logits_gemm(weight: torch.Tensor, out_dtype: torch.dtype):
    """``fill(h_chunk, out)``: out = h_chunk @ weightᵀ in ``out_dtype``, accumulated in fp32 (see the module doc)."""
    if out_dtype == weight.dtype:
        return lambda h, out: torch.mm(h, weight.t(), out=out)
    if weight.is_cuda and "dtype_out" in torch.ops.aten.mm.overloads():  # torch >= 2.8; older: the upcast below
        return lambda h, out: torch.mm(h, weight.t(), out_dtype=out_dtype, out=out)
    # fp16 products are exact in fp32 (11 + 11 bits < 24), so this equals an fp32-accumulating GEMM
    w_up = weight.to(out_dtype)
    return lambda h, out: torch.mm(h.to(out_dtype), w_up.t(), out=out)


def _kernel_applies(hidden) -> bool:
    """The dispatch rule, except fp64 (the oracle dtype): that always runs the reference."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype == torch.float64:
        return False
    return use_triton(hidden.device)


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[S, V] logits of ``hidden`` [S, H] computed as the fused log-prob / loss sweeps compute them on this
    device, for the rollout to sample from: its log-probs then agree with the trainer's to rounding and the
    GRPO ratio starts at 1. The kernel path's buffer dtype (``logits_dtype``: bf16 stays bf16, fp16 becomes
    fp32, written by ``logits_gemm``), the reference's fp32 (fp64 for fp64 inputs). The rollout's own bf16
    ``F.linear`` rounded logits to bf16 where the CPU reference kept fp32: max |r - 1| 0.135 on the first
    update (probe, logit std ~7); its fp16 logits could overflow (see the module docstring). ``out``: a
    [S, V] buffer of ``lm_head_logits_dtype(hidden)`` to write into (the decode graphs share one)."""
    if not _kernel_applies(hidden):
        logits = _chunk_logits(hidden, weight, None, 1.0, compute_dtype(hidden.dtype))
        return logits if out is None else out.copy_(logits)
    if out is None:
        out = torch.empty(hidden.shape[0], weight.shape[0], dtype=logits_dtype(hidden.dtype), device=hidden.device)
    logits_gemm(weight, out.dtype)(hidden, out)
    return out


def lm_head_logits_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head_logits`` returns for ``hidden``."""
    return logits_dtype(hidden.dtype) if _kernel_applies(hidden) else compute_dtype(hidden.dtype)
