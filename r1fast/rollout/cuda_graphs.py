"""CUDA-graph-captured decode steps (GPU only).

A decode step of a 1.5B model launches ~20 kernels per layer; at small batch the CPU cannot launch them as
fast as the GPU runs them, so pure-decode steps replay a captured graph instead. One graph is captured per
key (batch bucket, block-table width, plain or cascade, max group size) on first use, into one shared
memory pool, and every graph writes its logits into rows of one shared buffer (sized for the largest bucket
captured): each kept its own [bucket, V] output before, ~1 GB per table width at V = 152k in bf16 over the
16 buckets, 6-8 GB across the widths a long generation passes, outside the KV-cache budget. The step's inputs are copied into the graph's static buffers; padded rows get slot -1
(``append_kv`` skips them) and KV length 0 (attention returns zeros for them), so they never touch a
live sequence's cache. A graph reads the parameters' storage it was captured with: if any parameter's
storage moved (``load_state_dict(assign=True)``, resharding), ``check_weights`` drops every graph; in-place
updates (optimizer steps) are seen without re-capture. A capture that fails (e.g. a MoE layer that reads
routing counts on the host) disables graphs for this engine with a warning and decode runs eagerly.
"""

from __future__ import annotations

import warnings

import torch

from r1fast.kernels.grpo_logits_chunk import lm_head_logits, lm_head_logits_dtype

from .block_table import _round_width
from .paged_backend import StepMetadata

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class _Graph:
    """One captured decode forward + logits with its static input buffers."""

    def __init__(self, engine, batch: int, width: int, cascade: bool, max_group_size: int, pool, logits):
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
        self.logits = logits  # [batch, V] rows of DecodeGraphs' shared buffer
        with torch.cuda.stream(side):  # warm-up: autotuning, lazy allocations, Triton compilation
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self._forward()

    def _forward(self):
        model = self.engine.model
        hidden = model(self.input_ids, position_ids=self.positions, cu_seqlens=self.cu, attn=self.engine.backend,
                       max_seqlen=1)
        lm_head_logits(hidden, model.lm_head_weight, out=self.logits)  # as the trainer's loss computes them

    def replay(self, step):
        """Copy ``step``'s device inputs (``step_inputs.StepInputs``) into the static buffers and replay.

        Device-to-device copies only: the step's one host->device copy and its block-table gathers were
        made by ``prepare_step`` (the rows were rebuilt from Python lists here before: 29-32 ms per step
        at B = 256, 16k context).
        """
        b = step.batch
        self.input_ids[:b].copy_(step.input_ids)
        self.positions[:b].copy_(step.positions)
        self.slots[:b].copy_(step.slots)
        self.slots[b:].fill_(-1)
        self.lens[b:].zero_()
        self.table[:b, : step.width].copy_(step.block_table)
        self.lens[:b].copy_(step.seq_lens)
        if step.group_of_seq is not None:
            self.group_of_seq[:b].copy_(step.group_of_seq)
            self.group_of_seq[b:].zero_()  # group 0: the empty prefix
            groups = step.prefix_block_table.shape[0]
            self.prefix_table[:groups, : step.prefix_width].copy_(step.prefix_block_table)
            self.prefix_lens[:groups].copy_(step.prefix_lens)
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
        self.logits = None  # the logits buffer every graph writes its rows of

    def _logits_rows(self, bucket: int) -> torch.Tensor:
        """[bucket, V] rows of the shared logits buffer; a bucket larger than it (or another dtype) allocates a
        new one and drops the graphs, which wrote into the old one (rare: decode batches start at their
        largest)."""
        w = self.engine.model.lm_head_weight
        dtype = lm_head_logits_dtype(w)
        if (self.logits is None or self.logits.shape[0] < bucket or self.logits.shape[1] != w.shape[0]
                or self.logits.dtype != dtype):
            self.graphs.clear()
            self.logits = None  # freed before the new one is allocated (the cleared graphs held views of it)
            self.logits = torch.empty(bucket, w.shape[0], dtype=dtype, device=w.device)
        return self.logits[:bucket]

    def check_weights(self) -> None:
        """Drop every graph when a parameter's storage moved since capture."""
        ptrs = tuple(p.data_ptr() for p in self.engine.model.parameters())
        if ptrs != self._weight_ptrs:
            self.graphs.clear()
            self._weight_ptrs = ptrs

    def run(self, step):
        """Logits [B, V] of a decode step (``step_inputs.StepInputs``), or None when graphs are off or the
        batch is too large.

        When a cascade graph cannot be captured, sharing samples replay the plain decode graph instead
        (each sample then reads the shared blocks itself: correct, only more traffic): ``step.plain()``.
        """
        cascade = step.mode == "cascade"
        if cascade and not self.cascade_enabled:
            step = step.plain()
            cascade = False
        bucket = next((b for b in BATCH_BUCKETS if b >= step.batch), None)
        if not self.enabled or bucket is None:
            return None
        if cascade:
            width = _round_width(max(step.width, step.prefix_width))
            # the tile height is captured, so the bound is the largest group a generate call can form
            max_group = _round_width(step.max_group_size)
        else:
            width = _round_width(step.width)
            max_group = 1
        key = (bucket, width, cascade, max_group)
        graph = self.graphs.get(key)
        if graph is None:
            stream = torch.cuda.current_stream()
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = _Graph(self.engine, bucket, width, cascade, max_group, self.pool, self._logits_rows(bucket))
            except Exception as exc:  # noqa: BLE001  (any capture failure means: run eagerly)
                # a capture that fails inside capture_end() leaves torch.cuda.graph's side stream current
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize()
                if cascade:
                    warnings.warn(f"cascade decode graph capture failed ({exc!r}); using plain decode graphs",
                                  stacklevel=2)
                    self.cascade_enabled = False
                    return self.run(step)
                warnings.warn(f"CUDA graph capture failed ({exc!r}); decode steps run eagerly", stacklevel=2)
                self.enabled = False
                return None
            self.graphs[key] = graph
        return graph.replay(step)
