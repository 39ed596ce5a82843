"""A local sandbox for model-written Python: run one program on one stdin, capture capped output.

What is enforced (Linux):
- wall clock: the program gets its own session/process group; at the deadline the group, and when
  privileges are dropped every process of the sandbox's uid (children that called setsid), is SIGKILLed;
- rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), processes (RLIMIT_NPROC), file size
  (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core files;
- a private, empty temporary working directory (also HOME and TMPDIR) that is deleted afterwards;
- a cleared environment (PATH, HOME, TMPDIR, LANG only) and ``python -I -S`` (no user site, no
  site-packages, no PYTHON* variables, no script directory on sys.path): the stdlib only;
- network: a new, empty network namespace (``unshare(CLONE_NEWNET)``; unprivileged callers add
  CLONE_NEWUSER) when the kernel permits it: no interface but a down loopback, so every connect fails;
- privileges: when running as root, the program runs as a fresh uid/gid (cycled per run, unique among live runs,
  never a real account), so RLIMIT_NPROC counts only its own processes (root is exempt from it),
  it cannot signal or ptrace the trainer, and it cannot read 0600/0700 files such as /root;
- output: stdout and stderr are each capped at ``max_output_bytes``; past the cap the run is killed;
- test data: inputs go in through stdin (an unlinked temporary file), expected outputs never leave
  the parent, so there is no tests file to read.

What is *not* enforced: world-readable files stay readable (the program can read the repository);
without root, RLIMIT_NPROC counts all the user's processes (we set it to the current count plus the
limit) and a child that calls setsid can outlive the wall-clock kill; without namespaces the network
stays reachable; no seccomp filter, so any syscall the uid may make is allowed. ``capabilities()``
reports which of the optional protections this machine grants; the run result records them too.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxLimits", "SandboxResult", "SandboxError", "capabilities", "run_python"]

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): e.g. a protection granted by the probe broke."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run."""

    wall_time_s: float = 5.0
    cpu_time_s: int = 5
    memory_bytes: int = 512 * 2**20
    max_processes: int = 16
    max_file_bytes: int = 2**20
    max_open_files: int = 32
    max_output_bytes: int = 64 * 2**10

    def validate(self) -> None:
        for name in ("wall_time_s", "cpu_time_s", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_open_files", "max_output_bytes"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"limits.{name}: expected > 0, got {value!r}")


@dataclass
class SandboxResult:
    """What happened. ``ok`` = exited 0 in time without hitting the output cap."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    output_truncated: bool
    network_isolated: bool
    privileges_dropped: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


# Runs as the caller (a fresh interpreter, so no inherited threads), applies the protections, then
# execs the program's interpreter. A failure to apply one exits 125 with a message on stderr.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg["netns"]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(cfg["netns"]) != 0:
        os.write(2, b"sandbox: unshare failed, errno %d\n" % ctypes.get_errno()); os._exit(125)
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
if cfg["uid"] is not None:
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
os.umask(0o077)
os.execve(cfg["python"], [cfg["python"], "-I", "-S"] + cfg["args"], cfg["env"])
"""

_CAPS: dict | None = None
_CAPS_LOCK = threading.Lock()
_RUN_COUNTER = itertools.count()
_UIDS_PER_PROCESS = 1000  # uids a trainer process cycles through; more than its concurrent runs


def _launch(cfg: dict, **popen_kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                            start_new_session=True, close_fds=True, **popen_kwargs)


def _next_uid() -> int:
    """A uid no other live sandbox uses: unique per trainer process (pids are unique on the machine,
    so two ranks never share one or kill each other's programs) and cycled through 1000 values, so a
    uid is reused only long after its zombies (which still count for RLIMIT_NPROC) are reaped."""
    return 100_000 + os.getpid() * _UIDS_PER_PROCESS + next(_RUN_COUNTER) % _UIDS_PER_PROCESS


def capabilities() -> dict:
    """Probe once which protections work here: network namespace, dropping to a fresh uid, interpreter.

    Returns ``{"netns": flags or 0, "drop_privileges": bool, "python": path}``.
    """
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is not None:
            return _CAPS
        root = os.geteuid() == 0
        netns_flags = _CLONE_NEWNET if root else _CLONE_NEWNET | _CLONE_NEWUSER
        pythons = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                                      if os.path.exists(p) and os.path.realpath(p) != os.path.realpath(sys.executable)]
        probe_uid = _next_uid()
        candidates = [(netns, uid, py) for netns in (netns_flags, 0) for uid in ((probe_uid, None) if root else (None,))
                      for py in pythons]
        _CAPS = {"netns": 0, "drop_privileges": False, "python": sys.executable}
        for netns, uid, python in candidates:
            cfg = {"netns": netns, "uid": uid, "python": python, "rlimits": {}, "env": {"PATH": "/usr/bin:/bin"},
                   "args": ["-c", "import collections, json; print('ok')"]}
            try:
                proc = _launch(cfg, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/")
                out, _ = proc.communicate(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if proc.returncode == 0 and out.strip() == b"ok":
                _CAPS = {"netns": netns, "drop_privileges": uid is not None, "python": python}
                break
        return _CAPS


def _count_user_tasks(uid: int) -> int:
    """Threads of ``uid`` on the machine (RLIMIT_NPROC counts threads, not processes)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process owned by ``uid``, repeatedly, until none is left (forks race the scan).

    Zombies are skipped: they are already dead and wait for init to reap them."""
    for _ in range(100):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                with open(f"/proc/{pid}/stat", "rb") as handle:
                    state = handle.read().rsplit(b") ", 1)[-1][:1]
                if state != b"Z":
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
            except OSError:
                continue
        if not found:
            return
        time.sleep(0.01)


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a Python program reading ``stdin``; see the module docstring for the protections."""
    if not isinstance(code, str):
        raise ValueError(f"code: expected a str, got {type(code).__name__}")
    if not isinstance(stdin, str):
        raise ValueError(f"stdin: expected a str, got {type(stdin).__name__}")
    limits = limits or SandboxLimits()
    limits.validate()
    caps = capabilities()
    uid = _next_uid() if caps["drop_privileges"] else None
    root_dir = tempfile.mkdtemp(prefix="r1fast-sandbox-")
    try:
        return _run(code, stdin, limits, caps, uid, root_dir)
    finally:
        if uid is not None:
            _kill_uid(uid)  # stragglers that left the process group
        shutil.rmtree(root_dir, ignore_errors=True)


def _run(code: str, stdin: str, limits: SandboxLimits, caps: dict, uid: int | None, root_dir: str) -> SandboxResult:
    prog_dir, work_dir = os.path.join(root_dir, "prog"), os.path.join(root_dir, "work")
    os.mkdir(prog_dir)
    os.mkdir(work_dir, 0o700)
    program = os.path.join(prog_dir, "main.py")
    with open(program, "w", encoding="utf-8") as handle:
        handle.write(code)
    os.chmod(root_dir, 0o711)
    os.chmod(prog_dir, 0o755)
    os.chmod(program, 0o644)
    if uid is not None:
        os.chown(work_dir, uid, uid)
    nproc = limits.max_processes if uid is not None else _count_user_tasks(os.getuid()) + limits.max_processes
    cfg = {
        "netns": caps["netns"], "uid": uid, "python": caps["python"], "args": [program],
        "env": {"PATH": "/usr/bin:/bin", "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8"},
        "rlimits": {
            "RLIMIT_CPU": (limits.cpu_time_s, limits.cpu_time_s + 1),  # SIGXCPU, then SIGKILL
            "RLIMIT_AS": (limits.memory_bytes,) * 2,
            "RLIMIT_NPROC": (nproc,) * 2,
            "RLIMIT_FSIZE": (limits.max_file_bytes,) * 2,
            "RLIMIT_NOFILE": (limits.max_open_files,) * 2,
            "RLIMIT_CORE": (0, 0),
        },
    }
    with tempfile.TemporaryFile() as stdin_file:  # unlinked: the program sees only its own input
        stdin_file.write(stdin.encode("utf-8"))
        stdin_file.seek(0)
        proc = _launch(cfg, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work_dir)
    out, err, timed_out, truncated = _collect(proc, limits)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    returncode = proc.wait()
    if returncode == 125 and err.startswith(b"sandbox:"):
        raise SandboxError(err.decode(errors="replace").strip())
    return SandboxResult(
        stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
        returncode=None if timed_out or truncated else returncode, timed_out=timed_out,
        output_truncated=truncated, network_isolated=bool(caps["netns"]), privileges_dropped=uid is not None,
    )


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until EOF, the deadline or the output cap; never blocks past the deadline."""
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
