"""A progress bar for long work (rollouts, training steps, evaluation) that never spams logs.

On a terminal it is a rich live bar (refreshed twice a second) with free-form fields such as
``reward=0.53 tok/s=1234``. When the stream is not a terminal (a job log, a pipe, pytest's capture),
live redrawing would write a new frame per refresh, so it prints a plain line at most every
``log_interval_s`` seconds and one final line instead. It is silent on non-zero ranks, and
``R1FAST_PROGRESS=0`` turns it off everywhere; a disabled bar still counts, so callers may read it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1fast.metrics import current_rank

__all__ = ["progress", "ProgressBar"]


def _live(console: Console) -> bool:
    """Whether to draw the live bar: a terminal by rich's rules and by the stream itself. rich also calls a
    stream a terminal when FORCE_COLOR is set (common in CI, for colored logs): a log file then got two
    redrawn frames a second on one ever-growing line. TTY_COMPATIBLE=1 still asks for the bar (an IDE console
    that renders escapes but is no TTY)."""
    isatty = getattr(console.file, "isatty", None)
    return console.is_terminal and (os.environ.get("TTY_COMPATIBLE") == "1" or (callable(isatty) and isatty()))


def _format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for name, value in fields.items():
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.4g}"
        parts.append(f"{name}={value}")
    return " ".join(parts)


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)  # not int(): (start + 3665) - start is 3664.9999... for most monotonic starts
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """What ``progress()`` yields: ``advance(n, **fields)`` moves the bar and updates the shown fields."""

    def __init__(self, total: int | None, description: str, *, enabled: bool, console: Console,
                 log_interval_s: float):
        if total is not None and total < 0:
            raise ValueError(f"total: expected None or >= 0, got {total}")
        self.total = total
        self.description = description
        self.completed = 0
        self.fields: dict[str, Any] = {}
        self.enabled = enabled
        self._console = console
        self._log_interval_s = log_interval_s
        self._start = time.monotonic()
        self._last_line = self._start
        self._rich: Progress | None = None
        self._task_id = None
        if enabled and _live(console):
            self._rich = Progress(
                # markup off, as in _print_line: a description or value such as '[/think]' is data, and as
                # markup it raised rich.errors.MarkupError and killed the caller
                TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False, refresh_per_second=2,
                # print() during the bar lands above it only when the bar owns stdout.
                redirect_stdout=console.file is sys.stdout, redirect_stderr=console.file is sys.stdout,
            )
            self._task_id = self._rich.add_task(description, total=total, info="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Count ``n`` more units done (0 just updates fields) and show ``fields`` (name=value)."""
        if n < 0:
            raise ValueError(f"n: expected >= 0, got {n}")
        self.completed += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task_id, advance=n, info=_format_fields(self.fields))
            return
        now = time.monotonic()
        if now - self._last_line >= self._log_interval_s:
            self._last_line = now
            self._print_line(now)

    def line(self, now: float | None = None) -> str:
        """The plain one-line status: description, count, fields, elapsed and remaining time."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        count = f"{self.completed}/{'?' if self.total is None else self.total}"
        if self.total:
            count += f" ({100 * self.completed / self.total:.0f}%)"
        timing = f"{_format_seconds(elapsed)} elapsed"
        if self.total and 0 < self.completed < self.total:
            timing += f", ~{_format_seconds(elapsed * (self.total - self.completed) / self.completed)} left"
        return " ".join(p for p in (self.description, count, _format_fields(self.fields), f"[{timing}]") if p)

    def _print_line(self, now: float | None = None) -> None:
        # markup/highlight off: descriptions and values are data, not rich markup.
        self._console.print(self.line(now), markup=False, highlight=False, soft_wrap=True)

    def _start_display(self) -> None:
        if self._rich is not None:
            self._rich.start()

    def _stop_display(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
        else:
            self._print_line()


@contextlib.contextmanager
def progress(total: int | None, description: str = "", *, enabled: bool | None = None,
             stream: TextIO | None = None, log_interval_s: float = 30.0) -> Iterator[ProgressBar]:
    """Show progress of ``total`` units (None = unknown) while the block runs.

    ``enabled`` None means: on rank 0 unless ``R1FAST_PROGRESS=0``. ``stream`` defaults to stdout.
    ``log_interval_s`` spaces the plain lines written when the stream is not a terminal.
    """
    if enabled is None:
        enabled = current_rank() == 0 and os.environ.get("R1FAST_PROGRESS", "1") != "0"
    console = Console(file=stream if stream is not None else sys.stdout)
    bar = ProgressBar(total, description, enabled=enabled, console=console, log_interval_s=log_interval_s)
    bar._start_display()
    try:
        yield bar
    finally:
        bar._stop_display()
