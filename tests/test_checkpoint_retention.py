"""Checkpoint retention and crash safety: train.keep_last prunes old checkpoints, a checkpoint is never deleted
or replaced in place, and resume "latest" only ever picks a complete one."""

import json
import os
import shutil

import pytest
from train_testing import tiny_config

from r1fast.train_state import MANIFEST, is_complete_checkpoint, latest_checkpoint, prune_checkpoints


def _fake_checkpoint(run_dir, step, *, manifest=True, ranks=2):
    """A step_<step> directory with a model file, train_state.pt, `ranks` RNG files and (optionally) a manifest."""
    path = run_dir / "checkpoints" / f"step_{step}"
    (path / "model").mkdir(parents=True)
    names = ["train_state.pt", "model/model.safetensors", *[f"rng_rank{r}.pt" for r in range(ranks)]]
    for i, name in enumerate(names):
        (path / name).write_bytes(b"x" * (i + 1))
    if manifest:
        files = {name: i + 1 for i, name in enumerate(names)}
        (path / MANIFEST).write_text(json.dumps({"step": step, "world_size": ranks, "files": files}))
    return path


def _steps(run_dir):
    return sorted(os.listdir(run_dir / "checkpoints"))


def test_latest_passes_over_partial_checkpoints_and_trash(tmp_path):
    """A step_<N> missing a rank's RNG file, one with a truncated file, a manifest-less one without
    train_state.pt (rmtree killed halfway, as the old save did) and a step_<N>.old are all skipped."""
    _fake_checkpoint(tmp_path, 10)
    assert latest_checkpoint(str(tmp_path)).endswith("step_10")
    (_fake_checkpoint(tmp_path, 20) / "rng_rank1.pt").unlink()
    (_fake_checkpoint(tmp_path, 30) / "model" / "model.safetensors").write_bytes(b"")  # truncated
    (_fake_checkpoint(tmp_path, 40, manifest=False) / "train_state.pt").unlink()
    old = _fake_checkpoint(tmp_path, 50)
    old.rename(str(old) + ".old")
    assert latest_checkpoint(str(tmp_path)).endswith("step_10")
    (tmp_path / "checkpoints" / "step_10" / MANIFEST).write_text("{")  # torn manifest
    assert latest_checkpoint(str(tmp_path)) is None
    assert is_complete_checkpoint(str(_fake_checkpoint(tmp_path, 60, manifest=False)))  # written before manifests


def test_prune_keeps_the_newest_and_the_one_just_written(tmp_path):
    for step in (0, 5, 10, 20):
        _fake_checkpoint(tmp_path, step)
    (_fake_checkpoint(tmp_path, 30) / "train_state.pt").unlink()  # incomplete: not counted, not deleted
    assert prune_checkpoints(str(tmp_path), 0, keep=str(tmp_path / "checkpoints" / "step_5")) == []
    # a run resumed from step_5 just wrote it again: kept beside the newest two
    deleted = prune_checkpoints(str(tmp_path), 2, keep=str(tmp_path / "checkpoints" / "step_5"))
    assert sorted(os.path.basename(p) for p in deleted) == ["step_0"]
    assert _steps(tmp_path) == ["step_10", "step_20", "step_30", "step_5"]


def test_keep_last_prunes_periodic_checkpoints_and_resume_latest_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast.train import run

    common = ("--train.name", "keep", "--train.checkpoint_every", "1", "--train.keep_last", "2",
              "--train.sft_steps", "0")
    run(tiny_config(tmp_path, "--train.steps", "4", *common))
    run_dir = tmp_path / "keep"
    assert _steps(run_dir) == ["step_3", "step_4"]
    manifest = json.loads((run_dir / "checkpoints" / "step_4" / MANIFEST).read_text())
    assert manifest["world_size"] == 1 and {"train_state.pt", "rng_rank0.pt"} <= manifest["files"].keys()
    summary = run(tiny_config(tmp_path, "--train.steps", "5", "--train.resume", "latest", *common))
    assert summary["steps"] == 5 and _steps(run_dir) == ["step_4", "step_5"]


def test_a_kill_while_replacing_a_checkpoint_never_exposes_a_partial_one(tmp_path, monkeypatch):
    """steps = checkpoint_every: the final save rewrites step_2. A kill while the old copy is deleted (here: the
    deletion raises halfway) leaves step_2 complete and only .old trash, which the next save clears."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast.train import run

    rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        if str(path).endswith("step_2.old") and os.path.exists(path):
            os.remove(os.path.join(path, "train_state.pt"))
            raise KeyboardInterrupt  # what a kill leaves behind; the run stops here
        return rmtree(path, *args, **kwargs)

    common = ("--train.name", "swap", "--train.checkpoint_every", "2", "--train.sft_steps", "0")
    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, "--train.steps", "2", *common))
    run_dir = tmp_path / "swap"
    assert _steps(run_dir) == ["step_2", "step_2.old"]
    assert latest_checkpoint(str(run_dir)).endswith("step_2")
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    summary = run(tiny_config(tmp_path, "--train.steps", "3", "--train.resume", "latest", *common))
    assert summary["steps"] == 3 and _steps(run_dir) == ["step_2", "step_3"]


def test_a_kill_between_the_two_renames_of_a_replaced_checkpoint_keeps_it_resumable(tmp_path, monkeypatch):
    """The final save rewrites step_2 (steps = checkpoint_every) with keep_last 1: step_2 was renamed to
    step_2.old, and a kill before step_2.tmp (complete, manifest written) took its place left no step_<N>:
    'resume latest' found no finished checkpoint and the whole run was lost."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast import train_state
    from r1fast.train import run

    real_replace = os.replace

    def killed_between(src, dst):
        if str(src).endswith("step_2.tmp") and os.path.exists(str(dst) + ".old"):
            raise KeyboardInterrupt  # what a kill leaves behind
        return real_replace(src, dst)

    common = ("--train.name", "gap", "--train.checkpoint_every", "2", "--train.keep_last", "1",
              "--train.sft_steps", "0")
    monkeypatch.setattr(train_state.os, "replace", killed_between)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, "--train.steps", "2", *common))
    monkeypatch.setattr(train_state.os, "replace", real_replace)
    run_dir = tmp_path / "gap"
    assert _steps(run_dir) == ["step_2.old", "step_2.tmp"]
    summary = run(tiny_config(tmp_path, "--train.steps", "3", "--train.resume", "latest", *common))
    assert summary["steps"] == 3 and _steps(run_dir) == ["step_3"]


def test_a_fork_sets_aside_a_later_checkpoint_left_between_its_two_renames(tmp_path, monkeypatch):
    """step_4's replacement killed between its renames (step_4.old, step_4.tmp complete), then a fork from step_2
    killed before its first save: 'resume latest' renamed step_4.tmp into place and continued the abandoned
    branch. The fork now finishes step_4 first and sets it aside with the other later checkpoints."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast import train, train_state

    real_replace, real_step = os.replace, train.Trainer.grpo_step

    def killed_between(src, dst):
        if str(src).endswith("step_4.tmp") and os.path.exists(str(dst) + ".old"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    def killed_in_step_3(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    common = ("--train.name", "fork", "--train.checkpoint_every", "2", "--train.sft_steps", "0")
    monkeypatch.setattr(train_state.os, "replace", killed_between)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(tmp_path, "--train.steps", "4", *common))
    monkeypatch.setattr(train_state.os, "replace", real_replace)
    run_dir = tmp_path / "fork"
    assert _steps(run_dir) == ["step_2", "step_4.old", "step_4.tmp"]
    monkeypatch.setattr(train.Trainer, "grpo_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(tmp_path, "--train.steps", "3", "--train.resume", str(run_dir / "checkpoints" / "step_2"),
                              *common))
    assert latest_checkpoint(str(run_dir)).endswith("step_2")
    (aside,) = [n for n in os.listdir(run_dir / "checkpoints") if n.startswith("abandoned-")]
    assert os.listdir(run_dir / "checkpoints" / aside / "step_4")


def test_a_save_clears_what_a_failed_save_left_before_writing(tmp_path, monkeypatch):
    """A save that died of a full disk left a partial step_<N>.tmp (as big as a checkpoint, nearly); the next save
    of another step wrote its own beside it first and only cleared it afterwards, on a disk that was still full."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    import torch

    from r1fast import train_state
    from r1fast.train import run

    common = ("--train.name", "left", "--train.sft_steps", "0")
    run(tiny_config(tmp_path, "--train.steps", "1", *common))
    stale = tmp_path / "left" / "checkpoints" / "step_7.tmp"
    stale.mkdir()
    (stale / "train_state.pt").write_bytes(b"x" * 1000)
    seen, real_save = [], torch.save

    def save(obj, path, *args, **kwargs):
        seen.append(stale.exists())
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_state.torch, "save", save)
    run(tiny_config(tmp_path, "--train.steps", "2", "--train.resume", "latest", *common))
    assert seen and not any(seen)
