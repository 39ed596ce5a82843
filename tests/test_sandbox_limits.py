"""Each sandbox limit on its own: the suite's adversarial programs fail under several limits at once
(a busy loop also hits the wall clock, a 4 GiB bytearray also hits the cgroup), so a limit that
stopped applying went unnoticed. Each test here makes only the limit under test decide the outcome."""

import os
import signal
import tempfile

import pytest

from r1fast.rewards import sandbox
from r1fast.rewards.sandbox import SandboxLimits, _run_isolated, capabilities, run_python

LIMITS = SandboxLimits(wall_time_s=10, cpu_time_s=1, memory_bytes=256 * 2**20, max_processes=8,
                       max_file_bytes=2**16, max_open_files=16, max_output_bytes=4096)


def test_cpu_limit_kills_a_busy_loop_long_before_the_wall_clock():
    result = run_python("while True:\n    pass\n", "", LIMITS)
    assert not result.timed_out, result  # the CPU rlimit (1 s), not the 10 s wall clock, stopped it
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL), result


def test_output_of_exactly_the_cap_is_not_truncated():
    cap = LIMITS.max_output_bytes
    result = run_python(f"import sys\nsys.stdout.write('x' * {cap})\n", "", LIMITS)
    assert result.ok and not result.output_truncated and len(result.stdout) == cap, result
    result = run_python(f"import sys\nsys.stdout.write('x' * {cap + 1})\n", "", LIMITS)
    assert result.output_truncated and not result.ok and len(result.stdout) == cap


def test_address_space_limit_refuses_untouched_memory():
    """A zeroed bytearray is never touched, so no cgroup counts it: only RLIMIT_AS refuses it."""
    size = LIMITS.memory_bytes * 3 // 2
    result = run_python(f"x = bytearray({size})\nprint('allocated')\n", "", LIMITS)
    assert not result.ok and "allocated" not in result.stdout and "MemoryError" in result.stderr, result


def test_file_size_limit_on_its_own():
    """Twice max_file_bytes fits the scratch tmpfs (4 x max_file_bytes): only RLIMIT_FSIZE refuses it."""
    size = 2 * LIMITS.max_file_bytes
    code = f"with open('/tmp/big' if __import__('os').path.isdir('/tmp/work') else 'big', 'w') as f:\n    f.write('x' * {size})\nprint('written')\n"
    result = run_python(code, "", LIMITS)
    assert not result.ok and "written" not in result.stdout and "File too large" in result.stderr, result
    result = run_python(code.replace(str(size), str(LIMITS.max_file_bytes // 2)), "", LIMITS)
    assert result.ok and result.stdout == "written\n", result


def test_process_limit_without_a_cgroup():
    """Without a cgroup RLIMIT_NPROC alone bounds the run's processes."""
    caps = {**capabilities(), "cgroups": []}
    if not caps["drop_privileges"]:
        pytest.skip("without a spare uid RLIMIT_NPROC also counts the user's other processes")
    code = ("import os, time\nn = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
            "    n += 1\nprint(n, flush=True)\nos._exit(0)\n")
    result = _run_isolated(code, "", LIMITS, caps)
    assert result.ok, result
    assert int(result.stdout) < LIMITS.max_processes


def test_run_cgroup_carries_the_limits_and_is_removed(monkeypatch):
    caps = capabilities()
    if not caps["cgroups"]:
        pytest.skip("this machine gives the sandbox no cgroup")
    seen = {}
    real_remove = sandbox._cgroup_remove

    def remove(dirs):
        for d in dirs:
            for name in ("memory.max", "memory.limit_in_bytes", "pids.max"):
                path = os.path.join(d, name)
                if os.path.exists(path):
                    with open(path) as handle:
                        seen[name] = int(handle.read())
        real_remove(dirs)
        seen["dirs"] = list(dirs)

    monkeypatch.setattr(sandbox, "_cgroup_remove", remove)
    result = run_python("print('hi')\n", "", LIMITS)
    assert result.ok and result.memory_limit_per_run
    assert seen.get("pids.max") == LIMITS.max_processes
    assert seen.get("memory.max", seen.get("memory.limit_in_bytes")) == LIMITS.memory_bytes
    assert seen["dirs"] and not any(os.path.exists(d) for d in seen["dirs"])


def test_degraded_run_removes_its_host_directory():
    caps = {**capabilities(), "netns": 0, "ipcns": False, "pidns": False, "filesystem": False, "cgroups": []}
    before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("r1fast-sandbox-")}
    result = _run_isolated("open('scratch', 'w').write('x')\nprint('ok')\n", "", LIMITS, caps)
    assert result.ok and result.stdout == "ok\n"
    after = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("r1fast-sandbox-")}
    assert after <= before


def test_dropped_privileges_drop_the_group_too():
    """A spare uid with gid 0 could still read and write whatever the root group may (0640/0660 files)."""
    if not capabilities()["drop_privileges"]:
        pytest.skip("this machine gives the sandbox no spare uid")
    result = run_python("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())\n",
                        "", LIMITS)
    assert result.ok and result.privileges_dropped, result
    uid, euid, gid, egid, groups = result.stdout.split(" ", 4)
    assert int(uid) == int(euid) == int(gid) == int(egid) >= 100_000
    assert groups.strip() == "[]"


def test_live_runs_get_distinct_uids():
    uids = {sandbox._next_uid() for _ in range(50)}
    assert len(uids) == 50 and min(uids) >= 100_000


@pytest.mark.parametrize("wall", [True, 0, -1.0, float("inf"), float("nan")])
def test_wall_time_must_be_a_positive_finite_number(wall):
    with pytest.raises(ValueError, match="wall_time_s"):
        SandboxLimits(wall_time_s=wall).validate()
