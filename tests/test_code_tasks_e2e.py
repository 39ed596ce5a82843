"""Code tasks ({"prompt", "tests"}) from the JSONL file to the evaluation numbers: graded by their tests
everywhere (training reward, held-out evaluation, ``r1fast.eval``), checked when the data loads, and a hung
program costs one timeout per sample, not one per test."""

import json
import threading

import pytest

import r1fast.rewards.code as code_mod
from r1fast.config import Config
from r1fast.config_io import DataError, load_config
from r1fast.data import load_jsonl
from r1fast.eval import EvalConfig, _grade, run_eval
from r1fast.grpo_step import build_rollout_batch
from r1fast.rewards import combine
from r1fast.rewards.sandbox import SandboxResult
from r1fast.rewards_setup import build_scorer
from r1fast.rollout.engine import Completion

F = "```"
TESTS = [{"input": "2\n", "output": "6\n"}, {"input": "5\n", "output": "15\n"}]
SAMPLE = {"prompt": "print n*3", "id": "triple", "tests": TESTS}


def _answer(body: str) -> str:
    return f"<think>multiply</think><answer>\n{F}python\n{body}\n{F}\n</answer>"


CORRECT = _answer("print(int(input())*3)")
OFF_BY_ONE = _answer("print(int(input())*3+1)")
OFF_BY_ONE_TOO = _answer("n = int(input())\nprint(3*n + 1)")  # other text, the same outputs
CRASH = _answer("raise SystemExit(1)")


def _config(**weights) -> Config:
    cfg = Config()
    cfg.rewards.weights = weights
    return cfg


def test_evaluation_grades_a_code_task_by_its_tests_not_its_answer():
    """A correct program counted wrong in eval (graded against 'answer' by math-verify): greedy accuracy 0.0
    for a run whose every completion scored code reward 1.0."""
    sample = {**SAMPLE, "answer": "3"}  # an answer math-verify would compare against: not read
    texts = [CORRECT, OFF_BY_ONE, OFF_BY_ONE_TOO, CRASH]
    scores, formatted, answers, keys = _grade([sample] * 4, texts, True)
    assert scores == [1.0, 0.0, 0.0, 0.0] and formatted == [True] * 4
    assert answers[0].strip() == "print(int(input())*3)"  # the program is a code task's answer
    # wrong programs vote by their outputs: the two off-by-one programs are one answer; one that never ran
    # successfully has no outputs and votes as its own text (key None); correct ones need no key
    assert keys[1] == keys[2] == json.dumps(["7", "16"]) and keys[0] is None and keys[3] is None
    scorer = build_scorer(_config(code=1.0, format=0.2))
    assert scorer.check(sample, CORRECT) == (True, True)
    assert scorer.check(sample, OFF_BY_ONE) == (False, True)


def test_training_evaluation_runs_code_under_the_configured_sandbox_limits():
    slow = _answer("import time\ntime.sleep(0.6)\nprint(int(input())*3)")
    cfg = _config(code=1.0)
    assert build_scorer(cfg).check(SAMPLE, slow)[0] is True  # 5 s by default
    cfg.rewards.sandbox_timeout_s = 0.3
    assert build_scorer(cfg).check(SAMPLE, slow)[0] is False
    cfg.rewards.weights = {"accuracy": 1.0}  # no code reward: tests still grade a code sample
    assert build_scorer(cfg).check(SAMPLE, CORRECT)[0] is True


def test_check_batch_agrees_with_check_and_runs_code_samples_together(monkeypatch):
    """For evaluation.py: checked one at a time, 16 hung held-out completions cost 16 x the timeout."""
    math_sample = {"prompt": "1+1", "answer": "2", "task": "addition"}
    samples, texts = [SAMPLE, math_sample, SAMPLE], [CORRECT, "<think>x</think><answer>2</answer>", OFF_BY_ONE]
    scorer = build_scorer(_config(code=1.0))
    assert scorer.check_batch(samples, texts) == [scorer.check(s, t) for s, t in zip(samples, texts)]
    monkeypatch.setattr(code_mod, "_available_bytes", lambda: 64 * 2**30)
    barrier = threading.Barrier(2, timeout=10)  # both code samples' first runs must be in flight at once

    def together(code, stdin, limits):
        barrier.wait()
        return SandboxResult("6\n", "", 0, False, False, True, True)

    monkeypatch.setattr(code_mod, "run_python", together)
    assert [ok for ok, _ in scorer.check_batch([{**SAMPLE, "tests": TESTS[:1]}] * 2, [CORRECT] * 2)] == [True] * 2


def test_the_accuracy_metric_of_a_code_run_is_its_code_reward():
    """It was NaN: only accuracy/task_accuracy/math_accuracy rewards were looked for."""
    cfg = _config(code=1.0)
    cfg.grpo.samples_per_prompt = 2
    tok = _Chars()
    comps = [[Completion(tok.encode(t), [0.0] * len(t), "stop") for t in (CORRECT, OFF_BY_ONE)]]
    m = build_rollout_batch(cfg, tok, build_scorer(cfg), [SAMPLE], [[1]], comps, "cpu").metrics
    assert m["accuracy"] == m["reward_code"] == pytest.approx(0.5)


class _Chars:
    chat_template = prompt_template = None

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_after_a_timeout_the_remaining_tests_fail_without_running(monkeypatch):
    """6 tests x 1 s = 6.3 s for `while True: pass`: every test ran to the timeout."""
    calls = []

    def hang(code, stdin, limits):
        calls.append(stdin)
        return SandboxResult("", "", None, True, False, True, True)

    monkeypatch.setattr(code_mod, "run_python", hang)
    tests = [{"input": f"{k}\n", "output": f"{k}\n"} for k in range(6)]
    assert code_mod.code_reward("", _answer("while True: pass"), {"tests": tests}, timeout_s=1.0) == 0.0
    assert calls == ["0\n"]


def test_a_program_that_hangs_on_one_input_scores_only_the_tests_before_it():
    program = _answer("n = int(input())\nwhile n == 2:\n    pass\nprint(n)")
    tests = [{"input": f"{k}\n", "output": f"{k}\n"} for k in (1, 2, 3)]
    assert code_mod.code_reward("", program, {"tests": tests}, timeout_s=0.3) == pytest.approx(1 / 3)


def test_the_sandbox_pool_runs_more_programs_than_cores_within_memory(monkeypatch):
    """A pool thread only waits on its child: capped at the core count, 2 sleeping programs held both workers
    of a 2-core machine. 4 programs that each wait for the other 3 finish only if 4 run at once on 1 core."""
    monkeypatch.setattr(code_mod.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(code_mod, "_available_bytes", lambda: 64 * 2**30)
    barrier = threading.Barrier(4, timeout=10)

    def together(code, stdin, limits):
        barrier.wait()
        return SandboxResult("6\n", "", 0, False, False, True, True)

    monkeypatch.setattr(code_mod, "run_python", together)
    one_test = {"tests": TESTS[:1]}
    assert code_mod.code_batch([""] * 4, [CORRECT] * 4, [one_test] * 4) == [1.0] * 4
    mib = 2**20
    monkeypatch.setattr(code_mod.os, "cpu_count", lambda: 16)
    assert code_mod.pool_size(1000, 512 * mib) == 32  # 128 GiB, 16 cores: the 32 cap
    monkeypatch.setattr(code_mod, "_available_bytes", lambda: 4 * 2**30)
    assert code_mod.pool_size(1000, 512 * mib) == 8  # each child may use its 512 MiB: 8 fit in 4 GiB
    assert code_mod.pool_size(3, 512 * mib) == 3 and code_mod.pool_size(1000, 8 * 2**30) == 1
    monkeypatch.setattr(code_mod, "_available_bytes", lambda: None)
    assert code_mod.pool_size(1000, 512 * mib) == 32


@pytest.mark.parametrize("tests, match", [
    (None, "expected a non-empty list"),
    ([{"input": "1\n", "output": ""}], r"\[0\]: empty expected output"),
    ("[{not json", "not valid JSON"),
])
def test_malformed_tests_fail_when_the_data_loads(tests, match):
    sample = {"prompt": "p", "id": "bad"} | ({} if tests is None else {"tests": tests})
    with pytest.raises(ValueError, match=f"sample 'bad': reward 'code': meta\\['tests'\\].*{match}"):
        combine({"code": 1.0}).check_metas([SAMPLE, sample])
    with pytest.raises(DataError, match="sample 'bad'"):
        build_scorer(_config(code=1.0)).check_samples([SAMPLE, sample])
    if tests is not None:  # graded by its tests in evaluation whatever the training rewards are
        with pytest.raises(DataError, match=f"sample 'bad': meta\\['tests'\\].*{match}"):
            build_scorer(_config(accuracy=1.0)).check_samples([sample])
    build_scorer(_config(code=1.0)).check_samples([SAMPLE])


def test_a_code_task_needs_no_answer_but_others_still_do(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "p", "tests": TESTS}) + "\n" + json.dumps({"prompt": "q", "answer": 4,
                                                                                     "tests": TESTS}) + "\n")
    first, second = load_jsonl(path)
    assert "answer" not in first and second["answer"] == "4" and first["tests"] == TESTS
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=":1: field 'answer' missing"):
        load_jsonl(path)


def test_all_or_nothing_comes_from_the_config():
    half = _answer("n = int(input())\nprint(6 if n == 2 else 0)")
    cfg = _config(code=1.0)
    assert build_scorer(cfg).score([""], [half], [SAMPLE]).total == [0.5]
    cfg.rewards.code_all_or_nothing = True
    assert build_scorer(cfg).combined.rewards["code"].params["all_or_nothing"] is True
    assert build_scorer(cfg).score([""], [half], [SAMPLE]).total == [0.0]


def test_r1fast_eval_end_to_end_on_a_code_file(tmp_path, tiny_checkpoint, monkeypatch):
    """`python -m r1fast.eval` on {"prompt", "tests"} lines: canned completions stand in for the model."""
    from r1fast.rollout import Engine
    from r1fast.tokenizer import CharTokenizer

    tok = CharTokenizer()

    def generate(self, prompts, *, n=1, **kwargs):
        texts = [CORRECT] if n == 1 else [CORRECT, OFF_BY_ONE, OFF_BY_ONE_TOO]
        return [[Completion(tok.encode(t), [0.0] * len(tok.encode(t)), "stop") for t in texts] for _ in prompts]

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"prompt": "print n*3", "tests": TESTS}) + "\n")
    args = ["--model", tiny_checkpoint, "--data", str(data), "--template", "compact", "--k", "3", "--max_new_tokens", "40",
            "--bootstrap_resamples", "2"]
    metrics = run_eval(load_config(None, args, schema=EvalConfig))
    assert metrics["greedy_accuracy"] == 1.0 and metrics["pass@1"] == pytest.approx(1 / 3)
    assert metrics["cons@3"] == 0.0  # the two off-by-one programs print the same: they outvote the correct one
    data.write_text(json.dumps({"prompt": "print n*3", "id": "x", "tests": "[]"}) + "\n")
    with pytest.raises(DataError, match="sample 'x': meta\\['tests'\\]"):
        run_eval(load_config(None, args, schema=EvalConfig))


def test_rejection_sampling_grades_a_code_task_by_its_tests():
    """default_score sent answerless code samples to math-verify: KeyError 'answer'."""
    from r1fast.rejection import default_score

    scores = default_score([dict(SAMPLE), dict(SAMPLE)], [CORRECT, OFF_BY_ONE])
    assert [s["accuracy"] for s in scores] == [1.0, 0.0]
