"""How long a benchmark run will take, and how the GPU session's runs are split to fit its limits.

A lent GPU gives 600 s per device call and ~30 minutes in all (/work/.library/device/README.md), so
every ``bench/gpu_checks.sh`` part must finish inside one call. The estimate follows the timing rule
itself (``bench.timing.timing_plan``: warmup + memory call + do_bench, or a few direct calls for long
ones) applied to an estimated time per call:

- the case's ``est_call_s`` where it names the implementation (ANCHORS.md's H100 measurements, or a
  stated guess: the case file says which);
- otherwise ``FLOOR_FACTOR`` x the case's floor at ANCHORS' measured H100 ceilings.

Plus ``CASE_OVERHEAD_S`` per case and the case's ``est_setup_s``. Nothing here touches a GPU.
"""

from __future__ import annotations

from bench.rows import floor_ms
from bench.timing import FULL_BUDGET, QUICK_BUDGET, timing_plan

ANCHOR_CEILINGS = {"copy": 3018.0, "bf16_matmul": 697.0, "fp8_matmul": 1353.0}
"""ANCHORS.md's H100 ceilings: copy GB/s, matmuls TFLOP/s (the units ``floor_ms`` takes)."""
FLOOR_FACTOR = 3.0
"""An implementation without an ANCHORS time is assumed 3x its floor: ANCHORS' slowest non-Liger peer
at GRPO shape B (TRL-style, 212.8 ms over a 65.8 ms floor) is 3.2x."""
DEFAULT_CALL_S = 0.01
"""A case stating no floor and no estimate (none is registered so) is assumed 10 ms a call."""
CASE_OVERHEAD_S = 5.0
"""Per case: building up to 8 input sets and the first call's Triton compiles (1-3 s per kernel
specialization on CPU hosts; a guess until a GPU run measures it)."""
RUN_OVERHEAD_S = 30.0
"""Per run: imports, CUDA context and measuring the three ceilings (each a few ms per call)."""
CALL_LIMIT_S = 600.0
"""One device call's limit (the device README)."""
PART_LIMIT_S = 480.0
"""What one part's estimate may reach: 120 s below CALL_LIMIT_S for the editable install, imports and
estimates that are guesses."""

PARTS = {
    "bench": ["--quick"],
    "bench-full": ["--not-quick", "--only", "grpo_loss", "--only", "moe_gemm", "--only", "paged_attention",
                   "--only", "model", "--only", "rollout.qwen2.5-1.5b.64x16x1024"],
    "bench-rollout": ["--not-quick", "--only", "rollout.qwen2.5-1.5b.16x16x512"],
}
"""``bench/gpu_checks.sh <part>`` runs ``bench/run.py --part <part>``: the quick cases, then the others in
two groups, so every case is timed in exactly one part and each part's estimate stays under
PART_LIMIT_S (tests/test_bench_plan.py checks both). Issue 5's 16 x 16 x 512 comparison (transformers
alone ~170 s) gets a call of its own; 64 x 16 x 1024 (r1fast only) rides with the kernel cases."""


def call_seconds(case, impl) -> float:
    """Estimated seconds of one call of ``impl`` in ``case``: its ``est_call_s``, else from the floor."""
    if impl.name in case.est_call_s:
        return float(case.est_call_s[impl.name])
    floor = floor_ms(case.flops, case.bytes, case.ceiling, ANCHOR_CEILINGS)
    if floor:
        return FLOOR_FACTOR * floor / 1e3
    return DEFAULT_CALL_S


def impl_seconds(call_s: float, quick: bool) -> float:
    """Seconds one implementation costs under the timing rule, from the seconds of one call."""
    plan = timing_plan(call_s * 1e3, QUICK_BUDGET if quick else FULL_BUDGET)
    return plan["calls"] * call_s


def case_seconds(case, quick: bool) -> float:
    """Estimated seconds to time every implementation of ``case`` (setup and overhead included)."""
    total = CASE_OVERHEAD_S + float(case.est_setup_s)
    for impl in case.impls:
        total += impl_seconds(call_seconds(case, impl), quick)
    return total


def run_seconds(cases, quick: bool, case_s: list[float] | None = None) -> float:
    """Estimated seconds of a run over ``cases`` (each a ``Case``), the per-run overhead included.

    ``case_s``: the cases' ``case_seconds`` when the caller has them already (``--list`` prints them).
    """
    if case_s is None:
        case_s = [case_seconds(case, quick) for case in cases]
    return RUN_OVERHEAD_S + sum(case_s)
