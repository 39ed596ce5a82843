"""Rewards: format, accuracy (exact and math-verify), language, length, repetition, code, the registry."""

import logging
import math

import pytest

from r1fast.rewards import REWARDS, STATS, combine, get_reward
from r1fast.rewards.accuracy import MathVerifier
from r1fast.rewards.format import extract_answer, extract_think, format_reward, format_reward_partial
from r1fast.rewards.language import count_words_by_language
from r1fast.rewards.sandbox import SandboxLimits

FAST = {"limits": SandboxLimits(wall_time_s=1.5, cpu_time_s=1, memory_bytes=256 * 2**20, max_processes=8,
                                max_output_bytes=4096)}

# (completion, strict, partial)
FORMAT_CASES = [
    ("<think>a</think><answer>1</answer>", 1.0, 1.0),
    ("  <think>\nsteps\n</think>\n<answer> 1 </answer>\n", 1.0, 1.0),
    ("<think></think><answer></answer>", 1.0, 1.0),
    ("<think>a</think><answer>1</answer> trailing", 0.0, 0.5),
    ("lead <think>a</think><answer>1</answer>", 0.0, 0.5),
    ("<answer>1</answer><think>a</think>", 0.0, 0.5),                   # wrong order
    ("<think>a<answer>1</answer>", 0.0, 0.25),                          # unclosed think
    ("<think>a</think><answer>1", 0.0, 0.25),                           # unclosed answer
    ("<think><think>a</think></think><answer>1</answer>", 0.0, 0.25),   # nested think
    ("<think>a<answer>0</answer></think><answer>1</answer>", 0.0, 0.25),  # answer nested in think
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0, 0.25),  # two answers
    ("</think>a<think><answer>1</answer>", 0.0, 0.25),                  # closed before opened
    ("<think>a</think>", 0.0, 0.25),
    ("", 0.0, 0.0),
    ("47", 0.0, 0.0),
]


@pytest.mark.parametrize("completion,strict,partial", FORMAT_CASES)
def test_format_reward(completion, strict, partial):
    assert format_reward("", completion, {}) == strict
    assert format_reward_partial("", completion, {}) == partial
    assert get_reward("format")("", completion, {}) == strict
    assert get_reward("format", partial=True)("", completion, {}) == partial


def test_extraction():
    assert extract_answer("<think> x </think><answer> 42 </answer>") == "42"
    assert extract_think("<think> x y </think><answer>42</answer>") == "x y"
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None
    assert extract_answer("<answer><think>1</think></answer>") is None
    assert extract_answer("no tags") is None


def test_task_accuracy_exact_match():
    acc = get_reward("accuracy")
    meta = {"prompt": "47+385", "answer": "432", "task": "addition", "id": "x"}
    assert acc("", "<think>..</think><answer>432</answer>", meta) == 1.0
    assert acc("", "<think>..</think><answer>431</answer>", meta) == 0.0
    assert acc("", "432", meta) == 0.0  # no answer block: nothing to grade
    assert acc("", "<think>..<answer>432</answer>", meta) == 1.0  # format is the format reward's job
    count = {"prompt": "make 24 with 4 6 1", "answer": "4*6*1", "task": "countdown", "id": "c",
             "numbers": [4, 6, 1], "target": 24}
    assert acc("", "<answer>(6-1+1)*4</answer>", count) == 0.0  # 1 used twice
    assert acc("", "<answer>6*4/1</answer>", count) == 1.0
    assert acc("", "<answer>9**9**9</answer>", count) == 0.0


def test_math_accuracy_and_unparsable_gold():
    before = STATS["gold_unparsable"]
    reward = combine({"accuracy": 1.0})
    metas = [{"answer": "\\frac{1}{2}", "task": "math"}, {"answer": "\\frac{1}{2}", "task": "math"},
             {"answer": "x^2+1", "task": "math"}, {"answer": "no number here at all", "task": "math"},
             {"answer": "72"}]
    completions = ["<think>half</think><answer>0.5</answer>", "<think>t</think><answer>1/3</answer>",
                   "<think>t</think><answer>$1+x^2$</answer>", "<think>t</think><answer>1</answer>",
                   "<think>t</think>72"]
    batch = reward.score([""] * 5, completions, metas)
    assert batch.per_reward["accuracy"][:3] == [1.0, 0.0, 1.0]
    assert math.isnan(batch.per_reward["accuracy"][3]) and batch.skipped == [False, False, False, True, False]
    assert batch.total == [1.0, 0.0, 1.0, 0.0, 0.0] and batch.num_skipped == 1
    assert STATS["gold_unparsable"] == before + 1
    assert batch.errors == {"accuracy": 0}
    # gold that math_verify keeps only as its source text ("???", "x+") is unparsable too: skipped, not a
    # string comparison
    broken = reward.score([""] * 2, ["<answer>???</answer>", "<answer>1</answer>"],
                          [{"answer": "???", "task": "math"}, {"answer": "x+", "task": "math"}])
    assert broken.skipped == [True, True]


def test_math_accuracy_reads_bare_latex_whole():
    """MATH-style gold answers are bare LaTeX: "2\\pi" must not grade as its leading number 2, and
    E-notation is a number, not arithmetic with Euler's e."""
    cases = [("2\\pi", "2", 0.0), ("3\\sqrt{2}", "3", 0.0), ("-2x+1", "1", 0.0), ("2\\pi", "2\\pi", 1.0),
             ("\\sqrt{2}", "2^{1/2}", 1.0), ("x^2+1", "1+x^2", 1.0), ("(1,2)", "(1, 2)", 1.0),
             ("3\\sqrt{2}", "\\sqrt{18}", 1.0), ("1,000", "1000", 1.0), ("The answer is 5", "5", 1.0),
             ("\\boxed{7}", "7", 1.0), ("1e-05", "0.00001", 1.0), ("1e-05", "1", 0.0), ("2.5e20", "2.5", 0.0)]
    reward = combine({"math_accuracy": 1.0})
    batch = reward.score([""] * len(cases), [f"<think>t</think><answer>{p}</answer>" for _, p, _ in cases],
                         [{"answer": g} for g, _, _ in cases])
    assert batch.per_reward["math_accuracy"] == [c[2] for c in cases]


def test_math_verifier_timeout_kills_and_recovers():
    # too short even to start the worker (start-up has its own budget: it is not charged to the gold "1")
    verifier = MathVerifier(num_workers=1, timeout_s=0.001, startup_timeout_s=0.001)
    before = STATS["verify_timeout"]
    try:
        assert verifier.check(["1"], ["1"]) == [False]
        assert STATS["verify_timeout"] == before + 1
        verifier.timeout_s = verifier.startup_timeout_s = 30.0
        assert verifier.check(["2", "3"], ["2", "4"]) == [True, False]
    finally:
        verifier.close()
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)


def test_language_consistency():
    lang = get_reward("language")
    assert count_words_by_language("I think 所以 x=3, да") == {"en": 3, "zh": 2, "other": 1}
    # accented Latin words are English words by script (names in a proof: Gödel, Poincaré), one word each
    assert count_words_by_language("café Straße naïve hi") == {"en": 4, "zh": 0, "other": 0}
    assert count_words_by_language("by Gödel and Poincaré, да") == {"en": 4, "zh": 0, "other": 1}
    assert lang("", "<think>add the ones then the tens</think><answer>5</answer>", {}) == 1.0
    assert lang("", "<think>add 然后 carry</think><answer>5</answer>", {}) == pytest.approx(2 / 4)
    assert lang("", "<think>先加个位</think><answer>5</answer>", {"language": "zh"}) == 1.0
    assert lang("", "<think>先加个位</think><answer>5</answer>", {}) == 0.0
    assert lang("", "<think>12+35: 2+5=7</think><answer>47</answer>", {}) == 1.0  # no words at all
    assert lang("", "<answer>47</answer>", {}) == 0.0  # no chain of thought
    assert lang("", "<think> </think><answer>47</answer>", {}) == 0.0  # an empty one is none either
    assert get_reward("language", language="zh")("", "<think>abc 好</think>", {}) == 0.5
    with pytest.raises(ValueError, match="language"):
        lang("", "<think>a</think>", {"language": "fr"})


def test_cosine_length_reward():
    r = get_reward("length_cosine", max_len=100)
    assert r("", "", {"_correct": True, "completion_tokens": 0}) == pytest.approx(1.0)
    assert r("", "", {"_correct": True, "completion_tokens": 50}) == pytest.approx(0.75)
    assert r("", "", {"_correct": True, "completion_tokens": 100}) == pytest.approx(0.5)
    assert r("", "", {"_correct": True, "completion_tokens": 500}) == pytest.approx(0.5)
    assert r("", "", {"_correct": False, "completion_tokens": 0}) == pytest.approx(-1.0)
    assert r("", "", {"_correct": False, "completion_tokens": 100}) == pytest.approx(-0.5)
    x = 30 / 100
    assert r("", "", {"_correct": False, "completion_tokens": 30}) == pytest.approx(-0.5 - 0.25 * (1 + math.cos(math.pi * x)))
    # Without "correct" and token counts: accuracy computed, length in characters.
    meta = {"prompt": "1+2", "answer": "3", "task": "addition", "id": "a"}
    good = "<think>1+2=3</think><answer>3</answer>"
    assert r("", good, meta) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * len(good) / 100)))
    with pytest.raises(ValueError, match="max_len"):
        get_reward("length_cosine", max_len=0)("", "", {"_correct": True})
    # a data column named "correct" ("no" is truthy) is no grade: a wrong answer stays wrong
    wrong = "<think>1+2=4</think><answer>4</answer>"
    for column in ({"correct": "no"}, {"correct": True}, {"_correct": "yes"}):
        assert r("", wrong, {**meta, **column}) < -0.5


def test_repetition_penalty():
    rep = get_reward("repetition")
    assert rep("", "one two three four five", {}) == 0.0
    assert rep("", "a b", {}) == 0.0
    # 7 trigrams, 3 distinct -> -(1 - 3/7)
    assert rep("", "a b c a b c a b c", {}) == pytest.approx(-(1 - 3 / 7))
    assert get_reward("repetition", ngram_size=2, unit="char", max_penalty=-0.5)("", "abab", {}) == pytest.approx(-0.5 / 3)


ADD_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}, {"input": "0 0", "output": "0"}]


def _code(body):
    return f"<think>read and add</think><answer>\n```python\n{body}\n```\n</answer>"


@pytest.mark.parametrize("body,expected", [
    ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
    ("a, b = map(int, input().split())\nprint(a + b if a < 5 else 1)", 2 / 3),
    ("import sys\nsys.exit(0)", 0.0),                                   # exit(0) only
    ("pass", 0.0),                                                      # prints nothing
    ("print(9**9**9)", 0.0),
    ("while True:\n    pass", 0.0),                                     # infinite loop
    ("while True:\n    print('5' * 100)", 0.0),                         # output flood
    ("import os\nwhile True:\n    os.fork()", 0.0),                     # fork bomb
    ("x = bytearray(8 * 1024**3)\nprint(5)", 0.0),                      # memory bomb
])
def test_code_reward_adversarial(body, expected):
    tests = ADD_TESTS[:1] if expected == 0.0 else ADD_TESTS  # a failing program needs one test to show it
    assert get_reward("code", **FAST)("", _code(body), {"tests": tests}) == pytest.approx(expected)


def test_code_reward_cannot_read_the_tests():
    secret = "7f3a9c1e"
    # The program hunts for the expected output everywhere it could be: its directory tree, its stdin
    # file, the parent's command line, environment and open files, and /tmp.
    hunter = (
        "import os, sys\n"
        "seen = []\n"
        "def grab(path):\n"
        "    try:\n"
        "        with open(path, 'rb') as f: seen.append(f.read(100000))\n"
        "    except Exception: pass\n"
        "for root in ('..', '/tmp'):\n"
        "    for d, _, files in os.walk(root):\n"
        "        for name in files: grab(os.path.join(d, name))\n"
        "ppid = os.getppid()\n"
        "for p in ('cmdline', 'environ', 'fd/0', 'fd/1', 'fd/3', 'mem'):\n"
        "    grab(f'/proc/{ppid}/{p}')\n"
        "grab('/proc/self/fd/0')\n"
        "blob = b''.join(seen)\n"
        "print('FOUND' if b'" + secret + "' in blob else 'nothing')\n"
    )
    result = get_reward("code", **FAST)("", _code(hunter), {"tests": [{"input": "", "output": "FOUND"}]})
    assert result == 0.0


def test_code_reward_rejects_tests_that_cannot_fail():
    with pytest.raises(ValueError, match=r"meta\['tests'\]\[0\]: empty expected output"):
        get_reward("code", **FAST)("", _code("pass"), {"tests": [{"input": "", "output": "  \n"}]})
    with pytest.raises(ValueError, match=r"meta\['tests'\]"):
        get_reward("code", **FAST)("", _code("pass"), {})


def test_combine_validation_and_errors(caplog):
    with pytest.raises(ValueError, match=r"unknown reward name 'acuracy'; known: \['accuracy'"):
        combine({"acuracy": 1.0})
    with pytest.raises(ValueError, match="names_to_weights"):
        combine({"format": float("nan")})
    with pytest.raises(ValueError, match="params.format.strict: unknown parameter"):
        combine({"format": 1.0}, params={"format": {"strict": True}})
    with pytest.raises(ValueError, match="params.code"):
        combine({"format": 1.0}, params={"code": {}})
    # parameter values are checked when the run is configured, not at the first scored sample
    with pytest.raises(ValueError, match="params.repetition.max_penalty: expected a finite number <= 0"):
        combine({"repetition": 1.0}, params={"repetition": {"max_penalty": float("nan")}})
    with pytest.raises(ValueError, match="params.language.language: unsupported target 'fr'"):
        combine({"language": 1.0}, params={"language": {"language": "fr"}})
    with pytest.raises(ValueError, match="params.length_cosine.max_value_correct: expected a finite number"):
        combine({"length_cosine": 1.0}, params={"length_cosine": {"max_value_correct": float("inf")}})
    assert set(REWARDS) >= {"accuracy", "format", "language", "code", "length_cosine", "repetition"}

    # A reward that raises (malformed tests) scores 0 and is logged; the others still count.
    reward = combine({"format": 0.5, "code": 1.0}, params={"code": FAST})
    metas = [{"tests": "not json"}, {"tests": [{"input": "", "output": "hi"}]}]
    completions = ["<think>a</think><answer>print('hi')</answer>"] * 2
    with caplog.at_level(logging.WARNING, logger="r1fast.rewards"):
        batch = reward.score(["", ""], completions, metas)
    assert batch.per_reward["code"] == [0.0, 1.0] and batch.errors == {"format": 0, "code": 1}
    assert batch.total == [0.5, 1.5]
    assert any("reward 'code' raised" in r.getMessage() for r in caplog.records)
    assert reward("", completions[1], metas[1]) == 1.5
    with pytest.raises(ValueError, match="prompts/metas"):
        reward.score([""], completions, metas)

    # a reward that returns NaN is an error too (scored 0, logged): one NaN would poison its group's advantages
    REWARDS["nan_for_test"] = lambda prompt, completion, meta: float("nan") if meta.get("bad") else 1.0
    try:
        with caplog.at_level(logging.WARNING, logger="r1fast.rewards"):
            batch = combine({"nan_for_test": 1.0}).score(["", ""], ["a", "b"], [{"bad": True}, {}])
    finally:
        del REWARDS["nan_for_test"]
    assert batch.total == [0.0, 1.0] and batch.errors == {"nan_for_test": 1}
    assert any("non-finite score nan" in r.getMessage() for r in caplog.records)


def test_a_weighted_total_that_overflows_is_logged_and_scored_0(caplog, monkeypatch):
    """Each score is finite, their weighted sum is not (issue 6: a bad reward is logged and scores 0; the inf
    total crashed the step's advantage computation)."""
    monkeypatch.setitem(REWARDS, "zz_huge", lambda prompt, completion, meta: 1e308)
    with caplog.at_level(logging.WARNING):
        batch = combine({"zz_huge": 10.0}).score(["p"], ["c"], [{"id": "s0"}])
    assert batch.total == [0.0] and batch.errors["total"] == 1 and "s0" in caplog.text


def _score(body, tests=ADD_TESTS[:2], **params):
    return get_reward("code", **FAST, **params)("", _code(body), {"tests": tests})


def test_right_output_then_a_crash_fails():
    """Only a program that exits 0 passes a test, whatever it printed before dying."""
    assert _score("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)") == 0.0
    assert _score("a, b = map(int, input().split())\nprint(a + b, flush=True)\n1 / 0") == 0.0


def test_all_or_nothing_needs_every_test():
    half = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"
    assert _score(half) == pytest.approx(0.5)
    assert _score(half, all_or_nothing=True) == 0.0
    assert _score("a, b = map(int, input().split())\nprint(a + b)", all_or_nothing=True) == 1.0


def test_trailing_spaces_on_each_line_are_ignored():
    tests = [{"input": "", "output": "1\n2\n"}]
    assert _score("print('1   ')\nprint('2\\t')", tests) == 1.0
    assert _score("print(' 1')\nprint('2')", tests) == 0.0  # leading space is content
