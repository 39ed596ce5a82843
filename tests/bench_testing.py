"""Shared pieces of the benchmark-harness tests: a self-test case family and a case builder."""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from bench.registry import Case, Impl  # noqa: E402
from bench.rows import GIB  # noqa: E402

FAMILY = "zz_bench_selftest"
MiB = 2**20


def never_make_inputs():
    raise AssertionError("make_inputs must not be called while listing or collecting cases")


def make_case(name=f"{FAMILY}.copy", **kw):
    """A copy-like case of the self-test family; keyword arguments override its fields."""
    defaults = dict(
        shape={"N": 4096, "dtype": torch.bfloat16},
        make_inputs=never_make_inputs,
        impls=[Impl("r1fast", lambda x: x, ours=True), Impl("torch-eager", lambda x: x)],
        bytes=4096 * 2 * 2,
        ceiling="copy",
    )
    defaults.update(kw)
    return Case(name=name, **defaults)


def install_fake_cuda(monkeypatch, poisoned=None) -> list:
    """CPU stand-ins for the torch.cuda calls the harness makes, and a do_bench that runs fn 16 times.

    Returns the list each do_bench call appends its ``grad_to_none`` to. ``poisoned``, a dict, makes
    ``empty_cache`` raise a CUDA error once ``poisoned["on"]`` is true (a sticky illegal-address error).
    """
    import triton.testing

    props = dict(L2_cache_size=50 * MiB, name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    props |= dict(multi_processor_count=132, total_memory=80 * GIB)

    def empty_cache():
        if poisoned and poisoned.get("on"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    fakes = dict(
        is_available=lambda: True,
        synchronize=lambda *a, **k: None,
        empty_cache=empty_cache,
        memory_allocated=lambda *a: 0,
        max_memory_allocated=lambda *a: 3 * MiB,
        reset_peak_memory_stats=lambda *a: None,
        current_device=lambda: 0,
        mem_get_info=lambda *a: (80 * GIB, 80 * GIB),
        get_device_properties=lambda *a: type("Props", (), props)(),
    )
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    benched = []

    def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        assert return_mode == "median" and rep > warmup > 0
        for _ in range(16):
            for t in grad_to_none or []:
                t.grad = None
            fn()
        benched.append(grad_to_none)
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return benched


def tiny_ceilings(monkeypatch) -> None:
    """Make ``measure_ceilings`` run on CPU in milliseconds (64^3 matmul, 1 MiB copy, a 2 ms timer)."""
    import bench.ceilings

    real = bench.ceilings.measure_ceilings
    monkeypatch.setattr(bench.ceilings, "measure_ceilings",
                        lambda quick=False: real("cpu", quick=quick, timer=lambda fn: 2.0, matmul_n=64, copy_bytes=MiB))
