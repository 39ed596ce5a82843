"""Argument validation shared by both GRPO-loss paths (``grpo_loss.py`` and ``ref_grpo_loss.py``).

Shapes, dtypes and options are always checked. Checks that read device values (non-finite hidden,
token range, a tensor normalizer, a mask that is not 0/1) take ``host_checks=False`` when the caller's
``host_checks_enabled()`` says they cannot run (compile, CUDA-graph capture, meta or fake tensors),
and are skipped inside ``registration.trusted_inputs()`` (the trainer's own inputs; see there).
Split from ``ref_grpo_loss.py`` when it reached the 400-line limit.
"""

from __future__ import annotations

import math
import numbers

import torch

from .dispatch import check_same_device
from .registration import value_checks_enabled

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def validate_linear(hidden, weight, token_ids, bias, temperature, *, hidden_dims=(2, 3), host_checks=True):
    """Checks shared by both ops. Returns (tokens, H, V).

    ``host_checks=False`` skips the checks here that read device values (non-finite hidden, a tensor
    temperature's value): torch.compile and CUDA-graph capture cannot run them. Shapes and dtypes are
    always checked. The token range and the normalizer are checked by the callers (``validate_loss``,
    the log-prob ops).
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() not in hidden_dims:
        raise ValueError(f"hidden must have {' or '.join(map(str, hidden_dims))} dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] (hidden's last dim), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    check_same_device("hidden", hidden, (("weight", weight),))
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
    check_same_device("hidden", hidden, (("token_ids", token_ids), ("bias", bias)))
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden's last dim (H) must be > 0, got shape {tuple(hidden.shape)}")
    check_real("temperature", temperature, host_checks=host_checks, low=0.0, low_inclusive=False)
    if host_checks and value_checks_enabled() and hidden.numel() and not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden contains NaN or Inf")
    return token_ids.numel(), hidden.shape[-1], vocab


def _finite(number: float) -> bool:
    """``math.isfinite`` that ``torch.compile(dynamic=True, fullgraph=True)`` can trace.

    Dynamo refused ``math.isfinite`` / ``math.isinf`` there even on the constant 1.0 ("torch.* op
    returned non-Tensor", torch 2.13), which broke every compiled call of the GRPO ops. NaN and ±inf
    both fail ``abs(x) < inf``.
    """
    return abs(number) < math.inf


def check_real(name, value, *, host_checks=True, low=None, low_inclusive=True):
    """A finite real number (Python, NumPy, or a one-element float tensor) and, with ``low``, above it.

    Range checks alone let NaN through (every comparison is False): beta = nan dropped the KL term,
    eps/delta = nan gave a NaN loss, dr_grpo's length = inf gave loss 0. A tensor's value is read only
    with host checks (as the normalizer's); bools are refused (``temperature=True`` is a bug, not 1.0).
    Traceable: finiteness is tested with ``_finite`` (see there), and a symbolic number (SymFloat /
    SymInt, from a traced float argument) passes unchecked like a tensor without host checks.
    """
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number or a one-element real tensor, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if not host_checks:
            return
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not _finite(number):
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
    if not (_finite(value) and value > 0):
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
    if not value_checks_enabled():  # the trainer's own ids (registration.trusted_inputs)
        return
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
    # a CPU one-element normalizer stays fine below: torch takes CPU scalars beside any device's tensors
    check_same_device("hidden", hidden, (("mask", mask), ("advantages", advantages), ("old_logps", old_logps),
                                         ("ref_logps", ref_logps), ("rollout_is_ratio", rollout_is_ratio)))
    if isinstance(normalizer, torch.Tensor) and normalizer.device != hidden.device and normalizer.device.type != "cpu":
        raise ValueError(f"normalizer is on {normalizer.device} but hidden is on {hidden.device} (or the CPU)")
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
    if host_checks and value_checks_enabled():  # registration.trusted_inputs: the trainer's own mask and ids
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0 and 1 (or be bool): per-token weights are not supported")
        _check_token_range(token_ids, weight.shape[0], active=mask.bool())
