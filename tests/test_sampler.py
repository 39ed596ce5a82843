"""r1fast.rollout.sampler: at a real vocabulary size inverse-CDF sampling must reach every token it should; top-k /
top-p truncation and the returned log-probs against an fp64 inverse-CDF reference on a small vocabulary."""

import torch

from r1fast.rollout.sampler import SamplingParams, SequenceRandom, sample

V = 152_064  # Qwen2.5's vocabulary


class FixedUniform:
    """A stand-in for SequenceRandom that returns one chosen uniform (sample only calls ``uniform()``)."""

    def __init__(self, value: float):
        self.value = value

    def uniform(self) -> float:
        return self.value


def _peaked_logits():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(1, V, generator=gen)
    logits[0, :5] += 12  # five tokens hold most of the mass, so the CDF is near 1.0 over the tail
    return logits


def test_tail_tokens_are_reachable_at_152k_vocab():
    """A uniform in the middle of a token's exact CDF interval picks that token.

    With an fp32 CDF in vocab order, steps below 6e-8 near 1.0 vanished: ~50,800 of these 152,064 tokens
    (3.9e-4 of the mass) could never be drawn. Checked on tail tokens that fp32 lost.
    """
    logits = _peaked_logits()
    # intervals of the fp32 softmax the sampler draws from (fp64 softmax moves the head by ~1e-7, more than
    # a tail token's whole interval); its TV distance to the fp64 softmax is ~1e-7
    p = torch.softmax(logits, dim=-1)[0].double()
    cdf = p.cumsum(0)
    cdf32 = torch.softmax(logits, dim=-1)[0].cumsum(0)
    lost32 = ((torch.diff(cdf32, prepend=cdf32.new_zeros(1)) == 0) & (p > 0)).nonzero()[:, 0]
    assert len(lost32) > 10_000, "the case must be one where an fp32 CDF fails"
    picks = lost32[torch.linspace(0, len(lost32) - 1, 16).long()]
    # the token's interval: [cdf[j] - p[j], cdf[j]); its midpoint, as a fraction of the total
    uniforms = ((cdf[picks] - p[picks] / 2) / cdf[-1]).tolist()
    tokens, logprobs = sample(logits.expand(len(picks), V), SamplingParams(temperature=1.0),
                              [FixedUniform(u) for u in uniforms])
    assert tokens.tolist() == picks.tolist()
    exact = torch.log_softmax(logits.double(), dim=-1)[0, picks]
    torch.testing.assert_close(logprobs.double(), exact, atol=1e-4, rtol=0)


def test_token_frequencies_follow_softmax():
    """Seeded draws over a small vocab land on each token in proportion to its probability (a chi-square bound)."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -3.0, 0.5]])
    p = torch.softmax(logits.double() / 0.7, dim=-1)[0]
    n = 4000
    randoms = [SequenceRandom(seed) for seed in range(n)]
    tokens, _ = sample(logits.expand(n, -1), SamplingParams(temperature=0.7), randoms)
    counts = torch.bincount(tokens, minlength=6).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 20.5, f"chi-square {chi2:.1f} with 5 degrees of freedom (p = 0.001 at 20.5)"
    again, _ = sample(logits.expand(n, -1), SamplingParams(temperature=0.7), [SequenceRandom(s) for s in range(n)])
    assert torch.equal(tokens, again)  # a pure function of the seeds


def test_greedy_is_argmax_even_where_a_tail_token_ties_in_fp32():
    logits = _peaked_logits()
    tokens, _ = sample(logits, SamplingParams(temperature=0.0), [FixedUniform(0.999999)])
    assert tokens.tolist() == [int(logits.argmax())]


def test_top_p_drops_the_token_whose_mass_before_equals_top_p():
    """[0.4, 0.2, 0.2, 0.1, 0.1] at top_p 0.6: the smallest set reaching 0.6 is the first two tokens (as HF's
    TopPLogitsWarper keeps); cumsum - p gave 0.59999996 before the third and kept it too."""
    from r1fast.rollout.sampler import _truncate

    logits = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]).log()
    kept = torch.isfinite(_truncate(logits, 0, 0.6))
    assert kept.tolist() == [[True, True, False, False, False]]


def test_top_p_mass_is_exact_at_a_boundary_and_over_a_real_vocabulary():
    """The kept set is the smallest one whose exact mass reaches top_p. An fp32 softmax and cumsum summed
    0.4 + 0.2 + 0.2 to 0.79999995 (the exact softmax of these fp32 logits gives 0.8 + 5e-9) and kept a fourth
    token at top_p 0.8; over 152,064 sorted tokens the fp32 cumsum drifted by 1.3e-5 and dropped ~20 tokens."""
    from r1fast.rollout.sampler import _truncate

    logits = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]).log()
    assert torch.isfinite(_truncate(logits, 0, 0.8)).tolist() == [[True, True, True, False, False]]
    big = 3.0 * torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    for top_p in (0.9, 0.99):
        kept = torch.isfinite(_truncate(big, 0, top_p)).sum(-1)
        exact_sorted = torch.softmax(big.double().sort(dim=-1, descending=True).values, dim=-1)
        before = exact_sorted.cumsum(dim=-1) - exact_sorted  # fp64: rounding 1e-11, far below the margins here
        assert kept.tolist() == (before < top_p).sum(-1).tolist(), top_p


def test_top_p_keeps_the_lower_ids_of_tied_tokens_at_any_vocabulary_size():
    """Equal logits at top_p 0.5 keep the first half of the ids. The unstable sort kept ids 0-1 of V = 4 but
    ids 32-63 of V = 64: which tied tokens survived depended on the vocabulary size (and the device)."""
    from r1fast.rollout.sampler import _truncate

    for vocab in (4, 7, 64, 1024):  # 1/V exact in binary (V = 7: no count sums to 0.5)
        kept = torch.isfinite(_truncate(torch.zeros(2, vocab), 0, 0.5))
        half = (vocab + 1) // 2  # the smallest count whose mass reaches 0.5
        assert kept.tolist() == [[i < half for i in range(vocab)]] * 2, vocab


# ---- truncation and logprob semantics against an fp64 inverse-CDF reference ------------------------

SMALL_LOGITS = torch.tensor([[1.3, -0.4, 2.1, 0.2, -1.7, 0.9, 1.6, -0.8]])  # distinct values, V = 8


def _reference(logits, temperature, top_k, top_p, u):
    """The token inverse-CDF sampling in vocabulary order picks from the truncated softmax (fp64); top-k first,
    then top-p over the renormalized top-k set."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.numel():
        keep &= z >= torch.topk(z, top_k).values[-1]
    if top_p < 1.0:  # sequentially, as HF's warpers and vLLM: top-p over the top-k-renormalized softmax
        zk = z.masked_fill(~keep, float("-inf"))
        order = torch.argsort(zk, descending=True)
        p_sorted = torch.softmax(zk[order], dim=0)
        before = torch.cumsum(p_sorted, 0) - p_sorted
        keep_sorted = before < top_p
        keep_p = torch.zeros_like(keep)
        keep_p[order] = keep_sorted
        keep &= keep_p
    p = torch.where(keep, torch.softmax(z.masked_fill(~keep, float("-inf")), dim=0), torch.zeros_like(z))
    cdf = torch.cumsum(p, 0)
    return int((cdf > u * cdf[-1]).nonzero()[0, 0]), keep


def _draw(temperature, top_k, top_p, uniforms):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    return sample(SMALL_LOGITS.expand(len(uniforms), -1), params, [FixedUniform(u) for u in uniforms])


def test_top_k_keeps_exactly_k_tokens():
    uniforms = [(i + 0.5) / 64 for i in range(64)]
    for top_k in (1, 2, 3, 7):
        tokens, _ = _draw(0.8, top_k, 1.0, uniforms)
        expected = [_reference(SMALL_LOGITS[0], 0.8, top_k, 1.0, u)[0] for u in uniforms]
        assert tokens.tolist() == expected, top_k
        assert set(tokens.tolist()) == set(torch.topk(SMALL_LOGITS[0], top_k).indices.tolist())


def test_top_k_and_top_p_together():
    uniforms = [(i + 0.5) / 64 for i in range(64)]
    tokens, _ = _draw(1.3, 4, 0.8, uniforms)
    expected = [_reference(SMALL_LOGITS[0], 1.3, 4, 0.8, u)[0] for u in uniforms]
    assert tokens.tolist() == expected


def test_logprobs_are_tempered_and_untruncated():
    """The returned logprob is log_softmax(logits / T)[token] (after temperature, before truncation)."""
    uniforms = [0.05, 0.4, 0.93]
    for temperature in (0.5, 1.0, 1.7):
        tokens, logprobs = _draw(temperature, 3, 0.9, uniforms)
        exact = torch.log_softmax(SMALL_LOGITS[0].double() / temperature, dim=0)[tokens]
        torch.testing.assert_close(logprobs.double(), exact, atol=1e-6, rtol=0)


def test_greedy_logprobs_are_of_the_untempered_distribution():
    tokens, logprobs = sample(SMALL_LOGITS, SamplingParams(temperature=0.0), [FixedUniform(0.5)])
    assert tokens.tolist() == [2]
    exact = torch.log_softmax(SMALL_LOGITS[0].double(), dim=0)[2]
    torch.testing.assert_close(logprobs.double(), exact.reshape(1), atol=1e-6, rtol=0)


def test_the_last_kept_token_is_drawn_at_the_top_of_the_cdf_and_never_a_dropped_one():
    """A uniform just below 1 lands on the last token (in vocab order) of the kept set, not on a dropped tail
    token with zero probability."""
    tokens, _ = _draw(1.0, 2, 1.0, [1.0 - 1e-16, 0.999999999])
    assert tokens.tolist() == [6, 6]  # top-2 are ids 2 and 6; 6 is the later one


def test_a_zero_uniform_draws_the_first_kept_token_not_a_dropped_one():
    """u = 0.0 is a legal draw of a uniform in [0, 1): it must pick the first token with nonzero probability,
    not token 0 when token 0 was truncated away (its CDF value is 0 = the target)."""
    tokens, _ = _draw(1.0, 2, 1.0, [0.0])
    assert tokens.tolist() == [2]
    tokens, _ = _draw(1.0, 0, 0.5, [0.0])  # top-p keeps only id 2 here
    assert tokens.tolist() == [2]
