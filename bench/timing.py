"""Timing one benchmark case on CUDA: rotating input sets, one warmup, peak extra memory, a median.

Every implementation of a case is timed in the same process on the same input sets. One warmup call
(compilation, autotuning), then one call that measures peak extra memory and how long a call takes;
that cost picks the timer (``timing_plan``):

- under ``LONG_CALL_MS``: ``triton.testing.do_bench`` (median; it clears L2 before each call) with a
  ``rep`` long enough for at least ``MIN_SAMPLES`` timed calls;
- from ``LONG_CALL_MS``: the median of a few calls timed directly (``long_call_samples``: 5 under 1 s,
  1-3 above, as the case's budget allows). The memory-measuring call is the first sample.

When one input set fits in L2, several fresh sets are built and the calls rotate through them so
the inputs are not served from a warm cache between do_bench's own flushes.

The pure helpers (``rotation_count``, ``classify_failure``, ``failure_text``, ``tensors_in``) run
anywhere; the rest needs a CUDA device.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch

from bench.rows import ImplResult

DEFAULT_L2_BYTES = 50 * 2**20
"""Used when the device properties do not report an L2 size (H100: 50 MiB)."""
MAX_INPUT_SETS = 8
INPUT_MEMORY_FRACTION = 0.5
"""At most this share of the free device memory goes to extra input sets: the rest is left for
the implementations' own working memory (which is what "extra GiB" measures)."""

# do_bench budgets in ms. 200 ms of timed calls gives a stable median for kernels from a few us to
# tens of ms; --quick trades precision for a run that finishes in seconds.
FULL_BUDGET = {"warmup": 50, "rep": 200, "long_s": 120}
QUICK_BUDGET = {"warmup": 10, "rep": 40, "long_s": 30}
"""``long_s``: seconds of timed calls one implementation may spend once a call takes over 1 s. At
ANCHORS' 55.5 s per transformers ``generate`` (16 x 16 x 512) 120 s buys 2 samples (3 calls with the
warmup, ~170 s), so that case fits one 600 s device call; 30 s buys 2 samples of --quick's 12.7 s
4 x 16 x 128 generate (ANCHORS' 99 ms per decode step x 128)."""

MIN_SAMPLES = 5
"""Timed calls behind every median of a call under 1 s: do_bench's ``n_repeat = rep / estimate`` gave
1-2 samples for the 85-230 ms issue-target calls at rep 40-200 ms (probe report, finding 4)."""
LONG_CALL_MS = 100.0
"""From here calls are timed directly instead of through do_bench: a 100 ms call moves >= 300 GB at
3 TB/s, 6000x the 50 MiB L2, so do_bench's L2 flush changes nothing, while its 7 untimed calls (1 + 5
to estimate + >= 1 warmup) would cost >= 0.7 s per implementation, and 385 s for one 55 s generate."""
SLOW_CALL_MS = 1000.0
"""Above 1 s per call the median comes from 1-3 calls (``long_s`` of the budget), not ``MIN_SAMPLES``."""


@dataclass
class CaseRun:
    """The timings of one case plus how its inputs were laid out."""

    results: list[ImplResult]
    input_sets: int = 0
    set_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def rotation_count(
    set_bytes: float,
    l2_bytes: float,
    free_bytes: float,
    max_sets: int = MAX_INPUT_SETS,
    memory_fraction: float = INPUT_MEMORY_FRACTION,
) -> int:
    """How many input sets to rotate through so that a cached set cannot serve the next call.

    One set larger than L2 needs no rotation. Otherwise enough sets that together they exceed
    2x L2, capped at ``max_sets`` and at what fits in ``memory_fraction`` of the free memory
    (``free_bytes`` is measured with the first set already allocated).
    """
    if not set_bytes > 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes!r}")
    if not l2_bytes > 0:
        raise ValueError(f"l2_bytes must be positive, got {l2_bytes!r}")
    if max_sets < 1:
        raise ValueError(f"max_sets must be at least 1, got {max_sets!r}")
    if set_bytes > l2_bytes:
        return 1
    wanted = int(2 * l2_bytes // set_bytes) + 1
    affordable = 1 + int(max(free_bytes, 0) * memory_fraction // set_bytes)
    return max(1, min(wanted, max_sets, affordable))


def failure_text(exc: BaseException, prefix: str = "") -> str:
    """``prefix`` + "Type: message", first line only, at most 300 characters: how a failure reads in a row."""
    return f"{prefix}{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def classify_failure(exc: BaseException, ours: bool = False) -> tuple[str, str]:
    """("skipped" | "error", reason) for an exception raised by make_inputs or an implementation.

    For a peer, a missing dependency, an unimplemented path or running out of memory is a property
    of the peer or the shape, so the case goes on with the row marked skipped; anything else is a
    bug worth an "error" row. For r1fast's own implementation (``ours``) every exception is an
    error (and a non-zero exit): its ImportError is a broken package and its OOM a missed target
    (issue 4: "4 x 4,096 fits").
    """
    reason = failure_text(exc)
    if not ours and isinstance(exc, ImportError | NotImplementedError | torch.OutOfMemoryError):
        return "skipped", reason
    return "error", reason


def long_call_samples(call_ms: float, budget: dict) -> int:
    """How many directly timed calls give the median of a call taking ``call_ms`` (>= LONG_CALL_MS)."""
    if call_ms < SLOW_CALL_MS:
        return MIN_SAMPLES
    return max(1, min(3, int(budget["long_s"] * 1e3 // call_ms)))


def timing_plan(call_ms: float, budget: dict) -> dict:
    """How an implementation whose one call takes ``call_ms`` is timed, and the calls that costs.

    ``{"method": "do_bench" | "direct", "rep": ms (do_bench), "samples": timed calls (direct only),
    "calls": every call including the warmup and the memory call}``. Used by
    ``_time_impl`` and by ``bench/plan.py``'s estimates, so the estimate follows the same rule.
    """
    if not call_ms > 0:
        raise ValueError(f"call_ms must be positive, got {call_ms!r}")
    if call_ms >= LONG_CALL_MS:
        samples = long_call_samples(call_ms, budget)
        # the memory call is the first sample: warmup + samples calls in all
        return {"method": "direct", "rep": None, "samples": samples, "calls": 1 + samples}
    # 1.5x: do_bench's own estimate (with its L2 flush) may come out above ours; n_repeat must stay >= 5
    rep = max(float(budget["rep"]), MIN_SAMPLES * 1.5 * call_ms)
    warmup_calls = max(1, int(budget["warmup"] / call_ms))
    repeat = max(MIN_SAMPLES, int(rep / call_ms))
    return {"method": "do_bench", "rep": rep, "calls": 2 + 1 + 5 + warmup_calls + repeat}


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor reachable through tuples, lists, dicts and nn.Module parameters/buffers."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, tuple | list):
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def l2_cache_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def _clear_grads(leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def as_input_set(inputs) -> tuple:
    """``make_inputs()``'s result as the argument tuple for ``Impl.fn(*inputs)``."""
    if not isinstance(inputs, tuple | list):
        # A lone tensor would otherwise be unpacked row by row into fn's arguments.
        raise ValueError(f"make_inputs must return a tuple of fn's arguments, got {type(inputs).__name__}")
    return tuple(inputs)


def _skip_all(case, status: str, reason: str) -> list[ImplResult]:
    return [ImplResult(impl.name, impl.ours, status, reason=reason) for impl in case.impls]


def time_case(case, *, quick: bool, max_sets: int = MAX_INPUT_SETS) -> CaseRun:
    """Build rotating input sets for ``case`` and time each implementation on them.

    An exception from a later ``make_inputs`` call (other than running out of memory) or from the
    CUDA runtime itself (a poisoned context) propagates: ``bench/run.py`` records it as the case's
    error and decides whether the device is still usable.
    """
    from triton.testing import do_bench

    device = torch.device("cuda", torch.cuda.current_device())
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    try:
        sets = [as_input_set(case.make_inputs())]
        torch.cuda.synchronize()
    except Exception as exc:
        status, reason = classify_failure(exc)
        torch.cuda.empty_cache()
        return CaseRun(_skip_all(case, status, f"make_inputs: {reason}"))

    set_bytes = int(case.input_bytes or max(torch.cuda.memory_allocated() - before, _unique_bytes(tensors_in(sets[0]))))
    run = CaseRun(results=[], set_bytes=set_bytes)
    wanted = rotation_count(max(set_bytes, 1), l2_cache_bytes(device), torch.cuda.mem_get_info(device)[0], max_sets)
    try:
        while len(sets) < wanted:
            sets.append(as_input_set(case.make_inputs()))
    except torch.OutOfMemoryError:
        run.notes.append(f"out of memory after {len(sets)} of {wanted} input sets")
        torch.cuda.empty_cache()
    run.input_sets = len(sets)
    leaves = [t for s in sets for t in tensors_in(s) if t.is_leaf and t.requires_grad]

    for impl in case.impls:
        run.results.append(_time_impl(impl, sets, leaves, budget, do_bench))
    del sets, leaves
    gc.collect()
    torch.cuda.empty_cache()
    return run


def _timed_call_ms(call) -> float:
    """Wall-clock ms of one call between two device synchronizations.

    Only used for calls of >= LONG_CALL_MS, where the synchronization's few microseconds are < 0.01%,
    and a rollout's host-side scheduling is part of what a call costs (CUDA events would miss it).
    """
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    del out
    return elapsed


def _time_impl(impl, sets, leaves, budget, do_bench) -> ImplResult:
    """Warm up once, measure one call's peak extra memory and cost, then the median (``timing_plan``)."""
    try:
        reason = impl.available()
        if reason:
            return ImplResult(impl.name, impl.ours, "skipped", reason=str(reason))
        # Warmup first (compilation, autotuning, lazy workspaces are not part of one call's cost).
        out = impl.fn(*sets[0])
        torch.cuda.synchronize()
        del out
        _clear_grads(leaves)  # so a gradient the call creates counts as its extra memory
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first_ms = _timed_call_ms(lambda: impl.fn(*sets[0]))
        extra = max(torch.cuda.max_memory_allocated() - baseline, 0)
        _clear_grads(leaves)

        counter = itertools.count(1)  # set 0 served the memory call

        def call():
            return impl.fn(*sets[next(counter) % len(sets)])

        plan = timing_plan(max(first_ms, 1e-6), budget)
        if plan["method"] == "direct":
            samples = [first_ms]
            for _ in range(plan["samples"] - 1):
                samples.append(_timed_call_ms(call))
                _clear_grads(leaves)
            ms, how = statistics.median(samples), f"median of {len(samples)} direct calls"
        else:
            ms = do_bench(call, warmup=budget["warmup"], rep=plan["rep"], grad_to_none=leaves or None,
                          return_mode="median")
            how = f"do_bench median, rep {plan['rep']:.0f} ms (>= {MIN_SAMPLES} calls)"
        return ImplResult(impl.name, impl.ours, "ok", ms=float(ms), extra_bytes=int(extra), timing=how)
    except Exception as exc:
        status, reason = classify_failure(exc, ours=impl.ours)
        failed = ImplResult(impl.name, impl.ours, status, reason=reason)
    finally:
        _clear_grads(leaves)
    # The traceback's frames can hold the failed call's tensors in a cycle: free them for the next
    # implementation (Python drops ``exc`` itself at the end of the except block).
    gc.collect()
    torch.cuda.empty_cache()
    return failed
