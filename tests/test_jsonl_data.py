"""A user's JSONL prompts in r1fast.train: every split problem is one line before the model loads (a file whose
lines all fell in the held-out split crashed the first GRPO step with ZeroDivisionError), a built-in "task"
column carries what its verifier reads, data.eval_size = 0 trains on every line, and a resume accepts the
same file named by another path but not other data."""

import json

import pytest
from train_testing import tiny_config

from r1fast.config_io import DataError
from r1fast.data import split_of
from r1fast.data.order import batch_indices


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
