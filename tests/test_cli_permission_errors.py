"""An output directory r1fast may not write (a shared out_dir owned by another user, a read-only mount) is the
user's setup, not a bug: every CLI says so in one line and exits 1. r1fast.train and the pipeline printed
PermissionError's traceback (only FileNotFoundError was caught). Simulated by the stage's run function raising
it: the tests run as root on CI, where chmod does not refuse anything."""

import importlib

import pytest

DENIED = PermissionError(13, "Permission denied", "/shared/runs/tiny_r1_zero")


@pytest.mark.parametrize("module,run,argv", [
    ("r1fast.train", "run", []),
    ("r1fast.sft", "run_sft", ["--data", "d.jsonl"]),
    ("r1fast.eval", "run_eval", ["--model", "m", "--data", "d.jsonl"]),
    ("r1fast.rejection", "run_rejection", ["--checkpoint", "m", "--data", "d.jsonl", "--out", "kept.jsonl"]),
    ("r1fast.pipeline", "run_pipeline", ["--recipe", "r.toml"]),
])
def test_an_unwritable_output_directory_is_one_line_and_exit_1(monkeypatch, capsys, module, run, argv):
    mod = importlib.import_module(module)

    def denied(*args, **kwargs):
        raise DENIED

    monkeypatch.setattr(mod, run, denied)
    assert mod.main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"{module}: error: [Errno 13] Permission denied: '/shared/runs/tiny_r1_zero'\n"
