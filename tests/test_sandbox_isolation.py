"""The code sandbox's isolation: nothing outlives a run (processes, files, shared memory), the
program sees no user data, a run's memory is bounded as a whole, and exit()/quit() work.

Each protection is skipped where ``capabilities()`` reports the OS refuses it; the degraded path
(everything refused) is tested directly with a hand-made capability set."""

import logging
import os
import stat
import subprocess
import sys
import time
import uuid

import pytest

from r1fast.rewards import sandbox
from r1fast.rewards.sandbox import SandboxLimits, _jail_binds, _run_isolated, capabilities, run_python

FAST = SandboxLimits(wall_time_s=3, cpu_time_s=2, memory_bytes=256 * 2**20, max_processes=8,
                     max_file_bytes=2**16, max_open_files=16, max_output_bytes=4096)


def _require(name):
    if not capabilities()[name]:
        pytest.skip(f"this machine does not allow the sandbox's {name}")


def _processes_with(marker):
    """Live processes whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    with open(f"/proc/{pid}/stat") as handle:
                        if handle.read().rsplit(") ", 1)[-1][0] != "Z":
                            found.append(pid)
        except OSError:
            pass
    return found


def test_setuid_binary_gains_nothing_and_dies_with_the_run():
    """Double fork + setsid + exec of setuid su blocked on a pipe: su ran as root and outlived the run."""
    su = "/usr/bin/su"
    if not (os.path.exists(su) and os.stat(su).st_mode & stat.S_ISUID):
        pytest.skip("no setuid /usr/bin/su")
    marker = f"true r1fast-{uuid.uuid4().hex}"
    code = ("import os, time\n"
            "print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])\n"
            "r, w = os.pipe()\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.dup2(r, 0); os.dup2(w, 3)\n"
            f"        os.execv({su!r}, [{su!r}, '-c', {marker!r}])\n"
            "    os._exit(0)\n"
            "time.sleep(0.3)\n")
    result = run_python(code, "", FAST)
    assert result.ok and result.stdout == "1\n", result  # PR_SET_NO_NEW_PRIVS is set
    deadline = time.monotonic() + 2
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []


def test_escaped_sleeper_dies_when_the_program_exits():
    _require("pidns")
    marker = f"r1fast-{uuid.uuid4().hex}"
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    os.execv('/bin/sleep', ['/bin/sleep', '60', {marker!r}])\n"
            "print(os.getpid())\n")
    result = run_python(code, "", FAST)
    assert result.ok and result.processes_contained and result.stdout == "2\n"  # pid 1 is the sandbox's init
    assert _processes_with(marker) == []


def test_scratch_files_and_shared_memory_vanish_with_the_run():
    _require("filesystem")
    _require("ipcns")
    name, key = f"r1fast-{uuid.uuid4().hex}", int(uuid.uuid4().int % 2**30) + 1
    code = ("import ctypes, os\n"
            "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
            f"    open(os.path.join(d, {name!r}), 'w').write('x')\n"
            "n = 0\n"  # the scratch tmpfs is capped near _SCRATCH_FILES files of max_file_bytes
            "try:\n"
            "    for i in range(40):\n"
            f"        open(f'/dev/shm/{name}{{i}}', 'wb').write(b'x' * {FAST.max_file_bytes - 1})\n"
            "        n += 1\n"
            "except OSError as exc:\n"
            "    print('full', exc.errno)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"print(n, libc.shmget({key}, 2**20, 0o1600) >= 0)\n")
    result = run_python(code, "", FAST)
    assert result.ok and result.filesystem_isolated, result
    full, count = result.stdout.splitlines()
    assert full == "full 28" and count.split()[1] == "True"  # ENOSPC, and the segment was made
    assert int(count.split()[0]) <= sandbox._SCRATCH_FILES + 1
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not [f for f in os.listdir(d) if f.startswith(name)]
    with open("/proc/sysvipc/shm") as handle:
        assert not [line for line in handle.read().splitlines()[1:] if int(line.split()[0]) == key]


def test_user_data_is_hidden(tmp_path, monkeypatch):
    _require("filesystem")
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"tests": [{"input": "1", "output": "secret"}]}\n')
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o644)
    code = (f"import os\nprint(os.path.exists({str(data)!r}), os.path.exists({os.getcwd()!r}))\n"
            "print(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/tmp')), os.getcwd())\n")
    result = run_python(code, "", FAST)
    assert result.ok, result
    exists, top, tmp = result.stdout.splitlines()
    assert exists == "False False"  # neither the dataset nor the trainer's cwd
    binds = _jail_binds(capabilities()["python"])
    assert set(eval(top)) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp",
                              "var"} | {p.split("/")[1] for p in binds}
    # plus the top folder of a trainer python installed under /tmp (a venv there), which the jail binds
    python_in_tmp = {p.split("/")[2] for p in binds if p.startswith("/tmp/")}
    assert tmp == f"{sorted({'prog', 'work'} | python_in_tmp)} /tmp/work"
    escape = "open('/etc/r1fast-probe', 'w')\n"  # the jail's system dirs are read-only
    assert "Read-only file system" in run_python(escape, "", FAST).stderr


def test_jail_shows_the_trainers_python_prefix():
    """A python installed outside /usr (pyenv under /root here) still runs inside the jail."""
    _require("filesystem")
    assert sys.base_prefix.startswith("/usr") or sys.base_prefix in _jail_binds(sys.executable)
    caps = {**capabilities(), "python": sys.executable}
    result = _run_isolated("import sys, json\nprint(sys.base_prefix)\n", "", FAST, caps)
    assert result.ok and result.stdout == sys.base_prefix + "\n", result


def test_jail_runs_a_python_from_a_venv_under_tmp(tmp_path):
    """The jail mounts a fresh /tmp: a venv made under /tmp was hidden under it and its python failed to start
    (SandboxError: FileNotFoundError) until the jail bound such prefixes over the fresh tmpfs."""
    _require("filesystem")
    venv = tmp_path / "venv"  # pytest's tmp_path lives under /tmp
    assert str(venv).startswith("/tmp/")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    caps = {**capabilities(), "python": python}
    result = _run_isolated("import sys\nprint(sys.executable)\n", "", FAST, caps)  # -S: no venv prefix to show
    assert result.ok and result.stdout == python + "\n", result
    assert str(venv) in _jail_binds(python)


def test_memory_limit_covers_the_whole_run():
    """3 forked children holding 40 MiB each under a 64 MiB limit all lived at once before (RLIMIT_AS
    is per process); a per-run cgroup stops them."""
    _require("cgroups")
    code = ("import os, time\n"
            "r, w = os.pipe()\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        buf = b'x' * (40 * 2**20)\n"
            "        os.write(w, b'.')\n"
            "        time.sleep(1)\n"
            "        os._exit(0)\n"
            "os.close(w)\n"
            "for _ in range(3):\n"
            "    os.wait()\n"
            "print(len(os.read(r, 16)))\n")
    limits = SandboxLimits(wall_time_s=5, cpu_time_s=4, memory_bytes=64 * 2**20)
    result = run_python(code, "", limits)
    assert result.memory_limit_per_run
    assert result.stdout != "3\n", result


@pytest.mark.parametrize("tail, code, err", [("exit()", 0, ""), ("exit(0)", 0, ""), ("quit()", 0, ""),
                                             ("exit(3)", 3, ""), ("quit('bye')", 1, "bye\n")])
def test_exit_and_quit_builtins(tail, code, err):
    result = run_python(f"print(input())\n{tail}\nprint('unreached')\n", "7\n", FAST)
    assert (result.returncode, result.stdout, result.stderr) == (code, "7\n", err)


def test_program_runs_as_main_with_its_own_traceback():
    code = ("import sys\n"
            "print(__name__, sys.argv[0] == __file__, sorted(k for k in globals() if not k.startswith('__')))\n"
            "def f():\n"
            "    return 1 / 0\n"
            "f()\n")
    result = run_python(code, "", FAST)
    assert result.returncode == 1 and result.stdout == "__main__ True ['sys']\n"
    assert result.stderr.startswith('Traceback (most recent call last):\n  File "')
    assert 'main.py", line 5, in <module>' in result.stderr and 'line 4, in f' in result.stderr
    assert "<string>" not in result.stderr and "ZeroDivisionError" in result.stderr
    result = run_python("x = (\n", "", FAST)
    assert result.returncode == 1 and 'main.py", line 1' in result.stderr and "<string>" not in result.stderr


def test_degraded_sandbox_still_runs_and_cleans_up():
    """Where the OS refuses every namespace and cgroup, runs still work and escaped children still die (by uid).

    The marker is the sleeper's argv[0]: passed as a third argument, sleep refused it as an interval and exited at
    once, so nothing escaped and the check passed even with the kill by uid disabled."""
    caps = {**capabilities(), "netns": 0, "ipcns": False, "pidns": False, "filesystem": False, "cgroups": []}
    marker = f"r1fast-{uuid.uuid4().hex}"
    code = ("import os\nif os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv('/bin/sleep', [{marker!r}, '30'])\nimport time\ntime.sleep(0.2)\nprint('done')\n")
    result = _run_isolated(code, "", FAST, caps)
    assert result.ok and not (result.filesystem_isolated or result.processes_contained or result.memory_limit_per_run)
    # the escaped sleeper holds stdout / stderr: the run still ends with its program, judged on its output
    assert result.stdout == "done\n" and not result.timed_out, result
    if caps["drop_privileges"]:
        assert _processes_with(marker) == []
    else:
        for pid in _processes_with(marker):
            os.kill(int(pid), 9)


def test_missing_protection_is_probed_away_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_CAPS", None)
    monkeypatch.setattr(sandbox, "_cgroup_parents", lambda: ["/nonexistent-r1fast-cgroup"])
    with caplog.at_level(logging.WARNING, logger="r1fast.rewards.sandbox"):
        caps = capabilities()
        capabilities()
    assert caps["cgroups"] == []
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "cgroups" in warnings[0].getMessage()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="keyctl syscall numbers written for x86_64")
def test_the_trainers_session_keyring_is_out_of_reach():
    """Keyrings pass through fork, exec, namespaces and chroot: a token the trainer keeps in its session
    keyring was readable by the model's program."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(250, 1, None) <= 0:  # KEYCTL_JOIN_SESSION_KEYRING for this test process
        pytest.skip("this machine refuses keyctl")
    key = libc.syscall(248, b"user", b"r1fast-test-secret", b"hf_SECRET_TOKEN", 15, ctypes.c_long(-3))
    assert key > 0, ctypes.get_errno()
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.syscall.restype = ctypes.c_long\n"
            "k = libc.syscall(250, 10, ctypes.c_long(-3), b'user', b'r1fast-test-secret', 0)\n"
            "buf = ctypes.create_string_buffer(64)\nn = libc.syscall(250, 11, ctypes.c_long(k), buf, 64)\n"
            "print(k, buf.raw[:max(n, 0)].decode())\n")
    try:
        result = run_python(code, limits=FAST)
    finally:
        libc.syscall(250, 3, ctypes.c_long(key))  # KEYCTL_REVOKE
    assert result.returncode == 0, result.stderr
    assert "hf_SECRET_TOKEN" not in result.stdout
