"""Example order for SFT and GRPO: a stream of seeded epoch permutations cut into batches.

Step ``s`` takes positions ``s·B .. (s+1)·B`` of the stream, so every example is seen once per epoch
even when an epoch does not split into whole batches, and step ``s``'s batch depends only on
(s, B, n, seed): a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import torch

__all__ = ["batch_indices"]


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a stream of seeded epoch permutations, cut in full batches.
    ValueError for no examples: callers check their data first, and a ZeroDivisionError deep in a step said nothing."""
    if num_examples <= 0 and batch_size > 0:
        raise ValueError(f"num_examples: no examples to draw a batch of {batch_size} from (got {num_examples})")
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, num_examples)
        perm = _epoch_perm(seed, epoch, num_examples)
        out.append(perm[offset])
    return out


_PERM_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_perm(seed: int, epoch: int, n: int) -> list[int]:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        generator = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**63)  # any int seed, no overflow
        _PERM_CACHE[key] = torch.randperm(n, generator=generator).tolist()
    return _PERM_CACHE[key]
