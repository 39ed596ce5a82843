"""Fused GRPO loss and log-probs from hidden states, without ever holding [N, V] logits.

Public ops: ``fused_linear_logprobs`` (no autograd: old-policy, reference and rollout log-probs) and
``fused_linear_grpo_loss`` (loss + metrics, gradients to hidden, weight and bias). The PyTorch
reference with the same signatures is ``ref_grpo_loss.py``; it also holds the shared validation and
the GRPO objective on per-token log-probs.

Design (why not one giant Triton kernel). Per token chunk of C rows (C·V·2 bytes near 512 MiB for
the loss, 256 MiB for log-probs only):
  1. ``logits = h_c @ W^T`` by cuBLAS into one reused [C, V] buffer (bf16 for bf16 inputs)  2·C·H·V
  2. ``_logit_row_stats_kernel``: online max / sum-exp / sum p·z per row -> lse, logp, entropy   reads C·V·2 B
  3. dloss/dlogp for the chunk's tokens: autograd through ``grpo_objective`` on O(C) scalars
  4. ``_dlogits_kernel`` overwrites the buffer with dlogits = g·(onehot − softmax)/T            C·V·4 B
  5. ``grad_h_c = dlogits @ W`` and ``grad_W += dlogits^T @ h_c`` by cuBLAS                    4·C·H·V
Token-level importance runs steps 1–5 in ONE sweep (6·N·H·V: exactly the matmul floor's FLOPs);
sequence-level (GSPO) needs every token of a sequence before any coefficient is known, so it runs a
stats-only sweep (1–2) and then 1, 4, 5: 8·N·H·V. The alternative, a flash-style kernel that keeps
logit tiles in registers, saves the [C, V] round trips in the forward but cannot finish the
backward in registers: grad_h needs a [BLOCK_N, H] fp32 accumulator (H = 3584 -> 1.8 MB at
BLOCK_N = 128), so either dlogits go to memory anyway or the logits are recomputed once per H tile
(H / BLOCK_H extra matmuls). cuBLAS reaches ~700 TFLOP/s on these GEMMs (ANCHORS.md); a Triton GEMM
with an online-softmax epilogue is estimated (not measured here) at 550–650 on H100, i.e. 7–20%
slower on all 6·N·H·V FLOPs, which we expect to cost more than the [C, V] traffic below.
Extra traffic at shape A (N = 16k, V = 152k): ~12·V bytes per token (write, stats read, dlogits
read+write, two GEMM reads) = 30 GB ≈ 10 ms at 3 TB/s against the 77 ms floor; fusing steps 2–4
into one kernel (second read of a row from L2) is the next step if the benchmark says so.
Memory (shape A, loss): the [C, V] buffer (512 MiB), grad_h (N·H·2 = 117 MB), grad_W in the
weight's dtype (1.09 GB): ~1.6 GiB extra, inside the 2 GiB budget (an fp32 grad_W alone would be
2.2 GB); padding adds a gathered copy of the active hidden rows and of their gradient. Log-probs
only: the 256 MiB buffer plus O(N). The bigger loss buffer halves the read-modify-writes of grad_W
(2·V·H bytes per chunk after the first). Expected at shape A, unmeasured until a GPU run: GEMMs at
cuBLAS speed (~77–82 ms) + ~10 ms of [C, V] traffic ≈ 1.15–1.2× the floor; logprobs ≈ 1.1–1.15×.
Numerics: every GEMM accumulates in fp32; softmax statistics are fp32 (fp64 inputs go to the
reference: they are the oracle's dtype and gain nothing from a kernel);
grad_W is accumulated across chunks in the weight's dtype (one rounding per chunk).

Only active tokens (mask != 0) are computed: they are gathered first, so padding costs nothing and
a fully masked batch returns loss 0 and zero gradients without launching a kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .ref_grpo_loss import (
    _check_token_range,
    compute_dtype,
    default_chunk_tokens,
    finish_metrics,
    grpo_objective,
    token_weights,
    validate_linear,
    validate_loss,
)
from .ref_grpo_loss import fused_linear_grpo_loss as _reference_loss
from .ref_grpo_loss import fused_linear_logprobs as _reference_logprobs

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


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

    Running scalars (max m, sum s of exp(z - m), sum t of exp(z - m)·z) are rescaled when m grows;
    entropy = lse − t / s. Masked lanes are excluded with ``where`` (exp(-inf)·(-inf) would be NaN).
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
        e = tl.where(valid, tl.exp(z - m_new), 0.0)
        s = s * rescale + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            # z is -inf on masked lanes; multiply by a zeroed copy so no 0·inf NaN is ever formed
            t = t * rescale + tl.sum(e * tl.where(valid, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(ids_ptr + row).to(tl.int64)
    z_target = tl.load(row_ptr + target).to(tl.float32)
    if HAS_BIAS:
        z_target += tl.load(bias_ptr + target).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_target * inv_temperature - lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, lse - t / s)


@triton.jit
def _dlogits_kernel(logits_ptr, stride_row, bias_ptr, ids_ptr, lse_ptr, coef_ptr, V, inv_temperature,
                    HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with dloss/dlogits = coef · (onehot(target) − softmax(z)) / T.

    In place: the [C, V] logits buffer becomes the dlogits buffer the grad GEMMs read, so the
    backward needs no second [C, V] allocation.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lse = tl.load(lse_ptr + row)
    scale = tl.load(coef_ptr + row) * inv_temperature
    target = tl.load(ids_ptr + row).to(tl.int64)
    offs0 = tl.arange(0, BLOCK_V).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        valid = offs < V
        z = _load_scaled_logits(row_ptr, bias_ptr, offs, valid, inv_temperature, HAS_BIAS)
        p = tl.exp(z - lse)
        d = (tl.where(offs == target, 1.0, 0.0) - p) * scale
        tl.store(row_ptr + offs, d.to(logits_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _block_v(vocab: int) -> int:
    # 4096 lanes keep a row's loop at ~37 iterations at V = 152k; small vocabularies use one tile
    # (the interpreter then runs one iteration per row).
    return min(4096, triton.next_power_of_2(vocab))


def _num_warps(block_v: int) -> int:
    # memory-bound row sweeps: more warps in flight hide HBM latency (16 elements per thread)
    return max(1, min(8, block_v // 512))


def _row_stats(logits, bias, ids, inv_temperature, lse, logp, entropy):
    rows, vocab = logits.shape
    if rows == 0:
        return
    with_entropy = entropy is not None
    _logit_row_stats_kernel[(rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, ids, lse, logp,
        entropy if with_entropy else lse, vocab, inv_temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_V=_block_v(vocab),
        num_warps=_num_warps(_block_v(vocab)))


def _dlogits_inplace(logits, bias, ids, lse, coef, inv_temperature):
    rows, vocab = logits.shape
    if rows == 0:
        return
    _dlogits_kernel[(rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, ids, lse, coef, vocab, inv_temperature,
        HAS_BIAS=bias is not None, BLOCK_V=_block_v(vocab), num_warps=_num_warps(_block_v(vocab)))


def _chunk_bounds(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


# The loss path affords a larger [C, V] buffer (fewer read-modify-writes of grad_W, 2·V·H bytes each)
# inside its 2 GiB budget; log-probs alone must stay under 0.5 GiB extra.
LOSS_CHUNK_BYTES = 512 * 2**20


def _logits_buffer(rows, vocab, like, chunk_tokens, chunk_bytes=None):
    chunk = chunk_tokens or default_chunk_tokens(vocab, like.element_size(), chunk_bytes)
    chunk = max(1, min(chunk, rows))
    return torch.empty(chunk, vocab, dtype=like.dtype, device=like.device), chunk


def _logprobs_sweep(h2d, weight, bias, ids, inv_temperature, with_entropy, chunk_tokens):
    """Stats-only sweep: (lse, logp, entropy or None), each [N] in the compute dtype."""
    n, vocab = h2d.shape[0], weight.shape[0]
    cd = compute_dtype(h2d.dtype)
    lse = torch.empty(n, dtype=cd, device=h2d.device)
    logp = torch.empty_like(lse)
    entropy = torch.empty_like(lse) if with_entropy else None
    if n == 0:
        return lse, logp, entropy
    buf, chunk = _logits_buffer(n, vocab, h2d, chunk_tokens)
    for s, e in _chunk_bounds(n, chunk):
        logits = buf[: e - s]
        torch.mm(h2d[s:e], weight.t(), out=logits)
        _row_stats(logits, bias, ids[s:e], inv_temperature, lse[s:e], logp[s:e],
                   entropy[s:e] if with_entropy else None)
    return lse, logp, entropy


class _GradAccumulator:
    """grad_h rows, grad_W and grad_b for the active tokens, from dlogits chunks."""

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


def _coefficient(logp, objective_args, want_grad):
    """(loss, kl_sum, clipped, dloss/dlogp or None) of the objective at ``logp`` (O(tokens) work)."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(want_grad)
        loss, kl_sum, clipped = grpo_objective(lp, **objective_args)
        coef = torch.autograd.grad(loss, lp)[0] if want_grad else None
    return loss.detach(), kl_sum, clipped, coef


def _grpo_loss_and_grads(hidden, weight, bias, token_ids, mask, advantages, opts, want_h, want_w, want_b):
    """Forward value, metric sums and (eagerly) the gradients; see the module docstring."""
    B, T, H = hidden.shape
    cd = compute_dtype(hidden.dtype)
    inv_t = 1.0 / opts["temperature"]
    chunk_tokens = opts["chunk_tokens"]
    active = mask.bool()
    idx = active.reshape(-1).nonzero().squeeze(-1)
    n = idx.numel()
    everyone = n == B * T  # no padding: skip the gather and scatter copies of hidden and its grad
    h_act = hidden.reshape(-1, H) if everyone else hidden.reshape(-1, H).index_select(0, idx)
    ids_act = token_ids.reshape(-1) if everyone else token_ids.reshape(-1).index_select(0, idx)
    weights = token_weights(active, opts["loss_type"], opts["max_completion_length"], opts["normalizer"], dtype=cd)
    adv = advantages.to(cd).unsqueeze(-1).expand(B, T)

    def per_token(t):
        return None if t is None else t.reshape(-1).index_select(0, idx).to(cd)

    common = dict(beta=opts["beta"], eps_low=opts["eps_low"], eps_high=opts["eps_high"], delta=opts["delta"],
                  importance_level=opts["importance_level"])
    grads = _GradAccumulator(h_act, weight, bias, want_h, want_w, want_b)
    want_grad = want_h or want_w or want_b
    zero = torch.zeros((), dtype=cd, device=hidden.device)
    loss, kl_sum, clipped, entropy_sum = zero, zero, zero, zero
    if n > 0 and opts["importance_level"] == "token":
        # One sweep: a token's coefficient depends only on its own scalars and mask-only normalizers.
        tok = dict(mask=torch.ones(n, dtype=torch.bool, device=hidden.device), adv=per_token(adv),
                   weight=per_token(weights), old_logps=per_token(opts["old_logps"]),
                   ref_logps=per_token(opts["ref_logps"]), rollout_is_ratio=per_token(opts["rollout_is_ratio"]))
        buf, chunk = _logits_buffer(n, weight.shape[0], h_act, chunk_tokens, LOSS_CHUNK_BYTES)
        lse = torch.empty(chunk, dtype=cd, device=hidden.device)
        logp = torch.empty_like(lse)
        entropy = torch.empty_like(lse)
        for s, e in _chunk_bounds(n, chunk):
            logits, c = buf[: e - s], e - s
            torch.mm(h_act[s:e], weight.t(), out=logits)
            _row_stats(logits, bias, ids_act[s:e], inv_t, lse[:c], logp[:c], entropy[:c])
            args = {k: (None if v is None else v[s:e]) for k, v in tok.items()}
            l_c, kl_c, clip_c, coef = _coefficient(logp[:c], {**args, **common}, want_grad)
            loss, kl_sum, clipped = loss + l_c, kl_sum + kl_c, clipped + clip_c
            entropy_sum = entropy_sum + entropy[:c].sum()
            if want_grad:
                _dlogits_inplace(logits, bias, ids_act[s:e], lse[:c], coef.to(cd).contiguous(), inv_t)
                grads.add(s, e, logits)
    elif n > 0:
        # GSPO: sequence ratios need every token first -> stats sweep, coefficients, grad sweep.
        lse, logp_act, entropy = _logprobs_sweep(h_act, weight, bias, ids_act, inv_t, True, chunk_tokens)
        logp_full = torch.zeros(B * T, dtype=cd, device=hidden.device).index_copy(0, idx, logp_act).view(B, T)
        seq_args = dict(mask=active, adv=adv, weight=weights, old_logps=opts["old_logps"],
                        ref_logps=opts["ref_logps"], rollout_is_ratio=opts["rollout_is_ratio"])
        loss, kl_sum, clipped, coef_full = _coefficient(logp_full, {**seq_args, **common}, want_grad)
        entropy_sum = entropy.sum()
        if want_grad:
            coef = coef_full.reshape(-1).index_select(0, idx).to(cd)
            buf, chunk = _logits_buffer(n, weight.shape[0], h_act, chunk_tokens, LOSS_CHUNK_BYTES)
            for s, e in _chunk_bounds(n, chunk):
                logits = buf[: e - s]
                torch.mm(h_act[s:e], weight.t(), out=logits)
                _dlogits_inplace(logits, bias, ids_act[s:e], lse[s:e], coef[s:e], inv_t)
                grads.add(s, e, logits)
    grad_h = None
    if want_h and everyone:
        grad_h = grads.grad_h.view(B, T, H)
    elif want_h:
        grad_h = torch.zeros(B * T, H, dtype=hidden.dtype, device=hidden.device)
        grad_h.index_copy_(0, idx, grads.grad_h)
        grad_h = grad_h.view(B, T, H)
    grad_b = grads.grad_b.to(bias.dtype) if want_b else None
    metrics = finish_metrics(active, opts["beta"], kl_sum, clipped, entropy_sum)
    return loss, metrics, (grad_h, grads.grad_w, grad_b)


# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------


class _FusedLinearGRPOLossFunction(torch.autograd.Function):
    """Loss forward that computes the gradients eagerly (they need the same logit tiles).

    The backward only scales the stored gradients by the incoming scalar grad of the loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, mask, advantages, opts, want):
        loss, metrics, grads = _grpo_loss_and_grads(hidden, weight, bias, token_ids, mask, advantages, opts, *want)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.present = tuple(g is not None for g in grads)
        kl = metrics.get("kl", torch.zeros((), dtype=loss.dtype, device=loss.device))
        ctx.mark_non_differentiable(kl, metrics["clip_frac"], metrics["entropy"])
        return loss, kl, metrics["clip_frac"], metrics["entropy"]

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        out = []
        for g, present in zip(ctx.saved_tensors, ctx.present, strict=False):
            if not present:
                out.append(None)
            elif grad_loss.item() == 1.0:  # the common case: no extra pass over grad_W
                out.append(g)
            else:
                out.append(g * grad_loss.to(g.dtype))
        return (*out, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def _kernel_applies(hidden) -> bool:
    """The dispatch rule, except fp64 (the oracle dtype): that always runs the reference."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype == torch.float64:
        return False
    return use_triton(hidden.device)


def fused_linear_logprobs(hidden, weight, token_ids, *, bias=None, temperature=1.0, return_entropy=False,
                          chunk_tokens=None):
    """log softmax(hidden · Wᵀ (+ bias) / temperature)[token] without materializing [N, V].

    hidden [B, T, H] or [N, H]; weight [V, H] (same dtype); token_ids shaped like hidden.shape[:-1],
    every id in [0, V). Returns fp32 log-probs shaped like ``token_ids`` (fp64 for fp64 inputs) and,
    with ``return_entropy``, the per-token entropy of the same distribution. No autograd.
    ``chunk_tokens`` bounds the [chunk, V] logits buffer (default: ~256 MiB worth of rows).
    """
    if not _kernel_applies(hidden):
        return _reference_logprobs(hidden, weight, token_ids, bias=bias, temperature=temperature,
                                   return_entropy=return_entropy, chunk_tokens=chunk_tokens)
    validate_linear(hidden, weight, token_ids, bias, temperature)
    _check_token_range(token_ids, weight.shape[0])
    with torch.no_grad():
        h2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        _, logp, entropy = _logprobs_sweep(h2d, weight.contiguous(), bias, token_ids.reshape(-1).contiguous(),
                                           1.0 / temperature, return_entropy, chunk_tokens)
    logp = logp.view(token_ids.shape)
    return (logp, entropy.view(token_ids.shape)) if return_entropy else logp


def fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages, *, old_logps=None, ref_logps=None, bias=None,
                           beta=0.0, eps_low=0.2, eps_high=0.2, delta=None, temperature=1.0, loss_type="grpo",
                           importance_level="token", max_completion_length=None, normalizer=None,
                           rollout_is_ratio=None, chunk_tokens=None):
    """GRPO loss from hidden states [B, T, H] and the lm_head weight [V, H]; returns (loss, metrics).

    logp = log_softmax(hidden·Wᵀ (+bias) / temperature)[token], m = mask, A = advantages [B].
    r = exp(logp − old) (old = logp.detach() when ``old_logps`` is None); with
    ``importance_level="sequence"`` (GSPO) every token of sequence i uses
    r_i = exp(Σ_t m·(logp − old) / Σ_t m). Per token
    ℓ = −min(min(r, delta)·A, clip(r, 1 − eps_low, 1 + eps_high)·A) [· rollout_is_ratio] + beta·k3,
    k3 = exp(ref − logp) − (ref − logp) − 1. Reductions: "grpo" mean over sequences of
    Σ_t mℓ / max(Σ_t m, 1); "bnpo" Σmℓ / max(Σm, 1); "dr_grpo" Σmℓ / (B · max_completion_length);
    "dapo" Σmℓ / normalizer (the global active-token count; Σm when None).
    Metrics (detached 0-d tensors): "kl" (masked mean k3, only when beta > 0), "clip_frac" (fraction
    of active tokens with (r < 1 − eps_low and A < 0) or (r > 1 + eps_high and A > 0): the tokens
    whose clipped branch is taken), "entropy" (masked mean). Gradients reach hidden, weight, bias.

    Differences from TRL's GRPOTrainer, and why:
      * masked positions never influence anything: their log-ratio, k3 and rollout_is_ratio are
        zeroed before use, and their token ids are not range-checked (padding may hold -100);
        TRL multiplies by the mask afterwards, so an inf/NaN in a padded old/ref log-prob turns
        into NaN there.
      * metrics are means over this call's active tokens; TRL gathers them across processes
        (do that outside: the op has no process group).
      * "dapo" takes the normalizer as given (TRL divides num_items_in_batch by the process count;
        pass that quotient if your gradients are averaged across ranks).
      * CISPO/SAPO/VESPO/LUSPO loss types and the bias-corrected KL are not implemented.
    """
    validate_loss(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, bias, beta, eps_low, eps_high,
                  delta, temperature, loss_type, importance_level, max_completion_length, normalizer,
                  rollout_is_ratio)
    if not _kernel_applies(hidden):
        return _reference_loss(hidden, weight, token_ids, mask, advantages, old_logps=old_logps, ref_logps=ref_logps,
                               bias=bias, beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta,
                               temperature=temperature, loss_type=loss_type, importance_level=importance_level,
                               max_completion_length=max_completion_length, normalizer=normalizer,
                               rollout_is_ratio=rollout_is_ratio, chunk_tokens=chunk_tokens)
    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    opts = dict(old_logps=old_logps, ref_logps=ref_logps, beta=float(beta), eps_low=float(eps_low),
                eps_high=float(eps_high), delta=delta, temperature=float(temperature), loss_type=loss_type,
                importance_level=importance_level, max_completion_length=max_completion_length,
                normalizer=normalizer, rollout_is_ratio=rollout_is_ratio, chunk_tokens=chunk_tokens)
    loss, kl, clip_frac, entropy = _FusedLinearGRPOLossFunction.apply(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), token_ids, mask,
        advantages, opts, want)
    metrics = {"clip_frac": clip_frac, "entropy": entropy}
    if beta > 0:
        metrics["kl"] = kl
    return loss, metrics
