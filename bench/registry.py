"""The benchmark registry: each kernel file's cases live in ``bench/cases/<op>.py`` and register here.

A case generator is a function ``fn(quick: bool) -> Iterable[Case]`` decorated with
``@register("family")``. Each ``Case`` is one shape: r1fast's implementation plus every peer, timed
in the same run by ``bench/run.py`` on fresh inputs from ``make_inputs`` (called several times so
the rotating input sets exceed L2), with its floor given as FLOPs or bytes so results are ratios.

    from bench.registry import Case, Impl, register

    @register("grpo_loss")
    def cases(quick):
        yield Case(
            name="grpo_loss.fwd_bwd",
            shape={"N": 16384, "H": 3584, "V": 152064, "dtype": "bf16"},
            make_inputs=lambda: (...),             # fresh random tensors on CUDA
            impls=[Impl("r1fast", ours_fn, ours=True), Impl("torch-eager", eager_fn)],
            flops=6 * N * H * V,                   # or bytes=... for bandwidth-bound ops
            ceiling="bf16_matmul",                 # which measured device ceiling is the floor
        )

``Impl.fn(*inputs)`` runs one call; an Impl whose ``available()`` returns a string is reported as
skipped with that reason (e.g. "liger-kernel not installed") rather than failing the case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

CEILINGS = ("copy", "bf16_matmul", "fp8_matmul")


@dataclass
class Impl:
    """One implementation timed in a case."""

    name: str
    """Label in the results table, e.g. "r1fast", "torch-eager", "liger-fused"."""
    fn: Callable[..., Any]
    """Runs one call on one input set: ``fn(*inputs)``."""
    ours: bool = False
    """True for r1fast's own implementation (the row ratios are reported for)."""
    available: Callable[[], str | None] = lambda: None
    """Returns None when runnable, else the reason it is skipped (peer not importable, ...)."""


@dataclass
class Case:
    """One benchmark shape with all implementations that are timed against each other."""

    name: str
    """Dotted name, "<family>.<what>[.<shape tag>]"; ``--only`` matches by prefix or substring."""
    shape: dict
    """The sizes and dtype, recorded verbatim in the results."""
    make_inputs: Callable[[], tuple]
    """Builds one fresh random input set on the device."""
    impls: list[Impl]
    """r1fast first, then the peers."""
    flops: float | None = None
    """Useful floating-point operations of one call (for TFLOP/s and the FLOP floor)."""
    bytes: float | None = None
    """Minimum bytes one call must move (for GB/s and the byte floor)."""
    ceiling: str = "bf16_matmul"
    """Which device ceiling gives the floor: one of CEILINGS."""
    quick: bool = True
    """Included in ``--quick`` runs."""
    notes: str = ""
    """Free text carried into the results (e.g. what "extra memory" counts)."""
    input_bytes: float | None = None
    """Bytes of one input set, so the harness can rotate enough sets to defeat L2; None = measure."""
    extra: dict = field(default_factory=dict)
    """Case-specific numbers recorded with the results."""
    rates: dict = field(default_factory=dict)
    """Amounts one call produces, printed per second beside the timing: ``{"tokens": 131072}`` gives
    tokens/s, ``{"effective GB": 1.6}`` effective GB/s (what the issues' targets are stated in)."""
    est_call_s: dict = field(default_factory=dict)
    """Estimated seconds of one call per implementation name, for the run's time plan (bench/plan.py);
    an implementation not named here is estimated from the case's floor. Say in the case file where the
    numbers come from (ANCHORS.md rows, or "a guess")."""
    est_setup_s: float = 0.0
    """Estimated seconds to build the case's first input set (e.g. building a 1.5B model)."""


_REGISTRY: dict[str, Callable[[bool], Iterable[Case]]] = {}
_RELEASE: dict[str, Callable[[], None]] = {}


def register(family: str, release: Callable[[], None] | None = None):
    """Register a case generator under ``family`` (one per kernel file).

    ``release`` drops what the family's cases cache between cases (built models): ``bench/run.py``
    calls it after the family's last case, so e.g. two bf16 1.5B models (~6.2 GB) do not stay
    resident through the families timed after it.
    """

    def deco(fn):
        if family in _REGISTRY:
            raise ValueError(f"benchmark family {family!r} registered twice")
        _REGISTRY[family] = fn
        if release is not None:
            _RELEASE[family] = release
        return fn

    return deco


def release(family: str) -> None:
    """Call ``family``'s release hook, if it registered one."""
    hook = _RELEASE.get(family)
    if hook is not None:
        hook()


def families(errors: list[dict] | None = None) -> dict[str, Callable[[bool], Iterable[Case]]]:
    """All registered families, importing every module under bench/cases first.

    With ``errors`` given, a case module that fails to import is recorded there
    (``{"where": ..., "error": ...}``) and the others still load; without it the import error is raised.
    """
    import importlib
    import pkgutil

    from bench import cases

    for info in pkgutil.iter_modules(cases.__path__):
        try:
            importlib.import_module(f"bench.cases.{info.name}")
        except Exception as exc:
            if errors is None:
                raise
            errors.append({"where": f"bench/cases/{info.name}.py", "error": f"import failed: {type(exc).__name__}: {exc}"})
    return dict(_REGISTRY)
