"""Reward options reach the rewards from the config; per-sample reward data fails at load; every part of the
training reward is logged."""

import pytest

from r1fast.config import Config
from r1fast.config_io import DataError
from r1fast.grpo_step import build_rollout_batch
from r1fast.rewards_setup import build_scorer
from r1fast.rollout.engine import Completion


def _config(**weights) -> Config:
    cfg = Config()
    cfg.rewards.weights = weights
    return cfg


def test_repetition_unit_and_cosine_values_come_from_the_config():
    """A loop without spaces ('7+5=12,' x 50) has no repeated WORD n-gram: only unit 'char' can see it, and
    build_scorer bound no repetition parameter at all, so the option existed only for direct callers."""
    loop = "<think>" + "7+5=12," * 50 + "</think><answer>12</answer>"
    cfg = _config(repetition=1.0)
    assert build_scorer(cfg).score([""], [loop], [{}]).total == [0.0]
    cfg.rewards.repetition_unit = "char"
    assert build_scorer(cfg).score([""], [loop], [{}]).total[0] < -0.9
    cfg = _config(length_cosine=1.0)
    cfg.rewards.length_cosine_values = (-2.0, -1.0, 1.0, 3.0)
    wrong, right = {"_correct": False, "completion_tokens": 0}, {"_correct": True, "completion_tokens": 0}
    assert build_scorer(cfg).score(["", ""], ["", ""], [wrong, right]).total == [-2.0, 3.0]


def test_a_sample_language_the_reward_cannot_count_fails_when_the_data_loads():
    samples = [{"id": "a", "prompt": "1+1", "answer": "2"}, {"id": "b", "prompt": "1+2", "answer": "3", "language": "English"}]
    build_scorer(_config(accuracy=1.0)).check_samples(samples)  # no language reward: the column is unused
    with pytest.raises(DataError, match="sample 'b': reward 'language': language: unsupported target 'English'"):
        build_scorer(_config(accuracy=1.0, language=0.1)).check_samples(samples)
    build_scorer(_config(language=0.1)).check_samples([{**samples[1], "language": "zh"}])


class _Bytes:
    chat_template = prompt_template = None

    def encode(self, s):
        return list(s.encode())

    def decode(self, ids):
        return bytes(ids).decode()


def test_the_soft_overlong_penalty_is_logged_with_the_rewards():
    """The DAPO penalty moved reward_mean (1.125) away from the weighted sum of the logged rewards (1.5)."""
    cfg = _config(accuracy=1.0, format=0.5)
    cfg.grpo.samples_per_prompt, cfg.rollout.max_new_tokens = 2, 64
    cfg.grpo.soft_overlong_penalty, cfg.grpo.overlong_cache_len = True, 16
    short = "<think>2+3=5</think><answer>5</answer>"
    long_ = "<think>" + "2+3=5 " * 4 + "ok.</think><answer>5</answer>"  # 60 tokens: 12 into the 16-token ramp
    comps = [[Completion(list(t.encode()), [0.0] * len(t), "stop") for t in (short, long_)]]
    sample = {"task": "addition", "prompt": "2+3", "answer": "5"}
    m = build_rollout_batch(cfg, _Bytes(), build_scorer(cfg), [sample], [[1]], comps, "cpu").metrics
    assert m["reward_overlong_penalty"] == pytest.approx((0.0 + -12 / 16) / 2)
    parts = m["reward_accuracy"] + 0.5 * m["reward_format"] + m["reward_overlong_penalty"]
    assert m["reward_mean"] == pytest.approx(parts) and m["reward_overlong_penalty_std"] == pytest.approx(0.375)


def test_build_scorer_passes_format_partial_credit():
    cfg = Config()
    cfg.rewards.weights = {"format": 1.0}
    half = "<think>t</think> no answer block"
    assert build_scorer(cfg).score([""], [half], [{}]).total == [0.0]
    cfg.rewards.format_partial_credit = True
    assert build_scorer(cfg).score([""], [half], [{}]).total == [0.25]


def test_build_scorer_length_cosine_uses_max_new_tokens():
    cfg = Config()
    cfg.rewards.weights = {"length_cosine": 1.0}
    cfg.rollout.max_new_tokens = 64
    meta = {"_correct": True, "completion_tokens": 64}
    assert build_scorer(cfg).score([""], [""], [meta]).total == [0.5]  # at max_len: the low end


DISTILL = "<think>3 + 4 = 7</think>\n\nThe answer is \\boxed{7}."  # R1-Distill / QwQ: no <answer> block


def test_require_answer_tag_reaches_the_training_reward_and_its_evaluation():
    """r1fast.eval had --require_answer_tag false, training none: a chat or R1-Distill model's every accuracy was 0."""
    meta = {"prompt": "3+4", "answer": "7"}
    cfg = _config(accuracy=1.0)
    assert build_scorer(cfg).score([""], [DISTILL], [meta]).total == [0.0]
    assert build_scorer(cfg).check(meta, DISTILL)[0] is False
    cfg.rewards.require_answer_tag = False
    scorer = build_scorer(cfg)
    assert scorer.score([""], [DISTILL], [meta]).total == [1.0]
    assert scorer.check(meta, DISTILL)[0] is True
    assert scorer.check_batch([meta], [DISTILL]) == [(True, False)]
    cfg = _config(math_accuracy=1.0)
    cfg.rewards.require_answer_tag = False
    assert build_scorer(cfg).score([""], [DISTILL], [meta]).total == [1.0]


def test_require_answer_tag_reaches_the_cosine_length_reward():
    """length_cosine grades correctness itself; it always required the <answer> tag, so with require_answer_tag
    false every right R1-Distill answer was paid as a wrong one (-1.0 at length 0 instead of +1.0)."""
    meta = {"prompt": "3+4", "answer": "7", "completion_tokens": 0}
    cfg = _config(length_cosine=1.0)
    assert build_scorer(cfg).score([""], [DISTILL], [meta]).total == [-1.0]
    cfg.rewards.require_answer_tag = False
    assert build_scorer(cfg).score([""], [DISTILL], [meta]).total == [1.0]


def test_require_answer_tag_reaches_rejection_sampling():
    from r1fast.config_io import load_config
    from r1fast.rejection import RejectionConfig, config_score

    meta = {"prompt": "3+4", "answer": "7"}
    args = ["--checkpoint", "c", "--data", "d", "--out", "o"]
    assert config_score(load_config(None, args, schema=RejectionConfig))([meta], [DISTILL])[0]["accuracy"] == 0.0
    cfg = load_config(None, [*args, "--require_answer_tag", "false"], schema=RejectionConfig)
    assert config_score(cfg)([meta], [DISTILL])[0]["accuracy"] == 1.0


@pytest.mark.parametrize("name", ["accuracy", "math_accuracy", "length_cosine"])
def test_a_sample_without_an_answer_fails_at_load_under_an_answer_reward(name):
    """A code line (tests, no answer) under the default weights {accuracy, format} raised KeyError('answer') on every
    sample of every step (logged, scored 0), so such a run trained on the format reward alone, with no error."""
    code_line = {"id": "c", "prompt": "echo", "tests": [{"input": "1\n", "output": "1"}]}
    with pytest.raises(DataError, match=f"sample 'c': reward '{name}': .*'answer'"):
        build_scorer(_config(**{name: 1.0})).check_samples([{"id": "m", "prompt": "1+1", "answer": "2"}, code_line])
    build_scorer(_config(code=1.0)).check_samples([code_line])


def test_a_sample_task_accuracy_cannot_grade_fails_at_load():
    """task_accuracy (exact match only) on a math line raised "task 'math' is not a generated task" on every sample
    of every step, scored 0, instead of failing when the data loaded."""
    math_line = {"id": "m", "prompt": "1+1", "answer": "2", "task": "math"}
    with pytest.raises(DataError, match="sample 'm': reward 'task_accuracy': .*not a generated task"):
        build_scorer(_config(task_accuracy=1.0)).check_samples([math_line])
    build_scorer(_config(task_accuracy=1.0)).check_samples([{**math_line, "task": "addition"}])
