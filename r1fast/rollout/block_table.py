"""The engine's persistent block table: one int32 row per running sequence, kept on the device.

Rebuilding the table from the sequences' block lists every step cost O(B * context / block_size) host work
per step (B = 256 at 16k context: 31 ms per step for the table alone, more than the GPU step itself), so a
whole generate was O(B * L^2 / block_size). Instead a sequence owns a row while it runs
(``Scheduler`` acquires it on admission and releases it when the sequence finishes, is preempted or, for
a prefix job, hands its blocks over); the scheduler records one entry per block it allocates, and each
step sends only those new entries to the device (``take_updates``, applied by ``step_inputs.py``). A
decode step then writes about B / block_size entries, independent of the context length.

Entries past a row's current length are stale (the previous owner's blocks, or 0): the attention kernels
never read a table entry beyond ``ceil(seq_len / block_size)`` (loads are masked by the length), so rows
are not cleared on release. Every stale entry is a block id of this cache, so it is in range anyway.
"""

from __future__ import annotations

import torch


def _round_width(blocks: int) -> int:
    """A table width for ``blocks`` blocks: the next power of two >= 16, so that few sizes are ever allocated
    (device tables here, captured decode graphs in ``cuda_graphs.py``)."""
    width = 16
    while width < blocks:
        width *= 2
    return width


class BlockTable:
    """A [num_rows, width] int32 device table plus the host bookkeeping of which sequence owns which row."""

    def __init__(self, num_rows: int, device: torch.device):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        self.num_rows = num_rows
        self.device = torch.device(device)
        self.table = torch.zeros(num_rows, 0, dtype=torch.int32, device=self.device)
        self._free_rows = list(range(num_rows - 1, -1, -1))
        self._rows: list[int] = []
        self._cols: list[int] = []
        self._vals: list[int] = []

    @property
    def width(self) -> int:
        return self.table.shape[1]

    def reset(self, width: int) -> None:
        """Start a ``generate`` call whose sequences hold at most ``width`` blocks: every row free.

        The width only grows (to a power of two >= 16, so that few sizes are ever allocated); growing
        reallocates the device table (zeros), which is fine because no row is owned between calls.
        """
        if width > self.width:
            self.table = torch.zeros(self.num_rows, _round_width(width), dtype=torch.int32, device=self.device)
        self._free_rows = list(range(self.num_rows - 1, -1, -1))
        self._rows.clear()
        self._cols.clear()
        self._vals.clear()

    def acquire(self, seq) -> None:
        """Give ``seq`` a row and record the blocks it already holds (a sample's shared prompt blocks)."""
        if seq.row >= 0:
            raise RuntimeError(f"{seq.name or 'sequence'} already owns block-table row {seq.row}")
        if not self._free_rows:
            raise RuntimeError(f"all {self.num_rows} block-table rows are taken; the scheduler admits at most "
                               "max_num_seqs sequences")
        seq.row = self._free_rows.pop()
        for col, block in enumerate(seq.blocks):
            self.write(seq.row, col, block)

    def release(self, seq) -> None:
        """Return ``seq``'s row (no-op when it holds none)."""
        if seq.row >= 0:
            self._free_rows.append(seq.row)
            seq.row = -1

    def write(self, row: int, col: int, block: int) -> None:
        """Record ``table[row, col] = block``; it reaches the device with the next step's inputs."""
        if col >= self.width:
            raise RuntimeError(f"block-table column {col} is past the width {self.width} reserved for this call")
        self._rows.append(row)
        self._cols.append(col)
        self._vals.append(block)

    def take_updates(self) -> tuple[list[int], list[int], list[int]]:
        """(rows, cols, values) recorded since the last call; clears them.

        No (row, col) repeats between two calls (a device scatter with a repeated index would keep an
        unspecified one of its values): a running sequence writes each of its columns once; a row freed
        since the last call had no entries pending (a sequence finishes after its step's inputs were
        taken, and a victim of preemption had not grown yet in that schedule); and a step that preempts
        admits nobody, so a freed row is re-acquired no earlier than the next schedule.
        """
        rows, cols, vals = self._rows, self._cols, self._vals
        self._rows, self._cols, self._vals = [], [], []
        return rows, cols, vals
