"""The run-directory lock of r1fast.train and r1fast.sft, and config.toml across a resume.

A second r1fast.train into a live run directory moved the running run aside and both wrote step_2/4/6 into
one checkpoints/; a resume overwrote config.toml with resume = "latest", so ``--config <run>/config.toml`` no
longer reproduced the run."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import tomllib
from train_testing import TINY, run_cli, tiny_config

from r1fast import run_dir as R
from r1fast.config_io import ConfigError
from r1fast.run_dir import lock_beside, lock_run_dir, set_aside_earlier_run

# the smallest run that still writes config.toml, metrics and a checkpoint (~1 s on the torch kernels)
QUICK = ("--train.sft_steps", "0", "--data.eval_size", "0", "--grpo.prompts_per_step", "2",
         "--train.warmup_steps", "0")


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """The loop's bookkeeping is under test, not the kernels (they have their own tests)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


def _is_free(run_dir) -> bool:
    try:
        lock_beside(str(run_dir)).close()
    except RuntimeError:
        return False
    return True


def test_a_held_lock_refuses_a_second_holder_naming_the_directory_and_the_holder(tmp_path):
    run_dir = tmp_path / "x"
    held = lock_beside(str(run_dir), ConfigError)
    assert (tmp_path / ".x.lock").is_file() and not run_dir.exists()  # beside the directory, not in it
    with pytest.raises(ConfigError, match=rf"{run_dir}: another process is running on this run directory "
                                          rf"\(pid {os.getpid()} on {socket.gethostname()}"):
        lock_beside(str(run_dir) + "/", ConfigError)  # a trailing slash is the same directory
    assert not _is_free(run_dir)
    held.close()
    assert _is_free(run_dir)
    # the pipeline's lock names its holder too, and a stage's lock beside its directory is another file
    pipeline = lock_run_dir(str(tmp_path))
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
        lock_run_dir(str(tmp_path))
    assert _is_free(run_dir)  # <out_dir>/.x.lock is not <out_dir>/.lock: no self-deadlock
    pipeline.close()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    """SIGKILL runs no cleanup: the lock must die with its process (flock), not outlive it (a pid file)."""
    code = ("import sys, time; from r1fast.run_dir import lock_beside; lock = lock_beside(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"pid {proc.pid} on"):
            lock_beside(str(tmp_path / "x"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / ".x.lock").exists() and _is_free(tmp_path / "x")


def test_train_into_a_live_run_directory_is_refused_and_leaves_it_in_place(tmp_path):
    from r1fast import train

    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "phase": "rl"}\n')  # the live run's
    live = lock_beside(str(run_dir))
    try:
        with pytest.raises(ConfigError, match=rf"{run_dir}: another process .*pid {os.getpid()}"):
            train.run(tiny_config(tmp_path, *QUICK, "--train.name", "x", "--train.steps", "1"))
    finally:
        live.close()
    assert sorted(os.listdir(tmp_path)) == [".x.lock", "x"]  # nothing set aside, nothing written
    assert os.listdir(run_dir) == ["metrics.jsonl"]


def test_two_ranks_agree_on_the_refusal(tmp_path):
    """Rank 0 alone holds the lock: both ranks must exit with the error, neither waits in a collective."""
    live = lock_beside(str(tmp_path / "x"))
    try:
        proc = run_cli(tmp_path, "x", 2, *QUICK, "--train.steps", "1", timeout=120)
    finally:
        live.close()
    assert proc.returncode != 0
    assert proc.stderr.count("another process is running on this run directory") == 2, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_config_toml_stays_the_fresh_runs_across_a_resume_and_the_lock_is_released(tmp_path):
    from r1fast import train

    run_dir = tmp_path / "x"
    train.run(tiny_config(tmp_path, *QUICK, "--train.name", "x", "--train.steps", "1"))
    fresh = (run_dir / "config.toml").read_text()
    assert tomllib.loads(fresh)["train"]["resume"] == "none" and _is_free(run_dir)
    train.run(tiny_config(tmp_path, *QUICK, "--train.name", "x", "--train.steps", "2", "--train.resume", "latest"))
    assert (run_dir / "config.toml").read_text() == fresh  # --config of it still reruns the run from scratch
    resumed = tomllib.loads((run_dir / "config.resume-step_1.toml").read_text())["train"]
    assert (resumed["resume"], resumed["steps"]) == ("latest", 2)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2 and _is_free(run_dir)
    # a failed start releases the lock too (a pipeline or a notebook goes on in the same process)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        train.run(tiny_config(tmp_path, *QUICK, "--train.name", "y", "--train.resume", "latest"))
    assert _is_free(tmp_path / "y")
    # a fresh run sets the earlier one aside; the lock file stays beside, with the live run
    train.run(tiny_config(tmp_path, *QUICK, "--train.name", "x", "--train.steps", "1"))
    aside = [name for name in os.listdir(tmp_path) if name.startswith("x.prev-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "config.resume-step_1.toml").is_file()
    assert not (run_dir / "config.resume-step_1.toml").exists() and (tmp_path / ".x.lock").is_file()


def test_sft_into_a_live_run_directory_is_refused(tmp_path):
    from train_testing import tiny_sft_config

    from r1fast.sft import run_sft

    cfg = tiny_sft_config(tmp_path)
    live = lock_beside(str(tmp_path / "s"))
    try:
        with pytest.raises(ConfigError, match="another process is running on this run directory"):
            run_sft(cfg)
    finally:
        live.close()
    assert not (tmp_path / "s").exists()
    run_sft(cfg)  # free again, and released after the run
    assert (tmp_path / "s" / "summary.json").is_file() and _is_free(tmp_path / "s")


def test_a_resume_from_another_runs_checkpoint_saves_a_fresh_config_toml(tmp_path):
    """The run dir has no config.toml yet: the resume writes one with resume = "none" (``--config`` of it
    reruns the run from scratch) and records the resume itself in config.resume-step_1.toml."""
    from r1fast import train

    train.run(tiny_config(tmp_path, *QUICK, "--train.name", "x", "--train.steps", "1"))
    ckpt = str(tmp_path / "x" / "checkpoints" / "step_1")
    train.run(tiny_config(tmp_path, *QUICK, "--train.name", "y", "--train.steps", "2", "--train.resume", ckpt))
    y = tmp_path / "y"
    assert json.loads((y / "summary.json").read_text())["steps"] == 2
    fresh = tomllib.loads((y / "config.toml").read_text())["train"]
    assert (fresh["resume"], fresh["steps"], fresh["name"]) == ("none", 2, "y")
    resumed = tomllib.loads((y / "config.resume-step_1.toml").read_text())["train"]
    assert (resumed["resume"], resumed["steps"]) == (ckpt, 2)


def test_two_runs_set_aside_within_one_second_both_keep_their_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(R.time, "strftime", lambda fmt, *a: "20260101-000000")  # one second, twice
    run = tmp_path / "x"
    for text in ("first\n", "second\n", "third\n"):
        run.mkdir()
        (run / "metrics.jsonl").write_text(text)
        set_aside_earlier_run(str(run))
        assert not run.exists()
    stamp = "x.prev-20260101-000000"
    assert sorted(os.listdir(tmp_path)) == [stamp, f"{stamp}-2", f"{stamp}-3"]
    assert [(tmp_path / name / "metrics.jsonl").read_text() for name in (stamp, f"{stamp}-2", f"{stamp}-3")] == [
        "first\n", "second\n", "third\n"]


def test_a_file_where_the_run_directory_belongs_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A file at out_dir/name died after the model loaded with config_dump's FileExistsError traceback (torchrun:
    one per rank, from the shared-directory check); a file at out_dir said "cannot lock ...: [Errno 17]"."""
    import r1fast.train as T

    monkeypatch.setattr(T, "build_model", lambda *a, **k: pytest.fail("model built before the run directory"))
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match=r"^train.name: the run directory .*taken is a file, not a directory"):
        T.run(tiny_config(tmp_path, "--train.name", "taken"))
    out_dir = tmp_path / "taken" / "runs"  # a file above out_dir counts too
    with pytest.raises(ConfigError, match=r"^train.out_dir: .*taken is a file, not a directory"):
        T.run(tiny_config(out_dir))
    assert T.main([*TINY, "--train.out_dir", str(tmp_path), "--train.name", "taken"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r1fast.train: error: train.name: the run directory"), err
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_file_where_the_pipeline_run_directory_belongs_is_one_line(tmp_path, capsys):
    """r1fast.pipeline --out_dir FILE (or [pipeline] out_dir) was a NotADirectoryError traceback from os.makedirs."""
    from r1fast import pipeline as P

    (tmp_path / "taken").write_text("a file")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[pipeline]\nname = "taken"\n[[stages]]\nname = "data"\nkind = "data"\n')
    assert P.main(["--recipe", str(recipe), "--out_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"r1fast.pipeline: error: pipeline.name: the run directory {tmp_path / 'taken'} is a file, not a "
                   "directory; move it or choose another pipeline.name"], err
    assert P.main(["--recipe", str(recipe), "--out_dir", str(tmp_path / "taken" / "runs")]) == 1
    assert capsys.readouterr().err.startswith(f"r1fast.pipeline: error: pipeline.out_dir: {tmp_path / 'taken'} is a file")

