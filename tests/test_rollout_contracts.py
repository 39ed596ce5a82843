"""Engine contracts not pinned elsewhere: the per-completion seed layout over several prompts, the finish reason
when a stop token is the last allowed token, stats() accumulated over calls, and the constructor's and
generate's argument bounds (r1fast.rollout.arguments), refused before any work."""

import numpy as np
import pytest
import torch
from rollout_testing import prompts_of, tiny_model

from r1fast.rollout import Engine


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), block_size=8, num_blocks=8)


def test_int_seed_gives_completion_i_times_n_plus_j_the_seed_plus_that_index():
    """seed=s: completion j of prompt i gets seed s + i * n + j, i.e. the same tokens as the flat request with
    the explicit seed list; with several prompts (a single prompt cannot tell i * n + j from i + j)."""
    model = tiny_model()
    prompts = prompts_of([5, 11, 3])
    n, s = 3, 40
    kwargs = dict(max_new_tokens=6, temperature=1.0)
    engine = Engine(model, block_size=8, num_blocks=64)
    grouped = engine.generate(prompts, n=n, seed=s, **kwargs)
    flat_prompts = [p for p in prompts for _ in range(n)]
    separate = [g[0] for g in engine.generate(flat_prompts, n=1, seed=[s + k for k in range(len(flat_prompts))],
                                              **kwargs)]
    assert [c.token_ids for g in grouped for c in g] == [c.token_ids for c in separate]
    # an explicit list over the groups is read in the same order
    listed = engine.generate(prompts, n=n, seed=[s + k for k in range(len(flat_prompts))], **kwargs)
    assert [c.token_ids for g in listed for c in g] == [c.token_ids for g in grouped for c in g]


def test_stop_token_sampled_as_the_last_allowed_token_finishes_with_stop():
    """A completion whose max_new_tokens-th token is a stop token ended because of the stop token: "stop", not
    "length" (rejection sampling drops "length" traces as truncated, and trims the stop token of "stop" ones)."""
    model = tiny_model()
    prompt = prompts_of([6])[0]
    free = Engine(model, block_size=8, num_blocks=32).generate([prompt], max_new_tokens=10, temperature=0)[0][0]
    # the first position whose token did not occur earlier: stopping on it ends the completion exactly there
    last = next(i for i, t in enumerate(free.token_ids) if i >= 1 and t not in free.token_ids[:i])
    out = Engine(model, block_size=8, num_blocks=32).generate(
        [prompt], max_new_tokens=last + 1, temperature=0, stop_token_ids=[free.token_ids[last]])[0][0]
    assert out.token_ids == free.token_ids[: last + 1]
    assert out.finish_reason == "stop"
    # the same length without the stop token is a truncation
    cut = Engine(model, block_size=8, num_blocks=32).generate([prompt], max_new_tokens=last + 1, temperature=0)[0][0]
    assert cut.token_ids == out.token_ids and cut.finish_reason == "length"


def test_stats_accumulate_generated_tokens_and_preemptions_over_calls():
    model = tiny_model()
    prompts = prompts_of([9, 3])
    kwargs = dict(n=2, max_new_tokens=14, temperature=1.0, seed=99)
    engine = Engine(model, block_size=8, num_blocks=4)  # 32 tokens: the four sequences never fit at once
    first = engine.generate(prompts, **kwargs)
    s1 = engine.stats()
    tokens1 = sum(len(c.token_ids) for g in first for c in g)
    assert s1["generated_tokens"] == tokens1 == 4 * 14
    assert s1["preemptions"] > 0
    second = engine.generate(prompts, **kwargs)
    s2 = engine.stats()
    assert s2["generated_tokens"] == tokens1 + sum(len(c.token_ids) for g in second for c in g)
    # the same call again preempts the same number of times: the count is the sum over both calls
    assert s2["preemptions"] == 2 * s1["preemptions"]
    assert s2["steps"] > s1["steps"] > 0
    assert s2["tokens_per_s"] == pytest.approx(s2["generated_tokens"] / s2["generate_seconds"])


def test_peak_blocks_count_the_blocks_of_sequences_that_finish_in_the_step():
    """The peaks are read while the step's blocks are held: they were read after the step, when the sequences
    finishing in it had already released theirs, so a one-token generate reported 0 blocks used."""
    model = tiny_model()
    prompt = prompts_of([20])[0]  # 3 blocks of 8
    engine = Engine(model, block_size=8, num_blocks=8)
    engine.generate([prompt], max_new_tokens=1, temperature=0)
    assert engine.stats()["max_blocks_used"] == 3
    # n = 3: 2 shared full blocks plus each sample's own last block
    engine = Engine(model, block_size=8, num_blocks=8)
    engine.generate([prompt], n=3, max_new_tokens=1, temperature=0)
    assert engine.stats()["max_blocks_used"] == 5 and engine.stats()["max_blocks_shared"] == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=4), "block_size"),  # a power of two below the kernels' smallest page
    (dict(block_size=256), "block_size"),
    (dict(memory_fraction=1.5), "memory_fraction"),
    (dict(memory_fraction=0.0), "memory_fraction"),
    (dict(max_batch_tokens=0), "max_batch_tokens"),
    (dict(num_blocks=0), "num_blocks"),
    # bools passed as 1 (1.0); a string raised a bare TypeError from the comparison
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(num_blocks=True), "num_blocks"),
    (dict(memory_fraction=True), "memory_fraction"),
    (dict(memory_fraction="0.5"), "memory_fraction"),
    (dict(block_size=16.0), "block_size"),
])
def test_engine_options_out_of_range_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(tiny_model(), **{"num_blocks": 8, **kwargs})


def test_engine_options_take_numpy_and_torch_integers_like_generate():
    """They were refused with a message naming a valid value ("num_blocks must be a positive int ..., got 8")."""
    engine = Engine(tiny_model(), block_size=np.int64(8), num_blocks=np.int32(8), max_batch_tokens=torch.tensor(5),
                    max_num_seqs=np.int64(2), memory_fraction=np.float32(0.5))
    stats = engine.stats()
    assert (stats["block_size"], stats["num_blocks"], engine.max_batch_tokens, engine.max_num_seqs) == (8, 8, 5, 2)
    assert type(stats["block_size"]) is int
    assert len(engine.generate([[1, 2, 3]] * 3, max_new_tokens=2, temperature=0)) == 3


def test_engine_option_bounds_are_inclusive():
    model = tiny_model()
    for kwargs in (dict(block_size=8), dict(block_size=128), dict(memory_fraction=1.0), dict(max_num_seqs=1)):
        engine = Engine(model, **{"num_blocks": 8, **kwargs})
        assert len(engine.generate([[1, 2, 3]], max_new_tokens=2, temperature=0)[0][0].token_ids) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=-1), "top_k"),  # 0 is "off"; a negative k is a caller's bug, not vLLM's -1
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(prompts=[[1, -2, 3]]), "outside the vocabulary"),
    (dict(stop_token_ids=-1), "stop_token_ids"),
    (dict(stop_token_ids=b"\x01"), "stop_token_ids"),  # bytes iterate as ints: read as token 1 before
    (dict(stop_token_ids="\x01"), "stop_token_ids"),
])
def test_out_of_range_arguments_are_refused_before_any_work(engine, kwargs, match):
    steps = engine.stats()["steps"]
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.generate(kwargs.pop("prompts"), **kwargs)
    assert engine.stats()["steps"] == steps and engine.stats()["blocks_used"] == 0


def test_no_prompts_give_no_completions(engine):
    """A rank with no prompt this step gets [] ([len(prompts)][n]); it raised "max() arg is an empty sequence"
    while sizing the block table. Bad arguments are still refused."""
    steps = engine.stats()["steps"]
    assert engine.generate([], n=4, max_new_tokens=3, temperature=1.0, seed=[]) == []
    assert engine.generate(np.zeros((0, 5), dtype=np.int64), max_new_tokens=3) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([], max_new_tokens=0)
    assert engine.stats()["steps"] == steps and engine.stats()["blocks_used"] == 0


def test_one_token_prompts_as_arrays_and_tensors_are_prompts_not_ids(engine):
    """A one-element array or tensor is a one-token prompt (a list), never read as a bare id."""
    expect = engine.generate([[3], [5, 6]], max_new_tokens=3, temperature=0)
    for prompts in ([np.array([3]), np.array([5, 6])], [torch.tensor([3]), torch.tensor([5, 6])]):
        got = engine.generate(prompts, max_new_tokens=3, temperature=0)
        assert [g[0].token_ids for g in got] == [g[0].token_ids for g in expect]


def test_one_element_tensors_are_lists_not_ids(engine):
    """A one-element tensor is a list of one: as a seed it is one seed (two completions need two), as a prompt's
    token it is not an integer id."""
    with pytest.raises(ValueError, match="seed"):
        engine.generate([[1, 2]], n=2, max_new_tokens=2, seed=torch.tensor([7]))
    with pytest.raises(ValueError, match="not an integer token id"):
        engine.generate([[torch.tensor([3]), 4]], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate([[1, 2]], max_new_tokens=2, stop_token_ids=[torch.tensor([3])])
    assert engine.stats()["blocks_used"] == 0


def test_huge_max_num_seqs_builds_only_the_rows_a_step_can_run():
    """Engine(max_num_seqs=10**9) built a 1e9-entry free list and a [1e9, 16] int32 table (64 GB); a step's
    token budget bounds the running sequences, so the table has min(max_num_seqs, max_batch_tokens) rows."""
    engine = Engine(tiny_model(), num_blocks=64, max_batch_tokens=6, max_num_seqs=10**9)
    assert engine.max_num_seqs == 10**9 and engine.block_table.num_rows == 6
    out = engine.generate([[1, 2, 3]] * 4, n=3, max_new_tokens=5, temperature=1.0, seed=0)
    assert [len(c.token_ids) for group in out for c in group] == [5] * 12
    assert engine.stats()["blocks_used"] == 0


def test_a_failed_generate_counts_its_tokens_and_time_as_it_counts_its_steps():
    """stats() counted the steps of a call that raised mid-generation but not its tokens or seconds."""
    engine = Engine(tiny_model(), num_blocks=64)
    real, calls = engine._step, []

    def failing_step(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(real(*args))
        return calls[-1]

    engine._step = failing_step
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[1, 2, 3]] * 2, max_new_tokens=8, temperature=0)
    stats = engine.stats()
    assert stats["steps"] == 3 and stats["generated_tokens"] == sum(calls) == 6
    assert stats["generate_seconds"] > 0 and stats["blocks_used"] == 0


@pytest.mark.parametrize("where", ["allocate", "release"])
def test_an_interrupt_inside_the_allocator_leaks_no_block(where):
    """A KeyboardInterrupt between a block's allocation and its recording leaked the block for good, and one
    at the start of a finished sequence's release leaked all its blocks (it had left the running queue)."""
    engine = Engine(tiny_model(), num_blocks=32, block_size=8)
    alloc = engine.cache.allocator
    real, calls = getattr(alloc, where), []

    def interrupted(*block):
        calls.append(block)
        if where == "allocate":
            block = real()  # taken from the free list, interrupted before the caller records it
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*block) if where == "release" else block

    setattr(alloc, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[1, 2, 3] * 5] * 3, n=2, max_new_tokens=12, temperature=0)
    delattr(alloc, where)
    assert engine.stats()["blocks_used"] == 0 and alloc.num_free == 32 and alloc.num_shared == 0
    out = engine.generate([[1, 2, 3]] * 2, max_new_tokens=20, temperature=0)
    assert [len(c[0].token_ids) for c in out] == [20, 20]
