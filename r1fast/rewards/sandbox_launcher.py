"""The two scripts the code sandbox runs in its child processes (stdlib only, as ``python -I -S -c``).

``PRELUDE`` runs the program; ``LAUNCHER`` applies the protections and execs it. See ``sandbox.py``.
"""

# Runs the program as ``__main__`` with the exit/quit builtins that site.py would have added; the
# traceback of an error starts at the program's own frame, with its own file name and line numbers.
PRELUDE = r"""
def _run():
    import builtins, os, sys, _sitebuiltins
    gate = int(sys.argv[1])
    # The init puts us in the run's cgroup before user code runs. When it cannot, it reports that on the
    # status pipe (our exit code and stderr are the program's, so they cannot say it) and exits, which
    # kills this namespace: a shut gate only has to keep the program from starting.
    if gate >= 0 and os.read(gate, 1) != b"1":
        os._exit(125)
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    del sys.argv[:2]
    with open(sys.argv[0], "rb") as handle:
        source = handle.read()
    main = sys.modules["__main__"].__dict__
    main.clear()
    main.update(__name__="__main__", __doc__=None, __package__=None, __loader__=None, __spec__=None,
                __file__=sys.argv[0], __cached__=None, __builtins__=builtins)
    try:
        code = compile(source, sys.argv[0], "exec")
    except (SyntaxError, ValueError) as exc:
        sys.excepthook(type(exc), exc.with_traceback(None), None)
        sys.exit(1)
    try:
        exec(code, main)
    except SystemExit:
        raise
    except BaseException as exc:
        exc.with_traceback(exc.__traceback__.tb_next)  # drop this frame
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)
_run()
"""

# Runs as the caller (a fresh interpreter, so no inherited threads), applies the protections, then
# execs the program's interpreter. With a PID namespace it forks an init (pid 1) that builds the jail,
# forks the program, reports its wait status through a pipe and exits, which kills the namespace; the
# outer process exits as the program did. A protection that fails is reported on the status pipe
# (cfg["status"], close-on-exec: the program never holds it; see sandbox_pipes.py), then exits 125.
LAUNCHER = r"""
import ctypes, os, resource, signal, sys
cfg = eval(sys.argv[1], {"__builtins__": {}})  # a literal from the trainer (json's import costs ~3x more)
os.set_inheritable(cfg["status"], False)  # pass_fds made it inheritable; the program's exec must drop it
libc = ctypes.CDLL(None, use_errno=True)
prctl = lambda *args: libc.prctl(*map(ctypes.c_ulong, args))
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

def abort(message):
    try:
        os.write(cfg["status"], b"sandbox: %s\n" % message.encode(errors="replace"))
    except OSError:
        pass  # the trainer is gone: nobody to tell
    os._exit(125)

def fail(what, errno=None):
    abort("%s failed, errno %d" % (what, ctypes.get_errno() if errno is None else errno))

def mount(src, dst, fstype, flags, data=None, check=True):
    enc = lambda s: s.encode() if s is not None else None
    ok = libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0
    if check and not ok:
        fail("mount " + dst)
    return ok

def bind_readonly(src, dst):
    mount(src, dst, None, BIND | REC)
    f = os.statvfs(dst).f_flag  # keep nosuid/nodev/noexec/atime flags: a user namespace may not drop them
    mount(None, dst, None, BIND | REMOUNT | RDONLY | (f & 3086) | ((1 << 21) if f & 4096 else 0))

def jail(j):
    with open(j["code_fd"], "rb") as handle:
        code = handle.read()
    new, scratch = j["root"], "size=%d,nr_inodes=4096,mode=1777" % j["scratch_bytes"]
    mount(None, "/", None, REC | PRIVATE)
    mount("tmpfs", new, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=4096,mode=755")
    for path in ("/dev", "/proc", "/tmp", "/var/tmp"):
        os.makedirs(new + path, exist_ok=True)
    mount("tmpfs", new + "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,mode=755")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(new + "/dev/" + name, "w").close(); mount("/dev/" + name, new + "/dev/" + name, None, BIND)
    for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + target, new + "/dev/" + name)
    os.mkdir(new + "/dev/shm")
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        mount("tmpfs", new + path, "tmpfs", NOSUID | NODEV, scratch)
    # after the scratch mounts: a python under /tmp (a venv made there) lands over them, not hidden beneath
    for path in j["binds"]:
        if os.path.islink(path) and path.count("/") == 1:
            os.symlink(os.readlink(path), new + path)
        elif os.path.isdir(path):
            os.makedirs(new + path, exist_ok=True); bind_readonly(path, new + path)
    if not mount("proc", new + "/proc", "proc", NOSUID | NODEV | NOEXEC, check=False):
        bind_readonly("/proc", new + "/proc")  # a user namespace may refuse a fresh proc
    os.makedirs(new + os.path.dirname(j["program"]), 0o711); os.makedirs(new + j["work"], 0o700)
    with open(new + j["program"], "wb") as handle:
        handle.write(code)
    os.chmod(new + j["program"], 0o644)
    if cfg["uid"] is not None:
        os.chown(new + j["work"], cfg["uid"], cfg["uid"])
    os.chdir(new); os.chroot("."); os.chdir(j["work"])
    mount(None, "/", None, BIND | REMOUNT | RDONLY | NOSUID | NODEV)

def main():
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the trainer
    if os.getppid() != cfg["parent"]:
        os._exit(125)
    flags, ids = cfg["unshare"], (os.getuid(), os.getgid())
    if flags and libc.unshare(flags) != 0:
        fail("unshare")
    if flags & 0x10000000:  # a user namespace: map our ids to themselves, so its tmpfs can be written
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (ids[0], ids[0])),
                           ("gid_map", "%d %d 1" % (ids[1], ids[1]))):
            with open("/proc/self/" + name, "w") as handle:
                handle.write(text)
    if flags & 0x20000000:
        read_end, write_end = os.pipe()
        init = os.fork()
        if init:  # outside the namespace: exit as the program did
            os.close(write_end)
            status = os.waitpid(init, 0)[1]
            report = os.read(read_end, 32)
            status = int(report) if report else status
            if os.WIFSIGNALED(status):
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                if os.WTERMSIG(status) != signal.SIGKILL:
                    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                os.kill(os.getpid(), os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)
        prctl(1, signal.SIGKILL)  # the init dies with the outer process (killpg at the deadline)
    cgroups = [os.open(path, os.O_WRONLY) for path in cfg["cgroups"]]
    if cfg["jail"]:
        jail(cfg["jail"])
    gate = -1
    if flags & 0x20000000:
        prctl(4, 0)  # PR_SET_DUMPABLE 0: the program cannot inspect its init
        gate, opened = os.pipe() if cgroups else (-1, -1)
        program = os.fork()
        if program:  # the init: join the program to its cgroups while its interpreter starts (hides the
            try:     # 5-20 ms RCU wait of an attach), open its gate, then reap orphans until it exits
                for fd in cgroups:
                    os.write(fd, b"%d" % program)
                if cgroups:
                    os.write(opened, b"1")
            except OSError as exc:  # the gate stays shut; the init's exit kills the namespace
                fail("joining the run's cgroup", exc.errno)
            if cgroups:
                os.close(opened)
            while True:
                pid, status = os.waitpid(-1, 0)
                if pid == program:
                    os.write(write_end, b"%d" % status); os._exit(0)
        if gate >= 0:
            os.set_inheritable(gate, True)
    else:
        for fd in cgroups:
            os.write(fd, b"0")
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["uid"] is not None:
        os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
    # Kernel keyrings pass through fork, exec, namespaces and chroot: a fresh anonymous session keyring
    # hides the trainer's (an HF token kept there was readable), and clearing the spare uid's user
    # keyring hides what an earlier run under that uid left. Failure (ENOSYS, a seccomp EPERM) means the
    # program cannot reach keyrings either. The caller's own user keyring is never cleared.
    keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
    if keyctl is not None:
        libc.syscall(ctypes.c_long(keyctl), ctypes.c_long(1), ctypes.c_void_p(None))  # JOIN_SESSION_KEYRING
        if cfg["uid"] is not None:
            libc.syscall(ctypes.c_long(keyctl), ctypes.c_long(7), ctypes.c_long(-4))  # CLEAR @u
    if prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries (su) gain nothing
        fail("no_new_privs")
    os.umask(0o077)
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", cfg["prelude"], str(gate), cfg["program"]], cfg["env"])

try:
    main()
except Exception as exc:
    abort(repr(exc))
"""
