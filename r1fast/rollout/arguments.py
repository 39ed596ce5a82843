"""Checks and normalization of ``Engine.generate``'s arguments, before any work: ValueError naming the argument.

Integers may be Python, numpy or 0-d torch integers (never bools: ``top_k=True`` is a bug at the caller);
``stop_token_ids`` may be one id, as HF's ``eos_token_id`` may.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

import torch

from .sampler import MIN_TEMPERATURE, SamplingParams

__all__ = ["as_int", "is_real", "positive_int", "prompt_lists", "seeds", "validate"]


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (int, numpy or 0-d torch integer), else None.

    ``operator.index`` accepts exactly the integer types (not 3.0, not "3"); bools are refused although
    they are ints, since ``top_k=True`` or a ``True`` token id is a bug at the caller.
    """
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if getattr(value, "ndim", 0) != 0:  # a one-element tensor or array is a list, not an id
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_real(value) -> bool:
    """A real number (int, float, numpy scalar) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value, name: str, what: str = "a positive int") -> int:
    """``value`` as an int >= 1 (see ``as_int``); ValueError naming the argument otherwise."""
    number = as_int(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def _unordered(value) -> bool:
    """A mapping or a set: iterating one gives its keys / members in no token order ({1: 2} read as [1])."""
    return isinstance(value, (Mapping, AbstractSet))


def prompt_lists(prompts) -> list[list]:
    """Each prompt as a list (tensors and arrays as lists of their elements); ValueError for a flat list,
    a mapping, a set or a non-iterable such as None (as prompts or as a prompt). No prompt at all is fine."""
    # not iterable (None, a float): named here, not a bare TypeError from the loop
    if (isinstance(prompts, (str, bytes)) or as_int(prompts) is not None or _unordered(prompts)
            or not isinstance(prompts, Iterable)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    lists = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if _unordered(p):
            raise ValueError(f"prompts[{i}] is a {type(p).__name__} ({p!r}), not a list of token ids: a mapping "
                             "or set has no token order")
        if isinstance(p, (str, bytes)) or as_int(p) is not None or not isinstance(p, Iterable):
            raise ValueError(f"prompts[{i}] is {p!r}, not a list of token ids (prompts is a list of prompts)")
        lists.append(list(p))
    return lists

def validate(args, capacity_tokens: int, capacity: str, prompts, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids):
    """(n as an int, SamplingParams); replaces each prompt's ids by Python ints. ValueError names the argument.

    ``args``: the model's ModelArgs; ``capacity_tokens``: the KV cache's size, described by ``capacity``."""
    vocab = args.vocab_size
    n_int, new_tokens = positive_int(n, "n"), positive_int(max_new_tokens, "max_new_tokens")
    k = as_int(top_k)
    if not (is_real(temperature) and (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf)):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} (smaller "
                         f"ones overflow logits / temperature), got {temperature!r}")
    if not (is_real(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if k is None or k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    # a single id is accepted as HF's eos_token_id is (an int or a list of ints)
    single = as_int(stop_token_ids)
    try:
        if isinstance(stop_token_ids, (str, bytes, bytearray)):
            raise TypeError  # text is not ids: b"\x01" iterated as token 1 (a set of ids is fine: no order needed)
        ids = [single] if single is not None else list(stop_token_ids)
    except TypeError:
        raise ValueError(f"stop_token_ids must be a token id or a list of them, got {stop_token_ids!r}") from None
    stop = []
    for t in ids:
        token = as_int(t)
        if token is None or not 0 <= token < vocab:
            raise ValueError(f"stop_token_ids holds {t!r}, not a token id in [0, {vocab})")
        stop.append(token)
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        for j, t in enumerate(prompt):
            token = as_int(t)
            if token is None:
                raise ValueError(f"prompts[{i}] holds {t!r}, not an integer token id")
            if not 0 <= token < vocab:
                raise ValueError(f"prompts[{i}] holds token id {token} outside the vocabulary [0, {vocab})")
            prompt[j] = token
        # the last sampled token is never fed back, so it never takes a cache slot: a 128-token cache
        # holds a 100-token prompt plus 29 new tokens
        if len(prompt) + new_tokens - 1 > capacity_tokens:
            raise ValueError(
                f"prompts[{i}] ({len(prompt)} tokens) + max_new_tokens ({new_tokens}) - 1 (the last token is "
                f"never cached) exceeds the KV cache ({capacity}); raise num_blocks")
    longest = max((len(p) for p in prompts), default=0)
    limit = args.max_position_embeddings
    if prompts and longest + new_tokens > limit:
        # positions past the model's range run silently otherwise (RoPE beyond the trained/scaled range).
        # Not relaxed by one like the cache: the trainer feeds the whole prompt + completion to the model
        # (policy.pack), so the last token's position is used there, and train.py checks the same sum.
        raise ValueError(f"the model holds {limit} positions (max_position_embeddings), fewer than the longest "
                         f"prompt ({longest} tokens) plus max_new_tokens={new_tokens}")
    return n_int, SamplingParams(float(temperature), float(top_p), k, new_tokens, tuple(stop))

def seeds(seed, count: int) -> list[int]:
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    first = as_int(seed)
    if first is not None:
        seeds = [first + k for k in range(count)]
    else:
        try:
            seeds = [as_int(s) for s in seed]
        except TypeError:
            seeds = None
        if seeds is None or len(seeds) != count or None in seeds:
            raise ValueError(f"seed must be None, an int or a list of len(prompts) * n = {count} ints, "
                             f"got {seed!r}") from None
    # torch.Generator.manual_seed takes [-2**63, 2**64) and overflows above
    if seeds and not (-(2**63) <= min(seeds) and max(seeds) < 2**64):
        raise ValueError(f"seed must give seeds in [-2**63, 2**64) (an int seed s gives s .. s + {count - 1}), "
                         f"got {seed!r}")
    return seeds
