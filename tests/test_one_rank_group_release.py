"""A run that fails after ``build_mesh`` made its 1-rank process group (bf16 on one process) still releases it:
the group was destroyed only on success, so a later run in the same process (the pipeline's next stage, the
next test) found torch.distributed initialized and failed ("trying to initialize the default process group
twice")."""

import json

import pytest
import torch.distributed as dist
from train_testing import tiny_config

from r1fast.config_io import ConfigError, load_config
from r1fast.data import generate_tasks, worked_solution
from r1fast.parallelize import release_one_rank_group


@pytest.fixture(autouse=True)
def _no_group_left(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")
    assert not dist.is_initialized()
    yield
    release_one_rank_group()  # a failing test leaves no group behind for the tests after it


def test_train_constructor_error_after_build_mesh_releases_the_group(tmp_path, monkeypatch):
    from r1fast import train

    def refuse(*args, **kwargs):
        raise ConfigError("rollout: refused")

    # the rollout engine is built after build_mesh made the bf16 run's 1-rank group (an fp8 request on the dense
    # tiny model, the error this test used, is now refused before the model is built)
    monkeypatch.setattr(train, "Engine", refuse)
    cfg = tiny_config(tmp_path, "--train.name", "late_error", "--model.dtype", "bfloat16", "--parallel.fsdp", "true")
    with pytest.raises(ConfigError, match="rollout: refused"):
        train.run(cfg)
    assert not dist.is_initialized()


def test_sft_error_after_build_mesh_releases_the_group(tmp_path, monkeypatch):
    from r1fast import sft
    from r1fast.sft import SFTConfig, run_sft

    def refuse(*args, **kwargs):
        raise ConfigError("scheduler: refused")

    # the scheduler is built after build_mesh made the bf16 run's 1-rank group (fp8 experts on the dense tiny
    # model, the error this test used, is now refused from the config before the model is built)
    monkeypatch.setattr(sft, "build_scheduler", refuse)

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": s["prompt"], "completion": worked_solution(s)}) + "\n"
                            for s in generate_tasks("addition", 4, seed=0, min_digits=1, max_digits=1)))
    cfg = load_config(None, ["--data", str(data), "--out_dir", str(tmp_path / "runs"), "--template", "compact",
                             "--model.num_layers", "1", "--model.hidden_size", "32", "--model.intermediate_size",
                             "64", "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "64",
                             "--model.dtype", "bfloat16", "--parallel.fsdp", "true",
                             "--steps", "1", "--batch_size", "2"], schema=SFTConfig)
    with pytest.raises(ConfigError, match="scheduler: refused"):
        run_sft(cfg)
    assert not dist.is_initialized()
