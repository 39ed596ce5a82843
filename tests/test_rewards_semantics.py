"""Regression tests for what the rewards and verifiers mean: currency answers, words vs numbers,
generated samples their own verifier accepts, strict integers and equations, ungradable golds, limits."""

import math
import time

import pytest

from r1fast.data import generate_tasks, load_jsonl, verify_answer, worked_solution
from r1fast.rewards import combine
from r1fast.rewards.accuracy import STATS, MathVerifier, math_accuracy_batch, math_accuracy_reward, task_accuracy_reward
from r1fast.rewards.format import extract_think
from r1fast.rewards.grading import grade
from r1fast.rewards.language import count_words_by_language, language_consistency_reward
from r1fast.rewards.length import cosine_length_reward, repetition_penalty


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


def test_scientific_notation_check_is_linear_in_the_answer_length():
    """"\\d+\\.?\\d*" split a run of digits two ways at every position: a 20k-digit answer spent 4.7 s in this one
    regex inside the worker (100k digits: minutes, so the sample always hit the timeout and a gold was blacklisted)."""
    from r1fast.rewards.math_verify_pool import _expand_scientific

    start = time.perf_counter()
    for text in ("1" * 20_000, "1" * 20_000 + "e", " " * 20_000 + "1"):
        assert _expand_scientific(text) == text  # not E-notation: left as written
    assert time.perf_counter() - start < 0.5
    assert [_expand_scientific(t) for t in ("1e-05", " 1.5E3 ", ".5e1", "5.e2", "-2e0")] == ["0.00001", "1500", "5",
                                                                                          "500", "-2"]


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


# ---- options and skips (each test kills a mutant the suite missed) ----------------------------------

UNPARSABLE = "no number here at all"  # a gold answer math-verify finds nothing in


def test_extract_think_keeps_layout_without_strip():
    text = "<think>\n    def f():\n        pass\n</think><answer>x</answer>"
    assert extract_think(text, strip=False) == "\n    def f():\n        pass\n"
    assert extract_think(text) == "def f():\n        pass"


def test_math_accuracy_requires_the_answer_tag_unless_told_otherwise():
    meta = {"answer": "5"}
    assert math_accuracy_reward("", "The answer is 5", meta) == 0.0
    assert math_accuracy_reward("", "The answer is 5", meta, require_answer_tag=False) == 1.0
    assert math_accuracy_reward("", "<think>t</think><answer>5</answer>", meta) == 1.0


def test_unparsable_gold_is_skipped_even_without_an_answer():
    """The gold is parsed even when the completion has no answer block: such a sample is skipped (None),
    never a plain 0 that would count as a wrong answer."""
    scores = math_accuracy_batch(["", ""], ["no tags here", "<think>t</think><answer>4</answer>"],
                                 [{"answer": UNPARSABLE}, {"answer": "4"}])
    assert scores == [None, 1.0]


def test_a_skip_from_one_reward_is_not_cleared_by_another():
    reward = combine({"accuracy": 1.0, "format": 0.5})
    batch = reward.score([""], ["<think>t</think><answer>1</answer>"], [{"answer": UNPARSABLE, "task": "math"}])
    assert batch.skipped == [True] and batch.total == [0.0]
    assert batch.per_reward["format"] == [1.0] and math.isnan(batch.per_reward["accuracy"][0])


def test_skip_sample_raised_by_a_single_call_reward_is_a_skip_not_an_error():
    """length_cosine grades correctness through accuracy_reward, which raises SkipSample for an unparsable gold;
    the registry must mark the sample skipped (not log an error and score it 0)."""
    reward = combine({"length_cosine": 1.0})
    batch = reward.score([""], ["<think>t</think><answer>1</answer>"], [{"answer": UNPARSABLE}])
    assert batch.skipped == [True] and batch.errors == {"length_cosine": 0} and batch.total == [0.0]


def test_cosine_length_reward_is_clamped_beyond_max_len():
    for length in (100, 150, 199, 1000):
        for correct, end in ((True, 0.5), (False, -0.5)):
            meta = {"_correct": correct, "completion_tokens": length}
            assert cosine_length_reward("", "", meta, max_len=100) == end
    # halfway: the midpoint of the range
    assert math.isclose(cosine_length_reward("", "", {"_correct": True, "completion_tokens": 50}, max_len=100), 0.75)


def test_repetition_penalty_ignores_case():
    text = "The cat sat. the cat sat. THE CAT SAT."
    # words: the cat sat. the cat sat. the cat sat. -> 7 trigrams, 3 distinct
    assert math.isclose(repetition_penalty("", text, {}), -(1 - 3 / 7))


def test_grade_requires_the_answer_tag_when_asked():
    sample = {"prompt": "p", "answer": "5"}
    assert grade([sample], ["The answer is 5"], True)[0] == [0.0]
    assert grade([sample], ["The answer is 5"], False)[0] == [1.0]


def test_grade_prepends_the_open_think_prefix():
    sample = {"prompt": "p", "task": "addition", "answer": "5"}
    scores, formatted, answers, _ = grade([sample], ["2+3=5</think><answer>5</answer>"], True, "<think>\n")
    assert formatted == [True] and scores == [1.0] and answers == ["5"]
