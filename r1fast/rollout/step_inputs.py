"""One step's device inputs, built with one host->device copy; shared by the eager and the CUDA-graph paths.

Every integer the step needs (token ids, positions, KV lengths, block-table rows, query offsets, the rows
that sample, new block-table entries, cascade groups) and the sampling uniforms (fp64 bits) go into one
int64 host list, reach the device in one copy (``HostStaging``), and are sliced there. Block tables and
slots are gathered on the device from the persistent ``BlockTable``; the host work per step is
O(tokens + sequences + new blocks), independent of the context length. Before, the tables were rebuilt
from Python lists (B = 256 at 16k context: 31 ms a step) and 6 to 8 separate pageable copies were made.

Widths are those the per-step rebuild used (the longest row of the step; cascade: the longest prefix and
suffix rows, at least 1): the kernels choose their KV splits from the table width, so the same width
keeps every output bit-identical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch

from .block_table import BlockTable
from .paged_backend import StepMetadata


class HostStaging:
    """Sends an int64 host tensor to the device in one copy (CUDA: through a persistent pinned buffer).

    A pageable ``non_blocking`` copy is synchronous for the host; the pinned buffer makes it asynchronous.
    Before the buffer is refilled, the event of the previous copy is waited on (normally already done: each
    sampling step ends with a device->host copy that the host waits for).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._host = self._dev = self._event = None

    def send(self, values: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return values.to(self.device)
        n = values.numel()
        if self._host is None or self._host.numel() < n:
            size = max(1024, 1 << (n - 1).bit_length())
            if self._event is not None:
                self._event.synchronize()
            self._host = torch.empty(size, dtype=torch.int64, pin_memory=True)
            self._dev = torch.empty(size, dtype=torch.int64, device=self.device)
            self._event = torch.cuda.Event()
        else:
            self._event.synchronize()
        self._host[:n].copy_(values)
        out = self._dev[:n]
        out.copy_(self._host[:n], non_blocking=True)
        self._event.record()
        return out


@dataclass
class StepInputs:
    """Device tensors of one step (views of one staged buffer plus device-side gathers) and host sizes."""

    mode: str
    """"varlen", "decode" or "cascade" (the ``StepMetadata`` mode)."""
    batch: int
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    max_seqlen_q: int
    block_table: torch.Tensor  # int32 [B, W]  (cascade: the suffix table)
    seq_lens: torch.Tensor  # int32 [B]      (cascade: the suffix lengths)
    sample_rows: torch.Tensor | None
    """int64 token indices whose logits are sampled; None when every token samples (no gather needed)."""
    uniforms: torch.Tensor | None  # fp64 [S] sampling draws (None: greedy or nothing samples)
    width: int
    prefix_block_table: torch.Tensor | None = None  # int32 [G, P]  (cascade)
    prefix_lens: torch.Tensor | None = None  # int32 [G]
    group_of_seq: torch.Tensor | None = None  # int32 [B]
    prefix_width: int = 0
    max_group_size: int = 1
    rows: torch.Tensor | None = None  # int64 [B] block-table rows (for ``plain``)
    full_lens: torch.Tensor | None = None  # int64 [B] whole KV lengths (for ``plain``)
    full_width: int = 0
    table: BlockTable | None = None

    def plain(self) -> StepInputs:
        """This cascade step as a plain decode step: whole rows (shared blocks included), whole lengths."""
        if self.mode != "cascade":
            return self
        return replace(self, mode="decode", block_table=self.table.table[:, : self.full_width].index_select(0, self.rows),
                       seq_lens=self.full_lens.to(torch.int32), width=self.full_width, prefix_block_table=None, prefix_lens=None,
                       group_of_seq=None, prefix_width=0, max_group_size=1)

    def metadata(self) -> StepMetadata:
        """The attention backend's metadata for an eager forward."""
        if self.mode == "cascade":
            return StepMetadata("cascade", self.slots, prefix_block_table=self.prefix_block_table,
                                prefix_lens=self.prefix_lens, group_of_seq=self.group_of_seq,
                                suffix_block_table=self.block_table, suffix_lens=self.seq_lens,
                                max_group_size=self.max_group_size)
        return StepMetadata(self.mode, self.slots, block_table=self.block_table, seq_lens=self.seq_lens,
                            cu_seqlens_q=self.cu_seqlens if self.mode == "varlen" else None,
                            max_seqlen_q=self.max_seqlen_q)


def _cascade_groups(chunks, lens, bs):
    """Host side of a cascade step: group per sequence, a representative row and prefix length per group.

    Group 0 is the empty prefix (sequences that share nothing); group g > 0 is one prefix job's blocks.
    """
    group_index: dict[int, int] = {}
    rep_rows, prefix_blocks = [chunks[0].seq.row], [0]
    groups, shared, suffix_lens = [], [], []
    for c, length in zip(chunks, lens, strict=True):
        seq, n = c.seq, c.seq.num_shared_blocks
        g = 0
        if n:
            g = group_index.setdefault(id(seq.prefix_job), len(rep_rows))
            if g == len(rep_rows):
                rep_rows.append(seq.row)
                prefix_blocks.append(n)
        groups.append(g)
        shared.append(n)
        suffix_lens.append(length - n * bs)
    return groups, shared, suffix_lens, rep_rows, prefix_blocks


def prepare_step(chunks, table: BlockTable, block_size: int, staging: HostStaging, *, cascade: bool,
                 uniforms: list[float] | None) -> StepInputs:
    """The device inputs of the step computing ``chunks`` (each sequence owns a row of ``table``).

    ``cascade``: sequences read their group's shared prompt blocks through the cascade kernel; it applies
    to pure decode steps only (ignored when a chunk has more than one token). ``uniforms``: one draw per
    sampling chunk, in chunk order (None for greedy).
    """
    bs = block_size
    batch = len(chunks)
    decode = all(c.length == 1 for c in chunks)
    cascade = cascade and decode
    ids, positions, lens, rows, cu, ends = [], [], [], [], [0], []
    for c in chunks:
        end = c.start + c.length
        ids.extend(c.seq.token_ids[c.start : end])
        positions.extend(range(c.start, end))
        lens.append(end)
        rows.append(c.seq.row)
        cu.append(cu[-1] + c.length)
        if c.samples_next_token:
            ends.append(cu[-1] - 1)
    tokens = cu[-1]
    all_sample = len(ends) == tokens  # every token is a sampling row: the logits need no gather
    width = max(len(c.seq.blocks) for c in chunks)
    upd_rows, upd_cols, upd_vals = table.take_updates()
    head = ids + positions + lens + rows + cu + ([] if all_sample else ends) + upd_rows + upd_cols + upd_vals
    if cascade:
        groups, shared, suffix_lens, rep_rows, prefix_blocks = _cascade_groups(chunks, lens, bs)
        head += groups + shared + suffix_lens + rep_rows + [n * bs for n in prefix_blocks]
    values = torch.tensor(head, dtype=torch.int64)
    if uniforms:
        values = torch.cat([values, torch.tensor(uniforms, dtype=torch.float64).view(torch.int64)])
    buf = staging.send(values)

    offset = 0

    def take(n):
        nonlocal offset
        offset += n
        return buf[offset - n : offset]

    ids_d, pos_d, lens_d, rows_d, cu_d = take(tokens), take(tokens), take(batch), take(batch), take(batch + 1)
    ends_d = None if all_sample else take(len(ends))
    upd = len(upd_rows)
    r_d, c_d, v_d = take(upd), take(upd), take(upd)
    if upd:
        table.table.index_put_((r_d, c_d), v_d.to(torch.int32))
    # the sequence of each token: its chunk's row (decode: one token per chunk)
    tok_rows = rows_d if decode else torch.repeat_interleave(rows_d, cu_d.diff(), output_size=tokens)
    slots = table.table[tok_rows, pos_d // bs].long() * bs + pos_d % bs
    step = dict(mode="decode" if decode else "varlen", batch=batch, input_ids=ids_d, positions=pos_d, slots=slots,
                cu_seqlens=cu_d.to(torch.int32), max_seqlen_q=max(c.length for c in chunks), sample_rows=ends_d,
                uniforms=None, width=width, rows=rows_d, full_lens=lens_d,
                full_width=width, table=table)
    if cascade:
        num_groups = len(rep_rows)
        g_d, sh_d, sl_d = take(batch), take(batch), take(batch)
        rep_d, pl_d = take(num_groups), take(num_groups)
        sw = max(1, max(ln - n for ln, n in zip((len(c.seq.blocks) for c in chunks), shared, strict=True)))
        pw = max(1, max(prefix_blocks))
        # suffix row b = table[row_b, shared_b :]; columns past the table end are clamped (never read)
        cols = (sh_d[:, None] + torch.arange(sw, device=buf.device)[None, :]).clamp_(max=table.width - 1)
        step.update(mode="cascade", block_table=table.table[rows_d[:, None], cols], seq_lens=sl_d.to(torch.int32),
                    width=sw, prefix_block_table=table.table[:, :pw].index_select(0, rep_d),
                    prefix_lens=pl_d.to(torch.int32), group_of_seq=g_d.to(torch.int32), prefix_width=pw,
                    max_group_size=max(Counter(groups).values()))
    else:
        step.update(block_table=table.table[:, :width].index_select(0, rows_d), seq_lens=lens_d.to(torch.int32))
    if uniforms:
        step["uniforms"] = take(len(uniforms)).view(torch.float64)
    return StepInputs(**step)
