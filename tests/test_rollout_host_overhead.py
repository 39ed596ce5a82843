"""Rollout host work per step: the persistent block table, the one-copy step inputs, the CUDA-graph input path.

The engine used to rebuild every block table from Python lists each step (host work O(B * context /
block_size)), made 6 to 8 separate host->device copies, and the sampler two device->host copies. These tests
check the replacement's behaviour, never its timings (those are in ``bench/run.py``): the tables gathered on
the device equal the per-step rebuild, the data sent per decode step does not grow with the context, the
CUDA-graph path's input handling gives the eager path's tokens (run on CPU with an eager stand-in for
the captured graph), and the sampler makes one device->host copy with the same seeded draws.
"""

import contextlib

import pytest
import torch
from rollout_testing import VOCAB, prompts_of, tiny_model

import r1fast.rollout.engine as engine_module
from r1fast.rollout import Engine, cuda_graphs
from r1fast.rollout.sampler import SamplingParams, SequenceRandom, sample


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


def outputs(result):
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in group] for group in result]


def _used_rows(table, lens, bs):
    """Only the entries a kernel reads: ceil(len / bs) per row (the rest is stale by design)."""
    return [row[: -(-n // bs)] for row, n in zip(table.tolist(), lens.tolist(), strict=True)]


def check_against_rebuild(chunks, step, bs):
    """The step's device inputs equal what the per-step rebuild from the sequences' block lists gave."""
    tokens = [t for c in chunks for t in c.seq.token_ids[c.start : c.start + c.length]]
    positions = [p for c in chunks for p in range(c.start, c.start + c.length)]
    slots = [c.seq.blocks[p // bs] * bs + p % bs for c in chunks for p in range(c.start, c.start + c.length)]
    assert step.input_ids.tolist() == tokens and step.positions.tolist() == positions
    assert step.slots.tolist() == slots
    lens = [c.start + c.length for c in chunks]
    if step.mode == "cascade":
        shared = [c.seq.num_shared_blocks for c in chunks]
        assert step.block_table.shape[1] == max(1, max(len(c.seq.blocks) - n for c, n in zip(chunks, shared)))
        assert step.seq_lens.tolist() == [n - s * bs for n, s in zip(lens, shared)]
        assert _used_rows(step.block_table, step.seq_lens, bs) == [
            c.seq.blocks[s:][: -(-(n - s * bs) // bs)] for c, s, n in zip(chunks, shared, lens)]
        groups = step.group_of_seq.tolist()
        prefix = _used_rows(step.prefix_block_table, step.prefix_lens, bs)
        assert prefix[0] == [] and step.prefix_lens[0] == 0
        for c, g, s in zip(chunks, groups, shared):
            assert prefix[g] == c.seq.blocks[:s] and (g == 0) == (s == 0)
        plain = step.plain()
        assert plain.mode == "decode" and plain.seq_lens.tolist() == lens
        assert _used_rows(plain.block_table, plain.seq_lens, bs) == [c.seq.blocks[: -(-n // bs)] for c, n in zip(chunks, lens)]
    else:
        assert step.block_table.shape[1] == max(len(c.seq.blocks) for c in chunks)  # kernels split by width
        assert step.seq_lens.tolist() == lens
        assert _used_rows(step.block_table, step.seq_lens, bs) == [c.seq.blocks[: -(-n // bs)] for c, n in zip(chunks, lens)]
        assert step.cu_seqlens.dtype == torch.int32 and step.cu_seqlens.diff().tolist() == [c.length for c in chunks]
    sampling = [i for i, c in enumerate(chunks) if c.samples_next_token]
    ends = [int(step.cu_seqlens[i + 1]) - 1 for i in sampling]
    if step.sample_rows is None:  # no gather at all: every token samples
        assert ends == list(range(len(tokens)))
    else:
        assert step.sample_rows.dtype == torch.int64 and step.sample_rows.tolist() == ends


@pytest.mark.parametrize("block_size,num_blocks,max_batch_tokens,max_num_seqs", [
    (8, 64, 8192, 1024),  # groups share prompt blocks: cascade decode steps
    (8, 7, 8192, 1024),  # 56 tokens for 3 x 3 sequences of up to 31: preemption, rows freed and reused
    (16, 64, 6, 4),  # chunked prefill next to decodes, at most 4 rows, prefix jobs mid-decode
])
def test_step_inputs_equal_the_per_step_rebuild(monkeypatch, block_size, num_blocks, max_batch_tokens, max_num_seqs):
    model = tiny_model()
    engine = Engine(model, block_size=block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                    max_num_seqs=max_num_seqs)
    real = engine_module.prepare_step
    modes = set()

    def checked(chunks, table, bs, staging, **kwargs):
        step = real(chunks, table, bs, staging, **kwargs)
        check_against_rebuild(chunks, step, bs)
        rows = [c.seq.row for c in chunks]
        assert min(rows) >= 0 and len(set(rows)) == len(rows)  # a row per running sequence
        modes.add(step.mode)
        return step

    monkeypatch.setattr(engine_module, "prepare_step", checked)
    prompts = prompts_of([17, 4, 9])
    out = engine.generate(prompts, n=3, max_new_tokens=14, temperature=0.8, seed=3)
    monkeypatch.setattr(engine_module, "prepare_step", real)
    assert outputs(out) == outputs(engine.generate(prompts, n=3, max_new_tokens=14, temperature=0.8, seed=3))
    assert {"varlen", "decode", "cascade"} & modes >= {"varlen"} and len(modes) >= 2
    if num_blocks == 7:
        assert engine.stats()["preemptions"] > 0


def test_decode_step_sends_the_same_amount_at_any_context_length(monkeypatch):
    """The per-step host->device data is O(B + new blocks), not O(B * context / block_size).

    Before: the whole [B, context / block_size] table went to the device every decode step (B = 256 at
    16k context: 31 ms of host work a step).
    """
    model = tiny_model(num_layers=1)
    engine = Engine(model, block_size=8, num_blocks=4 * 40)
    sent = []
    real = engine.staging.send
    monkeypatch.setattr(engine.staging, "send", lambda values: sent.append(values.numel()) or real(values))
    engine.generate(prompts_of([3, 5, 2, 4]), max_new_tokens=300, temperature=0)
    decode = sent[1:]  # after the one prefill step: 299 decode steps, context 5 -> 304
    # 4 ids + 4 positions + 4 lens + 4 rows + 5 cu = 21, plus 3 ints per new block entry (<= 4 a step)
    assert len(decode) == 299 and max(decode) <= 21 + 3 * 4 and min(decode) == 21


def test_all_sampling_decode_needs_no_row_selection(monkeypatch):
    """rows=None when every row samples: no boolean mask (a nonzero() sync) and no gather per decode step."""
    engine = Engine(tiny_model(), block_size=8, num_blocks=32)
    steps = []
    real = engine_module.prepare_step
    monkeypatch.setattr(engine_module, "prepare_step", lambda *a, **k: steps.append(real(*a, **k)) or steps[-1])
    engine.generate(prompts_of([5, 9]), max_new_tokens=4, temperature=0)
    assert steps[0].mode == "varlen" and steps[0].sample_rows.tolist() == [4, 13]
    assert [s.sample_rows for s in steps[1:]] == [None] * 3


class _FakeStream:
    def wait_stream(self, other):
        pass


class _EagerGraph(cuda_graphs._Graph):
    """A decode "graph" on CPU: the real static buffers and ``replay``; the captured graph's replay is an
    eager forward over those buffers (what the captured graph computes)."""

    padding_reset: list = []
    """Per replay: were the rows past the live batch padding (slot -1, KV length 0, group 0)? Stale slots on rows
    once live would keep writing K and V into blocks a live sequence may own now; eager tokens can't show it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.replays = 0
        self.graph = self  # self.graph.replay() -> _replay_graph below

    def replay(self, step=None):
        if step is not None:  # DecodeGraphs.run -> _Graph.replay(step): copy the inputs, then graph.replay()
            out = super().replay(step)
            b = step.batch
            ok = bool((self.slots[b:] == -1).all()) and bool((self.lens[b:] == 0).all())
            if hasattr(self, "group_of_seq"):
                ok = ok and bool((self.group_of_seq[b:] == 0).all())
            _EagerGraph.padding_reset.append((b, self.batch, ok))
            return out
        self.replays += 1
        self._forward()  # writes self.logits, rows of the buffer the graphs share
        return None


@pytest.fixture
def cpu_graphs(monkeypatch):
    """torch.cuda's stream and graph calls made inert, so the graph input path runs on CPU."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs, "_Graph", _EagerGraph)
    monkeypatch.setattr(_EagerGraph, "padding_reset", [])


def test_cuda_graph_input_path_gives_the_eager_tokens_on_cpu(cpu_graphs):
    """DecodeGraphs.run / _Graph.replay (buckets, padded rows with slot -1 and length 0, cascade and plain
    tables copied into static buffers) give the eager path's tokens and logprobs exactly."""
    model = tiny_model()
    prompts = prompts_of([21, 6, 13])
    # stop tokens end some samples early: the batch shrinks (9 -> 6 -> 2 -> 1 rows), with padded rows
    kwargs = dict(n=3, max_new_tokens=12, temperature=0.9, top_k=40, seed=11, stop_token_ids=range(0, VOCAB, 9))
    eager = Engine(model, block_size=8, num_blocks=64).generate(prompts, **kwargs)
    assert len({len(c.token_ids) for group in eager for c in group}) > 2
    graphed = Engine(model, block_size=8, num_blocks=64)
    graphed.graphs = cuda_graphs.DecodeGraphs(graphed)
    assert outputs(graphed.generate(prompts, **kwargs)) == outputs(eager)
    graphs = graphed.graphs.graphs
    assert any(k[2] for k in graphs) and sum(g.replays for g in graphs.values()) >= 10  # cascade replays ran
    assert all(k[0] in cuda_graphs.BATCH_BUCKETS for k in graphs) and 16 in {k[0] for k in graphs}  # 9 rows -> 16
    # one logits buffer for every graph (each kept its own [bucket, V] output: ~1 GB per width at V = 152k)
    assert len(graphs) > 2 and {g.logits.data_ptr() for g in graphs.values()} == {graphed.graphs.logits.data_ptr()}
    graphed.graphs.cascade_enabled = False  # the plain-table fallback of a failed cascade capture
    assert outputs(graphed.generate(prompts, **kwargs)) == outputs(eager)
    assert any(not k[2] for k in graphs)


@pytest.mark.parametrize("cascade", [True, False])
def test_padding_rows_are_reset_after_the_batch_shrinks_inside_a_bucket(cpu_graphs, cascade):
    """Rows once live that became padding must read slot -1 (append_kv skips it), KV length 0 and group 0: a
    stale slot keeps writing K and V into a block a live sequence may own now, which equal tokens can't show."""
    engine = Engine(tiny_model(), block_size=8, num_blocks=64)
    engine.graphs = cuda_graphs.DecodeGraphs(engine)
    engine.graphs.cascade_enabled = cascade
    engine.generate(prompts_of([21, 6, 13]), n=3, max_new_tokens=12, temperature=0.9, seed=11,
                    stop_token_ids=range(0, VOCAB, 9))
    records = _EagerGraph.padding_reset  # (live rows, bucket, padding reset) per replay
    assert any(len({b for b, k, _ in records if k == bucket}) > 1 for bucket in {k for _, k, _ in records})
    assert all(ok for _, _, ok in records)


def test_graphs_are_dropped_when_a_parameter_storage_moves():
    """An optimizer step updates parameters in place (captured graphs see it); load_state_dict(assign=True)
    moves their storage, so graphs that read the old addresses must go."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 4)
    graphs = cuda_graphs.DecodeGraphs(SimpleNamespace(model=model))
    graphs.check_weights()
    graphs.graphs[(1, 16, False, 1)] = "captured"
    with torch.no_grad():
        model.weight.mul_(2.0)
    graphs.check_weights()
    assert graphs.graphs
    model.load_state_dict({"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}, assign=True)
    graphs.check_weights()
    assert not graphs.graphs


def test_the_shared_logits_buffer_grows_by_dropping_the_graphs_that_wrote_the_old_one():
    from types import SimpleNamespace

    graphs = cuda_graphs.DecodeGraphs(SimpleNamespace(model=SimpleNamespace(lm_head_weight=torch.zeros(VOCAB, 8))))
    rows = graphs._logits_rows(16)
    graphs.graphs[(16, 8, False, 1)] = "captured"
    assert graphs._logits_rows(4).data_ptr() == rows.data_ptr() and graphs.graphs  # smaller buckets: its rows
    bigger = graphs._logits_rows(32)
    assert bigger.shape == (32, VOCAB) and not graphs.graphs  # the old graphs wrote the old buffer: re-captured


def test_sampler_makes_one_host_copy_with_the_same_seeded_draws(monkeypatch):
    """Tokens and logprobs come back in one device->host copy; the draws equal the seed's torch.rand
    chunks exactly (the seed contract), also when passed in as ``uniforms``."""
    a = SequenceRandom(5)
    gen = torch.Generator().manual_seed(5)
    expect = torch.rand(256, generator=gen, dtype=torch.float64).tolist()
    expect += torch.rand(256, generator=gen, dtype=torch.float64).tolist()
    assert [a.uniform() for _ in range(300)] == expect[:300]
    logits = torch.randn(64, VOCAB)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a, **k))
    tokens, logprobs = sample(logits, params, [SequenceRandom(s) for s in range(64)])
    assert len(copies) == 1
    monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    draws = torch.tensor([SequenceRandom(s).uniform() for s in range(64)], dtype=torch.float64)
    again = sample(logits, params, [None] * 64, uniforms=draws)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], logprobs)
    greedy = sample(logits, SamplingParams(temperature=0.0), [None] * 64)
    expect_lp = torch.log_softmax(logits, -1).gather(-1, logits.argmax(-1)[:, None])[:, 0]
    assert torch.equal(greedy[0], logits.argmax(-1)) and torch.equal(greedy[1], expect_lp)
