"""Training metrics: one JSON object per line in ``<out_dir>/metrics.jsonl``, optionally TensorBoard.

Each ``log(step, **metrics)`` appends ``{"step": step, "time": <unix seconds>, **metrics}`` and flushes,
so a crashed run keeps every line it logged and ``tail -f`` works. Only rank 0 writes. Values may be
Python numbers, bools, strings, None, or one-element torch tensors / numpy scalars (converted with
``.item()``). Non-finite floats (NaN, +-inf) are written as ``null``: strict JSON has no NaN, and
pandas/jq/browsers all read ``null``; ``read_metrics`` gives them back as ``None``. torch is never
imported here: a tensor can only reach us if the caller already imported it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
import warnings
from typing import Any

from r1fast.safe_write import _NOFOLLOW, open_append, refuse_symlink, replace_atomically, write_file

__all__ = ["MetricsLogger", "read_metrics", "trim_metrics", "current_rank", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_warned_no_tensorboard = False


def current_rank() -> int:
    """This process's global rank: torch.distributed when initialized, else $RANK (set by torchrun), else 0."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    # Before init_process_group, torchrun's RANK still tells rank 0 apart, so no file is opened N times.
    return int(os.environ.get("RANK", "0"))


def _to_json_value(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item"):  # torch tensors, numpy arrays and numpy scalars
        numel = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", 1)
        if numel != 1:
            raise ValueError(f"metric {name!r}: expected a scalar, got a tensor/array with {numel} elements")
        value = value.item()
    if isinstance(value, int):  # bool included
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"metric {name!r}: expected a number, bool, str, None or scalar tensor, "
                     f"got {type(value).__name__}")


class MetricsLogger:
    """Append-only JSONL metrics for one run directory (rank 0 only); use as a context manager.

    ``rank`` defaults to ``current_rank()``. ``tensorboard=True`` also writes scalars to
    ``<out_dir>/tb`` when ``torch.utils.tensorboard`` imports; otherwise it warns once and goes on.
    """

    def __init__(self, out_dir: str, *, rank: int | None = None, tensorboard: bool = False):
        self.out_dir = str(out_dir)
        self.rank = current_rank() if rank is None else int(rank)
        self.path = os.path.join(self.out_dir, METRICS_FILE)
        self._file = None
        self._writer = None
        self._closed = False
        if self.rank != 0:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        # Append: a resumed run continues the same file, minus a line a crash cut short (appending to it
        # would glue two records into one line that read_metrics cannot parse). A symlinked metrics.jsonl
        # is refused (UnsafePathError), not followed: appending and trimming wrote into its target.
        refuse_symlink(self.path, "a metrics file")
        _drop_torn_tail(self.path)
        self._file = open_append(self.path)
        if tensorboard:
            self._writer = _tensorboard_writer(os.path.join(self.out_dir, "tb"))

    @property
    def enabled(self) -> bool:
        """True on the rank that writes."""
        return self.rank == 0

    def log(self, step: int, **metrics: Any) -> dict[str, Any] | None:
        """Write one line for ``step``; returns the record written (None on other ranks)."""
        if self._closed:
            raise RuntimeError(f"MetricsLogger({self.out_dir!r}) is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"step: expected an int, got {step!r}")
        if "time" in metrics:
            raise ValueError("metric name 'time' is reserved for the wall-clock timestamp")
        record = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in metrics.items():
            record[name] = _to_json_value(name, value)
        if self._file is None:
            return None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name not in ("step", "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(name, value, int(step))
        return record

    def close(self) -> None:
        """Flush and close the file (and TensorBoard writer); safe to call twice."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: str) -> None:
    """Truncate ``path`` after its last newline when it does not end in one (the writer died mid-line)."""
    try:  # O_NOFOLLOW: a symlink swapped in after the caller's check is not truncated either
        fh = os.fdopen(os.open(path, os.O_RDWR | _NOFOLLOW), "rb+")
    except FileNotFoundError:
        return
    with fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # backwards in 64 KiB chunks: a record is ~200 bytes, the file may be 100s of MB
            start = max(0, pos - 65536)
            fh.seek(start)
            chunk = fh.read(pos - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                pos = start + newline + 1
                break
            pos = start
        fh.truncate(pos)
    warnings.warn(f"{path}: dropped a final line cut short by a crash ({end - pos} bytes)", stacklevel=3)


def _tensorboard_writer(log_dir: str):
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        if not _warned_no_tensorboard:
            warnings.warn(f"tensorboard=True but TensorBoard is unavailable ({err}); writing metrics.jsonl only",
                          stacklevel=3)
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(log_dir=log_dir)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics file (or of ``<path>/metrics.jsonl`` for a directory), in order.

    A final line cut short by a crash is skipped; a malformed line elsewhere raises ValueError.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: the writer died mid-line
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
    return records


def _logged_after(record: dict, step: int, sft_step: int | None) -> bool:
    """Whether ``r1fast.train`` logged ``record`` after its checkpoint at GRPO ``step`` (or mid-SFT at
    ``sft_step``). Train logs: sft rows (step = SFT step index), eval 'initial' before the SFT, eval 'before_rl'
    after it, rl rows (step = steps done), eval 'step_<N>' (before checkpoint N), eval 'after_rl' (the run's
    end: the resumed run evaluates again, so an earlier one is always past the restored position)."""
    phase, at = record.get("phase"), record.get("step", 0)
    if sft_step is not None:  # everything but the initial evaluation and the SFT steps already taken
        return not ((phase == "sft" and at < sft_step) or (phase == "eval" and record.get("tag") == "initial"))
    if phase == "eval" and record.get("tag") == "after_rl":
        return True
    return phase in ("rl", "eval") and at > step


def trim_metrics(out_dir: str, step: int, sft_step: int | None = None, *, keep_dropped: str | None = None) -> int:
    """Drop the records of ``<out_dir>/metrics.jsonl`` logged after a checkpoint at GRPO ``step`` (mid-SFT:
    ``sft_step``), and a final line cut short by a crash; returns how many records went. Rank 0, before a
    resumed run's logger opens the file: the resumed run logs those steps again, and the file then reads as
    if the run had never stopped. Written to a temporary file and renamed over the original (a kill mid-way
    leaves the old file whole); kept lines are copied byte for byte. A missing file is left missing.
    ``keep_dropped``: a file the dropped records are written to first (a fork keeps the abandoned branch's)."""
    path = os.path.join(out_dir, METRICS_FILE)
    refuse_symlink(path, "a metrics file")  # its target's lines would be copied into the run directory
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError:
        return 0
    kept, dropped = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a crash: the logger would drop it too
                continue
            kept.append(line)  # not ours to judge: read_metrics names its line number
            continue
        if isinstance(record, dict) and _logged_after(record, step, sft_step):
            dropped.append(line)
        else:
            kept.append(line)
    if keep_dropped is not None and dropped:
        write_file(keep_dropped, "".join(line + "\n" for line in dropped))
    with replace_atomically(path, fsync=True) as fh:  # never through a symlink: see r1fast.safe_write
        fh.write("".join(line + "\n" for line in kept))
    return len(dropped)
