"""Per-run cgroups for the code sandbox: one run's total memory (no swap) and task count.

cgroup v1 (memory + pids hierarchies) or v2 (a directory with both controllers enabled for children).
"""

from __future__ import annotations

import os
import signal
import time


def cgroup_parents() -> list[str]:
    """Where run cgroups can be made: [v1 memory dir, v1 pids dir] or [v2 dir], else []."""
    try:
        with open("/proc/self/mounts") as handle:
            mounts = [line.split()[1:4] for line in handle]
        with open("/proc/self/cgroup") as handle:
            own = {ctrl: path for _, ctrls, path in (line.rstrip("\n").split(":", 2) for line in handle)
                   for ctrl in ctrls.split(",")}
    except (OSError, ValueError):
        return []
    v1 = {opt: point for point, fstype, opts in mounts if fstype == "cgroup" for opt in opts.split(",")}
    if "memory" in v1 and "pids" in v1:
        dirs = [v1[c] + own.get(c, "") if os.path.isdir(v1[c] + own.get(c, "")) else v1[c] for c in ("memory", "pids")]
        return dirs if all(os.access(d, os.W_OK) for d in dirs) else []
    for point, own_dir in ((p, p + own.get("", "").rstrip("/")) for p, fstype, _ in mounts if fstype == "cgroup2"):
        # v2 forbids controllers below a cgroup with processes (ours): a sibling of ours will do.
        for base in (own_dir, os.path.dirname(own_dir)) if own_dir != point else (own_dir,):
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as handle:
                    if {"memory", "pids"} <= set(handle.read().split()) and os.access(base, os.W_OK):
                        return [base]
            except OSError:
                continue
    return []


def cgroup_create(parents: list[str], name: str, limits) -> list[str]:
    """One cgroup per run under each parent, with the run's memory (no swap) and task limits."""
    made = []
    try:
        for parent in parents:
            made.append(os.path.join(parent, name))
            os.mkdir(made[-1])
            for file, value in (("memory.max", limits.memory_bytes), ("memory.swap.max", 0), ("memory.oom.group", 1),
                                ("memory.limit_in_bytes", limits.memory_bytes),
                                ("memory.memsw.limit_in_bytes", limits.memory_bytes), ("pids.max", limits.max_processes)):
                if os.path.exists(os.path.join(made[-1], file)):
                    with open(os.path.join(made[-1], file), "w") as handle:
                        handle.write(str(value))
    except OSError as exc:
        cgroup_remove(made)
        raise OSError(f"cgroup {made[-1]}: {exc}") from None
    return made


def cgroup_remove(dirs: list[str]) -> None:
    """Kill what is left in the run's cgroups, then remove them (rmdir fails while a task lives)."""
    for path in dirs:
        for _ in range(200):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                try:
                    with open(os.path.join(path, "cgroup.procs")) as handle:
                        for pid in handle.read().split():
                            os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
                time.sleep(0.005)
