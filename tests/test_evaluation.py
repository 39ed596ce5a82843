"""r1fast.evaluation.evaluate with distinguishable completions: greedy vs sampled calls, which grade belongs to
which completion, the pass@1 denominator, skipped prompts, the greedy length and the per-prompt seeds."""

from types import SimpleNamespace

import pytest

import r1fast.distributed as D
from r1fast.evaluation import evaluate

GREEDY, SAMPLE = 900, 500

# per prompt: (greedy correct, greedy formatted), [sample j correct] (k = 3)
TRUTH = {
    0: ((True, True), [True, False, False]),
    1: ((False, True), [True, True, False]),
    2: ((True, False), [False, None, True]),  # a sample's gold is ungradable: the prompt is skipped
    3: ((None, True), [True, True, True]),  # the greedy's gold is ungradable: skipped
    4: ((False, False), [True, True, False]),
}


class FakeTokenizer:
    eos_id = 7

    def decode(self, ids):
        return " ".join(map(str, ids))


class FakeEngine:
    """Greedy (temperature 0) completion of prompt p: [p, GREEDY] + [1] * p; sample j: [p, SAMPLE + j]."""

    args = SimpleNamespace(eos_token_id=None, generation_config=None, vocab_size=1000)

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                 stop_token_ids=()):
        self.calls.append(dict(prompts=prompts, n=n, temperature=temperature, top_p=top_p, seed=seed,
                               stop=list(stop_token_ids), max_new_tokens=max_new_tokens))
        out = []
        for p in prompts:
            i = p[0]
            if temperature == 0:
                out.append([SimpleNamespace(token_ids=[i, GREEDY] + [1] * i) for _ in range(n)])
            else:
                out.append([SimpleNamespace(token_ids=[i, SAMPLE + j]) for j in range(n)])
        return out


def score(samples, texts):
    grades = []
    for s, text in zip(samples, texts, strict=True):
        ids = [int(x) for x in text.split()]
        assert ids[0] == s["i"]  # each completion is graded against its own prompt's sample
        (ok, fmt), sampled = TRUTH[ids[0]]
        grades.append((ok, fmt) if ids[1] == GREEDY else (sampled[ids[1] - SAMPLE], True))
    return grades


def _run(indices_all=range(5), k=3, seed=5):
    samples = [{"i": i} for i in indices_all]
    engine = FakeEngine()
    out = evaluate(engine, FakeTokenizer(), samples, [[i] for i in indices_all], score, max_new_tokens=12, k=k,
                   temperature=0.6, top_p=0.95, seed=seed)
    return out, engine


def test_counts_follow_each_completions_grade():
    out, engine = _run()
    graded = [0, 1, 4]
    assert out["num_prompts"] == 3 and out["skipped_prompts"] == 2
    assert out["greedy_accuracy"] == pytest.approx(1 / 3)
    assert out["greedy_format_rate"] == pytest.approx(2 / 3)
    assert out["pass@1_k3"] == pytest.approx((1 + 2 + 2) / (3 * 3))  # correct samples / (prompts * k)
    assert out["greedy_length_mean"] == pytest.approx(sum(i + 2 for i in graded) / 3)


def test_greedy_call_then_k_seeded_samples_per_prompt():
    _, engine = _run()
    greedy, sampled = engine.calls
    assert greedy["temperature"] == 0.0 and greedy["n"] == 1 and greedy["stop"] == [7]
    assert sampled["temperature"] == 0.6 and sampled["top_p"] == 0.95 and sampled["n"] == 3 and sampled["stop"] == [7]
    assert greedy["max_new_tokens"] == sampled["max_new_tokens"] == 12
    # completion j of prompt i: seed * 1_000_003 + i * k + j
    assert sampled["seed"] == [5 * 1_000_003 + i * 3 + j for i in range(5) for j in range(3)]


def test_a_ranks_shard_uses_the_global_prompt_index_for_seeds(monkeypatch):
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "all_reduce_sum", lambda t: t)
    out, engine = _run()
    greedy, sampled = engine.calls
    assert greedy["prompts"] == [[1], [3]]
    assert sampled["seed"] == [5 * 1_000_003 + i * 3 + j for i in (1, 3) for j in range(3)]
    assert out["num_prompts"] == 1 and out["skipped_prompts"] == 1  # prompt 1 graded, prompt 3 skipped
    assert out["pass@1_k3"] == pytest.approx(2 / 3) and out["greedy_accuracy"] == 0.0


def test_no_graded_prompt_gives_zero_rates():
    out, _ = _run(indices_all=[2, 3])
    assert out["num_prompts"] == 0 and out["skipped_prompts"] == 2
    assert out["greedy_accuracy"] == out["greedy_format_rate"] == out["pass@1_k3"] == out["greedy_length_mean"] == 0.0
