"""Run-directory bookkeeping shared by r1fast.train and r1fast.pipeline: exclusive locks, JSON markers
read defensively, and setting an earlier run aside instead of mixing two runs in one directory."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

from r1fast import distributed as D
from r1fast.safe_write import UnsafePathError, open_lock

__all__ = ["lock_beside", "lock_run_dir", "read_json", "save_run_config", "set_aside_earlier_run"]


def _flock(path: str, run_dir: str, error: type[Exception]):
    """The open ``path``, exclusively flock-ed, recording ``pid <pid> on <host>`` for the next contender.

    flock, not a pid file: the kernel drops it when the holder dies, SIGKILL included, so a killed run
    never blocks the next one. Opened without truncating: the holder's line is read before a refusal. Never
    through a symlink (``open_lock``): one planted there had the target's content replaced by our pid line."""
    import fcntl

    try:
        handle = open_lock(path)  # the open file is the lock
    except UnsafePathError as err:
        raise error(f"{run_dir}: cannot lock the run directory: {err}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()  # empty in the instant between the holder's flock and its write
        handle.close()
        held_by = f" ({holder}; lock file {path})" if holder else f" (lock file {path})"
        raise error(f"{run_dir}: another process is running on this run directory{held_by}") from None
    handle.truncate(0)  # at position 0: nothing was read
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def lock_run_dir(run_dir: str, error: type[Exception] = RuntimeError,
                 keys: tuple[str, str] = ("pipeline.out_dir", "pipeline.name")):
    """An exclusive lock on ``<run_dir>/.lock``, held while the returned file stays open (the OS drops it
    at exit): two pipeline invocations on one run directory deleted each other's stages (one died with a
    checkpoint directory gone). Raises ``error`` naming the holder when another process holds it, and naming
    ``keys`` (as ``lock_beside``) when a file is where the run directory or one above it belongs."""
    refusal = _file_in_the_way(run_dir, keys)  # os.makedirs's NotADirectoryError traceback before
    if refusal is not None:
        raise error(refusal)
    os.makedirs(run_dir, exist_ok=True)
    return _flock(os.path.join(run_dir, ".lock"), run_dir, error)


def _file_in_the_way(run_dir: str, keys: tuple[str, str]) -> str | None:
    """Why ``run_dir`` cannot be a directory: it, or a directory above it, is a file (``keys``: the config fields of
    the parent and the name), else None. A file at out_dir/name died after the model loaded, in config.toml's
    makedirs (under torchrun: every rank's traceback from the shared-directory check); a file at out_dir said
    only "cannot lock the run directory: [Errno 17] File exists"."""
    path = Path(os.path.abspath(run_dir))
    for p in reversed([path, *path.parents]):
        if os.path.lexists(p) and not os.path.isdir(p):
            if p == path:
                return f"{keys[1]}: the run directory {run_dir} is a file, not a directory; move it or choose another {keys[1]}"
            return f"{keys[0]}: {p} is a file, not a directory (the run directory is {run_dir})"
    return None


def lock_beside(run_dir: str, error: type[Exception] = RuntimeError, keys: tuple[str, str] = ("out_dir", "name")):
    """An exclusive lock on ``<parent>/.<name>.lock`` next to ``run_dir``, taken by rank 0 and agreed by all.

    A second r1fast.train into a live run directory moved the running run to ``.prev-<time>``: the first
    kept logging into the moved metrics.jsonl while its checkpoints landed in the second's directory. The
    file sits beside the directory, not in it, so ``set_aside_earlier_run`` never moves it away from the
    holder, and inside a pipeline's directory it differs from the pipeline's own ``.lock`` (no self-deadlock).
    Every rank calls it: rank 0's outcome is broadcast, so all ranks raise ``error`` together (no rank is
    left waiting in a collective). A file where the run directory or a directory above it belongs is refused the
    same way, naming ``keys`` (the config fields of the parent directory and the run name). Returns the open lock
    file on rank 0 (close it to release), else None."""
    run_dir = os.path.normpath(run_dir)
    handle, refusal = None, None
    if D.rank() == 0:
        parent, name = os.path.split(os.path.abspath(run_dir))
        refusal = _file_in_the_way(run_dir, keys)
        try:
            if refusal is None:
                os.makedirs(parent, exist_ok=True)
                handle = _flock(os.path.join(parent, f".{name}.lock"), run_dir, error)
        except error as err:
            refusal = str(err)
        except OSError as err:  # an unwritable out_dir: rank 0 alone would fail and the others wait forever
            refusal = f"{run_dir}: cannot lock the run directory: {err}"
    refusal = D.broadcast_object(refusal)
    if refusal is not None:
        raise error(refusal)
    return handle


def read_json(path: str):
    """The JSON value in ``path``; None when the file is absent or torn (a kill mid-write, a full disk)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_run_config(cfg, run_dir: str, resumed_from: str | None = None) -> None:
    """``<run_dir>/config.toml``: the config a fresh run of this run uses (``train.resume`` = none).

    A resume wrote its own config there, resume = "latest" included, and the fresh run's was gone:
    ``--config <run>/config.toml`` then resumed the finished run (same name) or failed "holds no finished
    checkpoint" (another name). A resume keeps an existing config.toml and writes the config it ran with to
    ``config.resume-<checkpoint>.toml`` (``resumed_from``: e.g. ``step_4``; a later resume from the same
    checkpoint replaces it, as it replaces what the first one wrote after it). Rank 0 calls it."""
    from r1fast.config_dump import save_config

    fresh = os.path.join(run_dir, "config.toml")
    if resumed_from is None or not os.path.exists(fresh):  # absent: a resume of another run's checkpoint
        save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=None)), fresh)
    if resumed_from is not None:
        save_config(cfg, os.path.join(run_dir, f"config.resume-{resumed_from}.toml"))


def set_aside_earlier_run(run_dir: str, tool: str = "r1fast.train",
                          hint: str = " (--train.resume latest continues a run instead)") -> None:
    """A fresh run into a directory that holds an earlier one moves that one to ``<run_dir>.prev-<time>``:
    appending to its metrics.jsonl mixed two runs in one file and plot, and its later checkpoints were
    what ``--train.resume latest`` would then pick. Nothing is deleted. Every rank calls it (``tool`` and
    ``hint``: the stderr line's prefix and its closing remark)."""
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
        print(f"{tool}: {run_dir} holds an earlier run ({', '.join(earlier)}); moved it to {aside}{hint}",
              file=sys.stderr)
    D.barrier()
