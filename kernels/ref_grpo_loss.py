"""PyTorch reference of the fused GRPO loss and log-prob ops: the CPU fallback and the test oracle.

Same signatures as ``grpo_loss.py``. Logits are built ``chunk_tokens`` tokens at a time and each
chunk is recomputed in backward (``torch.utils.checkpoint``), so neither the forward nor the
backward ever holds [N, V]. Computation runs in fp64 for fp64 inputs and in fp32 otherwise.

This file also owns what both implementations share and what is not a kernel: input validation
(``validate_*``), the per-token weights of each loss type (``token_weights``) and the GRPO objective
on per-token log-probs (``grpo_objective``). The Triton path calls the same objective on O(N)
scalars to get dloss/dlogp, so both paths agree by construction on the loss options; the tests check
both against an independent dense fp64 transcription of TRL's formulas.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.utils.checkpoint import checkpoint

from .registration import host_checks_enabled

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
DEFAULT_CHUNK_BYTES = 256 * 2**20  # the kernel path's [C, V] log-probs buffer (grpo_loss.py)
# The reference holds REF_LIVE_CHUNK_BUFFERS [C, V] buffers at once (shifted logits + logsumexp's or the
# entropy's temporaries), all within REF_CHUNK_BYTES. One 256 MiB buffer with four alive (logits,
# log_softmax, exp, exp·logp) took 1.06 GiB for log-probs at V = 152k; the issue allows 0.5 GiB.
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
# validation (shared with the Triton path)
# ----------------------------------------------------------------------------------------------


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def validate_linear(hidden, weight, token_ids, bias, temperature, *, hidden_dims=(2, 3), host_checks=True):
    """Checks shared by both ops. Returns (tokens, H, V).

    ``host_checks=False`` skips the checks that read device values (non-finite hidden, token range,
    a tensor normalizer): torch.compile and CUDA-graph capture cannot run them. Shapes and dtypes are
    always checked.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() not in hidden_dims:
        raise ValueError(f"hidden must have {' or '.join(map(str, hidden_dims))} dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] (hidden's last dim), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("token_ids must be an int32 or int64 tensor")
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be [{vocab}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden's last dim (H) must be > 0, got shape {tuple(hidden.shape)}")
    check_real("temperature", temperature, host_checks=host_checks, low=0.0, low_inclusive=False)
    if host_checks and hidden.numel() and not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden contains NaN or Inf")
    return token_ids.numel(), hidden.shape[-1], vocab


def check_real(name, value, *, host_checks=True, low=None, low_inclusive=True):
    """A finite real number (Python, NumPy, or a one-element float tensor) and, with ``low``, above it.

    Range checks alone let NaN through (every comparison is False): beta = nan dropped the KL term,
    eps/delta = nan gave a NaN loss, dr_grpo's length = inf gave loss 0. A tensor's value is read only
    with host checks (as the normalizer's); bools are refused (``temperature=True`` is a bug, not 1.0).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number or a one-element real tensor, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if not host_checks:
            return
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if low is not None and (number < low or (number == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {number}")


def check_chunk_tokens(chunk_tokens):
    """``chunk_tokens``: None (the default size) or a positive int."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens <= 0):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def _check_normalizer(normalizer, host_checks):
    """A finite number > 0, or a one-element tensor holding one (its value is read only with host checks)."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        if not host_checks:
            return
    try:
        value = float(normalizer)
    except (TypeError, ValueError):
        raise ValueError(f"normalizer must be a number or a one-element tensor, got {normalizer!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer must be finite and > 0, got {value}")


def _check_no_grad_inputs(tensors):
    """Gradients flow only to hidden, weight and bias: the fused op has no formula for the others.

    Both paths raise (rather than silently returning None, or differentiating on the reference path
    only) so that a caller who forgot a ``.detach()`` learns it on either backend.
    """
    if not torch.is_grad_enabled():
        return
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but only hidden, weight and bias are differentiated: "
                             f"pass {name}.detach()")


def _check_token_range(token_ids, vocab, active=None):
    ids = token_ids if active is None else token_ids[active]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token_ids must lie in [0, {vocab}) (masked-out positions are not checked)")


def validate_loss(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, bias, beta, eps_low,
                  eps_high, delta, temperature, loss_type, importance_level, max_completion_length, normalizer,
                  rollout_is_ratio, *, host_checks=True, chunk_tokens=None):
    """All argument checks of ``fused_linear_grpo_loss`` (issue item 5); ``host_checks`` as in validate_linear.

    With host checks, a mask holding anything but 0/1 is rejected: the loss counts tokens, it does
    not weight them (a 0.25 would silently count as 1).
    """
    validate_linear(hidden, weight, token_ids, bias, temperature, hidden_dims=(3,), host_checks=host_checks)
    B, T = hidden.shape[:2]
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be a [{B}, {T}] tensor")
    _check_float("advantages", advantages)
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must be [{B}], got {tuple(advantages.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("rollout_is_ratio", rollout_is_ratio)):
        if t is not None:
            _check_float(name, t)
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must be [{B}, {T}], got {tuple(t.shape)}")
    check_real("beta", beta, host_checks=host_checks, low=0.0)
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta > 0")
    check_real("eps_low", eps_low, host_checks=host_checks, low=0.0)
    check_real("eps_high", eps_high, host_checks=host_checks, low=0.0)
    if delta is not None:
        check_real("delta", delta, host_checks=host_checks, low=0.0, low_inclusive=False)
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length (> 0) is required for loss_type='dr_grpo'")
    if max_completion_length is not None:
        check_real("max_completion_length", max_completion_length, host_checks=host_checks, low=0.0,
                   low_inclusive=False)
    if normalizer is not None:
        _check_normalizer(normalizer, host_checks)
    check_chunk_tokens(chunk_tokens)
    _check_no_grad_inputs((("mask", mask), ("advantages", advantages), ("old_logps", old_logps),
                           ("ref_logps", ref_logps), ("rollout_is_ratio", rollout_is_ratio),
                           ("normalizer", normalizer)))
    if host_checks:
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0 and 1 (or be bool): per-token weights are not supported")
        _check_token_range(token_ids, weight.shape[0], active=mask.bool())


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
    is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
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
    per_token = REF_LIVE_CHUNK_BUFFERS * max(1, vocab) * torch.finfo(dtype).bits // 8
    return max(16, REF_CHUNK_BYTES // per_token // 16 * 16)


def _chunk_logits(hidden, weight, bias, inv_temperature, cd):
    """(hidden · Wᵀ + bias) / T for one chunk in ``cd``: [C, V], the only full-chunk buffer it leaves.

    A bf16/fp16 weight is upcast WEIGHT_SLICE_BYTES of vocab rows at a time (fp32 matmul, no full copy).
    Bias and temperature go in place: neither add nor a scalar mul saves its input for backward.
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
    return z.mul_(inv_temperature)


def _entropy_from_shifted(shifted, log_s):
    """-Σ p·log p per row (log p = shifted − log_s, no lse − Σ p·z cancellation), in two row halves."""
    out = log_s.new_empty(shifted.shape[0])
    half = max(1, (shifted.shape[0] + 1) // 2)
    for r in range(0, shifted.shape[0], half):
        log_p = shifted[r:r + half] - log_s[r:r + half, None]
        out[r:r + half] = -log_p.exp().mul_(log_p).sum(-1)
    return out


def _chunk_logprobs(hidden, weight, bias, ids, inv_temperature):
    """fp32/fp64 log-probs and entropy of one token chunk (at most REF_LIVE_CHUNK_BUFFERS [chunk, V] at once).

    Autocast is off: under bf16 autocast the matmul gave bf16 log-probs 3e-2 off (V = 1001), not the
    fp32 the contract promises. Log-probs are relative to the row max, as in log_softmax (z − lse would
    lose |z|·ulp: 1e-3 at |z| = 1e4 in fp32).
    """
    cd = compute_dtype(hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
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
    cd = compute_dtype(hidden2d.dtype)
    chunk = chunk_tokens or ref_chunk_tokens(weight.shape[0], cd)
    inv_temperature = 1.0 / (temperature if isinstance(temperature, torch.Tensor) else float(temperature))
    logps, entropies = [], []
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden2d, weight, bias))
    for start in range(0, hidden2d.shape[0], chunk):
        args = (hidden2d[start:start + chunk], weight, bias, ids[start:start + chunk], inv_temperature)
        if track:  # recompute the chunk's logits in backward rather than keeping them
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        entropies.append(ent)
    if not logps:
        empty = hidden2d.new_zeros(0, dtype=cd)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


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
