"""``build_rollout_batch``: rewards -> advantages, keep mask and step metrics, on hand-made completions."""

import pytest
import torch

from r1fast.config import load_config
from r1fast.grpo_step import build_rollout_batch
from r1fast.rewards_setup import build_scorer
from r1fast.rollout.engine import Completion


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _completion(text):
    return Completion([ord(ch) for ch in text], [0.0] * len(text), "stop")


def _batch(samples, answers, *extra):
    cfg = load_config(None, ["--rewards.weights", "{math_accuracy = 1.0}", "--grpo.samples_per_prompt", "2",
                             "--grpo.prompts_per_step", str(len(samples)), "--grpo.beta", "0.0", *extra])
    comps = [[_completion(f"<think>x</think><answer>{a}</answer>") for a in pair] for pair in answers]
    return build_rollout_batch(cfg, _CharTokenizer(), build_scorer(cfg), samples, [[1]] * len(samples), comps, "cpu")


def test_a_skipped_prompt_moves_no_other_advantage_and_no_reward_statistic():
    """math-verify cannot parse prompt b's gold answer: its samples are skipped (stand-in reward 0). Under batch
    scaling they moved prompt a's advantages from +-0.707 to +-0.9998 and halved reward_mean (0.5 -> 0.25)."""
    a = {"prompt": "1+2", "answer": "3", "id": "a"}
    b = {"prompt": "?", "answer": "\\frac{", "id": "b"}
    alone = _batch([a], [("3", "4")], "--grpo.scale_rewards", "batch")
    both = _batch([a, b], [("3", "4"), ("1", "2")], "--grpo.scale_rewards", "batch")
    assert both.keep == [True, True, False, False] and both.metrics["reward_skipped"] == 2
    assert torch.equal(both.advantages[:2], alone.advantages) and torch.equal(both.advantages[2:], torch.zeros(2))
    assert both.metrics["reward_mean"] == alone.metrics["reward_mean"] == 0.5
    assert both.metrics["reward_std"] == alone.metrics["reward_std"] == 0.5


def test_accuracy_metric_reads_the_math_accuracy_reward():
    """GSM8K / MATH runs score with math_accuracy: metrics.jsonl's accuracy (and the plot's panel) was NaN."""
    batch = _batch([{"prompt": "1+2", "answer": "3", "id": "a"}], [("3", "4")])
    assert batch.metrics["reward_math_accuracy"] == batch.metrics["accuracy"] == 0.5


def test_reward_setup_errors_name_the_config_key():
    """`--rewards.weights {}` passed the config and died in combine() with a traceback naming its argument."""
    from r1fast.config import ConfigError

    with pytest.raises(ConfigError, match=r"^rewards\.weights: expected a non-empty dict"):
        build_scorer(load_config(None, ["--rewards.weights", "{}"]))
