"""Regression tests for what the rewards and verifiers mean: currency answers, words vs numbers,
generated samples their own verifier accepts, strict integers and equations, ungradable golds, limits."""

import time

import pytest

from r1fast.data import generate_tasks, load_jsonl, verify_answer, worked_solution
from r1fast.rewards.accuracy import STATS, MathVerifier, math_accuracy_batch, task_accuracy_reward
from r1fast.rewards.language import count_words_by_language, language_consistency_reward


def _answer(text: str) -> str:
    return f"<think>t</think><answer>{text}</answer>"


def test_escaped_dollar_is_currency_not_a_math_delimiter():
    cases = [("\\$18.90", "18.90", 1.0), ("5", "\\$5", 1.0), ("\\$1,000", "1000", 1.0), ("5", "$5$", 1.0),
             ("\\$18.90", "18.80", 0.0)]
    scores = math_accuracy_batch([""] * len(cases), [_answer(p) for _, p, _ in cases], [{"answer": g} for g, _, _ in cases])
    assert scores == [c[2] for c in cases]


def test_digit_group_separators_join_the_number():
    """math-verify reads "1\\,000" as 1 * 000 = 0 and "12\\,345" as 12 + 345: gold 1\\,000 accepted "0"."""
    cases = [("1\\,000", "1000", 1.0), ("1\\,000", "0", 0.0), ("12\\,345", "12345", 1.0), ("12\\,345", "357", 0.0),
             ("1000", "\\boxed{1\\,000}", 1.0), ("1 000", "1000", 1.0), ("1\\ 000", "1000", 1.0),
             ("1{,}000", "1~000", 1.0), ("0.123\\,456", "0.123456", 1.0)]
    scores = math_accuracy_batch([""] * len(cases), [_answer(p) for _, p, _ in cases], [{"answer": g} for g, _, _ in cases])
    assert scores == [c[2] for c in cases]


@pytest.mark.parametrize("think", ["x² + y² = z²", "so 3² = 9", "half is ½", "x₁ plus x₂", "step ① done",
                                   "ＡＢＣ is the name", "let 𝑥 be ５"])
def test_numbers_of_any_kind_are_not_words(think):
    assert language_consistency_reward("", f"<think>{think}</think><answer>1</answer>", {}) == 1.0


def test_word_counts_split_letters_from_digits():
    assert count_words_by_language("x² + y² = z²") == {"en": 3, "zh": 0, "other": 0}
    assert count_words_by_language("x₁ и x₂") == {"en": 2, "zh": 0, "other": 1}
    assert count_words_by_language("cafe\u0301s 好① ok") == {"en": 2, "zh": 1, "other": 0}


def test_generated_samples_pass_their_own_verifier():
    long_sums = generate_tasks("addition", 10, seed=0, min_digits=64, max_digits=70)
    assert max(len(s["answer"]) for s in long_sums) > 64
    assert all(task_accuracy_reward("", worked_solution(s), s) == 1.0 for s in long_sums)
    big = generate_tasks("countdown", 30, seed=0, num_count=4, max_number=100_000, max_target=10**9)
    assert all(verify_answer(s, s["answer"]) for s in big)
    assert all(task_accuracy_reward("", worked_solution(s), s) == 1.0 for s in big)
    with pytest.raises(ValueError, match="max_number"):
        generate_tasks("countdown", 1, max_number=10**10, max_target=10**9)


def test_countdown_equation_must_be_true_and_decimal():
    s = {"task": "countdown", "answer": "(3+5)*2", "numbers": [3, 5, 2], "target": 16, "prompt": "make 16 with 3 5 2"}
    assert verify_answer(s, "(3+5)*2") and verify_answer(s, "(3+5)*2 = 16") and verify_answer(s, " (3+5)*2=16 ")
    for wrong in ("(3+5)*2 = 99", "(3+5)*2 = 16 = 7", "(3+5)*2=banana", "(3+5)*2 =", "(0x3+5)*2", "(3+5)*0b10",
                  "(3+5)*2 = 1_6", "(3+5)*2 = ١٦", "(3+5)*2 = " + "9" * 5000):
        assert not verify_answer(s, wrong), wrong


def test_integer_match_is_exact():
    s = {"task": "addition", "answer": "1047", "prompt": "1000+47"}
    for right in ("1047", " 1047 ", "+1047", "1,047", "01047"):
        assert verify_answer(s, right), right
    for wrong in ("10,47", "1047,", "1,,047", ",1047", "١٠٤٧", "１０４７", "1 047", "1047.0"):
        assert not verify_answer(s, wrong), wrong
    assert verify_answer({"task": "addition", "answer": "0", "prompt": "0+0"}, "-0")


def test_gold_that_cannot_be_compared_is_skipped_once():
    verifier = MathVerifier(num_workers=2, timeout_s=30.0)
    try:
        assert verifier.check(["1", "2"], ["1", "3"]) == [True, False]  # warm: startup is not under test
        verifier.timeout_s = 1.0
        before = dict(STATS)
        start = time.monotonic()
        # sympy expands this gold against any other answer: no sample can be graded, none should pay twice
        assert verifier.check(["(x+1)^{100000}"] * 4, ["1", "2", "3", "4"]) == [None] * 4
        assert time.monotonic() - start < 1.9
        assert STATS["gold_timeout"] == before.get("gold_timeout", 0) + 1
        assert STATS["worker_restarts"] == before.get("worker_restarts", 0) + 1
        assert STATS["gold_unparsable"] == before.get("gold_unparsable", 0) + 4
        start = time.monotonic()
        assert verifier.check(["(x+1)^{100000}", "7"], ["1", "7"]) == [None, True]  # remembered, not re-sent
        assert time.monotonic() - start < 0.9
    finally:
        verifier.close()


def test_jsonl_limit_stops_before_reading_past_it(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt":"a","answer":1}\n{"prompt":"b","answer":2}\nNOT JSON\n')
    assert [s["prompt"] for s in load_jsonl(path, limit=2)] == ["a", "b"]
    assert load_jsonl(path, limit=0) == []
    with pytest.raises(ValueError, match=r"d\.jsonl:3"):
        load_jsonl(path, limit=3)
