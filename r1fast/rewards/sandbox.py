"""A local sandbox for model-written Python: run one program on one stdin, capture capped output.

Protections (Linux); ``capabilities()`` probes once which the machine grants, logs the missing ones
once, and every result records what applied:
- always: a wall clock (the run's process group is SIGKILLed at the deadline), rlimits (CPU seconds,
  address space per process, processes, file size, open files, no core), a private empty working
  dir (also HOME and TMPDIR), a cleared environment (PATH, HOME, TMPDIR, LANG), ``python -I -S``
  (stdlib only; a prelude restores the ``exit``/``quit`` builtins that ``-S`` drops),
  ``PR_SET_NO_NEW_PRIVS`` (setuid binaries such as su run without privileges), stdin from an
  unlinked file, expected outputs never leave the parent, output capped at ``max_output_bytes``;
- as root: a fresh uid/gid per run (unique among live runs), so RLIMIT_NPROC counts only the run,
  and the program cannot signal the trainer or read 0600/0700 files;
- namespaces (unprivileged callers add a user namespace): network (no interface but a down
  loopback), IPC (SysV segments die with the run), PID (the program runs under a tiny init; when the
  program exits or the deadline passes, the kernel kills every process left in the namespace, setsid
  or not), and mount: the program runs in a jail built from bind mounts (below);
- a cgroup per run when one can be made (cgroup v1 memory+pids hierarchies, or a v2 directory
  with both controllers enabled for children): ``memory_bytes`` then also bounds the run's total
  memory (tmpfs included) and ``max_processes`` its tasks.

The jail's rule: only what the interpreter and system need is visible, read-only: /usr, /bin,
/sbin, /lib*, /etc and the sandbox python's prefixes (``sys.prefix``/``sys.base_prefix`` when it is
the trainer's python); a fresh /proc; a /dev with null, zero, full, random, urandom; and size-capped
tmpfs at /tmp, /var/tmp and /dev/shm (``_SCRATCH_FILES`` x ``max_file_bytes`` each) that vanish
with the run. Everything else (/work, /home, /root, /mnt, /srv, /opt, /data, the trainer's cwd, /sys)
is absent, so a program cannot read the dataset's expected outputs.

Not enforced where the OS refuses it: without namespaces world-readable files stay readable, files
written to /tmp, /var/tmp or /dev/shm outlive the run (and, without a uid drop, so do writes to anything
the trainer's user may write: its repo, its venv), the network stays reachable, and an escaped child
(setsid) is found only by uid (root) or not at all;
without root RLIMIT_NPROC counts all the user's processes (set to their count plus the limit);
without a cgroup ``memory_bytes`` is per process, so a run may hold up to ``max_processes x
memory_bytes`` (16 x 512 MiB by default). ``capabilities()`` says which protections this machine gives;
every result records them, and a missing one is logged once. No seccomp filter: kernel keyrings are
handled by joining a fresh session keyring and clearing the spare uid's user keyring before the program
runs (the trainer's session keyring was readable through fork and exec).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from .sandbox_cgroup import cgroup_create, cgroup_parents
from .sandbox_cgroup import cgroup_remove as _cgroup_remove
from .sandbox_launcher import LAUNCHER as _LAUNCHER
from .sandbox_launcher import PRELUDE as _PRELUDE
from .sandbox_pipes import collect_output, encode_text, read_status, status_pipe

__all__ = ["SandboxLimits", "SandboxResult", "SandboxError", "capabilities", "run_python"]

logger = logging.getLogger("r1fast.rewards.sandbox")

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_JAIL_PROGRAM, _JAIL_WORK = "/tmp/prog/main.py", "/tmp/work"
# Each scratch tmpfs holds this many files of the size limit: room for a program's temporaries,
# and 3 x 4 x 1 MiB = 12 MiB of RAM per run at the defaults (a RAM disk of 24 GiB was reachable before).
_SCRATCH_FILES = 4


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): e.g. a protection granted by the probe broke.

    Only the launcher reports it, on a pipe the program cannot reach (``sandbox_pipes.py``)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run. ``memory_bytes`` bounds each process's address space and, with a
    cgroup, the run's total memory; without one a run may hold ``max_processes x memory_bytes``."""

    wall_time_s: float = 5.0
    cpu_time_s: int = 5
    memory_bytes: int = 512 * 2**20
    max_processes: int = 16
    max_file_bytes: int = 2**20
    max_open_files: int = 32
    max_output_bytes: int = 64 * 2**10

    def validate(self) -> None:
        """ValueError naming the field and value unless each limit is positive and of its kind: the
        integer fields become rlimits and cgroup files (``cpu_time_s=1.5`` made setrlimit fail every run)."""
        wall = self.wall_time_s
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 < wall < math.inf:
            raise ValueError(f"limits.wall_time_s: expected a positive finite number, got {wall!r}")
        for name in ("cpu_time_s", "memory_bytes", "max_processes", "max_file_bytes", "max_open_files",
                     "max_output_bytes"):
            value = getattr(self, name)
            # 2**62: every rlimit (the CPU one is set to value + 1) stays below RLIM_INFINITY's 2**63 - 1
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**62:
                raise ValueError(f"limits.{name}: expected an int in [1, 2**62], got {value!r}")


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
    filesystem_isolated: bool = False  # the jail: only system dirs and the python prefix visible
    processes_contained: bool = False  # PID namespace: nothing outlives the run
    memory_limit_per_run: bool = False  # a cgroup bounds the run's total memory and tasks

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


_CAPS: dict | None = None
_cgroup_parents = cgroup_parents  # a module global, so tests can fake it
_CAPS_LOCK = threading.Lock()
_RUN_COUNTER = itertools.count()
_UIDS_PER_PROCESS = 1000  # uids a trainer process cycles through; more than its concurrent runs


def _launch(cfg: dict, **popen_kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, repr(cfg)],
                            start_new_session=True, close_fds=True, **popen_kwargs)


def _next_uid() -> int:
    """A uid no other live sandbox uses: unique per trainer process (pids are unique on the machine,
    so two ranks never share one or kill each other's programs) and cycled through 1000 values, so a
    uid is reused only long after its zombies (which still count for RLIMIT_NPROC) are reaped."""
    return 100_000 + os.getpid() * _UIDS_PER_PROCESS + next(_RUN_COUNTER) % _UIDS_PER_PROCESS


@functools.lru_cache(maxsize=8)
def _jail_binds(python: str) -> list[str]:
    """Directories the jail shows: the system dirs, then the interpreter's prefixes not already under one."""
    prefixes = {os.path.dirname(os.path.dirname(path)) for path in (python, os.path.realpath(python))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        prefixes |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    binds = [path for path in _SYSTEM_DIRS if os.path.lexists(path)]
    for prefix in sorted(prefixes, key=len):
        if prefix != "/" and not any(prefix == b or prefix.startswith(b + "/") for b in binds):
            binds.append(prefix)
    return binds


def _cgroup_create(parents: list[str], name: str, limits: SandboxLimits) -> list[str]:
    try:
        return cgroup_create(parents, name, limits)
    except OSError as exc:
        raise SandboxError(f"sandbox: {exc}") from None


def capabilities() -> dict:
    """Probe once which protections work here, each by a real run of a tiny program.

    Returns ``{"netns": flags or 0, "drop_privileges", "ipcns", "pidns", "filesystem": bool,
    "cgroups": [parent dirs], "python": path (inside the jail: the trainer's own when the jail shows it),
    "python_unjailed": path (the one that runs without the jail), "jail_root": mount point}``; logs once
    what is missing."""
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is None:
            _CAPS = _probe()
            missing = [name for name in ("netns", "drop_privileges", "ipcns", "pidns", "filesystem", "cgroups")
                       if not _CAPS[name]]
            if missing:
                logger.warning("code sandbox: %s unavailable on this machine (see r1fast/rewards/sandbox.py)",
                               ", ".join(missing))
        return _CAPS


def _probe() -> dict:
    root = os.geteuid() == 0
    userns = 0 if root else _CLONE_NEWUSER
    pythons = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                                  if os.path.exists(p) and os.path.realpath(p) != os.path.realpath(sys.executable)]
    limits = SandboxLimits(wall_time_s=30, cpu_time_s=30, memory_bytes=256 * 2**20)

    def works(caps: dict) -> bool:
        try:
            result = _run_isolated("import collections, json\nprint('ok')\n", "", limits, caps)
        except (OSError, SandboxError):
            return False
        return result.ok and result.stdout == "ok\n"

    jail_root = tempfile.mkdtemp(prefix="r1fast-jail-")  # an empty mount point each run's jail covers privately
    atexit.register(shutil.rmtree, jail_root, True)
    caps = {"netns": 0, "drop_privileges": False, "ipcns": False, "pidns": False, "filesystem": False,
            "cgroups": [], "python": sys.executable, "jail_root": jail_root}
    for drop, python in itertools.product((True, False) if root else (False,), pythons):
        if works({**caps, "drop_privileges": drop, "python": python}):
            caps.update(drop_privileges=drop, python=python, python_unjailed=python)
            break
    for name, value in (("netns", _CLONE_NEWNET | userns), ("ipcns", True), ("pidns", True), ("filesystem", True),
                        ("cgroups", _cgroup_parents())):
        if value and works({**caps, name: value}):
            caps[name] = value
    if root and caps["filesystem"] and (caps["python"] != sys.executable or not caps["drop_privileges"]):
        # The jail binds the trainer's own python (under /root, 0700, out of a dropped uid's reach before it):
        # prefer it, or programs ran on an older system python (3.8 would fail valid `match` programs)
        if works({**caps, "drop_privileges": True, "python": sys.executable}):
            caps.update(drop_privileges=True, python=sys.executable)
    return caps


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
    return _run_isolated(code, stdin, limits, capabilities())


def _run_isolated(code: str, stdin: str, limits: SandboxLimits, caps: dict) -> SandboxResult:
    # Text with a lone surrogate has no UTF-8 form: refuse it (a ValueError naming the argument) before
    # anything is made that needs cleaning up. The code reward decides what such a sample scores.
    code_bytes, stdin_bytes = encode_text(code, "code"), encode_text(stdin, "stdin")
    uid = _next_uid() if caps["drop_privileges"] else None
    # Without the jail the program's file and working dir live on the host's disk (~8 ms to make and
    # delete on this ext4); the jail gets both on its own tmpfs.
    host_dir = None if caps["filesystem"] else tempfile.mkdtemp(prefix="r1fast-sandbox-")
    cgroups: list[str] = []
    try:
        cgroups = _cgroup_create(caps["cgroups"], f"r1fast-sandbox-{os.getpid()}-{os.urandom(6).hex()}", limits)
        return _run(code_bytes, stdin_bytes, limits, caps, uid, host_dir, cgroups)
    finally:
        if uid is not None and not caps["pidns"]:
            _kill_uid(uid)  # stragglers that left the process group (a PID namespace leaves none)
        _cgroup_remove(cgroups)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)


def _host_files(code: bytes, uid: int | None, host_dir: str) -> tuple[str, str]:
    """The program file (read-only to the program) and its private working dir, on the host."""
    prog_dir, work_dir = os.path.join(host_dir, "prog"), os.path.join(host_dir, "work")
    os.mkdir(prog_dir)
    os.mkdir(work_dir, 0o700)
    program = os.path.join(prog_dir, "main.py")
    with open(program, "wb") as handle:
        handle.write(code)
    os.chmod(host_dir, 0o711)
    os.chmod(prog_dir, 0o755)
    os.chmod(program, 0o644)
    if uid is not None:
        os.chown(work_dir, uid, uid)
    return program, work_dir


def _run(code: bytes, stdin: bytes, limits: SandboxLimits, caps: dict, uid: int | None, host_dir: str | None,
         cgroups: list[str]) -> SandboxResult:
    status_read, status_write = status_pipe()
    try:
        try:
            proc = _start(code, stdin, limits, caps, uid, host_dir, cgroups, status_write)
        finally:
            os.close(status_write)  # the launcher holds its own copy
        out, err, timed_out, truncated = collect_output(proc, limits)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
        failure = read_status(status_read)
    finally:
        os.close(status_read)
    if failure:  # from the launcher, never the program: its exit code and stderr are its own
        raise SandboxError(failure)
    return SandboxResult(
        stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
        returncode=None if timed_out or truncated else returncode, timed_out=timed_out,
        output_truncated=truncated, network_isolated=bool(caps["netns"]), privileges_dropped=uid is not None,
        filesystem_isolated=host_dir is None, processes_contained=caps["pidns"], memory_limit_per_run=bool(cgroups),
    )


def _start(code: bytes, stdin: bytes, limits: SandboxLimits, caps: dict, uid: int | None, host_dir: str | None,
           cgroups: list[str], status_fd: int) -> subprocess.Popen:
    """Launch the run: the launcher gets the config, the program (a memfd for the jail), stdin and ``status_fd``."""
    jail = host_dir is None
    code_fd = -1
    try:
        if jail:
            program, work_dir = _JAIL_PROGRAM, _JAIL_WORK
            code_fd = os.memfd_create("program")  # the launcher copies it into the jail
            with open(code_fd, "wb", closefd=False) as handle:
                handle.write(code)
            os.lseek(code_fd, 0, os.SEEK_SET)
        else:
            program, work_dir = _host_files(code, uid, host_dir)
        flags = caps["netns"] | (_CLONE_NEWIPC if caps["ipcns"] else 0) | (_CLONE_NEWPID if caps["pidns"] else 0)
        flags |= _CLONE_NEWNS if jail else 0
        if flags and os.geteuid() != 0:
            flags |= _CLONE_NEWUSER
        nproc = limits.max_processes if uid is not None else _count_user_tasks(os.getuid()) + limits.max_processes
        cfg = {
            # the interpreter the probe found for this set of protections (the trainer's, inside the jail)
            "unshare": flags, "uid": uid, "python": caps["python"] if jail else caps.get("python_unjailed", caps["python"]),
            "prelude": _PRELUDE, "program": program, "status": status_fd,
            "parent": os.getpid(), "cgroups": [os.path.join(path, "cgroup.procs") for path in cgroups],
            "env": {"PATH": "/usr/bin:/bin", "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8"},
            "jail": {"root": caps["jail_root"], "code_fd": code_fd, "program": program, "work": work_dir,
                     "binds": _jail_binds(caps["python"]),
                     "scratch_bytes": _SCRATCH_FILES * limits.max_file_bytes + len(code) + 2**16,
                     } if jail else None,
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
            stdin_file.write(stdin)
            stdin_file.seek(0)
            return _launch(cfg, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           pass_fds=(status_fd, code_fd) if jail else (status_fd,), cwd="/" if jail else work_dir)
    finally:
        if code_fd >= 0:
            os.close(code_fd)
