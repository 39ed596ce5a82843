"""Per-sample seeds of a GRPO run, derived from ``train.seed`` so that they are always valid generator seeds.

``torch.Generator.manual_seed`` accepts ``[-2**63, 2**64)`` and keeps the value modulo ``2**64`` (-5 and
``2**64 - 5`` give the same stream). The rollout seeds ``(seed * 7919 + step) * 1_000_003 + ...`` left that
range for any ``train.seed`` above ~2.33e9 (``2**32`` crashed the first rollout after the whole cold-start
SFT); reducing them modulo ``2**64`` keeps every stream that worked before bit for bit and makes every
other one valid. The config bounds the seed fields to ``[SEED_MIN, SEED_MAX]`` (a TOML integer).
"""

from __future__ import annotations

__all__ = ["SEED_MIN", "SEED_MAX", "generator_seed", "rollout_seeds", "sample_seeds"]

SEED_MIN = -(2**63)
"""Smallest seed a config may hold: TOML integers are signed 64-bit."""
SEED_MAX = 2**63 - 1
"""Largest seed a config may hold."""

_GENERATOR_MODULUS = 2**64  # torch.Generator keeps a seed as an unsigned 64-bit integer
_STEP_STRIDE = 7_919  # seeds of step s and s + 1 of the same base never meet (prime)
_PROMPT_STRIDE = 1_000_003  # room for a million completions per step (prime)


def generator_seed(value: int) -> int:
    """``value`` as a valid ``torch.Generator`` seed: the same stream torch gives for any value it accepts."""
    return int(value) % _GENERATOR_MODULUS


def sample_seeds(seed: int, prompts: list[int], samples_per_prompt: int) -> list[int]:
    """Seeds of sampled completions: completion j of prompt index i (in ``prompts``) gets
    ``seed * 1_000_003 + i * k + j``, reduced to a valid generator seed. They depend on the prompt's index only,
    so results do not depend on the number of ranks (evaluation, r1fast.eval, rejection sampling)."""
    base = seed * _PROMPT_STRIDE
    return [generator_seed(base + i * samples_per_prompt + j) for i in prompts for j in range(samples_per_prompt)]


def rollout_seeds(seed: int, step: int, prompts: list[int], samples_per_prompt: int) -> list[int]:
    """Seeds of the GRPO rollouts of ``step``: ``sample_seeds`` of the base ``seed * 7919 + step``, i.e.
    completion j of global prompt position i gets ``(seed * 7919 + step) * 1_000_003 + i * G + j``."""
    return sample_seeds(seed * _STEP_STRIDE + step, prompts, samples_per_prompt)
