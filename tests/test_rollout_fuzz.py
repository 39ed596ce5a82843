"""Randomized differential test of ``Engine.generate`` against a naive fp64 oracle (fixed seeds, a few seconds).

Each case draws an engine shape (block size, a cache barely large enough so that sequences get preempted and
recomputed, a token budget below the prompt lengths so that prefill is chunked, few sequences at once) and a
request (group sizes that share prompt blocks, prompt lengths at block multiples and of one token, one new
token, stop tokens, duplicate prompts, greedy or top-k/top-p sampling). Every generated token is checked
against one fp64 full forward of its own completion (no cache): greedy picks the argmax; sampling picks the
token that inverse-CDF sampling with the completion's own seeded draws gives (``sampler.py``'s contract), so
the tokens are also independent of batch composition and preemption. Logprobs, finish reasons, the KV
blocks (all free after the call) and the stats' peaks are checked too. Draws within 1e-6 of a CDF step or a
truncation boundary within a hair of a tie stop the comparison of that completion (fp32 vs fp64 may differ).
"""

import copy
import math
import random

import pytest
import torch
from rollout_testing import VOCAB, tiny_model

from r1fast.rollout import Engine
from r1fast.rollout.sampler import SequenceRandom

NUM_CASES = 24


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


@pytest.fixture(scope="module")
def models():
    model = tiny_model(seed=3)
    with torch.no_grad():  # spread the logits: greedy near-ties between fp32 and fp64 become rare
        model.lm_head_weight.mul_(20.0)
    return model, copy.deepcopy(model).double()


def draw_case(rng: random.Random) -> dict:
    bs = rng.choice([8, 8, 16, 32])
    lengths = []
    for _ in range(rng.choice([1, 2, 3, 5])):
        lengths.append(rng.choice([1, bs, 2 * bs, bs + 1, bs - 1, rng.randint(1, 3 * bs)]))
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]
    if len(prompts) > 1 and rng.random() < 0.3:
        prompts[-1] = list(prompts[0])  # duplicate prompts form separate groups
    mnt = rng.choice([1, 2, 5, 9, 17])
    need = max(-(-(len(p) + mnt - 1) // bs) for p in prompts)  # the blocks of the longest request alone
    temperature = rng.choice([0, 0, 0.7, 1.3])
    return dict(
        engine=dict(block_size=bs, num_blocks=need + rng.choice([0, 0, 1, 3, 40]),
                    max_batch_tokens=rng.choice([1, 3, 7, 16, 8192]), max_num_seqs=rng.choice([1, 2, 3, 1024])),
        prompts=prompts,
        generate=dict(n=rng.choice([1, 2, 3, 4, 8]), max_new_tokens=mnt, temperature=temperature,
                      top_k=rng.choice([0, 1, 3, 10]) if temperature else 0,
                      top_p=rng.choice([1.0, 0.5, 0.9]) if temperature else 1.0,
                      stop_token_ids=rng.choice([(), [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]]),
                      seed=rng.randrange(10**6)),
    )


def sampling_oracle(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, u: float):
    """(token, ambiguous): inverse-CDF sampling of fp64 ``logits`` with draw ``u``, as ``sampler.py`` samples;
    ambiguous when fp32 rounding could pick another token (a tie at the truncation edge, u near a CDF step)."""
    probs = torch.softmax(logits / temperature, -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    ambiguous = False
    if 0 < top_k < len(probs):
        keep[top_k:] = False
        ambiguous |= math.log(sorted_probs[top_k - 1] / sorted_probs[top_k]) < 1e-4
    if top_p < 1.0:  # over the top-k renormalized distribution, the mass strictly before each token
        kept = sorted_probs * keep
        before = torch.cat([kept.new_zeros(1), torch.cumsum(kept, 0)[:-1]]) / kept.sum()
        keep &= before < top_p
        ambiguous |= bool(((before - top_p).abs() < 1e-5).any())
    mask = torch.zeros_like(keep).scatter_(0, order, keep)
    cdf = torch.cumsum(torch.where(mask, probs, 0.0), 0)
    cdf = cdf / cdf[-1]
    token = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)[0]),
                int(mask.nonzero().max()))
    return token, ambiguous or bool(((cdf - u).abs() < 1e-6).any())


def check_completion(m64, prompt, completion, k, gen) -> None:
    """Each token of ``completion`` (the k-th of the call) against an fp64 forward of prompt + its tokens."""
    tokens, stop = completion.token_ids, set(gen["stop_token_ids"])
    assert 1 <= len(tokens) <= gen["max_new_tokens"] and len(completion.logprobs) == len(tokens)
    assert not stop & set(tokens[:-1]), "generation went past a stop token"
    if tokens[-1] in stop:
        assert completion.finish_reason == "stop"
    else:
        assert completion.finish_reason == "length" and len(tokens) == gen["max_new_tokens"]
    with torch.no_grad():
        logits = m64.logits(m64(torch.tensor(prompt + tokens))).double()[len(prompt) - 1 :]
    temperature, draws = gen["temperature"], SequenceRandom(gen["seed"] + k)
    for t, (token, logprob) in enumerate(zip(tokens, completion.logprobs, strict=True)):
        row = logits[t]
        if temperature == 0:
            assert row[token] >= row.max() - 1e-3, f"token {t}: {token} is not the argmax {int(row.argmax())}"
            expect_logprob = torch.log_softmax(row, -1)[token]
        else:
            expect, ambiguous = sampling_oracle(row, temperature, gen["top_k"], gen["top_p"], draws.uniform())
            if ambiguous and token != expect:
                return  # fp32 may legitimately pick the neighbour; the rest conditions on another prefix
            assert token == expect, f"token {t}: sampled {token}, the seeded draw gives {expect}"
            expect_logprob = torch.log_softmax(row / temperature, -1)[token]
        assert abs(logprob - expect_logprob.item()) < 1e-3, f"token {t}: logprob {logprob} vs {expect_logprob}"


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_generate_matches_fp64_oracle(models, case):
    m32, m64 = models
    spec = draw_case(random.Random(case))
    engine = Engine(m32, **spec["engine"])
    gen, prompts = spec["generate"], spec["prompts"]
    out = engine.generate(prompts, **gen)
    assert [len(g) for g in out] == [gen["n"]] * len(prompts)
    for i, (prompt, group) in enumerate(zip(prompts, out, strict=True)):
        for j, completion in enumerate(group):
            check_completion(m64, prompt, completion, i * gen["n"] + j, gen)
    alloc, stats = engine.cache.allocator, engine.stats()
    assert alloc.num_free == alloc.num_blocks and alloc.num_shared == 0
    assert all(alloc.refcount(b) == 0 for b in range(alloc.num_blocks))
    assert stats["generated_tokens"] == sum(len(c.token_ids) for g in out for c in g)
    # a sequence holds its whole prompt's blocks when it samples its first token
    assert max(-(-len(p) // engine.block_size) for p in prompts) <= stats["max_blocks_used"] <= alloc.num_blocks
    assert stats["max_blocks_shared"] <= stats["max_blocks_used"]
