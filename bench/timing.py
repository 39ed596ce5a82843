"""Timing one benchmark case on CUDA: rotating input sets, one warmup, peak extra memory, do_bench.

Every implementation of a case is timed in the same process on the same input sets with
``triton.testing.do_bench`` (median of the timed calls; do_bench also clears L2 before each call).
When one input set fits in L2, several fresh sets are built and the calls rotate through them so
the inputs are not served from a warm cache between do_bench's own flushes.

The pure helpers (``rotation_count``, ``classify_failure``, ``tensors_in``) run anywhere; the rest
needs a CUDA device.
"""

from __future__ import annotations

import gc
import itertools
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
FULL_BUDGET = {"warmup": 50, "rep": 200}
QUICK_BUDGET = {"warmup": 10, "rep": 40}


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


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """("skipped" | "error", reason) for an exception raised by make_inputs or an implementation.

    A missing dependency, an unimplemented path or running out of memory is a property of the
    peer or the shape, so the case goes on with the row marked skipped; anything else is a bug
    worth an "error" row (and a non-zero exit when it is r1fast's own).
    """
    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if isinstance(exc, ImportError | NotImplementedError | torch.OutOfMemoryError):
        return "skipped", reason
    return "error", reason


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
    """Build rotating input sets for ``case`` and time each implementation on them."""
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


def _time_impl(impl, sets, leaves, budget, do_bench) -> ImplResult:
    """Warm up once, measure one call's peak extra memory, then the do_bench median."""
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
        out = impl.fn(*sets[0])
        torch.cuda.synchronize()
        extra = max(torch.cuda.max_memory_allocated() - baseline, 0)
        del out
        _clear_grads(leaves)

        counter = itertools.count()

        def call():
            return impl.fn(*sets[next(counter) % len(sets)])

        ms = do_bench(
            call, warmup=budget["warmup"], rep=budget["rep"], grad_to_none=leaves or None, return_mode="median"
        )
        return ImplResult(impl.name, impl.ours, "ok", ms=float(ms), extra_bytes=int(extra))
    except Exception as exc:
        status, reason = classify_failure(exc)
        failed = ImplResult(impl.name, impl.ours, status, reason=reason)
    finally:
        _clear_grads(leaves)
    # The traceback's frames can hold the failed call's tensors in a cycle: free them for the next
    # implementation (Python drops ``exc`` itself at the end of the except block).
    gc.collect()
    torch.cuda.empty_cache()
    return failed
