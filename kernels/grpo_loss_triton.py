"""Triton row kernels of the fused GRPO loss: per-row statistics (``_logit_row_stats_kernel``) and dloss/dlogits
(``_dlogits_kernel`` in place, ``_dlogits_out_kernel`` into a second buffer). ``grpo_loss_kernels.py`` launches
them and holds the PyTorch version of the same arithmetic.

Imports Triton: ``grpo_loss_kernels.py`` imports this module only inside the branch that launches a kernel, so
the loss's reference path works on installs without Triton (see ``dispatch.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_scaled_logits(row_ptr, bias_ptr, offs, valid, inv_temperature, HAS_BIAS: tl.constexpr):
    """(logits + bias) / T for one vocab tile in fp32; -inf past V."""
    z = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    z = z * inv_temperature
    return tl.where(valid, z, float("-inf"))


@triton.jit
def _logit_row_stats_kernel(logits_ptr, stride_row, bias_ptr, ids_ptr, lse_ptr, logp_ptr, entropy_ptr, V,
                            inv_temperature, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    """One program per token row: logsumexp, log p(target) and entropy of softmax(z), online over V.

    Running scalars, rescaled when the max m grows: s = Σ exp(z − m), t = Σ exp(z − m)·(z − m).
    entropy = log s − t / s and logp = (z_target − m) − log s. Both are taken relative to m: the
    textbook lse − Σ p·z subtracts two numbers of size |z|, so a logit offset of 1e4 (fp32 ulp 1e-3)
    gave 4x–7x PyTorch's own fp32 entropy error. Masked lanes are excluded with ``where``
    (exp(-inf)·(-inf) would be NaN).
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs0 = tl.arange(0, BLOCK_V).to(tl.int64)
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        valid = offs < V
        z = _load_scaled_logits(row_ptr, bias_ptr, offs, valid, inv_temperature, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - m_new)
        shifted = tl.where(valid, z - m_new, 0.0)  # 0 on masked lanes: no 0·inf NaN is ever formed
        e = tl.where(valid, tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            # old terms move from base m to m_new: Σe·(z − m_new) = r·(t + s·(m − m_new)); before the
            # first tile s = 0 and m = -inf, where s·(m − m_new) would be 0·inf = NaN
            step = tl.where(s > 0.0, m - m_new, 0.0)
            t = rescale * (t + s * step) + tl.sum(e * shifted, axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    target = tl.load(ids_ptr + row).to(tl.int64)
    # An id outside [0, V) gets here only with the host checks off (torch.compile, CUDA-graph capture,
    # trusted_inputs): it read another row or past the buffer (garbage, or SIGSEGV at 10**6). Read lane 0
    # instead and report NaN, which the trainer's non-finite-loss check sees.
    in_range = (target >= 0) & (target < V)
    safe = tl.where(in_range, target, 0)
    z_target = tl.load(row_ptr + safe).to(tl.float32)
    if HAS_BIAS:
        z_target += tl.load(bias_ptr + safe).to(tl.float32)
    # lse is formed in fp64 (a per-row scalar): into an fp64 buffer it keeps log s's bits under a large max m,
    # which the dlogits kernel needs (see _dlogits_row); an fp32 buffer gets the same rounded value as before
    tl.store(lse_ptr + row, m.to(tl.float64) + log_s.to(tl.float64))
    tl.store(logp_ptr + row, tl.where(in_range, (z_target * inv_temperature - m) - log_s, float("nan")))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)


@triton.jit
def _dlogits_row(row_ptr, out_row_ptr, bias_ptr, ids_ptr, lse_ptr, coef_ptr, row, V, inv_temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Write one row of dloss/dlogits = coef · (onehot(target) − softmax(z)) / T to ``out_row_ptr``."""
    # softmax = exp((z - hi) - lo) with lse = hi + lo split in fp32 (lo = 0 for an fp32 lse): exp(z - lse) with lse
    # rounded to fp32 lost ulp(lse) of every probability (1e-3 at a logit offset of 1e4; PyTorch works relative to
    # the row max and loses ~1e-7)
    lse = tl.load(lse_ptr + row)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(lse.dtype)).to(tl.float32)
    scale = tl.load(coef_ptr + row) * inv_temperature
    target = tl.load(ids_ptr + row).to(tl.int64)
    offs0 = tl.arange(0, BLOCK_V).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        valid = offs < V
        z = _load_scaled_logits(row_ptr, bias_ptr, offs, valid, inv_temperature, HAS_BIAS)
        p = tl.exp((z - lse_hi) - lse_lo)
        d = (tl.where(offs == target, 1.0, 0.0) - p) * scale
        tl.store(out_row_ptr + offs, d.to(out_row_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _dlogits_kernel(logits_ptr, stride_row, bias_ptr, ids_ptr, lse_ptr, coef_ptr, V, inv_temperature,
                    HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with dloss/dlogits = coef · (onehot(target) − softmax(z)) / T.

    In place: the [C, V] logits buffer becomes the dlogits buffer the grad GEMMs read, so the
    backward needs no second [C, V] allocation.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    _dlogits_row(row_ptr, row_ptr, bias_ptr, ids_ptr, lse_ptr, coef_ptr, row, V, inv_temperature, HAS_BIAS, BLOCK_V)


@triton.jit
def _dlogits_out_kernel(logits_ptr, stride_row, dlogits_ptr, stride_out_row, bias_ptr, ids_ptr, lse_ptr, coef_ptr,
                        V, inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """``_dlogits_kernel`` into a separate buffer: fp32 logits (fp16 inputs) -> fp16 dlogits for the GEMMs."""
    row = tl.program_id(0).to(tl.int64)
    _dlogits_row(logits_ptr + row * stride_row, dlogits_ptr + row * stride_out_row, bias_ptr, ids_ptr, lse_ptr,
                 coef_ptr, row, V, inv_temperature, HAS_BIAS, BLOCK_V)
