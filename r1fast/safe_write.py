"""Writing run-directory files without following symlinks.

A run directory may come from someone else (a downloaded run resumed with ``--train.resume latest``, a
shared ``out_dir``). A symlink planted at ``summary.json`` or ``.lock`` pointing outside it made r1fast
overwrite or truncate the target (a user's file replaced by "pid N on host" or by a PNG). So:

- a file r1fast writes whole is written to a new temporary file beside it (``O_CREAT|O_EXCL|O_NOFOLLOW``,
  random name) and renamed over the final name: ``os.replace`` swaps a symlink itself, never its target,
  and a reader never sees a half-written file;
- a file r1fast keeps open and appends to (metrics.jsonl) or locks (``.lock``) is opened with
  ``O_NOFOLLOW``: a symlink there is refused with one line (``UnsafePathError``), not copied (a copy
  would put the target's content, perhaps a secret, into a directory another user can read);
- a directory r1fast empties is removed with ``remove_tree``: a symlink is unlinked, its target untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat

from r1fast.config_io import DataError

__all__ = ["UnsafePathError", "open_append", "open_lock", "open_new_beside", "refuse_symlink", "remove_tree",
           "replace_atomically", "write_file"]

# O_NOFOLLOW/O_CLOEXEC are POSIX; getattr keeps the module importable where they are missing (0 = no flag)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafePathError(DataError):
    """A symlink (or a file not ours) where r1fast writes in place; one line naming the path. A ``DataError``,
    so the CLIs print it without a traceback: the run directory's content is the bad input."""


def refuse_symlink(path: str | os.PathLike, what: str = "a file r1fast writes") -> None:
    """Raise ``UnsafePathError`` when ``path`` is a symlink (dangling ones included)."""
    if os.path.islink(path):
        raise UnsafePathError(f"{os.fspath(path)} is a symlink (to {os.readlink(path)!r}), not {what}; "
                              "r1fast never writes through a symlink there: remove it")


def open_new_beside(path: str) -> tuple[int, str]:
    """A new, empty file in ``path``'s directory with a random name: (fd, its path). 0o666 before the umask,
    as ``open(path, "w")`` would create it (mkstemp's 0o600 would make summary.json private)."""
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    for _ in range(16):  # 48 random bits: a collision is already a one-in-10^14 event
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(directory, f".{name}.*.tmp"))


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False):
    """Yield a file object (``mode`` "w" or "wb") whose content replaces ``path`` when the block ends without
    an error; on an error the temporary file is removed and ``path`` is left as it was. ``fsync``: flush to
    disk before the rename (where a torn file after a power loss would cost a run's history)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    fd, tmp = open_new_beside(path)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_file(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) through ``replace_atomically``."""
    with replace_atomically(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as fh:
        fh.write(data)


def open_append(path: str | os.PathLike):
    """``path`` opened for appending text, created when absent; a symlink there raises ``UnsafePathError``."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:  # what O_NOFOLLOW answers for a symlink
            refuse_symlink(path)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def open_lock(path: str | os.PathLike):
    """``path`` opened read-write for a lock (created 0o644 when absent), never through a symlink, and only
    when it is a regular file of ours with one link: a hard link planted there would have us truncate the
    other name's content as a symlink did. Raises ``UnsafePathError`` naming the path otherwise."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse_symlink(path, "a lock file")
        raise
    info = os.fstat(fd)
    why = ("not a regular file" if not stat.S_ISREG(info.st_mode)
           else f"owned by uid {info.st_uid}, not by this user ({os.geteuid()})" if info.st_uid != os.geteuid()
           else f"a file with {info.st_nlink} hard links" if info.st_nlink != 1 else None)
    if why is not None:
        os.close(fd)
        raise UnsafePathError(f"{path} is {why}; refusing to use it as a lock file: remove it")
    return os.fdopen(fd, "r+", encoding="utf-8")


def remove_tree(path: str | os.PathLike, *, ignore_errors: bool = False) -> None:
    """Remove directory ``path`` and its content; a symlink is unlinked (its target is left alone), a missing
    path is nothing to do. ``shutil.rmtree`` refuses a symlink, and with ``ignore_errors`` silently left it
    in place for the next write to go through."""
    if os.path.islink(path):
        try:
            os.unlink(path)
        except OSError:
            if not ignore_errors:
                raise
        return
    if ignore_errors or os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
