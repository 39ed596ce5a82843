"""Multi-node launch mistakes fail at startup with one clear error on every rank, instead of a hang until the
collective timeout (nodes with different --nproc_per_node) or a crash in the first save after the whole run
(a train.out_dir the nodes do not share). Ranks are real gloo processes given the environment torchrun sets."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from r1fast import distributed as D

_RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    from r1fast import distributed as D, train_checks
    from r1fast.config import ConfigError, load_config
    from r1fast.train_checks import check_shared_run_dir

    train_checks.SHARED_DIR_WAIT_S = 0.5  # one filesystem: the marker is there at once

    try:
        D.init_distributed("gloo", timeout_s=60)
        out_dir = os.environ["TEST_OUT_DIR"]
        check_shared_run_dir(load_config(None, ["--train.out_dir", out_dir]), os.path.join(out_dir, "run"))
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        sys.exit(2)
    D.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(local_world_sizes, out_dirs):
    """One process per rank with torchrun's variables; returns [(returncode, stderr)] in rank order."""
    port, world = _free_port(), len(local_world_sizes)
    procs = []
    for rank, (local_world, out_dir) in enumerate(zip(local_world_sizes, out_dirs, strict=True)):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(local_world),
               "OMP_NUM_THREADS": "1", "TEST_OUT_DIR": str(out_dir)}
        env.pop("TRITON_INTERPRET", None)
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], env=env, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


@pytest.mark.dist
def test_nodes_with_different_process_counts_fail_at_init_on_every_rank(tmp_path):
    """2 + 1 processes: each rank built its mesh from its own LOCAL_WORLD_SIZE (1-D on node 0, (3, 1) HSDP on
    node 1) and the ranks hung in different collectives for the 1800 s timeout."""
    results = _launch([2, 2, 1], [tmp_path] * 3)
    for rc, err in results:
        assert rc == 2, err[-2000:]
        assert "every node must run the same number of processes" in err and "the nodes run 2, 1" in err, err


@pytest.mark.dist
def test_a_run_directory_the_ranks_do_not_share_fails_at_startup(tmp_path):
    """Per-node local disks: rank 1 does not see what rank 0 writes. One directory for all: no error, and the
    marker is gone afterwards."""
    results = _launch([1, 1], [tmp_path / "node0", tmp_path / "node1"])
    for rc, err in results:
        assert rc == 2, err[-2000:]
        assert f"train.out_dir='{tmp_path / 'node0'}'" in err or f"train.out_dir='{tmp_path / 'node1'}'" in err, err
        assert "must be a directory all nodes share" in err and "rank(s) 1 do not see" in err, err
    results = _launch([1, 1], [tmp_path / "shared"] * 2)
    assert [rc for rc, _ in results] == [0, 0], results
    assert os.listdir(tmp_path / "shared" / "run") == []


def test_one_process_skips_both_checks(tmp_path):
    D.check_same_local_world(1)  # no process group: nothing to compare
    from r1fast.config import load_config
    from r1fast.train_checks import check_shared_run_dir

    check_shared_run_dir(load_config(None, ["--train.out_dir", str(tmp_path)]), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_train_passes_parallel_timeout_to_the_process_group(monkeypatch):
    from r1fast import train
    from r1fast.config import load_config

    seen = {}

    def capture(backend, timeout_s):
        seen.update(backend=backend, timeout_s=timeout_s)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train.D, "init_distributed", capture)
    with pytest.raises(RuntimeError, match="stop here"):
        train.run(load_config(None, ["--parallel.timeout_s", "90"]))
    assert seen == {"backend": "auto", "timeout_s": 90.0}


class _FakeNcclGroup:
    """``torch.distributed`` as a 2-rank NCCL group sees it, recording the tensors the collectives get."""

    ReduceOp = __import__("torch").distributed.ReduceOp

    def __init__(self):
        self.seen = []

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_backend(self):
        return "nccl"

    def all_reduce(self, t, op):
        self.seen.append(t)
        if op == self.ReduceOp.SUM:
            t.mul_(2)  # the other rank holds the same values; their max is the values themselves


def test_host_tensors_under_nccl_go_through_the_gpu(monkeypatch):
    """NCCL refuses CPU tensors ("No backend type associated with device type cpu"): the reward means, response
    lengths, eval counts and generated-token totals are host tensors, so a multi-GPU run died at its first
    rollout. They are staged on the rank's CUDA device and copied back in place."""
    import torch

    fake = _FakeNcclGroup()
    monkeypatch.setattr(D, "dist", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    host = torch.tensor([1.0, 2.0])
    assert D.collective_device(host) == torch.device("cuda", 3)  # only a device object: no GPU needed here
    staged = torch.device("cpu", 0)  # a device unequal to host.device that this CPU machine can allocate on
    monkeypatch.setattr(D, "collective_device", lambda t: staged)
    assert D.all_reduce_sum(host) is host and host.tolist() == [2.0, 4.0]
    assert fake.seen[0] is not host  # reduced on the staged copy, then copied back
    D.all_reduce_max(host)
    assert host.tolist() == [2.0, 4.0] and len(fake.seen) == 2 and fake.seen[1] is not host
    monkeypatch.setattr(D, "collective_device", lambda t: t.device)  # gloo, or a CUDA tensor: in place
    D.all_reduce_sum(host)
    assert fake.seen[-1] is host


def test_nccl_without_cuda_is_one_config_line(monkeypatch, capsys):
    """--parallel.backend nccl on a CPU machine under torchrun: init_process_group's device_id traceback on
    every rank, now one ConfigError line (each rank knows it alone: no collective has run yet)."""
    import r1fast.train as T

    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: False)
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert T.main(["--parallel.backend", "nccl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["r1fast.train: error: parallel.backend=nccl needs CUDA GPUs and torch sees none here; use gloo "
                   "(or auto)"]
