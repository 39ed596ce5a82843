"""Rollout engine: paged generation equals naive full-recompute generation, token for token.

Most tests force the PyTorch reference kernels (``R1FAST_KERNELS=torch``) because interpreted Triton is
slow; ``test_greedy_matches_naive_with_triton_kernels`` runs the real paged kernels under the interpreter.
All models are tiny random ``Transformer``s in fp32 on CPU.
"""

import pytest
import torch

from r1fast.kernels import backend
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.rollout import Completion, Engine
from r1fast.rollout.kv_cache import BlockAllocator
from r1fast.rollout.sampler import SamplingParams, SequenceRandom, sample

VOCAB = 101


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


def tiny_model(head_dim=16, num_heads=4, num_kv_heads=2, seed=1):
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, qkv_bias=True)
    model = Transformer.from_config(args, seed=seed)
    with torch.no_grad():  # non-zero biases, so the qkv bias path is exercised too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def prompts_of(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def full_logits(model, tokens):
    """Logits of every position from one full forward with the model's own (SDPA) attention."""
    ids = torch.tensor(tokens)
    return model.logits(model(ids)).double()


@torch.no_grad()
def naive_greedy(model, prompt, max_new_tokens):
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(full_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


# ---- allocator and sampler ----------------------------------------------------------------------


def test_block_allocator_refcounts():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(), alloc.allocate()
    assert alloc.num_used == 2 and alloc.num_free == 2 and alloc.num_shared == 0
    alloc.share(a)
    alloc.share(a)
    assert alloc.refcount(a) == 3 and alloc.num_shared == 1
    alloc.release(a)
    alloc.release(a)
    assert alloc.num_shared == 0 and alloc.num_used == 2
    alloc.release_all([a, b])
    assert alloc.num_used == 0 and alloc.num_free == 4
    with pytest.raises(RuntimeError, match="double free"):
        alloc.release(a)
    for _ in range(4):
        alloc.allocate()
    with pytest.raises(RuntimeError, match="no free block"):
        alloc.allocate()


def test_sharing_a_free_block_is_refused():
    alloc = BlockAllocator(4)
    with pytest.raises(RuntimeError, match="not allocated"):
        alloc.share(0)  # never allocated
    block = alloc.allocate()
    alloc.release(block)
    with pytest.raises(RuntimeError, match="not allocated"):
        alloc.share(block)  # freed: sharing it would hand a block on the free list to a reader
    assert alloc.num_free == 4 and alloc.num_shared == 0 and alloc.refcount(block) == 0


def test_sampler_truncation_keeps_only_allowed_tokens():
    logits = torch.randn(64, 50, dtype=torch.float64).float() * 3
    randoms = [SequenceRandom(s) for s in range(64)]
    for top_k, top_p in ((5, 1.0), (0, 0.3), (7, 0.5)):
        params = SamplingParams(temperature=0.8, top_p=top_p, top_k=top_k)
        for _ in range(5):
            tokens, logprobs = sample(logits, params, randoms)
            scaled = logits.double() / 0.8
            order = scaled.argsort(dim=-1, descending=True)
            rank = order.argsort(dim=-1).gather(-1, tokens[:, None])[:, 0]
            if top_k:
                assert (rank < top_k).all()
            if top_p < 1:
                probs = scaled.softmax(-1)
                mass_before = (probs.sort(-1, descending=True).values.cumsum(-1) - probs.sort(-1, descending=True).values)
                assert (mass_before.gather(-1, rank[:, None])[:, 0] < top_p).all()
            expect = torch.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0]
            assert (logprobs.double() - expect).abs().max() < 1e-5


def test_sequence_random_is_a_pure_function_of_the_seed():
    a, b = SequenceRandom(7), SequenceRandom(7)
    xs = [a.uniform() for _ in range(300)]  # crosses a refill of the draw buffer
    assert xs == [b.uniform() for _ in range(300)]
    assert all(0.0 <= x < 1.0 for x in xs) and xs != [SequenceRandom(8).uniform() for _ in range(300)]


# ---- engine vs naive generation -------------------------------------------------------------------


@pytest.mark.parametrize("block_size,max_batch_tokens", [(8, 8192), (16, 5)])
def test_greedy_matches_naive(torch_kernels, block_size, max_batch_tokens):
    """Odd prompt lengths (1, 8, 9, 23 around block 8), chunked prefill when the budget is 5 tokens."""
    model = tiny_model()
    prompts = prompts_of([1, 8, 9, 23])
    engine = Engine(model, block_size=block_size, num_blocks=64, max_batch_tokens=max_batch_tokens)
    out = engine.generate(prompts, n=2, max_new_tokens=9, temperature=0)
    for prompt, group in zip(prompts, out):
        expect = naive_greedy(model, prompt, 9)
        for completion in group:
            assert isinstance(completion, Completion)
            assert completion.token_ids == expect
            assert completion.finish_reason == "length" and len(completion.logprobs) == 9
    stats = engine.stats()
    assert stats["blocks_used"] == 0 and stats["blocks_shared"] == 0  # everything released
    assert stats["max_blocks_shared"] > 0  # the 23-token prompt's blocks were shared by its 2 samples


def test_greedy_matches_naive_with_triton_kernels(monkeypatch):
    """The paged and cascade kernels under the interpreter (head dim 64: no padding), GQA 4/2."""
    monkeypatch.delenv("R1FAST_KERNELS", raising=False)
    assert backend("cpu") == "triton-interpret"  # conftest sets TRITON_INTERPRET=1 on CPU
    model = tiny_model(head_dim=64)
    prompts = prompts_of([3, 19])
    engine = Engine(model, block_size=8, num_blocks=16)
    out = engine.generate(prompts, n=2, max_new_tokens=4, temperature=0)
    for prompt, group in zip(prompts, out):
        expect = naive_greedy(model, prompt, 4)
        assert [c.token_ids for c in group] == [expect, expect]


def test_group_equals_separate_requests_with_same_seeds(torch_kernels):
    model = tiny_model()
    prompt = prompts_of([21])[0]
    kwargs = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    engine = Engine(model, block_size=8, num_blocks=64)
    grouped = engine.generate([prompt], n=4, **kwargs)[0]
    assert engine.stats()["max_blocks_shared"] == 2  # 21 tokens: 2 full blocks shared, the tail recomputed
    separate = [g[0] for g in engine.generate([prompt] * 4, n=1, **kwargs)]
    assert [c.token_ids for c in grouped] == [c.token_ids for c in separate]
    for a, b in zip(grouped, separate):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(c.token_ids) for c in grouped}) > 1  # different seeds give different samples


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward(torch_kernels, temperature):
    model = tiny_model()
    prompts = prompts_of([5, 13])
    engine = Engine(model, block_size=8, num_blocks=64)
    out = engine.generate(prompts, n=3, max_new_tokens=9, temperature=temperature, top_k=30, seed=5)
    worst = 0.0
    for prompt, group in zip(prompts, out):
        for c in group:
            logits = full_logits(model, prompt + c.token_ids)[len(prompt) - 1 : -1] / temperature
            expect = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            worst = max(worst, (torch.tensor(c.logprobs, dtype=torch.float64) - expect).abs().max().item())
    assert worst < 1e-5


def test_preemption_under_tiny_cache_gives_same_outputs(torch_kernels):
    model = tiny_model()
    prompts = prompts_of([9, 3])
    kwargs = dict(n=2, max_new_tokens=14, temperature=1.0, seed=99)
    large = Engine(model, block_size=8, num_blocks=128).generate(prompts, **kwargs)
    # 4 blocks = 32 tokens: one sequence (at most 9 + 14 = 23 tokens) fits, the four never do at once
    tiny = Engine(model, block_size=8, num_blocks=4)
    small = tiny.generate(prompts, **kwargs)
    assert tiny.stats()["preemptions"] > 0 and tiny.stats()["max_blocks_shared"] > 0
    assert [[c.token_ids for c in g] for g in small] == [[c.token_ids for c in g] for g in large]
    for g_small, g_large in zip(small, large):
        for a, b in zip(g_small, g_large):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert tiny.stats()["blocks_used"] == 0


def test_stop_tokens_end_a_completion(torch_kernels):
    model = tiny_model()
    prompt = prompts_of([6])[0]
    free = Engine(model, block_size=8, num_blocks=32).generate([prompt], max_new_tokens=10, temperature=0)[0][0]
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    out = Engine(model, block_size=8, num_blocks=32).generate(
        [prompt], max_new_tokens=10, temperature=0, stop_token_ids=[stop])[0][0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


def test_live_weights_are_used(torch_kernels):
    model = tiny_model()
    prompts = prompts_of([7, 12])
    engine = Engine(model, block_size=8, num_blocks=64)
    before = engine.generate(prompts, max_new_tokens=8, temperature=0)
    with torch.no_grad():  # an "optimizer step" in place
        model.layers[1].mlp.down_proj.weight.mul_(-3.0)
        model.lm_head_weight.add_(torch.randn_like(model.lm_head_weight) * 0.05)
    after = engine.generate(prompts, max_new_tokens=8, temperature=0)
    for prompt, a in zip(prompts, after):
        assert a[0].token_ids == naive_greedy(model, prompt, 8)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]


def test_bad_input_is_rejected_before_any_work(torch_kernels):
    model = tiny_model()
    engine = Engine(model, block_size=8, num_blocks=4)  # 32 tokens
    ok = [1, 2, 3]
    cases = [
        (dict(prompts=[ok, []]), "prompts\\[1\\] is empty"),
        (dict(prompts=[ok, [1, VOCAB]]), "outside the vocabulary"),
        (dict(prompts=[[-1]]), "outside the vocabulary"),
        (dict(prompts=[[1] * 30]), "exceeds the KV cache"),
        (dict(prompts=[ok], n=0), "n must be"),
        (dict(prompts=[ok], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[ok], top_p=0.0), "top_p"),
        (dict(prompts=[ok], temperature=-1.0), "temperature"),
        (dict(prompts=[ok], stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(prompts=[ok], seed=[1, 2]), "seed"),
    ]
    for kwargs, match in cases:
        kwargs = {"max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=match):
            engine.generate(kwargs.pop("prompts"), **kwargs)
        assert engine.stats()["blocks_used"] == 0 and engine.stats()["steps"] == 0
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, block_size=12)
    default = Engine(model)  # CPU: 65,536 tokens (this model's cache is far below the 1 GiB cap)
    assert default.stats()["num_blocks"] * default.stats()["block_size"] == 65536


def test_gpu_kv_budget_counts_memory_the_caching_allocator_holds_free(monkeypatch):
    """The driver reports memory PyTorch's allocator caches as taken; the cache budget counts it as free."""
    from types import SimpleNamespace

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    args = SimpleNamespace(hidden_size=64, intermediate_size=128, vocab_size=100)
    fake = SimpleNamespace(device=torch.device("cuda"), args=args, weight_itemsize=2)
    per_block = 1 << 20
    blocks = Engine._default_num_blocks(fake, per_block, 16, 0.5, 4096, 64)
    activations = 4096 * (8 * 64 + 3 * 128) * 2
    sampling = 64 * 100 * 4 * 6
    assert blocks == int(((2 + 20) * gib * 0.5 - activations - sampling) // per_block)  # 2 GiB free + 20 cached
