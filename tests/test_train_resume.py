"""Resume and SIGTERM: a resumed run equals an uninterrupted one bit for bit, on 1 and 2 ranks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_testing import TINY, final_weights, rl_metrics, run_cli, tiny_config


def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast import train

    # a KL reference refreshed after the resume point: its weights are state of their own
    base = ["--train.steps", "4", "--train.schedule", "cosine", "--train.warmup_steps", "1",
            "--grpo.beta", "0.04", "--grpo.ref_update_steps", "3"]
    train.run(tiny_config(tmp_path, *base, "--train.name", "straight"))

    # interrupt the second run after its 2nd step as SIGTERM would, then resume it
    original = train.Trainer.grpo_step

    def stop_after_two(self, step):
        out = original(self, step)
        if step == 1:
            self.stop.requested = True
        return out

    monkeypatch.setattr(train.Trainer, "grpo_step", stop_after_two)
    train.run(tiny_config(tmp_path, *base, "--train.name", "resumed"))
    assert not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.setattr(train.Trainer, "grpo_step", original)
    train.run(tiny_config(tmp_path, *base, "--train.name", "resumed", "--train.resume", "latest"))

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, signum, status):
    """SIGTERM, or a Ctrl-C (SIGINT: it raised KeyboardInterrupt inside a collective, with no checkpoint)."""
    env = {**os.environ, "R1FAST_KERNELS": "torch", "OMP_NUM_THREADS": "1", "R1FAST_PROGRESS": "0"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "r1fast.train", *TINY, "--train.out_dir", str(tmp_path), "--train.name", "term",
           "--train.steps", "100000"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"phase": "rl"' in metrics.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]  # an interrupted run, as a killed process: 128 + the signal
    ckpts = os.listdir(tmp_path / "term" / "checkpoints")
    assert len(ckpts) == 1 and not ckpts[0].endswith(".tmp"), ckpts
    assert f"{signal.Signals(signum).name}: checkpoint written" in err


def test_a_second_ctrl_c_interrupts_at_once():
    """The first SIGINT only sets the flag; the handler that was there before is back for the second one."""
    from r1fast.stop_flag import StopFlag

    before = signal.getsignal(signal.SIGINT)
    flag = StopFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler between bytecodes
        assert flag.requested and flag.name == "SIGINT" and flag.exit_status == 130
        assert signal.getsignal(signal.SIGINT) is before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is not flag


@pytest.mark.dist
def test_two_rank_resume_from_a_mid_run_checkpoint_is_exact(tmp_path):
    base = ["--train.steps", "4", "--grpo.beta", "0.04", "--train.schedule", "cosine"]
    a = run_cli(tmp_path, "a", 2, *base, "--train.checkpoint_every", "2")
    assert a.returncode == 0, a.stderr[-3000:]
    mid = tmp_path / "a" / "checkpoints" / "step_2"
    b = run_cli(tmp_path, "b", 2, *base, "--train.resume", str(mid))
    assert b.returncode == 0, b.stderr[-3000:]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_takes_the_learning_rate_and_schedule_of_its_own_config(tmp_path, monkeypatch):
    """A finished 2-step run resumed with --train.steps 4 --train.lr 1e-4: steps 3 and 4 use the new peak
    rate on the new 4-step cosine (the checkpoint's param groups kept 1e-3, and step 3 ran at the old
    schedule's last value)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast.schedule import lr_factor
    from r1fast.train import run

    common = ("--train.name", "relr", "--train.schedule", "cosine", "--train.warmup_steps", "1", "--train.log_every", "1")
    run(tiny_config(tmp_path, "--train.steps", "2", *common))
    run(tiny_config(tmp_path, "--train.steps", "4", "--train.lr", "1e-4", "--train.resume", "latest", *common))
    logged = [m["lr"] for m in rl_metrics(tmp_path / "relr")][-2:]
    expected = [1e-4 * lr_factor(s, warmup_steps=1, total_steps=4, schedule="cosine", min_lr_ratio=0.1) for s in (2, 3)]
    assert logged == pytest.approx(expected, rel=1e-12)


def test_sigterm_during_the_cold_start_sft_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """A SIGTERM in the SFT stops after the current step with a checkpoint (it ran the whole SFT and a GRPO
    step before); resuming finishes the SFT and the run equals an uninterrupted one bit for bit."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast import train

    base = ["--train.steps", "2", "--train.sft_steps", "4"]
    train.run(tiny_config(tmp_path, *base, "--train.name", "straight"))
    real_step, calls = train.Trainer._clip_and_step, []

    def stop_after_two(self):
        calls.append(1)
        if len(calls) == 2:
            self.stop.requested = True
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "_clip_and_step", stop_after_two)
    summary = train.run(tiny_config(tmp_path, *base, "--train.name", "resumed"))
    assert len(calls) == 2 and "eval_before_rl" not in summary
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["step_0"]
    monkeypatch.setattr(train.Trainer, "_clip_and_step", real_step)
    summary = train.run(tiny_config(tmp_path, *base, "--train.name", "resumed", "--train.resume", "latest"))
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["eval_initial"] == straight["eval_initial"] and summary["eval_after_rl"] == straight["eval_after_rl"]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_another_models_checkpoint_is_one_config_error(tmp_path, monkeypatch):
    """An untied model resumed from a tied model's checkpoint raised torch's "Missing optimizer state for
    'model.lm_head.weight'" traceback; the weights' names and shapes are compared first."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast.config import ConfigError
    from r1fast.train import run

    run(tiny_config(tmp_path, "--train.steps", "1", "--train.name", "tied", "--train.sft_steps", "0"))
    ckpt = str(tmp_path / "tied" / "checkpoints" / "step_1")
    for extra, what in ((("--model.tie_word_embeddings", "false"), "lacks model.lm_head.weight"),
                        (("--model.intermediate_size", "96"), "of another shape")):
        with pytest.raises(ConfigError, match=rf"^train\.resume: .*step_1 holds another model's weights .*{what}"):
            run(tiny_config(tmp_path, "--train.steps", "2", "--train.name", "other", "--train.resume", ckpt, *extra))
