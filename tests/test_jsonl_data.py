"""A user's JSONL prompts in r1fast.train: every split problem is one line before the model loads (a file whose
lines all fell in the held-out split crashed the first GRPO step with ZeroDivisionError), a built-in "task"
column carries what its verifier reads, data.eval_size = 0 trains on every line, and a resume accepts the
same file named by another path but not other data."""

import json
import os

import pytest
from train_testing import tiny_config

from r1fast.config import ConfigError
from r1fast.config_io import DataError
from r1fast.data import load_jsonl, split_of
from r1fast.data.order import batch_indices
from r1fast.data_setup import build_datasets
from r1fast.train_checks import check_data_order, data_order_fingerprint


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sums(split, n, task="addition"):
    """``n`` one-digit sums "a+b" whose content hash puts them in ``split`` (as build_datasets splits a file)."""
    rows = [{"prompt": f"{a}+{b}", "answer": str(a + b), "task": task} for a in range(10) for b in range(a, 10)]
    return [r for r in rows if split_of(task, r["prompt"], 0.2) == split][:n]


def _cfg(tmp_path, data, *extra):
    return tiny_config(tmp_path, "--data.task", str(data), "--train.sft_steps", "0", *extra)


def test_a_file_without_training_lines_is_one_error_before_the_model_loads(tmp_path, monkeypatch):
    from r1fast import train

    def no_model(*_, **__):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(train, "build_model", no_model)
    data = _write(tmp_path / "one.jsonl", _sums("heldout", 1))
    with pytest.raises(DataError, match=r"^data\.task: none of the 1 line\(s\) of .*one\.jsonl fell in the training "
                                        r"split \(.*train 0, held-out 1\); add lines"):
        train.run(_cfg(tmp_path, data))


def test_batch_indices_of_no_examples_is_a_value_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match=r"^num_examples: no examples to draw a batch of 4 from"):
        batch_indices(0, 4, 0, seed=0)
    assert batch_indices(0, 0, 0, seed=0) == []


def test_eval_size_zero_trains_on_every_line(tmp_path):
    """The held-out ~20% were neither trained on nor evaluated with eval_size 0 (every pipeline rl stage)."""
    rows = _sums("train", 6) + _sums("heldout", 2)
    data = _write(tmp_path / "d.jsonl", rows)
    _, train, heldout = build_datasets(_cfg(tmp_path, data, "--data.eval_size", "0"))
    assert [r["prompt"] for r in train] == [r["prompt"] for r in rows] and heldout == []
    _, train, heldout = build_datasets(_cfg(tmp_path, data, "--data.eval_size", "4"))
    assert len(train) == 6 and [r["prompt"] for r in heldout] == [r["prompt"] for r in rows[6:]]
    _, train, _ = build_datasets(_cfg(tmp_path, data, "--data.eval_size", "0", "--data.train_size", "3"))
    assert len(train) == 3
    heldout_only = _write(tmp_path / "h.jsonl", _sums("heldout", 2))
    with pytest.raises(DataError, match=r"held-out 2\); add lines, or set data\.eval_size=0 to train on every line"):
        build_datasets(_cfg(tmp_path, heldout_only))
    assert len(build_datasets(_cfg(tmp_path, heldout_only, "--data.eval_size", "0"))[1]) == 2


def test_sft_steps_without_solutions_names_both_ways_out(tmp_path):
    data = _write(tmp_path / "f.jsonl", _sums("train", 4))
    with pytest.raises(ConfigError, match=r"^train\.sft_steps=2 but no training line of .*f\.jsonl has a 'solution' "
                                          r"to imitate: set train\.sft_steps=0 \(--train\.sft_steps 0: pure RL.*"
                                          r"R1-Zero\) or add a \"solution\" field"):
        build_datasets(_cfg(tmp_path, data, "--train.sft_steps", "2"))
    solved = [{**r, "solution": f"<think>{r['prompt']}</think><answer>{r['answer']}</answer>"} for r in _sums("train", 4)]
    sft, _, _ = build_datasets(_cfg(tmp_path, _write(data, solved), "--train.sft_steps", "2"))
    assert len(sft) == 4


@pytest.mark.parametrize(("row", "message"), [
    ({"task": "countdown", "answer": "4*6"}, r":3: task 'countdown' needs 'target' \(an integer\) and 'numbers'"),
    ({"task": "countdown", "answer": "4*6", "target": 24, "numbers": ["4", "6"]}, r":3: task 'countdown' needs"),
    ({"task": "countdown", "answer": "4*6", "target": True, "numbers": [4, 6]}, r":3: task 'countdown' needs"),
    ({"task": "addition", "answer": "twelve"}, r":3: task 'addition' needs an 'answer' that is an integer"),
    ({"task": "sorting", "answer": "1, 2, 3"}, r":3: task 'sorting' needs an 'answer' that is numbers separated"),
    ({"task": "addition", "tests": [{"input": "", "output": "1"}]}, r":3: task 'addition' needs an 'answer'; drop the 'task' column"),
    ({"task": ["countdown"], "answer": "1"}, r":3: field 'task' must be a string \(got list\)"),
], ids=["countdown-bare", "countdown-string-numbers", "countdown-bool-target", "addition", "sorting", "no-answer",
        "task-list"])
def test_a_builtin_task_column_must_carry_what_its_verifier_reads(tmp_path, row, message):
    """"task": "countdown" without its puzzle crashed evaluation with KeyError 'target', after the model loaded."""
    data = _write(tmp_path / "d.jsonl", [*_sums("train", 2), {"prompt": "make 24 with 4 6", **row}])
    with pytest.raises(ValueError, match=message):
        load_jsonl(data)
    with pytest.raises(DataError, match=r"d\.jsonl" + message):
        build_datasets(_cfg(tmp_path, data))


def test_builtin_task_rows_that_carry_their_metadata_load(tmp_path):
    rows = [{"prompt": "make 24 with 4 6", "answer": "4*6", "task": "countdown", "target": 24, "numbers": [4, 6]},
            {"prompt": "sort 3 1", "answer": "1 3", "task": "sorting"}, {"prompt": "x?", "answer": "x", "task": "gsm8k"},
            *_sums("train", 1)]
    assert [r["task"] for r in load_jsonl(_write(tmp_path / "d.jsonl", rows))] == [
        "countdown", "sorting", "gsm8k", "addition"]


def _fingerprint(tmp_path, task, *extra):
    cfg = _cfg(tmp_path, task, *extra)
    sft, train, _ = build_datasets(cfg)
    return data_order_fingerprint(cfg, sft, train)


def test_data_order_check_reads_the_file_not_the_path_that_named_it(tmp_path, monkeypatch):
    """./math.jsonl, then /abs/math.jsonl: refused as another data order although the content hash agreed."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "math.jsonl", _sums("train", 6) + _sums("heldout", 2))
    saved = {"data_order": _fingerprint(tmp_path, "./math.jsonl")}
    check_data_order("ck", saved, _fingerprint(tmp_path, str(tmp_path / "math.jsonl")))
    check_data_order("ck", saved, _fingerprint(tmp_path, "math.jsonl", "--data.eval_size", "7"))  # still 80/20
    os.makedirs("copy")
    _write(tmp_path / "copy" / "math.jsonl", _sums("train", 5) + _sums("heldout", 2))  # one training line fewer
    with pytest.raises(ConfigError, match=r"another data order \(data\.task: '\./math\.jsonl' in the checkpoint, "
                                          r"'copy/math\.jsonl' now\)"):  # other lines under another path
        check_data_order("ck", saved, _fingerprint(tmp_path, "copy/math.jsonl"))
    with pytest.raises(ConfigError, match=r"another data order \(JSONL lines trained on: '~80% by content hash' in "
                                          r"the checkpoint, 'every line \(data\.eval_size=0\)' now\)"):
        check_data_order("ck", saved, _fingerprint(tmp_path, "math.jsonl", "--data.eval_size", "0"))
    os.replace("copy/math.jsonl", "math.jsonl")  # edited in place
    with pytest.raises(ConfigError, match=r"another data order \(training prompts: .* \(the data itself changed\)\)"):
        check_data_order("ck", saved, _fingerprint(tmp_path, str(tmp_path / "math.jsonl")))
    generated = {"data_order": _fingerprint(tmp_path, "addition")}
    with pytest.raises(ConfigError, match=r"data\.task: 'addition' in the checkpoint, 'math\.jsonl' now"):
        check_data_order("ck", generated, _fingerprint(tmp_path, "math.jsonl"))
    check_data_order("ck", generated, _fingerprint(tmp_path, "addition", "--data.eval_size", "0"))


def test_a_jsonl_run_resumes_under_another_path_to_its_file(tmp_path, monkeypatch):
    from r1fast.train import run

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "math.jsonl", _sums("train", 8) + _sums("heldout", 2))
    common = ("--train.name", "r", "--train.checkpoint_every", "1", "--data.eval_size", "0")
    run(_cfg(tmp_path, "./math.jsonl", *common, "--train.steps", "1"))
    summary = run(_cfg(tmp_path, str(tmp_path / "math.jsonl"), *common, "--train.steps", "2",
                       "--train.resume", "latest"))
    assert summary["steps"] == 2
