"""Run-directory bookkeeping shared by r1fast.train and r1fast.pipeline: an exclusive lock, JSON markers
read defensively, and setting an earlier run aside instead of mixing two runs in one directory."""

from __future__ import annotations

import json
import os
import sys
import time

from r1fast import distributed as D

__all__ = ["lock_run_dir", "read_json", "set_aside_earlier_run"]


def lock_run_dir(run_dir: str, error: type[Exception] = RuntimeError):
    """An exclusive lock on ``<run_dir>/.lock``, held while the returned file stays open (the OS drops it
    at exit): two pipeline invocations on one run directory deleted each other's stages (one died with a
    checkpoint directory gone). Raises ``error`` when another process holds it."""
    import fcntl

    os.makedirs(run_dir, exist_ok=True)
    handle = open(os.path.join(run_dir, ".lock"), "w")  # noqa: SIM115  (the open file is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise error(f"{run_dir}: another process is running on this run directory") from None
    return handle


def read_json(path: str):
    """The JSON value in ``path``; None when the file is absent or torn (a kill mid-write, a full disk)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def set_aside_earlier_run(run_dir: str) -> None:
    """A fresh run into a directory that holds an earlier one moves that one to ``<run_dir>.prev-<time>``:
    appending to its metrics.jsonl mixed two runs in one file and plot, and its later checkpoints were
    what ``--train.resume latest`` would then pick. Nothing is deleted. Every rank calls it."""
    run_dir = os.path.normpath(run_dir)  # "x/" would otherwise be moved into itself
    earlier = [name for name in ("metrics.jsonl", "summary.json", "checkpoints")
               if os.path.exists(os.path.join(run_dir, name))]
    if earlier and D.rank() == 0:
        stamp = f"{run_dir}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, suffix = stamp, 1
        while os.path.exists(aside):
            suffix += 1
            aside = f"{stamp}-{suffix}"
        os.replace(run_dir, aside)
        print(f"r1fast.train: {run_dir} holds an earlier run ({', '.join(earlier)}); moved it to {aside} "
              "(--train.resume latest continues a run instead)", file=sys.stderr)
    D.barrier()
