"""The code sandbox under adversarial programs: each must fail safely and leave nothing running."""

import os
import time

import pytest

from r1fast.rewards.sandbox import SandboxLimits, _run_isolated, capabilities, run_python

FAST = SandboxLimits(wall_time_s=1.5, cpu_time_s=1, memory_bytes=256 * 2**20, max_processes=8,
                     max_file_bytes=2**16, max_open_files=16, max_output_bytes=4096)


def _sandbox_pids():
    """Processes running under a sandbox uid (only meaningful when privileges are dropped)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid >= 100_000:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ")[-1][0] != "Z":
                        pids.append(pid)
        except OSError:
            pass
    return pids


def test_echo_roundtrip_and_clean_environment():
    code = ("import os, sys\n"
            "data = sys.stdin.read()\n"
            "print(int(data) * 2)\n"
            "print(sorted(os.environ))\n"
            "print(os.listdir('.'))\n")
    result = run_python(code, "21\n", FAST)
    assert result.ok, result
    lines = result.stdout.splitlines()
    assert lines[0] == "42"
    assert lines[1] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"  # nothing of the trainer's environment
    assert lines[2] == "[]"  # empty working directory


def test_infinite_loop_is_stopped_by_cpu_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", "", FAST)
    assert not result.ok and result.returncode != 0
    assert time.monotonic() - start < 5


def test_sleeping_program_hits_wall_clock():
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(60)\n", "", FAST)
    assert result.timed_out and not result.ok and result.returncode is None
    assert time.monotonic() - start < 5


def test_huge_power_is_stopped():
    result = run_python("print(9**9**9)\n", "", FAST)
    assert not result.ok and result.stdout == ""


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('x' * 1000)\n", "", FAST)
    assert result.output_truncated and not result.ok
    assert len(result.stdout) == FAST.max_output_bytes
    result = run_python("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n", "", FAST)
    assert result.output_truncated and not result.ok and len(result.stderr) == FAST.max_output_bytes


def test_memory_bomb_fails_without_taking_memory():
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')\n", "", FAST)
    assert not result.ok and "allocated" not in result.stdout and "MemoryError" in result.stderr
    result = run_python("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", "", FAST)
    assert not result.ok


def test_fork_bomb_is_contained_and_cleaned_up():
    start = time.monotonic()
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(code, "", FAST)
    assert not result.ok
    assert time.monotonic() - start < 10
    if capabilities()["drop_privileges"]:
        time.sleep(0.1)
        assert _sandbox_pids() == []


def test_escaped_child_is_killed():
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    time.sleep(60)\n"
            "print('done')\n")
    result = run_python(code, "", FAST)
    assert result.ok and result.stdout == "done\n"
    if not capabilities()["drop_privileges"]:
        pytest.skip("without root the escaped child is only reachable through its process group")
    time.sleep(0.1)
    assert _sandbox_pids() == []


def test_file_size_and_open_file_limits():
    result = run_python("open('big', 'w').write('x' * 10**6)\n", "", FAST)
    assert not result.ok
    result = run_python("fs = [open(f'f{i}', 'w') for i in range(100)]\n", "", FAST)
    assert not result.ok and "Too many open files" in result.stderr


def test_network_is_cut_when_the_os_allows():
    if not capabilities()["netns"]:
        pytest.skip("this machine does not allow a new network namespace")
    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
            "    print('connected')\n"
            "except OSError as exc:\n"
            "    print('blocked', exc.errno)\n")
    result = run_python(code, "", FAST)
    assert result.ok and result.stdout.startswith("blocked") and result.network_isolated


def test_private_files_are_unreadable_when_privileges_drop(tmp_path):
    if not capabilities()["drop_privileges"]:
        pytest.skip("not running as root: the sandbox keeps the caller's uid")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    os.chmod(secret, 0o600)
    # The jail would hide the file altogether (tests/test_sandbox_isolation.py): check the uid alone.
    caps = {**capabilities(), "filesystem": False}
    result = _run_isolated(f"print(open({str(secret)!r}).read())\n", "", FAST, caps)
    assert not result.ok and "s3cr3t" not in result.stdout and "PermissionError" in result.stderr


def test_bad_arguments():
    with pytest.raises(ValueError, match="code"):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="limits.wall_time_s"):
        run_python("print(1)", "", SandboxLimits(wall_time_s=0))
