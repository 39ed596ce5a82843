"""Rollout engine failure paths: an aborted ``generate`` frees its blocks, non-finite logits and positions
past the model's range raise, and ``generate`` takes integer-like arguments (numpy/torch ints, a single
stop id) but refuses bools with a ValueError naming the argument. Also the KV cache's edges: its exact
capacity, a model cast after ``Engine(model)``, and cache writes past its end.

Tiny random fp32 models on CPU with the PyTorch reference kernels (``R1FAST_KERNELS=torch``).
"""

import numpy as np
import pytest
import torch
from rollout_testing import VOCAB, tiny_model

import r1fast.rollout.engine as engine_module
from r1fast.kernels import backend
from r1fast.kernels.paged_attention import append_kv
from r1fast.rollout import Engine
from r1fast.rollout.sampler import SamplingParams, SequenceRandom, sample


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


def assert_all_blocks_free(engine):
    alloc = engine.cache.allocator
    assert alloc.num_used == 0 and alloc.num_shared == 0
    assert all(alloc.refcount(b) == 0 for b in range(alloc.num_blocks))


# ---- an exception mid-generation releases every block ------------------------------------------------


@pytest.mark.parametrize("where", ["sampler", "forward"])
def test_exception_mid_generation_releases_every_block(monkeypatch, where):
    model = tiny_model()
    engine = Engine(model, block_size=8, num_blocks=8)  # 64 tokens
    prompt = list(range(1, 20))  # 19 tokens: 2 shared full blocks per group of n = 2
    calls = {"n": 0}

    def fail_on_third_call():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt if where == "forward" else RuntimeError("injected sampler failure")

    if where == "sampler":  # mid-decode: samples hold their share of the prompt blocks and own ones
        real_sample = engine_module.sample

        def failing_sample(*args, **kwargs):
            fail_on_third_call()
            return real_sample(*args, **kwargs)

        monkeypatch.setattr(engine_module, "sample", failing_sample)
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate([prompt], n=2, max_new_tokens=10, temperature=1.0, seed=0)
        monkeypatch.setattr(engine_module, "sample", real_sample)
    else:  # Ctrl-C inside the model's forward, during a prefill / decode step
        hook = model.layers[0].register_forward_hook(lambda *_: fail_on_third_call())
        with pytest.raises(KeyboardInterrupt):
            engine.generate([prompt], n=2, max_new_tokens=10, temperature=1.0, seed=0)
        hook.remove()
    assert calls["n"] == 3
    assert_all_blocks_free(engine)
    # 29 + 30 = 59 of the 64 cache tokens: impossible with even one block leaked
    out = engine.generate([list(range(1, 30))], max_new_tokens=30, temperature=0)[0][0]
    assert len(out.token_ids) == 30 and out.finish_reason == "length"
    assert_all_blocks_free(engine)


# ---- non-finite logits -------------------------------------------------------------------------------


def test_sampler_raises_naming_rows_with_non_finite_logits():
    logits = torch.randn(4, 9)
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")  # no token has any probability
    logits[3, :5] = float("-inf")  # masked tokens are fine while one is finite
    names = ["a", "b", "c", "d"]
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=3)):
        randoms = [SequenceRandom(s) for s in range(4)]
        with pytest.raises(RuntimeError, match=r"sequences \['b', 'c'\] are not finite"):
            sample(logits, params, randoms, names)
    tokens, logprobs = sample(logits[[0, 3]], SamplingParams(temperature=0.8), [SequenceRandom(0)] * 2)
    assert tokens[1] >= 5 and torch.isfinite(logprobs).all()
    with pytest.raises(RuntimeError, match=r"row 0"):  # logits / temperature overflows fp32
        sample(torch.full((1, 9), 1e3), SamplingParams(temperature=1e-36), [SequenceRandom(0)])


def test_nan_weights_raise_naming_the_sequences_and_free_the_cache():
    model = tiny_model()
    engine = Engine(model, block_size=8, num_blocks=16)
    with torch.no_grad():
        model.lm_head_weight[7, 0] = float("nan")  # one NaN weight in the head: every row's logits hold a NaN
    for temperature in (0.0, 1.0):
        with pytest.raises(RuntimeError, match=r"prompts\[1\] sample 0'?, '?prompts\[1\] sample 1.*not finite"):
            engine.generate([[3, 1, 4], [1, 5]], n=2, max_new_tokens=4, temperature=temperature, seed=0)
        assert_all_blocks_free(engine)


@pytest.mark.parametrize("temperature", [1e-45, 1e-6, float("nan"), float("inf"), True])
def test_temperature_that_overflows_logits_is_rejected(temperature):
    engine = Engine(tiny_model(), block_size=8, num_blocks=4)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1, 2]], max_new_tokens=2, temperature=temperature)


# ---- positions past max_position_embeddings ---------------------------------------------------------


def test_prompt_plus_new_tokens_must_fit_the_model_positions():
    engine = Engine(tiny_model(max_position_embeddings=32), block_size=8, num_blocks=16)  # cache: 128 tokens
    prompts = [[1] * 5, [2] * 20]
    with pytest.raises(ValueError, match=r"32 positions.*longest prompt \(20 tokens\).*max_new_tokens=13"):
        engine.generate(prompts, max_new_tokens=13, temperature=0)
    assert engine.stats()["steps"] == 0
    out = engine.generate(prompts, max_new_tokens=12, temperature=0)  # 20 + 12 = 32 exactly fits
    assert [len(g[0].token_ids) for g in out] == [12, 12]


# ---- integer-like arguments ----------------------------------------------------------------------------


def test_bools_and_non_integers_are_rejected_before_any_work():
    engine = Engine(tiny_model(), block_size=8, num_blocks=4)
    ok = [1, 2, 3]
    cases = [
        (dict(n=True), "n must be"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_p=True), "top_p"),
        (dict(prompts=[[1, True]]), "not an integer token id"),
        (dict(prompts=[[1, 2.0]]), "not an integer token id"),
        (dict(prompts=[np.array([1.0, 2.0])]), "not an integer token id"),
        (dict(prompts=ok), r"prompts\[0\] is 1, not a list"),  # a flat prompt instead of a list of prompts
        (dict(prompts=[{1: 2}]), r"prompts\[0\] is a dict .*no token order"),  # once read as the prompt [1]
        (dict(prompts=[{3, 1}]), r"prompts\[0\] is a set .*no token order"),
        (dict(prompts={0: ok}), "prompts must be a list of token-id lists, got dict"),
        # not iterable: these were bare TypeErrors ("'NoneType' object is not iterable")
        (dict(prompts=None), "prompts must be a list of token-id lists, got NoneType"),
        (dict(prompts=[ok, None]), r"prompts\[1\] is None, not a list"),
        (dict(prompts=[2.5]), r"prompts\[0\] is 2.5, not a list"),
        (dict(stop_token_ids=True), "stop_token_ids"),
        (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(seed=True), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(seed=[1.5]), "seed"),
    ]
    for kwargs, match in cases:
        kwargs = {"max_new_tokens": 2, "prompts": [ok], **kwargs}
        with pytest.raises(ValueError, match=match):
            engine.generate(kwargs.pop("prompts"), **kwargs)
        assert engine.stats()["steps"] == 0
    assert_all_blocks_free(engine)


def test_numpy_and_torch_integers_are_accepted_like_python_ints():
    engine = Engine(tiny_model(), block_size=8, num_blocks=16)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    kwargs = dict(n=2, max_new_tokens=4, temperature=1.0, top_k=20, seed=7, stop_token_ids=[2])
    want = engine.generate(prompts, **kwargs)
    variants = [
        dict(prompts=[np.array(p) for p in prompts]),
        dict(prompts=[torch.tensor(p, dtype=torch.int32) for p in prompts]),
        dict(prompts=[[np.int32(t) for t in p] for p in prompts]),
        dict(seed=np.int64(7), top_k=np.int64(20), n=np.int64(2), max_new_tokens=torch.tensor(4)),
        dict(seed=[np.uint32(7 + k) for k in range(4)]),
        dict(stop_token_ids=2),  # a single id, as HF's eos_token_id may be
        dict(stop_token_ids=np.array([2])),
    ]
    for variant in variants:
        got = engine.generate(**{"prompts": prompts, **kwargs, **variant})
        assert [[(c.token_ids, c.logprobs) for c in g] for g in got] == [
            [(c.token_ids, c.logprobs) for c in g] for g in want
        ], variant
        assert all(type(t) is int for g in got for c in g for t in c.token_ids)


# ---- the KV cache: what it must hold, and a model cast after Engine(model) ---------------------------


def test_cache_holds_prompt_plus_new_tokens_minus_the_uncached_last_one():
    """The last sampled token is never fed back: a 32-token cache runs 20 + 13 (was refused, one token lost)."""
    engine = Engine(tiny_model(), block_size=8, num_blocks=4)  # 32 tokens
    prompt = list(range(1, 21))
    out = engine.generate([prompt], max_new_tokens=13, temperature=0)[0][0]
    big = Engine(engine.model, block_size=8, num_blocks=16).generate([prompt], max_new_tokens=13, temperature=0)
    assert out.token_ids == big[0][0].token_ids and len(out.token_ids) == 13
    assert_all_blocks_free(engine)
    with pytest.raises(ValueError, match=r"\(20 tokens\) \+ max_new_tokens \(14\) - 1 .* exceeds the KV cache "
                                         r"\(4 blocks x 8 = 32 tokens\); raise num_blocks") as err:
        engine.generate([prompt], max_new_tokens=14, temperature=0)
    assert "tokens tokens" not in str(err.value)


def test_model_cast_after_engine_rebuilds_the_cache_and_a_device_move_is_refused():
    """Casting the live model after Engine(model) used to fail mid-step inside attention (k/v vs cache dtype)."""
    model = tiny_model()
    engine = Engine(model, block_size=8, num_blocks=32)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    model.to(torch.bfloat16)
    got = engine.generate(prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3)
    assert engine.cache.dtype == engine.cache.k[0].dtype == torch.bfloat16
    assert engine.stats()["num_blocks"] == 64  # same bytes, half the bytes per block
    want = Engine(model, block_size=8, num_blocks=64).generate(prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    model.to(torch.float32)
    engine.generate(prompts, max_new_tokens=2, temperature=0)
    assert engine.stats()["num_blocks"] == 32
    assert_all_blocks_free(engine)
    model.to("meta")
    with pytest.raises(ValueError, match=r"now on meta.*build a new Engine"):
        engine.generate(prompts, max_new_tokens=2, temperature=0)


def test_explicit_dtype_holds_and_weights_of_another_dtype_are_refused():
    """Engine(fp32 model, dtype=bfloat16) silently rebuilt its cache in fp32 with half the blocks (64 -> 32) on
    the first generate. dtype= is the dtype the weights have when generate runs (FSDP2's gathered bf16)."""
    model = tiny_model()
    engine = Engine(model, block_size=8, num_blocks=64, dtype=torch.bfloat16)
    assert engine.cache.k[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"Engine\(dtype=torch.bfloat16\).*weights are torch.float32"):
        engine.generate([[1, 2, 3]], max_new_tokens=3, temperature=0)
    assert engine.cache.k[0].dtype == torch.bfloat16 and engine.stats()["num_blocks"] == 64
    assert engine.stats()["steps"] == 0
    model.to(torch.bfloat16)  # the weights as the trainer's gather hands them over: the option holds
    out = engine.generate([[1, 2, 3]], max_new_tokens=3, temperature=0)
    assert len(out[0][0].token_ids) == 3
    assert engine.cache.k[0].dtype == torch.bfloat16 and engine.stats()["num_blocks"] == 64
    assert_all_blocks_free(engine)
    with pytest.raises(ValueError, match="dtype must be None or a floating torch.dtype"):
        Engine(model, block_size=8, num_blocks=4, dtype="bfloat16")


@pytest.mark.parametrize("kernels", ["torch", "triton-interpret"])
def test_append_kv_refuses_slots_past_the_cache_on_cpu(monkeypatch, kernels):
    """The interpreted kernel wrote out of bounds (a heap abort when past the allocation); both paths raise.

    The cache is the first 3 blocks of a 4-block buffer, so a write to slot 3 * 8 would land in the guard
    block rather than corrupt the heap if the check were missing.
    """
    if kernels == "triton-interpret":
        monkeypatch.delenv("R1FAST_KERNELS")
    assert backend(torch.device("cpu")) == kernels
    buffers = [torch.zeros(4, 8, 2, 64) for _ in range(2)]
    k_cache, v_cache = (b[:3] for b in buffers)
    k, v = torch.ones(2, 2, 64), torch.ones(2, 2, 64)
    with pytest.raises(ValueError, match="slot 24 beyond the cache's 24 slots"):
        append_kv(k, v, k_cache, v_cache, torch.tensor([5, 24]))
    assert all(b[3].abs().sum() == 0 for b in buffers)
    append_kv(k, v, k_cache, v_cache, torch.tensor([-1, 23]))  # the last slot and a skipped token are fine
    assert k_cache[2, 7].eq(1).all() and k_cache.sum() == 2 * 64
