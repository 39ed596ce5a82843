"""The paged KV cache: per-layer block pools and a refcounted block allocator.

Layout: each layer owns ``k`` and ``v`` tensors of shape [num_blocks, block_size, Hkv, D], the layout
``r1fast.kernels.paged_attention`` reads. A sequence's KV lives in the blocks listed in its block table;
token ``t`` of a sequence sits in block ``table[t // block_size]`` at offset ``t % block_size``, i.e. at
slot ``table[t // block_size] * block_size + t % block_size`` (what ``append_kv`` takes).

Group-shared prompts (GRPO draws G samples of one prompt): the prompt's *full* blocks are computed once
and shared by all G samples through refcounts. Each sample then continues on a fresh block of its own, so
no block is ever written by two sequences and no copy-on-write is needed. The partially filled last
prompt block is not shared: its tokens (1 to block_size of them; the last prompt token is always among
them, so every sample computes its own first-token logits) are recomputed by every sample into its own
block. Recomputing at most ``block_size`` tokens per sample is cheaper and simpler than a per-sample block
copy, and it keeps the invariant "a shared block is full and read-only".

Padded rows of a CUDA-graph decode batch need no scratch block: they get slot -1 (``append_kv`` skips
negative slots) and KV length 0 (the kernels return zeros for a query that sees no key).
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Hands out block ids and counts references to them.

    A block returns to the free list when its last reference is released. Blocks with more than one
    reference are shared (a group's prompt blocks).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        """Free every block: no references, nothing shared."""
        self._refcount = [0] * self.num_blocks
        # LIFO free list: recently freed blocks are reused first (warm in L2)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._num_shared = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks holding at least one reference."""
        return self.num_blocks - len(self._free)

    @property
    def num_shared(self) -> int:
        """Blocks currently referenced by more than one sequence."""
        return self._num_shared

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def allocate(self) -> int:
        """A fresh block with refcount 1; raises RuntimeError when none is free (callers check first)."""
        if not self._free:
            raise RuntimeError("KV cache has no free block; the scheduler must preempt before allocating")
        block = self._free.pop()
        self._refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        """Add a reference to an allocated block (another sequence reads it)."""
        count = self._refcount[block]
        if count <= 0:
            raise RuntimeError(f"cannot share block {block}: it is not allocated")
        if count == 1:
            self._num_shared += 1
        self._refcount[block] = count + 1

    def release(self, block: int) -> None:
        """Drop one reference; the block is free again when none is left."""
        count = self._refcount[block]
        if count <= 0:
            raise RuntimeError(f"double free of block {block}")
        if count == 2:
            self._num_shared -= 1
        self._refcount[block] = count - 1
        if count == 1:
            self._free.append(block)

    def release_all(self, blocks: list[int]) -> None:
        for block in blocks:
            self.release(block)


class PagedKVCache:
    """Per-layer K and V block pools plus the allocator that manages their blocks.

    For attention with different key and value widths (MLA: Dqk = 192, Dv = 128) the value pool is
    padded to the key width: the kernel contract has one D for both caches, and zero padding leaves the
    attention weights unchanged (they come from q . k only) while the padded output columns are dropped.
    It costs (Dqk - Dv) / Dv extra value memory; dense models (Dqk == Dv) pay nothing.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        """K + V bytes of one block over all layers (for sizing the cache from free memory)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had every allocatable block."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
