"""Code reward: run the model's Python program on each test case in the sandbox, compare stdout.

``meta["tests"]`` is a list (or a JSON string of a list) of ``{"input": str, "output": str}``. The
program reads the input on stdin; its stdout is compared in the parent with the expected output
after trimming trailing whitespace on each line and trailing blank lines. A test passes only when
the program exits 0, in time, under the output cap, *and* prints the expected text; so a program
that only calls ``exit(0)`` or prints nothing fails (a test with an empty expected output is refused
as malformed, since it could not tell such a program from a correct one).

The program is the last fenced Python block of the ``<answer>`` text (or of the whole completion
when there is no well-formed answer block), else the answer text itself (``code_extract.py``).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

from .code_extract import extract_code
from .sandbox import SandboxLimits, run_python
from .sandbox_pipes import is_utf8

__all__ = ["extract_code", "normalize_output", "parse_tests", "code_reward", "code_batch"]


def normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def parse_tests(tests) -> list[dict]:
    """Validate ``meta['tests']``; raise ValueError naming it when malformed."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as exc:
            raise ValueError(f"meta['tests']: not valid JSON ({exc.msg})") from None
    if not isinstance(tests, list) or not tests:
        raise ValueError("meta['tests']: expected a non-empty list of {'input', 'output'} objects")
    for k, test in enumerate(tests):
        if not isinstance(test, dict) or not isinstance(test.get("input"), str) or not isinstance(test.get("output"), str):
            raise ValueError(f"meta['tests'][{k}]: expected {{'input': str, 'output': str}}")
        if not normalize_output(test["output"]):
            raise ValueError(f"meta['tests'][{k}]: empty expected output cannot tell a silent program from a correct one")
        for key in ("input", "output"):  # a lone surrogate (JSON "\udcff") can be neither fed nor printed
            if not is_utf8(test[key]):
                raise ValueError(f"meta['tests'][{k}]['{key}']: not valid UTF-8 text (a lone surrogate)")
    return tests


def _limits(limits: SandboxLimits | None, timeout_s: float | None, memory_mb: float | None) -> SandboxLimits:
    """``limits`` (default ``SandboxLimits()``) with the wall/CPU time and memory overrides applied."""
    limits = limits or SandboxLimits()
    overrides = {}
    if timeout_s is not None:  # the CPU limit is whole seconds, at least 1 (RLIMIT_CPU's unit)
        overrides.update(wall_time_s=timeout_s, cpu_time_s=max(1, math.ceil(timeout_s)))
    if memory_mb is not None:
        overrides.update(memory_bytes=int(memory_mb * 2**20))
    return SandboxLimits(**{**limits.__dict__, **overrides}) if overrides else limits


def _check_params(*, limits=None, all_or_nothing=False, timeout_s=None, memory_mb=None) -> None:
    """ValueError naming the parameter: a bad value failed every sample (logged, scored 0) before."""
    if limits is not None and not isinstance(limits, SandboxLimits):
        raise ValueError(f"limits: expected a SandboxLimits, got {type(limits).__name__} {limits!r}")
    if not isinstance(all_or_nothing, bool):
        raise ValueError(f"all_or_nothing: expected a bool, got {all_or_nothing!r}")
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    _limits(limits, timeout_s, memory_mb).validate()  # e.g. memory_mb=1e-9 is 0 bytes, a huge timeout_s overflows


def code_reward(prompt: str, completion: str, meta: dict, *, limits: SandboxLimits | None = None,
                all_or_nothing: bool = False, timeout_s: float | None = None, memory_mb: int | None = None) -> float:
    """Fraction of ``meta['tests']`` passed (or 1/0 with ``all_or_nothing``, which stops at the first failure)."""
    tests = parse_tests(meta.get("tests"))
    limits = _limits(limits, timeout_s, memory_mb)
    code = extract_code(completion)
    # A program with a lone surrogate has no UTF-8 form: no file could hold it, so it fails like one that
    # does not compile (the sandbox refuses such text with a ValueError; mapping it to 0 is this layer's call).
    if code is None or not is_utf8(code):
        return 0.0
    passed = 0
    for test in tests:
        result = run_python(code, test["input"], limits)
        if result.ok and normalize_output(result.stdout) == normalize_output(test["output"]):
            passed += 1
        elif all_or_nothing:
            return 0.0
    return passed / len(tests)


def code_batch(prompts, completions, metas, **params) -> list[float | Exception]:
    """``code_reward`` over a batch, several programs at a time (runs mostly wait on the child).

    Per sample: its score, or the exception it raised (malformed tests, SandboxError), which the
    registry logs, counts and scores 0 for that sample alone. Raising instead aborted the whole pool
    and made the registry run every program of the batch again, one at a time."""
    def score(args) -> float | Exception:
        try:
            return code_reward(*args, **params)
        except Exception as exc:  # noqa: BLE001 - handed back per sample, reported by the registry
            return exc

    workers = max(1, min(8, os.cpu_count() or 1, len(completions)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(score, zip(prompts, completions, metas, strict=True)))


code_reward.batch = code_batch
code_reward.check_params = _check_params  # checked when a run is configured, not at the first scored sample
