"""CUDA-graph-captured decode steps (GPU only).

A decode step of a 1.5B model launches ~20 kernels per layer; at small batch the CPU cannot launch them as
fast as the GPU runs them, so pure-decode steps replay a captured graph instead. One graph is captured per
key (batch bucket, block-table width, plain or cascade, max group size) on first use, into one shared
memory pool. The step's inputs are copied into the graph's static buffers; padded rows get slot -1
(``append_kv`` skips them) and KV length 0 (attention returns zeros for them), so they never touch a
live sequence's cache. A graph reads the parameters' storage it was captured with: if any parameter's
storage moved (``load_state_dict(assign=True)``, resharding), ``check_weights`` drops every graph; in-place
updates (optimizer steps) are seen without re-capture. A capture that fails (e.g. a MoE layer that reads
routing counts on the host) disables graphs for this engine with a warning and decode runs eagerly.
"""

from __future__ import annotations

import warnings

import torch

from .paged_backend import StepMetadata

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _round_width(blocks: int) -> int:
    """Block-table widths are rounded up to a power of two (>= 16) so that few graphs are captured."""
    width = 16
    while width < blocks:
        width *= 2
    return width


class _Graph:
    """One captured decode forward + logits with its static input buffers."""

    def __init__(self, engine, batch: int, width: int, cascade: bool, max_group_size: int, pool):
        dev = engine.device
        self.engine, self.batch = engine, batch
        i32 = dict(dtype=torch.int32, device=dev)
        self.input_ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.cu = torch.arange(batch + 1, **i32)
        self.slots = torch.full((batch,), -1, dtype=torch.int64, device=dev)
        if cascade:
            self.prefix_table = torch.zeros(batch + 1, width, **i32)
            self.prefix_lens = torch.zeros(batch + 1, **i32)
            self.group_of_seq = torch.zeros(batch, **i32)
            self.table = torch.zeros(batch, width, **i32)
            self.lens = torch.zeros(batch, **i32)
            self.meta = StepMetadata("cascade", self.slots, prefix_block_table=self.prefix_table,
                                     prefix_lens=self.prefix_lens, group_of_seq=self.group_of_seq,
                                     suffix_block_table=self.table, suffix_lens=self.lens,
                                     max_group_size=max_group_size)
        else:
            self.table = torch.zeros(batch, width, **i32)
            self.lens = torch.zeros(batch, **i32)
            self.meta = StepMetadata("decode", self.slots, block_table=self.table, seq_lens=self.lens)
        engine.backend.set_step(self.meta)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: autotuning, lazy allocations, Triton compilation
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._forward()

    def _forward(self):
        model = self.engine.model
        hidden = model(self.input_ids, position_ids=self.positions, cu_seqlens=self.cu, attn=self.engine.backend,
                       max_seqlen=1)
        return model.logits(hidden)

    def replay(self, ids, positions, slots, table_rows, lens, groups=None, prefix_rows=None, prefix_lens=None):
        b = len(ids)
        put = lambda buf, values, dt: buf[: len(values)].copy_(torch.tensor(values, dtype=dt), non_blocking=True)  # noqa: E731
        put(self.input_ids, ids, torch.int64)
        put(self.positions, positions, torch.int64)
        put(self.slots, slots, torch.int64)
        self.slots[b:].fill_(-1)
        self.lens[b:].zero_()
        width = max(1, max(len(r) for r in table_rows))
        self.table[:b, :width].copy_(torch.tensor([r + [0] * (width - len(r)) for r in table_rows], dtype=torch.int32),
                                     non_blocking=True)
        put(self.lens, lens, torch.int32)
        if groups is not None:
            put(self.group_of_seq, groups, torch.int32)
            self.group_of_seq[b:].zero_()  # group 0: the empty prefix
            pw = max(1, max(len(r) for r in prefix_rows))
            self.prefix_table[: len(prefix_rows), :pw].copy_(
                torch.tensor([r + [0] * (pw - len(r)) for r in prefix_rows], dtype=torch.int32), non_blocking=True)
            put(self.prefix_lens, prefix_lens, torch.int32)
        self.engine.backend.set_step(self.meta)
        self.graph.replay()
        return self.logits[:b]


class DecodeGraphs:
    """Captures and replays decode graphs for one engine."""

    def __init__(self, engine):
        self.engine = engine
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.enabled = True
        self.cascade_enabled = True
        self._weight_ptrs = None

    def check_weights(self) -> None:
        """Drop every graph when a parameter's storage moved since capture."""
        ptrs = tuple(p.data_ptr() for p in self.engine.model.parameters())
        if ptrs != self._weight_ptrs:
            self.graphs.clear()
            self._weight_ptrs = ptrs

    def run(self, chunks, ids, positions, slots, lens, cascade):
        """Logits [B, V] of a decode step, or None when graphs are off or the batch is too large.

        When a cascade graph cannot be captured, sharing samples replay the plain decode graph instead
        (each sample then reads the shared blocks itself: correct, only more traffic).
        """
        cascade = cascade and self.cascade_enabled
        batch = len(chunks)
        bucket = next((b for b in BATCH_BUCKETS if b >= batch), None)
        if not self.enabled or bucket is None:
            return None
        bs = self.engine.block_size
        groups = prefix_rows = prefix_lens = None
        if cascade:
            group_index: dict[int, int] = {}
            prefix_rows, groups, table_rows, suffix_lens = [[]], [], [], []
            for c, length in zip(chunks, lens, strict=False):
                shared = c.seq.num_shared_blocks
                g = 0
                if shared:
                    g = group_index.setdefault(id(c.seq.prefix_job), len(prefix_rows))
                    if g == len(prefix_rows):
                        prefix_rows.append(c.seq.blocks[:shared])
                groups.append(g)
                table_rows.append(c.seq.blocks[shared:])
                suffix_lens.append(length - shared * bs)
            prefix_lens = [len(r) * bs for r in prefix_rows]
            row_lens = suffix_lens
            width = _round_width(max(max(len(r) for r in table_rows), max(len(r) for r in prefix_rows)))
            # the tile height is captured, so the bound is the largest group a generate call can form
            max_group = _round_width(max(groups.count(g) for g in set(groups)))
        else:
            table_rows = [c.seq.blocks for c in chunks]
            row_lens = lens
            width = _round_width(max(len(r) for r in table_rows))
            max_group = 1
        key = (bucket, width, cascade, max_group)
        graph = self.graphs.get(key)
        if graph is None:
            stream = torch.cuda.current_stream()
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = _Graph(self.engine, bucket, width, cascade, max_group, self.pool)
            except Exception as exc:  # noqa: BLE001  (any capture failure means: run eagerly)
                # a capture that fails inside capture_end() leaves torch.cuda.graph's side stream current
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize()
                if cascade:
                    warnings.warn(f"cascade decode graph capture failed ({exc!r}); using plain decode graphs",
                                  stacklevel=2)
                    self.cascade_enabled = False
                    return self.run(chunks, ids, positions, slots, lens, False)
                warnings.warn(f"CUDA graph capture failed ({exc!r}); decode steps run eagerly", stacklevel=2)
                self.enabled = False
                return None
            self.graphs[key] = graph
        return graph.replay(ids, positions, slots, table_rows, row_lens, groups, prefix_rows, prefix_lens)
