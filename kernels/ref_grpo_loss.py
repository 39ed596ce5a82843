"""PyTorch reference of the fused GRPO loss and log-prob ops: the CPU fallback and the test oracle.

Same signatures as ``grpo_loss.py``. Logits are built ``chunk_tokens`` tokens at a time and each
chunk is recomputed in backward (``torch.utils.checkpoint``), so neither the forward nor the
backward ever holds [N, V]. Computation runs in fp64 for fp64 inputs and in fp32 otherwise.

This file also owns what both implementations share and what is not a kernel: input validation
(``validate_*``, written in ``ref_grpo_checks.py`` and re-exported here), the per-token weights of each loss type (``token_weights``) and the GRPO objective
on per-token log-probs (``grpo_objective``). The Triton path calls the same objective on O(N)
scalars to get dloss/dlogp, so both paths agree by construction on the loss options; the tests check
both against an independent dense fp64 transcription of TRL's formulas.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from .ref_grpo_checks import (  # noqa: F401 (re-exported: grpo_loss.py and the tests import them from here)
    IMPORTANCE_LEVELS,
    LOSS_TYPES,
    _check_token_range,
    check_chunk_tokens,
    validate_linear,
    validate_loss,
)
from .registration import host_checks_enabled

DEFAULT_CHUNK_BYTES = 256 * 2**20  # the kernel path's [C, V] log-probs buffer (grpo_loss.py)
# The reference holds REF_LIVE_CHUNK_BUFFERS [C, V] buffers at once (shifted logits + logsumexp's or the
# entropy's temporaries), all within REF_CHUNK_BYTES. One 256 MiB buffer with four alive (logits,
# log_softmax, exp, exp·logp) took 1.06 GiB for log-probs at V = 152k; the issue allows 0.5 GiB.
# The loss's backward (autograd through one chunk's recompute and softmax) holds about 5 chunk-sized
# buffers: measured 641 MB extra for fp32 forward + backward at V = 152k, H = 64 (forward 242 MB), inside
# the 2 GiB the issue allows the loss.
REF_CHUNK_BYTES = 256 * 2**20
REF_LIVE_CHUNK_BUFFERS = 2
# bf16/fp16 weights are upcast one vocab slice at a time: a whole upcast per chunk copied 2.2 GB (152k x 3584).
WEIGHT_SLICE_BYTES = 32 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (the oracle); every other input dtype is computed and returned in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_tokens(vocab: int, element_size: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk so that one [chunk, V] logits buffer stays near ``chunk_bytes``."""
    rows = (chunk_bytes or DEFAULT_CHUNK_BYTES) // max(1, vocab * element_size)
    return max(16, rows // 16 * 16)


# ----------------------------------------------------------------------------------------------
# the objective on per-token log-probs (shared with the Triton path)
# ----------------------------------------------------------------------------------------------


def token_weights(mask, loss_type, max_completion_length=None, normalizer=None, dtype=torch.float32):
    """w[b, t] such that loss = sum(w * per_token_loss); zero on masked tokens.

    grpo: 1 / (B * max(n_b, 1)); bnpo: 1 / max(sum m, 1); dr_grpo: 1 / (B * L); dapo: 1 / normalizer
    (sum m, at least 1, when None).
    """
    m = mask.to(dtype)
    B = m.shape[0]
    if loss_type == "grpo":
        return m / (B * m.sum(-1, keepdim=True).clamp(min=1.0))
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / float(B * max_completion_length)
    if normalizer is None:
        return m / m.sum().clamp(min=1.0)
    return m / torch.as_tensor(normalizer, dtype=dtype, device=m.device)


def grpo_objective(logp, mask, adv, weight, *, old_logps=None, ref_logps=None, rollout_is_ratio=None, beta=0.0,
                   eps_low=0.2, eps_high=0.2, delta=None, importance_level="token"):
    """Weighted GRPO loss from per-token log-probs, plus the sums the metrics need.

    All tensors share ``logp``'s shape; ``adv`` is the advantage broadcast to tokens, ``weight`` comes
    from ``token_weights``. For ``importance_level="sequence"`` the last dim must hold whole sequences.
    Masked tokens contribute nothing, whatever old/ref/ratio hold there (padding may be garbage).
    Returns (loss, kl_sum, clipped_count), the last two over active tokens.
    """
    active = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = torch.where(active, adv.to(logp.dtype), zero)  # a fully masked sequence's advantage may be NaN (0/0)
    old = logp.detach() if old_logps is None else old_logps.to(logp.dtype)
    log_ratio = torch.where(active, logp - old, zero)
    if importance_level == "sequence":
        n = active.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)
        log_ratio = (log_ratio.sum(-1, keepdim=True) / n).expand_as(logp)
    ratio = torch.exp(log_ratio)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(capped * adv, clipped * adv)
    if rollout_is_ratio is not None:
        per_token = per_token * torch.where(active, rollout_is_ratio.to(logp.dtype), zero)
    kl_sum = zero
    if beta > 0:
        ref_minus = torch.where(active, ref_logps.to(logp.dtype) - logp, zero)
        k3 = torch.exp(ref_minus) - ref_minus - 1.0
        per_token = per_token + beta * k3
        kl_sum = (k3 * active).sum().detach()
    loss = (weight.to(logp.dtype) * per_token).sum()
    # on the delta-capped ratio, as TRL: with delta < 1 + eps_high a positive-advantage token above 1 + eps_high
    # takes the delta branch (delta·A < (1 + eps_high)·A), not the clipped one
    is_clipped = ((capped < 1.0 - eps_low) & (adv < 0)) | ((capped > 1.0 + eps_high) & (adv > 0))
    return loss, kl_sum, (is_clipped & active).sum().to(logp.dtype).detach()


def finish_metrics(mask, beta, kl_sum, clipped_count, entropy_sum):
    """Masked means of the summed metrics, as a dict of detached 0-d tensors."""
    count = mask.sum().to(entropy_sum.dtype).clamp(min=1.0)
    metrics = {"clip_frac": clipped_count / count, "entropy": entropy_sum / count}
    if beta > 0:
        metrics["kl"] = kl_sum / count
    return {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# chunked reference
# ----------------------------------------------------------------------------------------------


def ref_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per reference chunk: REF_LIVE_CHUNK_BUFFERS [chunk, V] ``dtype`` buffers within REF_CHUNK_BYTES."""
    return default_chunk_tokens(vocab, REF_LIVE_CHUNK_BUFFERS * torch.finfo(dtype).bits // 8, REF_CHUNK_BYTES)


def _chunk_logits(hidden, weight, bias, inv_temperature, cd):
    """(hidden · Wᵀ + bias) / T for one chunk in ``cd``: [C, V], the only full-chunk buffer it leaves.

    A bf16/fp16 weight is upcast WEIGHT_SLICE_BYTES of vocab rows at a time (fp32 matmul, no full copy).
    Bias and temperature go in place: neither add nor a scalar mul saves its input for backward. A Python 1.0
    (``lm_head_logits``, temperature 1) skips the mul: one pass over [C, V] less, the same numbers.
    """
    h = hidden.to(cd)
    if weight.dtype == cd:
        z = h @ weight.t()
    else:
        vocab, width = weight.shape
        rows = max(1, WEIGHT_SLICE_BYTES // (max(1, width) * torch.finfo(cd).bits // 8))
        z = h.new_empty(h.shape[0], vocab)
        for v0 in range(0, vocab, rows):
            z[:, v0:v0 + rows] = h @ weight[v0:v0 + rows].to(cd).t()
    if bias is not None:
        z.add_(bias.to(cd))
    if isinstance(inv_temperature, float) and inv_temperature == 1.0:  # a tensor (compiled runs) always multiplies
        return z
    return z.mul_(inv_temperature)


def _entropy_from_shifted(shifted, log_s):
    """-Σ p·log p per row (log p = shifted − log_s, no lse − Σ p·z cancellation), in two row halves.

    Always exactly two slices (the second may be empty): a loop over the row count would make
    torch.compile specialize on the sequence length (finding: a recompile per length).
    """
    out = log_s.new_empty(shifted.shape[0])
    half = (shifted.shape[0] + 1) // 2
    for rows in (slice(0, half), slice(half, shifted.shape[0])):
        log_p = shifted[rows] - log_s[rows, None]
        out[rows] = -log_p.exp().mul_(log_p).sum(-1)
    return out


def _chunk_logprobs(hidden, weight, bias, ids, inv_temperature):
    """fp32/fp64 log-probs and entropy of one token chunk (at most REF_LIVE_CHUNK_BUFFERS [chunk, V] at once).

    Autocast is off: under bf16 autocast the matmul gave bf16 log-probs 3e-2 off (V = 1001), not the
    fp32 the contract promises. Log-probs are relative to the row max, as in log_softmax (z − lse would
    lose |z|·ulp: 1e-3 at |z| = 1e4 in fp32).
    """
    cd = compute_dtype(hidden.dtype)
    # the meta device has no autocast state (torch.autocast("meta") raises): shape inference needs none
    no_autocast = contextlib.nullcontext() if hidden.is_meta else torch.autocast(hidden.device.type, enabled=False)
    with no_autocast:
        z = _chunk_logits(hidden, weight, bias, inv_temperature, cd)
        # the max is a constant shift: the log-probs do not depend on it, so no gradient flows through it
        shifted = z - z.detach().amax(-1, keepdim=True)
        del z  # two [C, V] buffers at most: logsumexp's temporary comes next
        log_s = torch.logsumexp(shifted, dim=-1)
        logp = shifted.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1) - log_s
        with torch.no_grad():
            entropy = _entropy_from_shifted(shifted.detach(), log_s.detach())
        return logp, entropy


def _logprobs_all(hidden2d, weight, bias, ids, temperature, chunk_tokens):
    """(logp, entropy) [N] in the compute dtype, ``chunk`` tokens at a time (checkpointed under autograd).

    A Python loop over ``range(0, N, chunk)`` makes torch.compile guard on N's exact value: the compiled
    loss recompiled for each sequence length and failed at the 9th (recompile limit 8). N <= chunk now
    runs one chunk without a loop (guard ``N <= chunk`` only: one dynamic graph for every such N).
    Known limit: N > chunk still specializes (a loop over the chunk count did too, measured), and the
    chunk is small at a real vocab (208 tokens at V = 152k fp32); the kernel path has no such limit.
    """
    cd = compute_dtype(hidden2d.dtype)
    chunk = chunk_tokens or ref_chunk_tokens(weight.shape[0], cd)
    inv_temperature = 1.0 / (temperature if isinstance(temperature, torch.Tensor) else float(temperature))
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden2d, weight, bias))

    def run(rows):
        args = (hidden2d[rows], weight, bias, ids[rows], inv_temperature)
        if track:  # recompute the chunk's logits in backward rather than keeping them
            return checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        return _chunk_logprobs(*args)

    n = hidden2d.shape[0]
    if n <= chunk:
        return run(slice(0, n))
    parts = [run(slice(start, start + chunk)) for start in range(0, n, chunk)]
    return torch.cat([lp for lp, _ in parts]), torch.cat([ent for _, ent in parts])


def fused_linear_logprobs(hidden, weight, token_ids, *, bias=None, temperature=1.0, return_entropy=False,
                          chunk_tokens=None):
    """Reference of ``r1fast.kernels.fused_linear_logprobs`` (see grpo_loss.py for the contract).

    The checks that read device values are skipped while ``host_checks_enabled()`` is False, as on
    the kernel path, so ``torch.compile(fullgraph=True)`` traces this function too.
    """
    host_checks = host_checks_enabled(hidden)
    validate_linear(hidden, weight, token_ids, bias, temperature, host_checks=host_checks)
    check_chunk_tokens(chunk_tokens)
    if host_checks:
        _check_token_range(token_ids, weight.shape[0])
    with torch.no_grad():
        logp, entropy = _logprobs_all(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                      token_ids.reshape(-1), temperature, chunk_tokens)
    logp = logp.reshape(token_ids.shape)
    return (logp, entropy.reshape(token_ids.shape)) if return_entropy else logp


def fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages, *, old_logps=None, ref_logps=None, bias=None,
                           beta=0.0, eps_low=0.2, eps_high=0.2, delta=None, temperature=1.0, loss_type="grpo",
                           importance_level="token", max_completion_length=None, normalizer=None,
                           rollout_is_ratio=None, chunk_tokens=None):
    """Reference of ``r1fast.kernels.fused_linear_grpo_loss`` (see grpo_loss.py for the contract).

    Host checks as in ``fused_linear_logprobs`` above.
    """
    validate_loss(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, bias, beta, eps_low, eps_high,
                  delta, temperature, loss_type, importance_level, max_completion_length, normalizer,
                  rollout_is_ratio, host_checks=host_checks_enabled(hidden), chunk_tokens=chunk_tokens)
    B, T, H = hidden.shape
    active = mask.bool()
    safe_ids = torch.where(active, token_ids, torch.zeros_like(token_ids))  # padding may hold -100
    logp, entropy = _logprobs_all(hidden.reshape(-1, H), weight, bias, safe_ids.reshape(-1), temperature,
                                  chunk_tokens)
    cd = logp.dtype
    logp, entropy = logp.reshape(B, T), entropy.reshape(B, T)
    weights = token_weights(active, loss_type, max_completion_length, normalizer, dtype=cd)
    adv = advantages.to(cd).unsqueeze(-1).expand(B, T)
    loss, kl_sum, clipped = grpo_objective(
        logp, active, adv, weights, old_logps=old_logps, ref_logps=ref_logps, rollout_is_ratio=rollout_is_ratio,
        beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta, importance_level=importance_level)
    entropy_sum = (entropy * active).sum()
    return loss, finish_metrics(active, beta, kl_sum, clipped, entropy_sum)
