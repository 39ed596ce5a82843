"""Process-group setup and rank helpers (torchrun env vars; NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group torchrun describes (or run as a single process without one).

    ``backend``: "auto" picks NCCL when CUDA is available and gloo otherwise. ``timeout_s``: how long a
    collective waits for the other ranks (``parallel.timeout_s``). Raises ConfigError on every rank when the
    nodes run different numbers of processes (see ``check_same_local_world``), and for "nccl" without CUDA.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and not cuda:  # init_process_group's device_id then failed with a traceback per rank
        from r1fast.config_io import ConfigError

        raise ConfigError("parallel.backend=nccl needs CUDA GPUs and torch sees none here; use gloo (or auto)")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        check_same_local_world(local_world)
    return DistInfo(rank, world_size, local_rank, local_world, device)


def check_same_local_world(local_world: int) -> None:
    """ConfigError on every rank unless every rank has the same LOCAL_WORLD_SIZE (``--nproc_per_node``).

    The HSDP mesh (``parallelize.build_mesh``) is cut from each rank's own local world size: with nodes of 2
    and 1 processes, node 0 built a 1-D mesh of 3 and node 1 a (3, 1) mesh, and the ranks then ran different
    collectives and hung until the 1800 s timeout. An error rather than a 1-D mesh on every rank: that mesh
    shards each parameter across nodes, so every FSDP all-gather and reduce-scatter would cross the
    inter-node network (~18x less bandwidth than NVLink on H100 nodes: 50 vs 900 GB/s per GPU), and unequal
    nodes are in practice a launch-command slip. The all-gather runs once, at init, on every rank."""
    sizes = all_gather_object(local_world)
    if len(set(sizes)) > 1:
        from r1fast.config_io import ConfigError

        per_node = []  # ranks are numbered node by node: one entry per run of equal local sizes
        r = 0
        while r < len(sizes):
            per_node.append(sizes[r])
            r += max(sizes[r], 1)
        # every rank is here (after the all-gather): leave the group together, else gloo's teardown at exit
        # aborted some ranks (SIGABRT, "terminate called without an active exception") after the message
        shutdown()
        raise ConfigError(f"every node must run the same number of processes (torchrun --nproc_per_node): the "
                          f"nodes run {', '.join(map(str, per_node))} (LOCAL_WORLD_SIZE of ranks 0..{len(sizes) - 1}: "
                          f"{sizes})")


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL reduces CUDA tensors only ("No backend type associated with
    device type cpu"), so a host tensor goes through the rank's current CUDA device; gloo takes it as it is."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = collective_device(t)
        if device == t.device:
            dist.all_reduce(t, op=op)
        else:  # host bookkeeping (reward means, lengths, eval counts) under NCCL: a round trip, in place
            staged = t.to(device)
            dist.all_reduce(staged, op=op)
            t.copy_(staged)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op on one process; a CPU tensor under NCCL goes through the GPU)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``t`` over ranks in place, as ``all_reduce_sum``."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
