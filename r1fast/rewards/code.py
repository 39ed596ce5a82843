"""Code reward: run the model's Python program on each test case in the sandbox, compare stdout.

``meta["tests"]`` is a list (or a JSON string of a list) of ``{"input": str, "output": str}``. The
program reads the input on stdin; its stdout is compared in the parent with the expected output
after trimming trailing whitespace on each line and leading and trailing blank lines. A test passes only when
the program exits 0, in time, under the output cap, *and* prints the expected text; so a program
that only calls ``exit(0)`` or prints nothing fails (a test with an empty expected output is refused
as malformed, since it could not tell such a program from a correct one).

The program is the last fenced Python block of the ``<answer>`` text (or of the whole completion
when there is no well-formed answer block), else the answer text itself (``code_extract.py``).

After a test times out, the sample's remaining tests fail without running: a program that hung on one
input almost always hangs (or is as slow) on the next, and running them cost the timeout per test (6
tests x 1 s = 6.3 s for ``while True: pass``; one GRPO step spent 48.5 s grading).

``code_verdict`` grades a completion for evaluation: correct when every test passes, plus a vote key
for cons@k (``code_vote_key``).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

from .code_extract import extract_code
from .sandbox import SandboxLimits, run_python
from .sandbox_pipes import is_utf8

__all__ = ["check_tests", "extract_code", "normalize_output", "parse_tests", "run_tests", "code_reward", "code_batch",
           "code_verdict", "code_verdicts", "code_vote_key", "pool_size"]


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


def check_tests(samples: list[dict]) -> None:
    """ValueError naming the first sample (its ``id``, else its index) whose ``tests`` are malformed; samples
    without ``tests`` are not code tasks. Run at load by every stage that grades code (train, eval, rejection)."""
    for i, sample in enumerate(samples):
        if "tests" in sample:
            try:
                parse_tests(sample["tests"])
            except ValueError as exc:
                raise ValueError(f"sample {sample.get('id', i)!r}: {exc}") from None


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


def run_tests(code: str, tests: list[dict], limits: SandboxLimits, *, stop_at_failure: bool = False) -> list:
    """Per test: the program's normalized stdout when its run succeeded (exit 0, in time, under the output
    cap), else None. After the first timeout the remaining tests get None without running (module
    docstring); with ``stop_at_failure`` so do those after the first failed test."""
    outputs: list[str | None] = []
    for test in tests:
        result = run_python(code, test["input"], limits)
        output = normalize_output(result.stdout) if result.ok else None
        outputs.append(output)
        if result.timed_out or (stop_at_failure and output != normalize_output(test["output"])):
            return outputs + [None] * (len(tests) - len(outputs))
    return outputs


def _program(completion: str) -> str | None:
    """The program to run, or None. A program with a lone surrogate has no UTF-8 form: no file could hold
    it, so it fails like one that does not compile (the sandbox refuses such text with a ValueError)."""
    code = extract_code(completion)
    return code if code is not None and is_utf8(code) else None


def _passed(outputs: list, tests: list[dict]) -> int:
    return sum(out == normalize_output(t["output"]) for out, t in zip(outputs, tests, strict=True))


def code_reward(prompt: str, completion: str, meta: dict, *, limits: SandboxLimits | None = None,
                all_or_nothing: bool = False, timeout_s: float | None = None, memory_mb: int | None = None) -> float:
    """Fraction of ``meta['tests']`` passed (or 1/0 with ``all_or_nothing``, which stops at the first failure)."""
    tests = parse_tests(meta.get("tests"))
    limits = _limits(limits, timeout_s, memory_mb)
    code = _program(completion)
    if code is None:
        return 0.0
    passed = _passed(run_tests(code, tests, limits, stop_at_failure=all_or_nothing), tests)
    if all_or_nothing:
        return float(passed == len(tests))
    return passed / len(tests)


def code_vote_key(outputs: list) -> str | None:
    """cons@k's vote key of a program graded wrong: its outputs on the tests (JSON), so programs that print
    the same on every input are one answer, as math-verify groups equal math answers. None (the vote falls
    back to the program's text, ``eval_metrics.majority_vote``) when no test ran successfully: programs
    that only crash or hang have no behaviour to compare, and grouping them all as one answer would let a few
    distinct broken programs outvote the correct ones."""
    return json.dumps(outputs) if any(out is not None for out in outputs) else None


def code_verdict(prompt: str, completion: str, meta: dict, *, vote_key: bool = False,
                 limits: SandboxLimits | None = None, timeout_s: float | None = None,
                 memory_mb: int | None = None) -> tuple[bool, str | None, str | None]:
    """(every test passes, the program run or None, its vote key or None) of one completion. Without
    ``vote_key`` grading stops at the first failed test (all that correctness needs); with it every test
    runs (but those after a timeout) so that wrong programs can be grouped by their outputs."""
    tests = parse_tests(meta.get("tests"))
    code = _program(completion)
    if code is None:
        return False, None, None
    outputs = run_tests(code, tests, _limits(limits, timeout_s, memory_mb), stop_at_failure=not vote_key)
    correct = _passed(outputs, tests) == len(tests)
    return correct, code, (code_vote_key(outputs) if vote_key and not correct else None)


MAX_POOL = 32
"""Most programs graded at once. A pool thread only waits on its child process, so more threads than
cores help whenever children sleep or block (``time.sleep(60)`` held one of 2 workers for the whole
timeout); at most 4 per core, since spinning children share the cores and the limit is wall-clock time."""


def _available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None (no bound from memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pool_size(n: int, memory_bytes: int) -> int:
    """Threads grading ``n`` programs: min(32, 4 x cores, n), and at most MemAvailable / ``memory_bytes``
    (each child may use its memory limit: at 512 MiB a 4 GiB machine grades 8 at once, not 32). At least 1."""
    cores = os.cpu_count() or 1
    available = _available_bytes()
    by_memory = available // max(memory_bytes, 1) if available is not None else MAX_POOL
    return max(1, min(MAX_POOL, 4 * cores, n, by_memory))


def _pool_map(fn, items: list, memory_bytes: int) -> list:
    with ThreadPoolExecutor(max_workers=pool_size(len(items), memory_bytes), thread_name_prefix="sandbox") as pool:
        return list(pool.map(fn, items))


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

    memory = _limits(params.get("limits"), None, params.get("memory_mb")).memory_bytes
    return _pool_map(score, list(zip(prompts, completions, metas, strict=True)), memory)


def code_verdicts(prompts, completions, metas, *, vote_key: bool = False, **params) -> list[tuple]:
    """``code_verdict`` over a batch in the sandbox pool; an exception (malformed tests) propagates."""
    memory = _limits(params.get("limits"), None, params.get("memory_mb")).memory_bytes
    return _pool_map(lambda args: code_verdict(*args, vote_key=vote_key, **params),
                     list(zip(prompts, completions, metas, strict=True)), memory)


def _check_meta(meta: dict) -> None:
    """ValueError unless ``meta['tests']`` is well formed (``parse_tests``): checked on every sample when the
    data loads, since a malformed one scored 0 at every step."""
    parse_tests(meta.get("tests"))


code_reward.batch = code_batch
code_reward.check_params = _check_params  # checked when a run is configured, not at the first scored sample
code_reward.check_meta = _check_meta
