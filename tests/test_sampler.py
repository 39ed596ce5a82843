"""r1fast.rollout.sampler at a real vocabulary size: inverse-CDF sampling must reach every token it should."""

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
