"""Generated tasks, verifiers, the safe evaluator, templates and the JSONL loader."""

import ast
import json
import random
import re
import time
from fractions import Fraction

import pytest

from r1fast.data import (
    R1_ZERO_TEMPLATE,
    TASKS,
    UnsafeExpression,
    apply_template,
    generate_tasks,
    load_jsonl,
    safe_eval,
    split_of,
    verify_answer,
    worked_solution,
)
from r1fast.rewards.format import extract_answer, format_reward

ALL_TASKS = sorted(TASKS) + ["arithmetic"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_distinct_and_well_formed(task):
    a = generate_tasks(task, 40, seed=3)
    assert a == generate_tasks(task, 40, seed=3)
    assert a != generate_tasks(task, 40, seed=4)
    assert len({s["id"] for s in a}) == len({s["prompt"] for s in a}) == 40
    for s in a:
        assert {"prompt", "answer", "task", "id"} <= set(s) and all(isinstance(s[k], str) for k in ("prompt", "answer"))
        assert s["task"] in TASKS


@pytest.mark.parametrize("task", ALL_TASKS)
def test_train_and_heldout_disjoint_by_content(task):
    train = generate_tasks(task, 150, seed=0, split="train")
    held = generate_tasks(task, 40, seed=0, split="heldout")
    assert not {(s["task"], s["prompt"]) for s in train} & {(s["task"], s["prompt"]) for s in held}
    assert all(split_of(s["task"], s["prompt"], 0.2) == "train" for s in train)
    assert all(split_of(s["task"], s["prompt"], 0.2) == "heldout" for s in held)
    # Another seed for the held-out set still never hits a training prompt.
    held2 = generate_tasks(task, 40, seed=9, split="heldout")
    assert not {s["prompt"] for s in train if s["task"] == "addition"} & {s["prompt"] for s in held2 if s["task"] == "addition"}


@pytest.mark.parametrize("task", ["addition", "countdown", "sorting"])
def test_reordered_numbers_stay_in_their_split(task):
    """"4+63" and "63+4" (or a countdown's numbers in another order) are one sample for the split:
    raw-text hashing put 20 of 200 held-out countdown puzzles in train with their numbers reordered."""
    def key(s):
        numbers = sorted(int(n) for n in re.findall(r"\d+", s["prompt"]))
        return s["prompt"].split()[1] if task == "countdown" else "", tuple(numbers)
    train = generate_tasks(task, 1000, seed=0, split="train")
    held = generate_tasks(task, 200, seed=0, split="heldout")
    assert not {key(s) for s in train} & {key(s) for s in held}
    assert split_of("addition", "4+63", 0.5) == split_of("addition", "63+4", 0.5)
    assert split_of("countdown", "make 85 with 10 5 9", 0.5) == split_of("countdown", "make 85 with 9 10 5", 0.5)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_worked_solutions_follow_template_and_verify(task):
    for s in generate_tasks(task, 60, seed=1):
        solution = worked_solution(s)
        assert format_reward("", solution, s) == 1.0, solution
        assert verify_answer(s, extract_answer(solution)), solution


def test_worked_solution_contents():
    s = {"prompt": "47+385", "answer": "432", "task": "addition", "id": "x"}
    assert worked_solution(s) == "<think>47+385: 7+5=12, 4+8+1=13, 3+1=4</think><answer>432</answer>"
    s = {"prompt": "12+35", "answer": "47", "task": "addition", "id": "x"}
    assert worked_solution(s) == "<think>12+35: 2+5=7, 1+3=4</think><answer>47</answer>"
    s = {"prompt": "3+14+7", "answer": "24", "task": "chain_sum", "id": "x"}
    assert worked_solution(s) == "<think>3+14=17, 17+7=24</think><answer>24</answer>"


def test_integer_and_sorting_verifiers():
    add = {"prompt": "47+385", "answer": "432", "task": "addition", "id": "x"}
    assert verify_answer(add, " 432 ") and verify_answer(add, "432")
    for wrong in ("431", "", "432 433", "4 32", "abc", "432.0", "9" * 200):
        assert not verify_answer(add, wrong), wrong
    srt = {"prompt": "sort 5 3 9 3", "answer": "3 3 5 9", "task": "sorting", "id": "x"}
    assert verify_answer(srt, "3 3 5 9") and verify_answer(srt, "3, 3, 5, 9")
    assert not verify_answer(srt, "3 5 9") and not verify_answer(srt, "9 5 3 3")


def test_countdown_always_solvable_and_verified():
    samples = generate_tasks("countdown", 100, seed=2, num_count=4, max_number=20, max_target=300)
    for s in samples:
        used = []
        assert safe_eval(s["answer"], literals=used) == s["target"]
        assert sorted(used) == sorted(s["numbers"])
        assert 1 <= s["target"] <= 300
        assert s["prompt"] == f"make {s['target']} with {' '.join(map(str, s['numbers']))}"


def test_countdown_verifier_rejects_cheats():
    s = {"prompt": "make 24 with 4 6 1", "answer": "4*6*1", "task": "countdown", "id": "x",
         "numbers": [4, 6, 1], "target": 24}
    assert verify_answer(s, "4*6*1") and verify_answer(s, "(4*6)/1 = 24") and verify_answer(s, "6*4*1")
    for cheat in ("4*6", "24", "4*6*1*1", "4*6*1+0", "4**2+6+1+1", "9**9**9", "(4*6)//1", "__import__('os')",
                  "4*6*1; 1", "x", "4*6*1 if 1 else 0", "", "-(-4)*6*1", "1e1", "4.0*6*1"):
        assert not verify_answer(s, cheat), cheat


def test_safe_eval_matches_exact_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        nums = [rng.randint(1, 50) for _ in range(4)]
        ops = [rng.choice("+-*/") for _ in range(3)]
        expr = f"({nums[0]}{ops[0]}{nums[1]}){ops[1]}({nums[2]}{ops[2]}{nums[3]})"
        tree = ast.parse(expr, mode="eval")
        # Reference: the same tree evaluated with Fractions by Python's own operators.
        ref = eval(compile(ast.fix_missing_locations(_fractionize(tree)), "<ref>", "eval"), {"F": Fraction})
        try:
            assert safe_eval(expr) == ref
        except UnsafeExpression as exc:
            assert "division by zero" in str(exc)


def _fractionize(tree):
    class T(ast.NodeTransformer):
        def visit_Constant(self, node):
            return ast.Call(ast.Name("F", ast.Load()), [node], [])
    return T().visit(tree)


def test_safe_eval_refuses_unsafe_fast():
    start = time.perf_counter()
    for bad in ("9**9**9", "2**10", "10**100", "9" * 20, "(10**9)*(10**9)", "999999999*999999999", "1/0",
                "a+1", "f(1)", "[1]", "1 if 1 else 2", "1<<100000", "'a'*10", "+1" * 200, "1" * 300, "\x00"):
        with pytest.raises(UnsafeExpression):
            safe_eval(bad)
    assert time.perf_counter() - start < 1.0
    assert safe_eval("7/2*2") == 7 and safe_eval("1/3+2/3") == 1


def test_generator_bad_input():
    with pytest.raises(ValueError, match="task: unknown task 'nope'.*addition"):
        generate_tasks("nope", 1)
    with pytest.raises(ValueError, match="split"):
        generate_tasks("addition", 1, split="test")
    with pytest.raises(ValueError, match="params"):
        generate_tasks("addition", 1, digits=3)
    with pytest.raises(ValueError, match="digits"):
        generate_tasks("addition", 1, min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="n: only"):
        generate_tasks("addition", 95, max_digits=1)  # 100 possible prompts, ~80 of them in train
    with pytest.raises(ValueError, match="not a generated task"):
        verify_answer({"task": "math", "answer": "1"}, "1")


def test_r1_zero_template_verbatim():
    expected = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                "The assistant first thinks about the reasoning process in the mind and then provides the user with "
                "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
                "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
                "</answer>. User: {prompt}. Assistant:")
    assert R1_ZERO_TEMPLATE == expected
    assert apply_template("What is \\frac{1}{2}+{x}", "r1_zero").endswith("User: What is \\frac{1}{2}+{x}. Assistant:")
    assert apply_template("12+35", "compact") == "User: 12+35. Assistant:"
    with pytest.raises(ValueError, match="template: unknown template 'chatml'"):
        apply_template("x", "chatml")


def test_jsonl_loader(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n\n" +
                    json.dumps({"prompt": "p", "answer": "\\frac12", "task": "math", "id": "q7", "extra": [1]}) + "\n")
    rows = load_jsonl(good)
    assert rows == [{"prompt": "1+1?", "answer": "2", "task": "math", "id": "good.jsonl:1"},
                    {"prompt": "p", "answer": "\\frac12", "task": "math", "id": "q7", "extra": [1]}]
    assert load_jsonl(good, limit=1) == rows[:1]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    cases = {
        '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n': ":3: malformed JSON",
        '{"prompt": "a", "answer": "b"}\n[1, 2]\n': ":2: expected a JSON object",
        '{"prompt": "a"}\n': ":1: field 'answer' missing",
        '{"prompt": "", "answer": "1"}\n': ":1: field 'prompt' is empty",
        '{"prompt": "a", "answer": true}\n': ":1: field 'answer'",
        '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": 1' + "0" * 5000 + '}\n': ":2: unreadable JSON value",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_jsonl(bad)
    bad.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "b"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=":2: not UTF-8"):
        load_jsonl(bad)
    # numbers keep their text: str(1e-05) would make math-verify read e - 5; a byte-order mark is no error
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "answer": 0.00001, "weight": 0.5}\n{"prompt": "p", "answer": 2.5e20}\n')
    rows = load_jsonl(numbers)
    assert [r["answer"] for r in rows] == ["0.00001", "2.5e20"] and rows[0]["weight"] == 0.5


def test_integer_answers_keep_their_sign():
    s = {"task": "addition", "answer": "5", "prompt": "2+3"}
    assert verify_answer(s, "5") and verify_answer(s, "+5")
    assert not verify_answer(s, "-5")
    neg = {"task": "addition", "answer": "-7", "prompt": "x"}
    assert verify_answer(neg, "-7") and not verify_answer(neg, "7")


def test_heldout_share_matches_heldout_fraction():
    prompts = [f"{a}+{b}" for a in range(100) for b in range(a, 100)]  # 5,050 distinct (order-free) sums
    for fraction in (0.1, 0.2, 0.5):
        share = sum(split_of("addition", p, fraction) == "heldout" for p in prompts) / len(prompts)
        assert abs(share - fraction) < 0.03, (fraction, share)


def test_jsonl_whitespace_only_prompt_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok", "answer": 1}\n{"prompt": "  \\n ", "answer": 2}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'prompt' is empty"):
        load_jsonl(path)


def test_jsonl_code_task_keeps_a_given_answer(tmp_path):
    path = tmp_path / "c.jsonl"
    tests = [{"input": "", "output": "1\n"}]
    rows = [{"prompt": "p", "answer": "42", "tests": tests}, {"prompt": "q", "answer": None, "tests": tests}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = load_jsonl(path)
    assert first["answer"] == "42" and "answer" not in second


def test_denominator_beyond_max_abs_is_refused():
    assert safe_eval("1/1000/1000/1000") == Fraction(1, 10**9)  # denominator exactly at the bound
    with pytest.raises(UnsafeExpression):
        safe_eval("1/1000/1000/1000/10")  # 1e-10: tiny value, denominator 1e10 > max_abs
    with pytest.raises(UnsafeExpression):
        safe_eval("7/13", max_abs=12)
    assert safe_eval("7/12", max_abs=12) == Fraction(7, 12)
