"""The trainer's ends of a sandbox run's pipes: the program's capped output, and the launcher's status.

The status pipe is how the launcher says "the sandbox itself failed" (a protection the probe granted
broke, the run's cgroup could not be joined). It used to be exit code 125 plus a ``sandbox:`` prefix
on stderr, both of which the model's program controls: one program doing ``sys.stderr.write('sandbox:
x'); sys.exit(125)`` raised SandboxError, aborted its batch's thread pool and made the registry score
all 6 samples of a probe batch again one at a time (12 runs instead of 6). The status pipe's write end
is close-on-exec in the launcher, so the program's interpreter never holds it; only the launcher and
its init (code of ours, before the exec) can write to it. (Only where the sandbox gets neither a spare
uid nor a PID namespace could the program reopen a pipe through the trainer's /proc/<pid>/fd; it could
then signal the trainer as well, and ``capabilities()`` logs that machine as degraded.)
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time

__all__ = ["is_utf8", "encode_text", "status_pipe", "read_status", "collect_output"]

_STATUS_MAX = 4096  # the launcher writes one short line; more is never read


def is_utf8(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form (a lone surrogate has none); ``encode_text`` says why not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_text(text: str, name: str) -> bytes:
    """``text`` as UTF-8, or a UnicodeEncodeError (a ValueError) naming the argument ``name``.

    A lone surrogate (a JSON ``\\udcff`` escape decodes to one) has no UTF-8 form; encoding first means
    the run fails before it opens any file (a memfd leaked per such run before)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnicodeEncodeError(exc.encoding, exc.object, exc.start, exc.end,
                                 f"{name}: not valid UTF-8 text ({exc.reason})") from None


def status_pipe() -> tuple[int, int]:
    """``(read_fd, write_fd)``: the read end non-blocking (read once, after the run), both close-on-exec
    here (``pass_fds`` hands the write end to the launcher, which marks it close-on-exec again)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


def read_status(read_fd: int) -> str:
    """What the launcher reported (empty when the sandbox worked); call after the launcher exited.

    Non-blocking: the init may still hold the write end for a moment after the launcher is reaped (it
    dies of PR_SET_PDEATHSIG), but everything written before the launcher's exit is already buffered."""
    try:
        data = os.read(read_fd, _STATUS_MAX)
    except BlockingIOError:
        data = b""
    return data.decode("utf-8", errors="replace").strip()


def collect_output(proc: subprocess.Popen, limits) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until EOF, the deadline or the output cap; never blocks past the deadline.

    Returns ``(stdout, stderr, timed_out, truncated)``; closes both streams."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in buffers:
        selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + limits.wall_time_s
    timed_out = truncated = False
    try:
        while selector.get_map() and not truncated:
            now = time.monotonic()
            if now >= deadline:
                # Past the deadline with the program still running is a timeout; a finished program
                # whose orphans still hold the pipes is judged on what it printed (orphans die below).
                timed_out = proc.poll() is None
                break
            if proc.poll() is not None:
                # The program is gone; give orphans that still hold the pipes a moment, no more.
                deadline = min(deadline, now + 0.2)
            for key, _ in selector.select(min(deadline - now, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                buffer += chunk
                if len(buffer) > limits.max_output_bytes:
                    del buffer[limits.max_output_bytes:]
                    truncated = True
    finally:
        selector.close()
        for stream in buffers:
            stream.close()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), timed_out, truncated
