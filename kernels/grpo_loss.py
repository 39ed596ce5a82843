"""Fused GRPO loss and log-probs from hidden states, without ever holding [N, V] logits.

Public ops: ``fused_linear_logprobs`` (no autograd: old-policy, reference and rollout log-probs) and
``fused_linear_grpo_loss`` (loss + metrics, gradients to hidden, weight and bias). The PyTorch
reference with the same signatures is ``ref_grpo_loss.py``; it also holds the shared validation and
the GRPO objective on per-token log-probs. The per-chunk steps (row kernels, dloss/dlogp, gradient
GEMMs) live in ``grpo_loss_kernels.py``; this file holds the sweep, the ops and the public functions.

Design (why not one giant Triton kernel). Per token chunk of C rows (C·V·2 bytes near 512 MiB for
the loss, 256 MiB for log-probs only):
  1. ``logits = h_c @ W^T`` by cuBLAS into one reused [C, V] buffer (bf16 for bf16; fp32 for fp16)  2·C·H·V
  2. ``_logit_row_stats_kernel``: online max / sum-exp / sum p·(z − max) per row -> lse, logp, entropy   reads C·V·2 B
  3. dloss/dlogp for the chunk's tokens: autograd through ``grpo_objective`` on O(C) scalars
  4. ``_dlogits_kernel`` overwrites the buffer with dlogits = g·(onehot − softmax)/T            C·V·4 B
     (fp16: an fp32 buffer cannot feed fp16 GEMMs, so fp16 dlogits go to a second buffer; the reason,
     65504 < logits, and the cost are in ``grpo_logits_chunk.py``)
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

torch.compile. Each public function calls ONE registered op for its whole chunked sweep:
``torch.ops.r1fast.grpo_linear_logprobs`` -> (logp, entropy) and ``grpo_linear_loss_and_grads`` ->
(loss, kl, clip_frac, entropy, grad_hidden, grad_weight, grad_bias; unwanted grads are empty), and
``_FusedLinearGRPOLossFunction`` saves the grads and scales them by grad_output in backward. Why one
op and not ops for the two row launchers with the Python chunk loop traced: the sweep gathers the
active tokens with ``nonzero`` (a data-dependent size dynamo cannot trace without graph breaks), runs
autograd on O(C) scalars inside the loop, and its chunk count depends on the shapes, so a traced loop
would unroll into one graph node per chunk and re-trace per shape; opaque, the op has static output
shapes (a 10-line fake), eager pays one dispatch (~1 us) per call instead of one per chunk kernel,
and compiled and eager run the same kernels in the same order (bitwise-equal results). The autograd
inside the loss op is re-enabled by ``objective_coefficient`` when a dispatch mode calls the op below
autograd (aot_autograd's compiled runtime does). Shape, dtype and option checks always run; those
that read device values (non-finite hidden, token range, a tensor normalizer's value, a mask that is
not 0/1) run only while ``host_checks_enabled()``: torch.compile and CUDA-graph capture cannot run
them. The reference path follows the same rule, so both trace with ``fullgraph=True``.
"""

from __future__ import annotations

import torch

from .grpo_logits_chunk import _kernel_applies, chunk_rows, dlogits_buffer, logits_dtype, logits_gemm
from .grpo_loss_kernels import GradAccumulator, dlogits_inplace, objective_coefficient, row_stats
from .ref_grpo_loss import (
    _check_token_range,
    check_chunk_tokens,
    compute_dtype,
    finish_metrics,
    token_weights,
    validate_linear,
    validate_loss,
)
from .ref_grpo_loss import fused_linear_grpo_loss as _reference_loss
from .ref_grpo_loss import fused_linear_logprobs as _reference_logprobs
from .registration import host_checks_enabled, register_op

# ----------------------------------------------------------------------------------------------
# the chunked sweep (runs inside the registered ops)
# ----------------------------------------------------------------------------------------------


def _chunk_bounds(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


# The loss path affords a larger [C, V] buffer (fewer read-modify-writes of grad_W, 2·V·H bytes each)
# inside its 2 GiB budget; log-probs alone must stay under 0.5 GiB extra.
LOSS_CHUNK_BYTES = 512 * 2**20


def _logits_buffer(rows, vocab, like, chunk_tokens, chunk_bytes=None, with_dlogits=False):
    """(the [chunk, V] logits buffer, chunk): fp32 for fp16 inputs (see grpo_logits_chunk.py)."""
    chunk = chunk_rows(rows, vocab, like.dtype, chunk_tokens, chunk_bytes, with_dlogits)
    return torch.empty(chunk, vocab, dtype=logits_dtype(like.dtype), device=like.device), chunk


def _logprobs_sweep(h2d, weight, bias, ids, inv_temperature, with_entropy, chunk_tokens):
    """Stats-only sweep: (lse in fp64, logp, entropy or None), each [N], the last two in the compute dtype."""
    n, vocab = h2d.shape[0], weight.shape[0]
    cd = compute_dtype(h2d.dtype)
    lse = torch.empty(n, dtype=torch.float64, device=h2d.device)  # fp64: see grpo_loss_kernels.row_stats
    logp = torch.empty(n, dtype=cd, device=h2d.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    if n == 0:
        return lse, logp, entropy
    buf, chunk = _logits_buffer(n, vocab, h2d, chunk_tokens)
    fill_logits = logits_gemm(weight, buf.dtype)
    for s, e in _chunk_bounds(n, chunk):
        logits = buf[: e - s]
        fill_logits(h2d[s:e], logits)
        row_stats(logits, bias, ids[s:e], inv_temperature, lse[s:e], logp[s:e],
                   entropy[s:e] if with_entropy else None)
    return lse, logp, entropy


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
    grads = GradAccumulator(h_act, weight, bias, want_h, want_w, want_b)
    want_grad = want_h or want_w or want_b
    zero = torch.zeros((), dtype=cd, device=hidden.device)
    loss, kl_sum, clipped, entropy_sum = zero, zero, zero, zero
    if n > 0 and opts["importance_level"] == "token":
        # One sweep: a token's coefficient depends only on its own scalars and mask-only normalizers.
        tok = dict(mask=torch.ones(n, dtype=torch.bool, device=hidden.device), adv=per_token(adv),
                   weight=per_token(weights), old_logps=per_token(opts["old_logps"]),
                   ref_logps=per_token(opts["ref_logps"]), rollout_is_ratio=per_token(opts["rollout_is_ratio"]))
        buf, chunk = _logits_buffer(n, weight.shape[0], h_act, chunk_tokens, LOSS_CHUNK_BYTES, want_grad)
        fill_logits, dl_buf = logits_gemm(weight, buf.dtype), dlogits_buffer(buf, hidden.dtype) if want_grad else None
        lse = torch.empty(chunk, dtype=torch.float64, device=hidden.device)  # fp64: see row_stats
        logp = torch.empty(chunk, dtype=cd, device=hidden.device)
        entropy = torch.empty_like(logp)
        for s, e in _chunk_bounds(n, chunk):
            logits, c = buf[: e - s], e - s
            fill_logits(h_act[s:e], logits)
            row_stats(logits, bias, ids_act[s:e], inv_t, lse[:c], logp[:c], entropy[:c])
            args = {k: (None if v is None else v[s:e]) for k, v in tok.items()}
            l_c, kl_c, clip_c, coef = objective_coefficient(logp[:c], {**args, **common}, want_grad)
            loss, kl_sum, clipped = loss + l_c, kl_sum + kl_c, clipped + clip_c
            entropy_sum = entropy_sum + entropy[:c].sum()
            if want_grad:
                dl = logits if dl_buf is buf else dl_buf[:c]  # bf16/fp32: in place, the one-buffer kernel
                dlogits_inplace(logits, bias, ids_act[s:e], lse[:c], coef.to(cd).contiguous(), inv_t, dl)
                grads.add(s, e, dl)
    elif n > 0:
        # GSPO: sequence ratios need every token first -> stats sweep, coefficients, grad sweep.
        lse, logp_act, entropy = _logprobs_sweep(h_act, weight, bias, ids_act, inv_t, True, chunk_tokens)
        logp_full = torch.zeros(B * T, dtype=cd, device=hidden.device).index_copy(0, idx, logp_act).view(B, T)
        seq_args = dict(mask=active, adv=adv, weight=weights, old_logps=opts["old_logps"],
                        ref_logps=opts["ref_logps"], rollout_is_ratio=opts["rollout_is_ratio"])
        loss, kl_sum, clipped, coef_full = objective_coefficient(logp_full, {**seq_args, **common}, want_grad)
        entropy_sum = entropy.sum()
        if want_grad:
            coef = coef_full.reshape(-1).index_select(0, idx).to(cd)
            buf, chunk = _logits_buffer(n, weight.shape[0], h_act, chunk_tokens, LOSS_CHUNK_BYTES, True)
            fill_logits, dl_buf = logits_gemm(weight, buf.dtype), dlogits_buffer(buf, hidden.dtype)
            for s, e in _chunk_bounds(n, chunk):
                logits, c = buf[: e - s], e - s
                fill_logits(h_act[s:e], logits)
                dl = logits if dl_buf is buf else dl_buf[:c]
                dlogits_inplace(logits, bias, ids_act[s:e], lse[s:e], coef[s:e], inv_t, dl)
                grads.add(s, e, dl)
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
# torch.library registration (see the module docstring, "torch.compile")
# ----------------------------------------------------------------------------------------------


def _linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     token_ids: torch.Tensor, temperature: float, with_entropy: bool,
                     chunk_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], token_ids [N] -> (logp [N], entropy [N], or [0] when not ``with_entropy``)."""
    _, logp, entropy = _logprobs_sweep(hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
                                       token_ids.contiguous(), 1.0 / temperature, with_entropy, chunk_tokens)
    return logp, entropy if with_entropy else logp.new_empty(0)


def _linear_logprobs_fake(hidden, weight, bias, token_ids, temperature, with_entropy, chunk_tokens):
    n, cd = hidden.shape[0], compute_dtype(hidden.dtype)
    return hidden.new_empty(n, dtype=cd), hidden.new_empty(n if with_entropy else 0, dtype=cd)


def _linear_grpo_loss_and_grads(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
        mask: torch.Tensor, advantages: torch.Tensor, old_logps: torch.Tensor | None,
        ref_logps: torch.Tensor | None, rollout_is_ratio: torch.Tensor | None, normalizer: torch.Tensor | None,
        beta: float, eps_low: float, eps_high: float, delta: float | None, temperature: float, loss_type: str,
        importance_level: str, max_completion_length: float | None, chunk_tokens: int | None, want_hidden_grad: bool,
        want_weight_grad: bool, want_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, clip_frac, entropy, grad_hidden, grad_weight, grad_bias) of the fused GRPO loss.

    The three gradients are those of the loss itself (a backward with grad_output 1); an unwanted
    one (or grad_bias without a bias) is an empty tensor. kl is 0 when beta == 0.
    """
    opts = dict(old_logps=old_logps, ref_logps=ref_logps, beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta,
                temperature=temperature, loss_type=loss_type, importance_level=importance_level,
                max_completion_length=max_completion_length, normalizer=normalizer,
                rollout_is_ratio=rollout_is_ratio, chunk_tokens=chunk_tokens)
    want_b = want_bias_grad and bias is not None
    # token_ids may stay strided: the row kernels' launchers make the ids they read by ``ptr + row`` contiguous
    # (grpo_loss_kernels._flat_rows). The other per-token inputs (mask, advantages, old/ref logps,
    # rollout_is_ratio) reach only torch ops (index_select, where), which honour any strides.
    loss, metrics, grads = _grpo_loss_and_grads(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), token_ids,
        mask, advantages, opts, want_hidden_grad, want_weight_grad, want_b)
    kl = metrics.get("kl", torch.zeros((), dtype=loss.dtype, device=loss.device))
    grads = [g if g is not None else like.new_empty(0) for g, like in zip(grads, (hidden, weight, weight))]
    return (loss, kl, metrics["clip_frac"], metrics["entropy"], *grads)


def _linear_grpo_loss_and_grads_fake(hidden, weight, bias, token_ids, mask, advantages, old_logps, ref_logps,
                                     rollout_is_ratio, normalizer, beta, eps_low, eps_high, delta, temperature,
                                     loss_type, importance_level, max_completion_length, chunk_tokens,
                                     want_hidden_grad, want_weight_grad, want_bias_grad):
    cd = compute_dtype(hidden.dtype)
    scalars = [hidden.new_empty((), dtype=cd) for _ in range(4)]
    grad_h = hidden.new_empty(hidden.shape) if want_hidden_grad else hidden.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if want_weight_grad else weight.new_empty(0)
    grad_b = bias.new_empty(bias.shape) if want_bias_grad and bias is not None else weight.new_empty(0)
    return (*scalars, grad_h, grad_w, grad_b)


linear_logprobs_op = register_op("grpo_linear_logprobs", _linear_logprobs, fake=_linear_logprobs_fake)
linear_grpo_loss_op = register_op("grpo_linear_loss_and_grads", _linear_grpo_loss_and_grads,
                                  fake=_linear_grpo_loss_and_grads_fake)


# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------


class _FusedLinearGRPOLossFunction(torch.autograd.Function):
    """The loss op's forward already produced the gradients (they need the same logit tiles).

    The backward only scales the saved gradients by the incoming scalar grad of the loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, mask, advantages, old_logps, ref_logps, rollout_is_ratio,
                normalizer, scalars, want):
        loss, kl, clip_frac, entropy, *grads = linear_grpo_loss_op(
            hidden, weight, bias, token_ids, mask, advantages, old_logps, ref_logps, rollout_is_ratio, normalizer,
            *scalars, *want)
        ctx.save_for_backward(*grads)
        ctx.want = want
        ctx.mark_non_differentiable(kl, clip_frac, entropy)
        return loss, kl, clip_frac, entropy

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(ctx.want):
            # create_graph=True: the saved grads are constants to autograd, so a gradient penalty built
            # from them would silently lose its second-order term (54% off in the probe). A node that
            # raises when differentiated would not do: this Function keeps no edge to hidden/weight
            # (saving them would pin hidden until backward), so autograd would never visit it.
            raise RuntimeError("fused_linear_grpo_loss: the kernel path has no double backward (backward with "
                               "create_graph=True); use the PyTorch reference (R1FAST_KERNELS=torch) for it")
        # grad_loss is almost always exactly 1: returning the saved grads as they are skips a pass
        # over grad_W (1.1 GB at V = 152k). Reading it is a host sync, so traced graphs (and CUDA
        # graph captures) always multiply instead: g * 1 is bitwise g, so the results agree.
        unit = host_checks_enabled(grad_loss) and grad_loss.item() == 1.0
        out = [None if not wanted else g if unit else g * grad_loss.to(g.dtype)
               for g, wanted in zip(ctx.saved_tensors, ctx.want, strict=True)]
        return (*out, *([None] * 9))


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


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
    host_checks = host_checks_enabled(hidden)  # see the module docstring: some checks read device values
    validate_linear(hidden, weight, token_ids, bias, temperature, host_checks=host_checks)
    check_chunk_tokens(chunk_tokens)
    if host_checks:
        _check_token_range(token_ids, weight.shape[0])
    with torch.no_grad():  # the op has no autograd formula: its outputs must not look differentiable
        logp, entropy = linear_logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                           token_ids.reshape(-1), float(temperature), return_entropy, chunk_tokens)
    logp = logp.view(token_ids.shape)
    return (logp, entropy.view(token_ids.shape)) if return_entropy else logp


def fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages, *, old_logps=None, ref_logps=None, bias=None,
                           beta=0.0, eps_low=0.2, eps_high=0.2, delta=None, temperature=1.0, loss_type="grpo",
                           importance_level="token", max_completion_length=None, normalizer=None,
                           rollout_is_ratio=None, chunk_tokens=None):
    """GRPO loss from hidden states [B, T, H] and the lm_head weight [V, H]; returns (loss, metrics).

    logp = log_softmax(hidden·Wᵀ (+bias) / temperature)[token], m = mask (bool or 0/1: other values
    are rejected, per-token weights are not supported), A = advantages [B].
    r = exp(logp − old) (old = logp.detach() when ``old_logps`` is None); with
    ``importance_level="sequence"`` (GSPO) every token of sequence i uses
    r_i = exp(Σ_t m·(logp − old) / Σ_t m). Per token
    ℓ = −min(min(r, delta)·A, clip(r, 1 − eps_low, 1 + eps_high)·A) [· rollout_is_ratio] + beta·k3,
    k3 = exp(ref − logp) − (ref − logp) − 1. Reductions: "grpo" mean over sequences of
    Σ_t mℓ / max(Σ_t m, 1); "bnpo" Σmℓ / max(Σm, 1); "dr_grpo" Σmℓ / (B · max_completion_length);
    "dapo" Σmℓ / normalizer (the global active-token count; Σm when None).
    Metrics (detached 0-d tensors): "kl" (masked mean k3, only when beta > 0), "clip_frac" (fraction
    of active tokens with (r' < 1 − eps_low and A < 0) or (r' > 1 + eps_high and A > 0), r' = min(r, delta)
    as in TRL: the tokens whose clipped branch is taken), "entropy" (masked mean). Gradients reach hidden, weight, bias
    only: any other tensor argument that requires grad is a ValueError (pass it detached), and the
    kernel path has no double backward (a backward with create_graph=True raises; the reference,
    ``R1FAST_KERNELS=torch``, supports it). ``normalizer`` must be finite and > 0. hidden, weight and
    bias share one dtype: bf16 hidden states with an fp32 master weight (autocast) is a ValueError; pass
    ``weight.to(hidden.dtype)`` (what autocast's matmul would use; its gradient flows back in fp32).

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
    if not _kernel_applies(hidden):  # the reference validates (once) with the same checks
        return _reference_loss(hidden, weight, token_ids, mask, advantages, old_logps=old_logps, ref_logps=ref_logps,
                               bias=bias, beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta,
                               temperature=temperature, loss_type=loss_type, importance_level=importance_level,
                               max_completion_length=max_completion_length, normalizer=normalizer,
                               rollout_is_ratio=rollout_is_ratio, chunk_tokens=chunk_tokens)
    # see the module docstring: the checks that read device values are skipped under compile / capture
    validate_loss(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, bias, beta, eps_low,
                  eps_high, delta, temperature, loss_type, importance_level, max_completion_length, normalizer,
                  rollout_is_ratio, host_checks=host_checks_enabled(hidden), chunk_tokens=chunk_tokens)
    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):  # the op's schema takes a tensor
        normalizer = torch.as_tensor(normalizer, dtype=compute_dtype(hidden.dtype), device=hidden.device)
    scalars = (float(beta), float(eps_low), float(eps_high), None if delta is None else float(delta), float(temperature),
               loss_type, importance_level, None if max_completion_length is None else float(max_completion_length),
               chunk_tokens)
    loss, kl, clip_frac, entropy = _FusedLinearGRPOLossFunction.apply(
        hidden, weight, bias, token_ids, mask, advantages, old_logps, ref_logps, rollout_is_ratio, normalizer,
        scalars, want)
    metrics = {"clip_frac": clip_frac, "entropy": entropy}
    if beta > 0:
        metrics["kl"] = kl
    return loss, metrics
