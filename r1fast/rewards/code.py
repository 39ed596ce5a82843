"""Code reward: run the model's Python program on each test case in the sandbox, compare stdout.

``meta["tests"]`` is a list (or a JSON string of a list) of ``{"input": str, "output": str}``. The
program reads the input on stdin; its stdout is compared in the parent with the expected output
after trimming trailing whitespace on each line and trailing blank lines. A test passes only when
the program exits 0, in time, under the output cap, *and* prints the expected text; so a program
that only calls ``exit(0)`` or prints nothing fails (a test with an empty expected output is refused
as malformed, since it could not tell such a program from a correct one).

The program is the last fenced ```python block of the ``<answer>`` text (or of the whole completion
when there is no well-formed answer block), else the answer text itself.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from .format import extract_answer
from .sandbox import SandboxLimits, run_python

__all__ = ["extract_code", "normalize_output", "parse_tests", "code_reward", "code_batch"]

_FENCE_RE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The program to run, or None when there is nothing that could be one."""
    answer = extract_answer(completion)
    text = answer if answer is not None else completion
    blocks = _FENCE_RE.findall(text)
    if blocks:
        return blocks[-1]
    if answer is not None and answer.strip():
        return answer
    return None


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
    return tests


def code_reward(prompt: str, completion: str, meta: dict, *, limits: SandboxLimits | None = None,
                all_or_nothing: bool = False, timeout_s: float | None = None, memory_mb: int | None = None) -> float:
    """Fraction of ``meta['tests']`` passed (or 1/0 with ``all_or_nothing``, which stops at the first failure)."""
    tests = parse_tests(meta.get("tests"))
    limits = limits or SandboxLimits()
    if timeout_s is not None or memory_mb is not None:
        limits = SandboxLimits(**{**limits.__dict__,
                                  **({"wall_time_s": timeout_s, "cpu_time_s": max(1, int(timeout_s + 0.999))}
                                     if timeout_s is not None else {}),
                                  **({"memory_bytes": int(memory_mb) * 2**20} if memory_mb is not None else {})})
    code = extract_code(completion)
    if code is None:
        return 0.0
    passed = 0
    for test in tests:
        result = run_python(code, test["input"], limits)
        if result.ok and normalize_output(result.stdout) == normalize_output(test["output"]):
            passed += 1
        elif all_or_nothing:
            return 0.0
    return passed / len(tests)


def code_batch(prompts, completions, metas, **params) -> list[float]:
    """``code_reward`` over a batch, several programs at a time (runs mostly wait on the child)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(completions)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda args: code_reward(*args, **params), zip(prompts, completions, metas, strict=True)))


code_reward.batch = code_batch
