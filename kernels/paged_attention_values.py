"""Value checks of paged attention's index arguments, for CPU tensors only.

The kernels read what the tables say. A block-table entry past the cache read another allocation
(9.8e35 came back, no error) or crashed the process (an entry of 10**8; so did ``cu_seqlens_q`` ending past
T), and the reference path raised an IndexError or returned a value for them. On CPU the checks cost a few
tensor ops; on CUDA they would be a host sync per layer, so device values stay the caller's promise there
(the rollout engine builds them itself), as with ``append_kv``'s slots. Shapes, dtypes and devices are
checked on every backend by ``ref_paged_attention``.
"""

from __future__ import annotations

import torch

from .registration import host_checks_enabled, value_checks_enabled


def values_checkable(q: torch.Tensor) -> bool:
    """Whether the value checks run for this call: CPU tensors with readable values, outside trusted_inputs."""
    return q.device.type == "cpu" and host_checks_enabled(q) and value_checks_enabled()


def check_table_values(table_name: str, table: torch.Tensor, lens_name: str, lens: torch.Tensor,
                       k_cache: torch.Tensor) -> None:
    """Each length within its row's capacity, and every table entry a length reaches inside the cache."""
    if lens.numel() == 0:
        return
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    capacity = table.shape[1] * block_size
    bad = ((lens < 0) | (lens > capacity)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"{lens_name}[{row}] = {int(lens[row])} is outside [0, {capacity}] ({table_name} rows hold "
                         f"{table.shape[1]} blocks of {block_size} tokens)")
    used = torch.arange(table.shape[1]) < ((lens.long() + block_size - 1) // block_size).unsqueeze(1)
    bad = (used & ((table < 0) | (table >= num_blocks))).nonzero()
    if bad.numel():
        row, col = int(bad[0, 0]), int(bad[0, 1])
        raise ValueError(f"{table_name}[{row}, {col}] = {int(table[row, col])} is not a block of the cache "
                         f"([0, {num_blocks})), and {lens_name}[{row}] = {int(lens[row])} reads it")


def check_cu_seqlens_values(cu_seqlens_q: torch.Tensor, num_queries: int, max_seqlen_q: int,
                            seq_lens: torch.Tensor) -> None:
    """cu_seqlens_q starts at 0, never decreases and ends at T: the kernels write each chunk's rows of out.

    No chunk may be longer than ``max_seqlen_q``: it sizes the kernel's query-tile grid, and a chunk past
    it kept its last rows unwritten (Lq = 20 with max_seqlen_q = 1 at D = 64, one head: rows 16..19 of a
    NaN-poisoned out stayed NaN, uninitialised memory without out=) while the reference ignores it.
    Nor may chunk b be longer than seq_lens[b], which counts the chunk's own tokens: its first queries would
    sit at negative positions (20 queries over seq_len 5 came back with 15 all-zero rows and no error).
    """
    cu = cu_seqlens_q.long()
    if int(cu[0]) != 0 or int(cu[-1]) != num_queries or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens_q must start at 0, never decrease and end at T = {num_queries} (q's rows), "
                         f"got {cu.tolist()[:8]}{' ...' if cu.numel() > 8 else ''}")
    chunks = cu.diff()
    longest = int(chunks.max()) if chunks.numel() else 0
    if longest > max_seqlen_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is smaller than the longest query chunk ({longest} queries in "
                         "cu_seqlens_q); pass at least that")
    bad = (chunks > seq_lens.long()).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(f"query chunk {b} has {int(cu[b + 1] - cu[b])} queries (cu_seqlens_q) but seq_lens[{b}] = "
                         f"{int(seq_lens[b])}; seq_lens counts the KV tokens including the chunk's own")


def check_groups_values(group_of_seq: torch.Tensor, num_groups: int) -> None:
    """Every group_of_seq entry names a row of prefix_block_table."""
    if group_of_seq.numel() and (int(group_of_seq.min()) < 0 or int(group_of_seq.max()) >= num_groups):
        raise ValueError(f"group_of_seq must lie in [0, {num_groups}) (prefix_block_table's rows), got values "
                         f"from {int(group_of_seq.min())} to {int(group_of_seq.max())}")
