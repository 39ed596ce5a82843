"""DAPO's dynamic sampling: which groups it drops (skipped samples included) and which configs refuse it."""

import math
import os

import pytest
import torch

from r1fast.config import ConfigError, load_config
from r1fast.grpo import dynamic_sampling_mask, equal_reward_groups, group_advantages
from r1fast.grpo_step import build_rollout_batch
from r1fast.rewards import RewardBatch
from r1fast.rollout.engine import Completion

# One group per row, G = 4; False in VALID marks a skipped sample, scored the stand-in 0.
REWARDS = torch.tensor([[1.0, 1.0, 0.0, 1.0],   # valid rewards all 1: no signal, the stand-in 0 must not count
                        [0.0, 1.0, 0.0, 1.0],   # signal, one skipped: kept
                        [1.0, 0.0, 0.0, 0.0],   # a single valid sample: no baseline
                        [0.0, 0.0, 0.0, 0.0],   # every sample skipped
                        [0.5, 0.5, 0.5, 0.5],   # all valid and equal
                        [0.0, 1.0, 1.0, 1.0]])  # all valid, differing
VALID = torch.tensor([[True, True, False, True], [True, True, False, True], [True, False, False, False],
                      [False] * 4, [True] * 4, [True] * 4])


def test_a_group_whose_valid_rewards_are_equal_is_dropped():
    """Rewards 1, 1, (skipped), 1 were kept: advantages all 0, yet their tokens entered the dapo normalizer."""
    assert equal_reward_groups(REWARDS, 4, valid=VALID).tolist() == [True, False, True, True, True, False]
    keep = dynamic_sampling_mask(REWARDS, 4, valid=VALID)
    assert keep.shape == REWARDS.shape and keep.dtype == torch.bool
    assert keep[:, 0].tolist() == [False, True, False, False, False, True] and (keep == keep[:, :1]).all()
    # every dropped group has all-zero advantages, every kept one has a nonzero one
    advantages = group_advantages(REWARDS, 4, valid=VALID)
    assert ((advantages != 0).any(dim=1) == keep[:, 0]).all()
    flat = dynamic_sampling_mask(REWARDS.flatten(), 4, valid=VALID.flatten())
    assert torch.equal(flat, keep.flatten())


def test_without_valid_every_sample_is_compared():
    assert equal_reward_groups(REWARDS, 4).tolist() == [False, False, False, True, True, False]
    assert torch.equal(equal_reward_groups(REWARDS, 4), equal_reward_groups(REWARDS, 4, valid=torch.ones_like(VALID)))
    with pytest.raises(ValueError, match="valid"):
        dynamic_sampling_mask(REWARDS, 4, valid=VALID.float())
    with pytest.raises(ValueError, match="valid"):
        equal_reward_groups(REWARDS, 4, valid=VALID[:2])


class _Tokenizer:
    def decode(self, ids):
        return "x" * len(ids)


class _ScriptedScorer:
    """Group 0: rewards 1, 1, (skipped), 1 over 20-token completions; group 1: 0, 1, 0, 1 over 5-token ones."""

    def score(self, prompts, texts, metas):
        skipped = [False, False, True, False] + [False] * 4
        total = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        return RewardBatch(total=total, skipped=skipped, errors={},
                           per_reward={"accuracy": [math.nan if s else t for t, s in zip(total, skipped, strict=True)]})


def test_build_rollout_batch_drops_the_group_with_a_skipped_sample():
    """Under dapo the kept group-0 rows made the normalizer count 80 tokens instead of 20 (gradient x0.25)."""
    cfg = load_config(None, ["--grpo.samples_per_prompt", "4", "--grpo.prompts_per_step", "2",
                             "--grpo.dynamic_sampling", "true", "--grpo.loss_type", "dapo"])
    comps = [[Completion([1] * n, [-0.1] * n, "stop") for _ in range(4)] for n in (20, 5)]
    batch = build_rollout_batch(cfg, _Tokenizer(), _ScriptedScorer(), [{"prompt": "p"}] * 2, [[1, 2]] * 2, comps,
                                "cpu")
    assert batch.keep == [False] * 4 + [True] * 4
    assert sum(len(c) for c, k in zip(batch.completions, batch.keep, strict=True) if k) == 20
    assert batch.metrics["kept_fraction"] == 0.5


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_dynamic_sampling_that_cannot_change_the_gradient_is_refused(loss_type):
    """grpo/dr_grpo count dropped rows in their per-sequence mean (zero advantage): with beta 0 a probe's gradient
    was bit-identical with and without the filter."""
    args = ["--grpo.dynamic_sampling", "true", "--grpo.loss_type", loss_type, "--grpo.beta", "0.0"]
    with pytest.raises(ConfigError, match=rf"grpo\.dynamic_sampling.*grpo\.loss_type={loss_type}.*grpo\.beta=0.*dapo"):
        load_config(None, args)
    load_config(None, args[:-1] + ["0.001"])  # the KL term skips dropped groups: it does something
    load_config(None, ["--grpo.dynamic_sampling", "false", *args[2:]])  # off: nothing to refuse


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_dynamic_sampling_with_a_token_normalizer_is_allowed(loss_type):
    cfg = load_config(None, ["--grpo.dynamic_sampling", "true", "--grpo.loss_type", loss_type, "--grpo.beta", "0.0"])
    assert cfg.grpo.dynamic_sampling and cfg.grpo.beta == 0.0
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny_r1_zero.toml")
    load_config(recipe, ["--grpo.dynamic_sampling", "true"])  # the shipped recipe: dapo, beta 0
