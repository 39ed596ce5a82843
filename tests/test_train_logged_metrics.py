"""What the GRPO loop logs: the KL reference refreshed every grpo.ref_update_steps (KL back to 0), and 2 ranks
logging the loss and gradient norm of 1 rank on the same global batch (AdamW is invariant to the gradient's
scale, so final weights alone, as in test_train.py::test_two_ranks_equal_one_rank, miss a normalizer off by the
world size)."""

import pytest
from train_testing import rl_metrics, run_cli, tiny_config

SHARP = ("--grpo.beta", "0.04", "--rewards.weights", "{length_cosine = 1.0}", "--train.log_every", "1")


def test_the_reference_is_refreshed_every_ref_update_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")
    from r1fast.train import run

    run(tiny_config(tmp_path, *SHARP, "--train.steps", "5", "--train.name", "ref", "--grpo.ref_update_steps", "3",
                    "--train.lr", "1e-2"))
    kl = [r["kl"] for r in rl_metrics(tmp_path / "ref")]
    assert len(kl) == 5, kl
    # steps 0 and 3 start from a fresh copy (after the SFT, then every 3 steps); the others from a moved policy
    assert kl[0] < 1e-7 and kl[3] < 1e-7, kl
    assert kl[2] > 1e-5 and kl[4] > 1e-5, kl


@pytest.mark.dist
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_ranks_log_the_loss_and_gradient_norm_of_one_rank(tmp_path, loss_type):
    runs = []
    for name, nproc in (("one", 1), ("two", 2)):
        done = run_cli(tmp_path, name, nproc, *SHARP, "--train.steps", "1", "--grpo.loss_type", loss_type)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(rl_metrics(tmp_path / name)[0])
    one, two = runs
    assert one["active_tokens"] == two["active_tokens"] > 0
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_frac", "reward_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
