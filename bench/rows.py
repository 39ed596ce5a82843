"""Pure result arithmetic for ``bench/run.py``: floors, per-implementation rows, ``--only`` matching.

Nothing here touches a GPU, so every number the harness reports can be checked on CPU with fake
timings (tests/test_bench_rows.py). Units: times in milliseconds, ceilings in TFLOP/s (matmul ceilings)
or GB/s (the ``copy`` ceiling), memory in bytes in, GiB out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bench.registry import CEILINGS

GIB = 2**30
STATUSES = ("ok", "skipped", "error")


@dataclass
class ImplResult:
    """What timing one implementation of one case produced."""

    name: str
    ours: bool
    status: str
    """"ok" (timed), "skipped" (a peer unavailable or raising ImportError, OOM, NotImplementedError) or
    "error" (anything else, and every exception of r1fast's own implementation)."""
    ms: float | None = None
    """Median time of one call in milliseconds (status "ok" only)."""
    extra_bytes: int | None = None
    """Peak memory one call allocated beyond what existed before it (inputs included in the base)."""
    reason: str = ""
    """Why it was skipped or what it raised."""
    timing: str = ""
    """How ``ms`` was taken, e.g. "median of 3 direct calls" (see bench/timing.py ``timing_plan``)."""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok" and (self.ms is None or not self.ms > 0):
            raise ValueError(f"ms must be a positive time for a timed implementation, got {self.ms!r}")


def matches_only(name: str, patterns: Iterable[str] | None) -> bool:
    """``--only`` rule: no patterns selects everything; otherwise a prefix or substring match of any."""
    patterns = [p for p in (patterns or []) if p]
    if not patterns:
        return True
    return any(name.startswith(p) or p in name for p in patterns)


def validate_case(case) -> None:
    """Raise ``ValueError`` naming the field when a registered case cannot be timed or floored."""
    if not getattr(case, "name", ""):
        raise ValueError("case.name must be a non-empty dotted name")
    if not case.impls:
        raise ValueError(f"case {case.name!r}: impls must list at least one implementation")
    if sum(1 for impl in case.impls if impl.ours) > 1:
        raise ValueError(f"case {case.name!r}: impls has more than one implementation with ours=True")
    names = [impl.name for impl in case.impls]
    if len(set(names)) != len(names):
        raise ValueError(f"case {case.name!r}: impls names repeat: {names}")
    if case.ceiling not in CEILINGS:
        raise ValueError(f"case {case.name!r}: ceiling must be one of {CEILINGS}, got {case.ceiling!r}")
    if case.ceiling == "copy" and case.bytes is None:
        raise ValueError(f"case {case.name!r}: ceiling='copy' needs bytes= (the bytes one call must move)")
    unknown = set(case.est_call_s) - set(names)
    if unknown:
        raise ValueError(f"case {case.name!r}: est_call_s names no implementation: {sorted(unknown)}")
    for field in ("flops", "bytes", "input_bytes"):
        value = getattr(case, field)
        if value is not None and not value > 0:
            raise ValueError(f"case {case.name!r}: {field} must be positive or None, got {value!r}")


def floor_ms(
    flops: float | None, bytes_: float | None, ceiling: str, ceilings: Mapping[str, float | None]
) -> float | None:
    """The time one call cannot beat on this device, in ms: a roofline over what the case states.

    ``flops`` is floored by the case's matmul ceiling (TFLOP/s), ``bytes_`` by the ``copy`` ceiling
    (GB/s); with both, the larger bound wins. None when the case states neither, or a ceiling it
    needs was not measured (so a missing ceiling never yields a flattering ratio).
    """
    bounds = []
    if flops is not None and ceiling != "copy":
        tflops = ceilings.get(ceiling)
        if not tflops:
            return None
        bounds.append(flops / (tflops * 1e12) * 1e3)
    if bytes_ is not None:
        gbps = ceilings.get("copy")
        if not gbps:
            return None
        bounds.append(bytes_ / (gbps * 1e9) * 1e3)
    return max(bounds) if bounds else None


def impl_rows(
    results: list[ImplResult], *, flops: float | None, bytes_: float | None, floor: float | None,
    rates: Mapping[str, float] | None = None,
) -> list[dict]:
    """One row per implementation: ms, TFLOP/s, GB/s, the case's ``rates`` per second (``"tokens/s"``),
    x floor, x fastest peer, extra GiB.

    ``x_fastest_peer`` is ``ms / ms of the fastest timed peer`` (non-ours implementation); for
    r1fast's row that is the headline "time_ours / time_fastest_peer".
    """
    peer_times = [r.ms for r in results if not r.ours and r.status == "ok"]
    fastest_peer = min(peer_times) if peer_times else None
    rows = []
    for r in results:
        timed = r.status == "ok"
        rows.append(
            {
                "impl": r.name,
                "ours": r.ours,
                "status": r.status,
                "reason": r.reason,
                "timing": r.timing if timed else "",
                "ms": r.ms if timed else None,
                "tflops": flops / (r.ms * 1e-3) / 1e12 if timed and flops is not None else None,
                "gbps": bytes_ / (r.ms * 1e-3) / 1e9 if timed and bytes_ is not None else None,
                "rates": {f"{unit}/s": amount / (r.ms * 1e-3) for unit, amount in (rates or {}).items()}
                if timed else {},
                "x_floor": r.ms / floor if timed and floor else None,
                "x_fastest_peer": r.ms / fastest_peer if timed and fastest_peer else None,
                "extra_gib": r.extra_bytes / GIB if timed and r.extra_bytes is not None else None,
            }
        )
    return rows


def ceiling_values(ceilings: Mapping[str, Mapping] | None) -> dict[str, float | None]:
    """``{name: value}`` from the measured ceilings report (see bench/ceilings.py)."""
    return {name: entry.get("value") for name, entry in (ceilings or {}).items()}


# ---- text formatting shared by the rich tables and the markdown file -----------------------------

DASH = "—"


def fmt_num(value: float | None) -> str:
    """Three significant digits for mid-size numbers, thousands separators for large ones."""
    if value is None:
        return DASH
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ms(ms: float | None) -> str:
    """Milliseconds: enough digits that a 5 us kernel and a 1 s step both read sensibly."""
    if ms is None:
        return DASH
    if ms < 0.1:
        return f"{ms:.4f}"
    if ms < 10:
        return f"{ms:.3f}"
    return fmt_num(ms)


def fmt_ratio(ratio: float | None) -> str:
    return DASH if ratio is None else f"{ratio:.2f}×"


def fmt_gib(gib: float | None) -> str:
    return DASH if gib is None else f"{gib:.2f}"


def fmt_floor_ratio(ratio: float | None) -> str:
    """``2.00× (50%)``: time over the floor, and the share of the roofline (MFU for a FLOP floor)."""
    return DASH if ratio is None else f"{fmt_ratio(ratio)} ({100 / ratio:.0f}%)"


def fmt_peer_ratio(ratio: float | None) -> str:
    """Time over the fastest peer's; below 1 also as a speedup (``0.08× (12.5× faster)``), which is how
    the issues state their targets."""
    if ratio is None:
        return DASH
    return fmt_ratio(ratio) if ratio >= 1 else f"{fmt_ratio(ratio)} ({1 / ratio:.1f}× faster)"


def fmt_throughput(row: Mapping) -> str:
    """TFLOP/s and/or GB/s of one row, whichever the case states, then its per-second rates."""
    parts = []
    if row.get("tflops") is not None:
        parts.append(f"{fmt_num(row['tflops'])} TFLOP/s")
    if row.get("gbps") is not None:
        parts.append(f"{fmt_num(row['gbps'])} GB/s")
    parts += [f"{fmt_num(value)} {unit}" for unit, value in (row.get("rates") or {}).items()]
    return ", ".join(parts) if parts else DASH


def fmt_shape(shape: Mapping) -> str:
    """``{"N": 16384, "dtype": "bf16"}`` -> ``"N=16384 dtype=bf16"``."""
    return " ".join(f"{key}={_short(value)}" for key, value in shape.items())


def _short(value) -> str:
    text = str(value)
    return text.removeprefix("torch.")
