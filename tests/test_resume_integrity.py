"""A resumed run reads as if it had never stopped: metrics.jsonl without the rows a crash logged twice, the
data order of its checkpoint (a changed P, n or seed is one ConfigError), a fork's abandoned checkpoints set
aside, a 1-rank checkpoint resumable on 2 ranks, a bad resume path refused before anything is written, and the
non-finite counter carried across the resume."""

import json
import os
import shutil

import pytest
import torch
from train_testing import rl_metrics, run_cli, tiny_config

from r1fast import distributed as D
from r1fast.config import ConfigError
from r1fast.metrics import read_metrics, trim_metrics

BASE = ("--train.name", "r", "--train.sft_steps", "0", "--train.log_every", "1")


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """Every test trains (or reads a checkpoint) with the PyTorch kernels."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One 4-step run with checkpoints step_2 and step_4, copied by the tests that change it (2 s on one core)."""
    out = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R1FAST_KERNELS", "torch")
        from r1fast.train import run

        run(tiny_config(out, *BASE, "--train.steps", "4", "--train.checkpoint_every", "2"))
    return out / "r"


def _copy(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "r")
    return tmp_path / "r"


def test_a_crash_between_checkpoints_logs_every_step_once(tmp_path, monkeypatch):
    """Killed in step 4 after step_2's checkpoint, resumed: rl rows read 1, 2, 3, 3, 4 and eval step_3 twice;
    resuming the finished run again logged a second after_rl row."""
    from r1fast import train

    cfg = ("--train.steps", "4", "--train.checkpoint_every", "2", "--train.eval_every", "1", *BASE)
    original = train.Trainer.grpo_step

    def crash_in_step_4(self, step):
        if step == 3:
            raise MemoryError("simulated crash")  # steps 1-3 are logged, the last checkpoint is step_2
        return original(self, step)

    monkeypatch.setattr(train.Trainer, "grpo_step", crash_in_step_4)
    with pytest.raises(MemoryError):
        train.run(tiny_config(tmp_path, *cfg))
    monkeypatch.setattr(train.Trainer, "grpo_step", original)
    train.run(tiny_config(tmp_path, *cfg, "--train.resume", "latest"))
    assert [m["step"] for m in rl_metrics(tmp_path / "r")] == [1, 2, 3, 4]
    tags = [m["tag"] for m in read_metrics(str(tmp_path / "r")) if m["phase"] == "eval"]
    assert tags == ["before_rl", "step_1", "step_2", "step_3", "after_rl"]

    train.run(tiny_config(tmp_path, *cfg[2:], "--train.steps", "5", "--train.resume", "latest"))  # extend it
    assert [m["step"] for m in rl_metrics(tmp_path / "r")] == [1, 2, 3, 4, 5]
    tags = [m["tag"] for m in read_metrics(str(tmp_path / "r")) if m["phase"] == "eval"]
    assert tags == ["before_rl", "step_1", "step_2", "step_3", "after_rl"]
    assert [m["step"] for m in read_metrics(str(tmp_path / "r")) if m.get("tag") == "after_rl"] == [5]


def test_trim_metrics_for_a_mid_sft_checkpoint_and_a_torn_tail(tmp_path):
    rows = [{"step": 0, "phase": "eval", "tag": "initial"}, {"step": 0, "phase": "sft"}, {"step": 1, "phase": "sft"},
            {"step": 2, "phase": "sft"}, {"step": 3, "phase": "sft"}, {"step": 0, "phase": "eval", "tag": "before_rl"},
            {"step": 1, "phase": "rl"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 2, "pha')  # a crash cut the last line short
    aside = tmp_path / "aside.jsonl"
    assert trim_metrics(str(tmp_path), 0, sft_step=2, keep_dropped=str(aside)) == 4  # SFT 2, 3, before_rl, rl 1 go
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])
    assert aside.read_text() == "".join(json.dumps(r) + "\n" for r in rows[3:])  # the torn line is not a record
    assert trim_metrics(str(tmp_path / "absent"), 3) == 0 and not (tmp_path / "absent").exists()


def test_resume_with_another_data_order_is_one_config_error(base_run, tmp_path):
    """P 4 -> 8 at step 4 made the position 4*8 = 32 of the 64-prompt stream instead of 16: 16 prompts of
    epoch 0 were never drawn. Changing lr and steps stays allowed (a user extends a run)."""
    from r1fast.train import run

    run_dir = _copy(base_run, tmp_path)
    config_before = (run_dir / "config.toml").read_text()
    changed = ("--grpo.prompts_per_step", "8", "--data.seed", "3", "--grpo.micro_batch_size", "8")
    with pytest.raises(ConfigError, match=r"^train\.resume: .*step_4 was trained on another data order "
                                          r"\(data\.seed: 0 in the checkpoint, 3 now; grpo\.prompts_per_step: 4 "
                                          r"in the checkpoint, 8 now\); the resumed run would skip or repeat"):
        run(tiny_config(tmp_path, *BASE, "--train.steps", "6", "--train.resume", "latest", *changed))
    assert (run_dir / "config.toml").read_text() == config_before  # the refused resume wrote nothing
    summary = run(tiny_config(tmp_path, *BASE, "--train.steps", "5", "--train.lr", "5e-4", "--train.resume", "latest"))
    assert summary["steps"] == 5


def test_check_data_order_compares_the_sft_keys_only_mid_sft_and_accepts_old_checkpoints(capsys):
    from r1fast.train_checks import check_data_order

    saved = {"rl": {"grpo.prompts_per_step": 4}, "sft": {"train.sft_batch_size": 4, "train.seed": 0}}
    now = {"rl": {"grpo.prompts_per_step": 4}, "sft": {"train.sft_batch_size": 8, "train.seed": 0}}
    check_data_order("ck", {"data_order": saved}, now)  # after the SFT its batch size decides nothing
    with pytest.raises(ConfigError, match=r"train\.sft_batch_size: 4 in the checkpoint, 8 now\)"):
        check_data_order("ck", {"data_order": saved, "sft_step": 1}, now)
    check_data_order("ck", {}, now)  # a checkpoint from before fingerprints: accepted with one line
    assert capsys.readouterr().err.count("predates data-order fingerprints") == 1


def test_a_fork_sets_the_abandoned_checkpoints_aside(base_run, tmp_path, capsys):
    """Resumed from step_2 with keep_last 1: pruning kept the abandoned run's step_4 beside the fork's step_3,
    and 'resume latest' then continued the abandoned run."""
    from r1fast.train import run
    from r1fast.train_state import latest_checkpoint

    run_dir = _copy(base_run, tmp_path)
    step2 = str(run_dir / "checkpoints" / "step_2")
    run(tiny_config(tmp_path, *BASE, "--train.steps", "3", "--train.keep_last", "1", "--train.resume", step2))
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names[1:] == ["step_3"] and names[0].startswith("abandoned-"), names
    aside = run_dir / "checkpoints" / names[0]
    assert sorted(os.listdir(aside)) == ["metrics.jsonl", "step_4"]  # moved, not deleted
    assert latest_checkpoint(str(run_dir)).endswith("step_3")
    assert capsys.readouterr().err.count("moved its later checkpoints (step_4)") == 1
    assert [m["step"] for m in rl_metrics(run_dir)] == [1, 2, 3]
    assert [m["step"] for m in rl_metrics(aside)] == [3, 4]  # the abandoned branch's records, kept beside it


def test_a_fork_from_a_checkpoint_outside_the_run_directory_sets_its_later_checkpoints_aside(base_run, tmp_path):
    """The run directory copied (cp -r base b) and resumed from the original's step_2: b's own step_4, from the
    branch the fork abandons, stayed beside the fork's step_3 (so 'resume latest' continued the abandoned
    branch), while its metrics rows 3 and 4 were trimmed and lost."""
    from r1fast.train import run
    from r1fast.train_state import latest_checkpoint

    run_dir = _copy(base_run, tmp_path)
    run(tiny_config(tmp_path, *BASE, "--train.steps", "3", "--train.resume", str(base_run / "checkpoints" / "step_2")))
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names[1:] == ["step_2", "step_3"] and names[0].startswith("abandoned-"), names
    assert latest_checkpoint(str(run_dir)).endswith("step_3")
    assert [m["step"] for m in rl_metrics(run_dir)] == [1, 2, 3]
    assert [m["step"] for m in rl_metrics(run_dir / "checkpoints" / names[0])] == [3, 4]


def test_ranks_the_saving_run_lacked_get_a_deterministic_rng_state_of_their_own(base_run, monkeypatch):
    from r1fast.train_state import _restore_rng, saved_world_size

    ckpt = str(base_run / "checkpoints" / "step_2")
    assert saved_world_size(ckpt) == 1
    monkeypatch.setattr(D, "world_size", lambda: 3)
    states = {}
    for rank in (0, 1, 2, 1):
        monkeypatch.setattr(D, "rank", lambda rank=rank: rank)
        _restore_rng(ckpt)
        states.setdefault(rank, []).append(torch.get_rng_state())
    assert torch.equal(states[0][0], torch.load(os.path.join(ckpt, "rng_rank0.pt"), weights_only=False)["torch"])
    assert torch.equal(states[1][0], states[1][1])  # the same on every resume
    assert not torch.equal(states[1][0], states[2][0]) and not torch.equal(states[1][0], states[0][0])


@pytest.mark.dist
def test_a_one_rank_checkpoint_resumes_on_two_ranks(base_run, tmp_path):
    """Rank 1 alone raised 'rng_rank1.pt: written by a run with fewer ranks'; rank 0 died in gloo."""
    two = run_cli(tmp_path, "two", 2, *BASE[2:], "--train.steps", "3",
                  "--train.resume", str(base_run / "checkpoints" / "step_2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "written by 1 rank(s), resumed on 2" in two.stderr
    assert [m["step"] for m in rl_metrics(tmp_path / "two")] == [3]


def test_a_bad_resume_path_is_refused_before_anything_is_written(base_run, tmp_path):
    from r1fast.train import run
    from r1fast.train_checks import resolve_resume

    step2 = base_run / "checkpoints" / "step_2"
    with pytest.raises(ConfigError, match=r"is a file, not a checkpoint directory; pass its checkpoint directory"):
        run(tiny_config(tmp_path, "--train.name", "x", "--train.resume", str(step2 / "train_state.pt")))
    assert not (tmp_path / "x").exists()  # no config.toml, no empty metrics.jsonl for a next run to set aside
    with pytest.raises(ConfigError, match=r"is a run directory, not a checkpoint: pass 'latest' .*step_2, step_4"):
        resolve_resume(str(base_run), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .* does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), str(tmp_path / "x"))
    cut = tmp_path / "cut"
    shutil.copytree(step2, cut)
    with open(cut / "train_state.pt", "r+b") as f:  # a disk that filled up mid-write
        f.truncate(1000)
    with pytest.raises(ConfigError, match=r"is incomplete .*complete\.json"):
        resolve_resume(str(cut), str(tmp_path / "x"))
    assert resolve_resume(str(step2), str(tmp_path / "x")) == str(step2)


def test_the_non_finite_counter_survives_a_resume(tmp_path, monkeypatch):
    """Two non-finite steps, SIGTERM, resume, a third one: "3 in a row, then abort" restarted from 0."""
    from r1fast import train

    original = train.Trainer.grpo_step

    def non_finite(self, step):
        out = original(self, step)
        out["skipped_nonfinite"] = True
        if step == 1:
            self.stop.requested = True
        return out

    monkeypatch.setattr(train.Trainer, "grpo_step", non_finite)
    assert train.run(tiny_config(tmp_path, *BASE, "--train.steps", "5"))["exit_status"] == 143
    with pytest.raises(RuntimeError, match=r"^3 non-finite losses or gradients in a row at step 3"):
        train.run(tiny_config(tmp_path, *BASE, "--train.steps", "5", "--train.resume", "latest"))


class _Payload:
    """A pickle that runs code when loaded with weights_only=False (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["train_state.pt", "rng_rank0.pt"])
def test_a_crafted_checkpoint_cannot_run_code_on_resume(base_run, tmp_path, name):
    """train_state.pt and rng_rank*.pt were unpickled with weights_only=False: a downloaded run directory ran
    a shell command on --train.resume (the probe's marker appeared)."""
    import pickle

    from r1fast.train import run
    from r1fast.train_state import MANIFEST

    run_dir = _copy(base_run, tmp_path)
    marker = tmp_path / "pwned"
    step = run_dir / "checkpoints" / "step_4"
    torch.save({"payload": _Payload(str(marker))}, step / name)
    manifest = json.loads((step / MANIFEST).read_text())  # the attacker keeps the checkpoint "complete"
    manifest["files"][name] = os.path.getsize(step / name)
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):
        run(tiny_config(tmp_path, *BASE, "--train.steps", "5", "--train.resume", "latest"))
    assert not marker.exists()


def test_rng_files_from_before_the_tensor_format_still_load(tmp_path):
    """rng_rank*.pt held numpy's state as an ndarray: loaded with numpy's array reconstruction allowed, only."""
    import random

    import numpy as np

    from r1fast.train_state import _load_rng, _set_rng_state

    np.random.seed(7)
    old = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(), "cuda": None}
    torch.save(old, tmp_path / "rng_rank0.pt")
    expected = np.random.rand(3)
    np.random.seed(8)
    _set_rng_state(_load_rng(str(tmp_path / "rng_rank0.pt")))
    assert np.array_equal(np.random.rand(3), expected)
