"""Token sampling: temperature, top-k, top-p, per-sequence seeds, logprobs.

Reproducibility: every sequence owns a CPU ``torch.Generator`` seeded from its request seed. It draws one
uniform number per generated token (in chunks, so the generator is touched once per 256 tokens), and the
token is picked by inverse-CDF sampling with that number (CDF and target in fp64, so every token of a
152k vocabulary keeps its share). A sequence's t-th token therefore depends only
on its own seed and its own logits, never on which other sequences share the batch, on preemption
(recomputation draws nothing) or on the order of requests. The whole batch is sampled with one cumsum
and one searchsorted instead of one kernel launch per sequence.

Logprobs: the returned logprob of a token is that of the distribution actually sampled from *after the
temperature and before top-p/top-k truncation*: ``log_softmax(logits / temperature)[token]`` in fp32.
That is the behaviour policy GRPO's importance ratio needs when no truncation is used, and it does not
depend on the truncation thresholds. ``temperature == 0`` means greedy decoding; its logprobs are those
of the untempered distribution, ``log_softmax(logits)[token]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DRAW_CHUNK = 256
MIN_TEMPERATURE = 1e-5
"""Smallest sampling temperature: fp32 logits up to 3.4e38 * 1e-5 = 3.4e33 survive the division, far above
any real logit, while 1e-45 turns every logit into +-inf (NaN probabilities). Below it, use 0 (greedy):
mapping it to greedy silently would change what the returned logprobs mean."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one ``generate`` call (shared by all its sequences)."""

    temperature: float = 1.0
    """0 = greedy (ties go to the lowest id); > 0 divides the logits (``Engine.generate`` rejects
    0 < temperature < MIN_TEMPERATURE)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass reaches top_p (1 = off): the token whose mass
    crosses top_p is kept, as in HF and vLLM. Applied after top_k, to the renormalised top-k set; among
    tokens of equal probability the lower ids are kept first."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off); tokens tied with the k-th are kept too (as HF and vLLM)."""
    max_new_tokens: int = 16
    """Generated tokens per completion at most."""
    stop_token_ids: tuple[int, ...] = ()
    """A sampled token in this set ends the completion (the stop token is kept in the output)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceRandom:
    """A sequence's private random stream: one uniform in [0, 1) per generated token."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        # a Python list of the same fp64 draws (``tolist`` is exact): indexing a tensor cost 2.85 us per
        # sequence and step (0.73 ms a step at B = 256), a list item ~0.1 us
        self._draws: list[float] = []
        self._next = 0

    def uniform(self) -> float:
        if self._next == len(self._draws):
            self._draws = torch.rand(_DRAW_CHUNK, generator=self.generator, dtype=torch.float64).tolist()
            self._next = 0
        value = self._draws[self._next]
        self._next += 1
        return value


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p sets to -inf (logits already divided by the temperature)."""
    vocab = logits.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # stable: among tokens of equal probability the lower ids are kept first. The default sort broke
        # such ties by its algorithm: equal logits at top_p 0.5 kept ids 0-1 of V = 4 but 50-99 of V = 100
        # (bf16 logits tie often, so which tied tokens survive depended on V and the device)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        # the mass in fp64, as the CDF below: an fp32 cumsum drifted by 1.3e-5 over 152,064 sorted tokens
        # (top_p 0.99 kept 38,102 tokens where the rule keeps 38,119), and its fp32 softmax summed
        # 0.4 + 0.2 + 0.2 to 0.79999995 < 0.8, keeping a fourth token of [0.4, 0.2, 0.2, 0.1, 0.1]
        # one fp64 [B, V] buffer, filled in place (softmax(dtype=float64) holds a converted copy too);
        # the first sorted logit is the row maximum
        mass = sorted_logits.double().sub_(sorted_logits[:, :1]).exp_().cumsum_(dim=-1)
        mass = mass.div_(mass[:, -1:].clone())
        # a token is kept while the mass strictly before it is below top_p, so the most likely token is
        # always kept. The inclusive sum shifted by one, not cumsum - p: that subtraction turned
        # 0.4 + 0.2 into 0.59999996 < 0.6 and kept a third token of [0.4, 0.2, 0.2, 0.1, 0.1]
        drop_sorted = torch.zeros_like(order, dtype=torch.bool)
        drop_sorted[:, 1:] = mass[:, :-1] >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _checked(tokens: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor, params: SamplingParams,
             names) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64, logprobs fp32) on the CPU in one device->host copy; RuntimeError naming the sequences
    whose (tempered) ``logits`` are not finite.

    A row is unusable when its largest logit is NaN (NaN anywhere propagates through amax), +inf (softmax
    gives NaN) or -inf (no token has probability): sampling it would silently return the last vocabulary
    id with a NaN logprob. Such rows carry token -1 through the device-to-host copy the caller needs
    anyway, so the check adds no host sync. Tokens and logprobs travel packed as fp64 (exact for both: ids
    below 2^53, fp32 values), one copy where there were two.
    """
    bad = ~torch.isfinite(logits.amax(dim=-1))
    tokens = torch.where(bad, torch.full_like(tokens, -1), tokens)
    packed = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]).cpu()
    tokens, logprobs = packed[0].to(torch.int64), packed[1].to(torch.float32)
    rows = (tokens < 0).nonzero()[:, 0].tolist()
    if rows:
        who = [names[r] if names is not None else f"row {r}" for r in rows]
        raise RuntimeError(
            f"logits of sequences {who} are not finite (NaN, +inf, or -inf for every token) at "
            f"temperature={params.temperature}; the model's weights or activations have diverged"
        )
    return tokens, logprobs


def sample(logits: torch.Tensor, params: SamplingParams, randoms: list[SequenceRandom],
           names: list[str] | None = None, *, uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits`` [B, V]; returns (tokens int64 [B], logprobs fp32 [B]) on CPU.

    ``randoms[i]`` is row i's stream (unused for greedy decoding); ``names[i]`` names row i's sequence in
    errors. ``uniforms``: row i's draw ``randoms[i].uniform()`` already taken (fp64 [B] on the logits'
    device; the engine sends it with the step's other inputs), in which case ``randoms`` is not touched.
    Raises RuntimeError when a row's logits (divided by the temperature) are not finite.
    """
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
        return _checked(tokens, logprobs, logits, params, names)
    scaled = logits / params.temperature
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    truncated = _truncate(scaled, params.top_k, params.top_p)
    probs = torch.softmax(truncated, dim=-1)
    # The CDF and the target are fp64: in fp32 the CDF steps by 6e-8 near 1.0, so at V = 152,064 about
    # 50,800 tail tokens (3.9e-4 of the mass) added nothing to it and could never be drawn (TV distance
    # ~1e-3 per token from the softmax whose logprobs we return). fp64 steps by 1.1e-16 there: what it
    # still loses is at most V * 1.1e-16 = 2e-11 of the mass.
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    if uniforms is None:
        uniforms = torch.tensor([r.uniform() for r in randoms], dtype=torch.float64).to(logits.device)
    # scale by the row total so rounding in the cumsum cannot push the target past the last token;
    # right=True returns the first index whose cdf exceeds the target, which has nonzero probability
    target = uniforms[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    # rounding of the target can land past the last kept token; clamp to it, never to a token outside
    # the kept set
    vocab = logits.shape[-1]
    last_kept = vocab - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    tokens = torch.minimum(tokens, last_kept)
    logprobs = logprobs_all.gather(-1, tokens[:, None])[:, 0]
    return _checked(tokens, logprobs, scaled, params, names)
