"""The device ceilings every benchmark ratio is taken against, measured in the same run.

- ``copy``: device-to-device copy of a 1 GiB buffer, counted as read + write (GB/s).
- ``bf16_matmul``: ``torch.mm`` of two bf16 8192x8192 matrices, 2*8192^3 FLOPs (TFLOP/s).
- ``fp8_matmul``: ``torch._scaled_mm`` of e4m3 8192x8192 operands with per-tensor scales and a
  bf16 output, the layout cuBLAS wants (A row-major, B column-major), the faster of its fp32-promoted and
  fast accumulations (TFLOP/s).

Measured rather than taken from a datasheet: a kernel at 1.0x its floor is as fast as the best
library call on this very device, clocks and all (ANCHORS.md lists what an H100 gave).
Each entry is ``{"value", "unit", "ms", "what", "reason"}``; ``value`` is None with a ``reason``
when the measurement could not run (e.g. fp8 on a GPU older than sm89).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.registry import CEILINGS

MATMUL_N = 8192
COPY_BYTES = 2**30


def do_bench_timer(quick: bool) -> Callable[[Callable[[], object]], float]:
    """The default timer: triton's do_bench median with the run's budget."""
    from triton.testing import do_bench

    from bench.timing import FULL_BUDGET, QUICK_BUDGET

    budget = QUICK_BUDGET if quick else FULL_BUDGET
    return lambda fn: float(do_bench(fn, warmup=budget["warmup"], rep=budget["rep"], return_mode="median"))


def _entry(unit: str, what: str, amount: float, scale: float, timer, fn) -> dict:
    """Time ``fn`` and express ``amount`` (bytes or FLOPs) per second in ``unit`` (1/scale)."""
    entry = {"value": None, "unit": unit, "ms": None, "what": what, "reason": ""}
    try:
        fn()  # fail early (and outside the timer) when the op is unsupported here
        ms = timer(fn)
        entry.update(ms=ms, value=amount / (ms * 1e-3) / scale)
    except Exception as exc:  # one missing ceiling must not stop the others
        entry["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return entry


def measure_copy(device, timer, nbytes: int = COPY_BYTES) -> dict:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    what = f"copy {nbytes / 2**20:g} MiB device-to-device, read + write"
    return _entry("GB/s", what, 2 * nbytes, 1e9, timer, lambda: dst.copy_(src))


def measure_bf16_matmul(device, timer, n: int = MATMUL_N) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return _entry("TFLOP/s", f"bf16 torch.mm {n}^3", 2 * n**3, 1e12, timer, lambda: torch.mm(a, b, out=out))


def measure_fp8_matmul(device, timer, n: int = MATMUL_N) -> dict:
    what = f"fp8 e4m3 torch._scaled_mm {n}^3, per-tensor scales, bf16 out"
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None or not hasattr(torch, "_scaled_mm"):
        return {"value": None, "unit": "TFLOP/s", "ms": None, "what": what, "reason": "this torch has no fp8 matmul"}
    a = torch.randn(n, n, device=device).to(fp8)
    b = torch.randn(n, n, device=device).to(fp8).t()  # column-major, as cuBLASLt requires for B
    scale_a = torch.ones((), device=device, dtype=torch.float32)
    scale_b = torch.ones((), device=device, dtype=torch.float32)

    def call(fast: bool):
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16, use_fast_accum=fast)

    # Both accumulations, the faster is the ceiling: cuBLAS' default promotes partial sums to fp32 as the
    # DeepSeek-V3 recipe does, fast accumulation keeps them in the tensor cores' ~14-bit accumulator and is the
    # hardware's peak; a ceiling below what the device does would flatter every FP8 floor ratio.
    entries = [_entry("TFLOP/s", f"{what}, {'fast' if fast else 'fp32-promoted'} accumulation", 2 * n**3, 1e12,
                      timer, lambda fast=fast: call(fast)) for fast in (False, True)]
    return max(entries, key=lambda e: -1.0 if e["value"] is None else e["value"])


def measure_ceilings(
    device=None,
    *,
    quick: bool = False,
    timer: Callable[[Callable[[], object]], float] | None = None,
    matmul_n: int = MATMUL_N,
    copy_bytes: int = COPY_BYTES,
) -> dict[str, dict]:
    """Measure every ceiling in ``bench.registry.CEILINGS`` on ``device`` (default: current CUDA)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = {
        "copy": (measure_copy, copy_bytes),
        "bf16_matmul": (measure_bf16_matmul, matmul_n),
        "fp8_matmul": (measure_fp8_matmul, matmul_n),
    }
    missing = set(CEILINGS) - set(plan)
    if missing:
        raise ValueError(f"bench.registry.CEILINGS names ceilings this module cannot measure: {sorted(missing)}")
    timer = timer or do_bench_timer(quick)
    measured = {}
    for name, (measure, size) in plan.items():
        measured[name] = measure(device, timer, size)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the buffers above are gone: give the cases their memory
    return measured
