"""JSONL loader for user data: one ``{"prompt": ..., "answer": ...}`` object per line.

Meant for exports of GSM8K, MATH and the like. Errors are raised before any training starts and
name the file and the 1-based line number, so a bad line in a 100k-line file is found at once.
Extra keys are kept (e.g. ``"tests"`` for code tasks, ``"language"``); ``"task"`` defaults to
``"math"`` and ``"id"`` to ``"<file name>:<line>"``. A code task, ``{"prompt", "tests": [{"input",
"output"}, ...]}``, needs no ``"answer"``: it is graded by its tests (``r1fast.rewards.code``).

A ``"task"`` naming a built-in task (addition, chain_sum, countdown, sorting) is graded by that task's exact
verifier instead of math-verify: r1fast's own exported files use it. Such a line must carry what the verifier
reads (countdown: ``"target"`` and ``"numbers"``; the others an ``"answer"`` in their form), checked here: a
countdown line without them crashed evaluation with KeyError 'target' after the model had loaded.
"""

from __future__ import annotations

import itertools
import json
import os

from .tasks import TASKS, verify_answer

__all__ = ["iter_json_objects", "load_jsonl"]


class _LiteralFloat(float):
    """A JSON number as written: ``str(float)`` turns 0.00001 into "1e-05" and 1e16 into "1e+16", which
    math-verify reads as 1 - 5 and 1 + 16; answers keep the file's text. A float for every other use."""

    def __new__(cls, text: str):
        value = super().__new__(cls, text)
        value.text = text
        return value


def iter_json_objects(path: str | os.PathLike):
    """(1-based line number, object) for each non-blank line; ValueError naming ``path:line`` otherwise."""
    path = os.fspath(path)
    with open(path, "rb") as handle:  # decoded per line, so bad UTF-8 is reported with its line number
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not UTF-8 (byte {exc.start + 1}: {exc.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_float=_LiteralFloat)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError as exc:  # e.g. an integer longer than Python's 4,300-digit conversion limit
                raise ValueError(f"{path}:{line_number}: unreadable JSON value ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def load_jsonl(path: str | os.PathLike, *, limit: int | None = None, default_task: str = "math") -> list[dict]:
    """Read samples from ``path``; stop after ``limit`` samples when given. Blank lines are skipped.

    Raises FileNotFoundError for a missing file and ValueError naming ``path:line`` for a line that is
    not valid JSON, not an object, or lacks a string/number ``prompt`` or ``answer`` (``answer`` may be
    absent or null when the record has ``tests``: the code reward never reads it).
    """
    path = os.fspath(path)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected a non-negative int or None, got {limit!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path!r}")
    name = os.path.basename(path)
    samples: list[dict] = []
    # islice stops before reading past the limit: a line past it is never parsed, so it cannot fail the load
    for line_number, record in itertools.islice(iter_json_objects(path), limit):
        for key in ("prompt", "answer"):
            value = record.get(key)
            if key == "answer" and value is None and "tests" in record:
                record.pop(key, None)  # absent, not "None": no verifier grades a code task by it
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"{path}:{line_number}: field {key!r} missing or not a string/number "
                                 f"(got {type(value).__name__})")
            record[key] = value.text if isinstance(value, _LiteralFloat) else str(value)
        if not record["prompt"].strip():
            raise ValueError(f"{path}:{line_number}: field 'prompt' is empty")
        record.setdefault("task", default_task)
        _check_task(record, f"{path}:{line_number}")
        record.setdefault("id", f"{name}:{line_number}")
        samples.append(record)
    return samples


def _check_task(record: dict, where: str) -> None:
    """ValueError naming ``where`` when the line's ``task`` is not a string, or names a built-in task whose
    exact verifier cannot grade the line (the accuracy reward picks that verifier by this column)."""
    task = record["task"]
    if not isinstance(task, str):
        raise ValueError(f"{where}: field 'task' must be a string (got {type(task).__name__})")
    if task in TASKS and (why := _builtin_task_error(record)) is not None:
        raise ValueError(f"{where}: task {task!r} {why}; drop the 'task' column to grade this line by math-verify")


_ANSWER_FORMS = {"addition": "an integer", "chain_sum": "an integer", "sorting": "numbers separated by spaces"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _builtin_task_error(record: dict) -> str | None:
    """Why the built-in task's verifier cannot grade ``record``, or None. Countdown reads the puzzle from
    ``target`` and ``numbers``; the others compare the ``answer``, which must pass its own verifier (a sorting
    answer "1, 2" never equals any answer, since the gold is split on spaces only)."""
    task = record["task"]
    if task == "countdown":
        numbers = record.get("numbers")
        if _is_int(record.get("target")) and isinstance(numbers, list) and numbers and all(map(_is_int, numbers)):
            return None
        return "needs 'target' (an integer) and 'numbers' (a list of integers)"
    answer = record.get("answer")
    if answer is None:
        return "needs an 'answer'"
    if not verify_answer(record, answer):
        return f"needs an 'answer' that is {_ANSWER_FORMS.get(task, 'in its form')} (got {answer!r})"
    return None
