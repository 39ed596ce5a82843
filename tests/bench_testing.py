"""Shared pieces of the benchmark-harness tests: a self-test case family and a case builder."""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from bench.registry import Case, Impl  # noqa: E402

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
