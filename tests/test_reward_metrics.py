"""The logged reward statistics of ``build_rollout_batch`` count every sample whose reward exists.

Filters that drop samples from the loss (dynamic sampling, the overlong filter) must not drop them from
reward_mean / reward_std: those were computed over the kept samples only while reward_<name> and accuracy
counted every valid one, so with dynamic sampling on reward_mean leaned toward the mixed groups (all-correct
groups are the ones it drops). Only skipped samples (no reward) enter no statistic.
"""

import math

import pytest

from r1fast.config import load_config
from r1fast.grpo_step import build_rollout_batch
from r1fast.rewards import RewardBatch
from r1fast.rollout.engine import Completion

SKIPPED = [False, False, True, False] + [False] * 4
TOTAL = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # group 0: all correct (one skipped); group 1: mixed


class _Tokenizer:
    def decode(self, ids):
        return "x" * len(ids)


class _ScriptedScorer:
    def score(self, prompts, texts, metas):
        accuracy = [math.nan if s else t for t, s in zip(TOTAL, SKIPPED, strict=True)]
        return RewardBatch(total=list(TOTAL), skipped=list(SKIPPED), errors={}, per_reward={"accuracy": accuracy})


@pytest.mark.parametrize("filters", [["--grpo.dynamic_sampling", "true"],
                                     ["--grpo.dynamic_sampling", "true", "--grpo.overlong_filter", "true"]])
def test_reward_mean_counts_the_samples_the_loss_filters_drop(filters):
    cfg = load_config(None, ["--grpo.samples_per_prompt", "4", "--grpo.prompts_per_step", "2",
                             "--grpo.loss_type", "dapo", *filters])
    # group 1's last sample hit max_new_tokens: the overlong filter drops it from the loss
    comps = [[Completion([1] * 5, [-0.1] * 5, "length" if (i, j) == (1, 3) else "stop") for j in range(4)]
             for i in range(2)]
    batch = build_rollout_batch(cfg, _Tokenizer(), _ScriptedScorer(), [{"prompt": "p"}] * 2, [[1, 2]] * 2, comps,
                                "cpu")
    overlong = "--grpo.overlong_filter" in filters
    assert batch.keep == [False] * 4 + [True, True, True, not overlong]  # the filters did drop samples
    valid = [t for t, s in zip(TOTAL, SKIPPED, strict=True) if not s]  # 7 rewards, 5 of them 1
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum(v * v for v in valid) / len(valid) - mean * mean)
    m = batch.metrics
    assert m["reward_mean"] == pytest.approx(mean) and m["reward_std"] == pytest.approx(std)
    assert m["reward_mean"] == pytest.approx(m["reward_accuracy"]) and m["accuracy"] == m["reward_accuracy"]
    assert m["reward_std"] == pytest.approx(m["reward_accuracy_std"])


def test_skipped_and_error_counts_are_global_like_the_means(monkeypatch):
    """Under torchrun, reward_skipped / reward_errors were rank 0's own counts (0 logged while rank 1 skipped 4)
    although every other rollout metric is global. Two identical ranks, simulated: the sums double, means stay."""
    from r1fast import distributed as D

    class _ErroringScorer(_ScriptedScorer):
        def score(self, prompts, texts, metas):
            return RewardBatch(**{**vars(super().score(prompts, texts, metas)), "errors": {"accuracy": 1},
                                  "verify_failures": 3})

    cfg = load_config(None, ["--grpo.samples_per_prompt", "4", "--grpo.prompts_per_step", "2"])
    comps = [[Completion([1] * 5, [-0.1] * 5, "stop") for _ in range(4)] for _ in range(2)]
    args = (cfg, _Tokenizer(), _ErroringScorer(), [{"prompt": "p"}] * 2, [[1, 2]] * 2, comps, "cpu")
    alone = build_rollout_batch(*args).metrics
    monkeypatch.setattr(D, "all_reduce_sum", lambda t: t.mul_(2))
    two = build_rollout_batch(*args).metrics
    assert (alone["reward_skipped"], alone["reward_errors"], alone["reward_verify_failures"]) == (1, 1, 3)
    assert (two["reward_skipped"], two["reward_errors"], two["reward_verify_failures"]) == (2, 2, 6)
    assert two["reward_mean"] == pytest.approx(alone["reward_mean"])


def test_a_skipped_sample_enters_no_reward_statistic():
    """A sample skipped by one reward (unparsable gold) still has its other rewards' raw scores in the batch
    (format 0 here); they were logged, so reward_format counted 8 samples while reward_mean counted 7, and
    reward_mean was no longer the weighted sum of the logged reward_<name> means."""
    fmt = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the skipped sample (index 2) is the only unformatted one

    class _TwoRewards(_ScriptedScorer):
        def score(self, prompts, texts, metas):
            batch = super().score(prompts, texts, metas)
            total = [0.0 if s else t + 0.5 * f for t, f, s in zip(TOTAL, fmt, SKIPPED, strict=True)]
            return RewardBatch(total=total, skipped=batch.skipped, errors={},
                               per_reward={**batch.per_reward, "format": list(fmt)})

    cfg = load_config(None, ["--grpo.samples_per_prompt", "4", "--grpo.prompts_per_step", "2"])
    comps = [[Completion([1] * 5, [-0.1] * 5, "stop") for _ in range(4)] for _ in range(2)]
    m = build_rollout_batch(cfg, _Tokenizer(), _TwoRewards(), [{"prompt": "p"}] * 2, [[1, 2]] * 2, comps,
                            "cpu").metrics
    assert m["reward_format"] == 1.0 and m["format_rate"] == 1.0 and m["reward_format_std"] == 0.0
    assert m["reward_mean"] == pytest.approx(m["reward_accuracy"] + 0.5 * m["reward_format"])
