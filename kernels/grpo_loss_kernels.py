"""Per-chunk steps of the fused GRPO loss: the two row kernels, dloss/dlogp, the gradient GEMMs.

The chunked sweep in ``grpo_loss.py`` fills a [C, V] buffer with ``h_c @ W^T`` (cuBLAS) and calls the
two row launchers below on it:
  ``row_stats``        per row, online over V: logsumexp, log p(target) and entropy of softmax(z)
  ``dlogits_inplace``  overwrites each row with dloss/dlogits = coef · (onehot(target) − softmax(z)) / T
                       (or, for fp32 logits from fp16 inputs, writes them to a separate fp16 buffer)
where z = (logits + bias) / T. Both follow the dispatch rule (``dispatch.use_triton``): the Triton
kernel (compiled on CUDA, interpreted on CPU under ``TRITON_INTERPRET=1``), else a PyTorch version
of the same arithmetic, so the registered ops built on them run on every device.
Statistics are fp32 (fp64 only on the PyTorch path, for fp64 inputs): the outputs' dtype decides.
Between the two, ``objective_coefficient`` gets dloss/dlogp by autograd through ``grpo_objective`` on
the chunk's O(C) scalars; after them ``GradAccumulator`` runs the gradient GEMMs on the dlogits.
"""

from __future__ import annotations

import contextlib

import torch

from .dispatch import use_triton
from .launch_math import next_power_of_2
from .ref_grpo_loss import compute_dtype, grpo_objective

# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _block_v(vocab: int) -> int:
    # 4096 lanes keep a row's loop at ~37 iterations at V = 152k; small vocabularies use one tile
    # (the interpreter then runs one iteration per row).
    return min(4096, next_power_of_2(vocab))


def _num_warps(block_v: int) -> int:
    # memory-bound row sweeps: more warps in flight hide HBM latency (16 elements per thread)
    return max(1, min(8, block_v // 512))


def _scaled_logits_torch(logits, bias, inv_temperature, dtype):
    z = logits.to(dtype)
    if bias is not None:
        z = z + bias.to(dtype)
    return z * inv_temperature


def _flat_rows(logits, bias, ids):
    """The launchers' views: the kernels index ids/bias by ``ptr + i`` and a row's logits by
    ``row_ptr + v``, i.e. they assume unit strides there. A strided ``token_ids`` view (ids[:, ::2],
    stride 2) was once read as contiguous: loss 0.131 instead of -0.094, no error. Inputs are made
    contiguous here (an O(C) copy, a no-op when already so); the [C, V] buffer is written in place,
    so it cannot be copied: a non-unit vocab stride is refused instead."""
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError(f"logits must have unit stride along the vocabulary, got strides {tuple(logits.stride())}")
    return (None if bias is None else bias.contiguous()), ids.contiguous()


def _unit_stride_out(t):
    """``t`` itself when the kernel may store to it by ``ptr + row``, else a contiguous stand-in."""
    return None if t is None else t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)


def row_stats(logits, bias, ids, inv_temperature, lse, logp, entropy):
    """Fill lse, logp (and entropy unless None), each [C], from the [C, V] ``logits`` rows.

    lse = m + log s is formed in ``lse``'s dtype: an fp64 ``lse`` keeps the bits of log s under a large row max m,
    which ``dlogits_inplace`` needs; logp and entropy are relative to m either way."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if not use_triton(logits.device):
        z = _scaled_logits_torch(logits, bias, inv_temperature, logp.dtype)
        # log_softmax works relative to the row max: lse − Σ p·z would cancel at large |z| (see the kernel)
        log_p = torch.log_softmax(z, dim=-1)
        m = z.amax(-1)  # lse = m + log s formed in lse's dtype, as the kernel does (fp64 keeps log s's bits)
        lse.copy_(m.to(lse.dtype) + torch.log(torch.exp(z - m.unsqueeze(-1)).sum(-1)).to(lse.dtype))
        logp.copy_(log_p.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1))
        if entropy is not None:
            entropy.copy_(-(log_p.exp() * log_p).sum(-1))
        return
    from .grpo_loss_triton import _logit_row_stats_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    bias, ids = _flat_rows(logits, bias, ids)
    outs = (lse, logp, entropy)
    lse_k, logp_k, entropy_k = (_unit_stride_out(t) for t in outs)
    with_entropy = entropy is not None
    _logit_row_stats_kernel[(rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, ids, lse_k, logp_k,
        entropy_k if with_entropy else lse_k, vocab, inv_temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_V=_block_v(vocab),
        num_warps=_num_warps(_block_v(vocab)))
    for out, written in zip(outs, (lse_k, logp_k, entropy_k), strict=True):
        if out is not None and written is not out:
            out.copy_(written)


def dlogits_inplace(logits, bias, ids, lse, coef, inv_temperature, out=None):
    """Overwrite the [C, V] ``logits`` with coef · (onehot(ids) − softmax(z)) / T, row by row.

    ``lse`` from ``row_stats``: pass it in fp64 (the sweeps do) for softmax to PyTorch's accuracy at large logits.

    With ``out`` (a [C, V] buffer of another dtype: fp16 dlogits from fp32 logits) the rows go there
    and ``logits`` is only read.
    """
    rows, vocab = logits.shape
    out = logits if out is None else out
    if rows == 0:
        return
    if out.shape != logits.shape:
        raise ValueError(f"out must be shaped like logits {tuple(logits.shape)}, got {tuple(out.shape)}")
    if not use_triton(logits.device):
        cd = compute_dtype(logits.dtype)
        z = _scaled_logits_torch(logits, bias, inv_temperature, cd)
        lse_hi = lse.to(cd)  # lse = hi + lo, as in the kernel (lo = 0 unless lse is finer than cd)
        lse_lo = (lse - lse_hi.to(lse.dtype)).to(cd)
        d = -torch.exp((z - lse_hi.unsqueeze(-1)) - lse_lo.unsqueeze(-1))
        d.scatter_add_(-1, ids.long().unsqueeze(-1), torch.ones_like(lse_hi).unsqueeze(-1))
        out.copy_(d * (coef.to(cd) * inv_temperature).unsqueeze(-1))
        return
    from .grpo_loss_triton import _dlogits_kernel, _dlogits_out_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    bias, ids = _flat_rows(logits, bias, ids)
    if out.stride(1) != 1 and out.shape[1] > 1:  # the kernel stores by ``row_ptr + v`` in out too
        raise ValueError(f"logits must have unit stride along the vocabulary, got strides {tuple(out.stride())}")
    tail = (bias if bias is not None else logits, ids, lse.contiguous(), coef.contiguous(), vocab, inv_temperature)
    consts = dict(HAS_BIAS=bias is not None, BLOCK_V=_block_v(vocab), num_warps=_num_warps(_block_v(vocab)))
    if out is logits:
        _dlogits_kernel[(rows,)](logits, logits.stride(0), *tail, **consts)
    else:
        _dlogits_out_kernel[(rows,)](logits, logits.stride(0), out, out.stride(0), *tail, **consts)


# ----------------------------------------------------------------------------------------------
# the other per-chunk steps: dloss/dlogp on O(C) scalars, gradient GEMMs
# ----------------------------------------------------------------------------------------------

def _autograd_keys():
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        keys = keys | torch._C.DispatchKeySet(key)
    return keys


_AUTOGRAD_KEYS = _autograd_keys()


def _autograd_on():
    """Grad mode on, with autograd's dispatch keys back when the op runs below autograd.

    A TorchDispatchMode calls the op with the autograd keys excluded (aot_autograd's compiled
    runtime installs one); there ``enable_grad`` alone would record nothing for the objective.
    ``torch.func.grad`` would be the public way, but it fails under a Python dispatch mode
    (opcheck's SchemaCheckMode: "Cannot access data pointer of Tensor that doesn't have storage"),
    so this uses torch's private dispatch-key guard; the compile and opcheck tests catch a torch
    release that changes it.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    if not exclude.has(torch._C.DispatchKey.AutogradFunctionality):
        return torch.enable_grad()
    stack = contextlib.ExitStack()
    stack.enter_context(torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                                        exclude - _AUTOGRAD_KEYS))
    stack.enter_context(torch.enable_grad())
    return stack


def objective_coefficient(logp, objective_args, want_grad):
    """(loss, kl_sum, clipped, dloss/dlogp or None) of ``grpo_objective`` at ``logp`` (O(tokens) work)."""
    with _autograd_on():
        lp = logp.detach().requires_grad_(want_grad)
        loss, kl_sum, clipped = grpo_objective(lp, **objective_args)
        coef = torch.autograd.grad(loss, lp)[0] if want_grad else None
    return loss.detach(), kl_sum, clipped, coef


class GradAccumulator:
    """grad_h rows, grad_W and grad_b for the active tokens, from dlogits chunks (cuBLAS GEMMs)."""

    def __init__(self, h_active, weight, bias, want_h, want_w, want_b):
        self.h = h_active
        self.weight = weight
        self.grad_h = torch.empty_like(h_active) if want_h else None
        self.grad_w = torch.zeros_like(weight) if want_w else None
        self.grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        self.first = True

    def add(self, s, e, dlogits):
        if self.grad_h is not None:
            torch.mm(dlogits, self.weight, out=self.grad_h[s:e])
        if self.grad_w is not None:
            if self.first:  # a plain GEMM: no read of the zeroed buffer
                torch.mm(dlogits.t(), self.h[s:e], out=self.grad_w)
            else:
                self.grad_w.addmm_(dlogits.t(), self.h[s:e])
        if self.grad_b is not None:
            self.grad_b += dlogits.sum(0, dtype=torch.float32)
        self.first = False
