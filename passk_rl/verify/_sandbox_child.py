# Sandbox child prelude. This file is NOT imported: its source is passed to ``python -I -S -c`` by
# passk_rl/verify/sandbox.py, so it must use the standard library only and define everything inline.
#
# Order matters: read the payload, set resource limits, drop privileges, install the audit hook, and only
# then run untrusted code. Results go to a private copy of the original stdout, one JSON object per line;
# the program's own stdout/stderr go to /dev/null so printing cannot forge a result.
import builtins
import json
import os
import resource
import sys


def _prelude():
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    token = payload["token"]
    res_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    out = os.fdopen(res_fd, "w", buffering=1)

    def emit(**msg):
        msg["token"] = token
        out.write(json.dumps(msg) + "\n")

    lim = payload["limits"]
    cpu = int(lim["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if lim.get("memory_mb"):
        mem = int(lim["memory_mb"]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(lim["file_size_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nofile = int(lim["max_open_files"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    uid = payload.get("drop_to_uid")
    if uid is not None and os.geteuid() == 0:
        gid = payload["drop_to_gid"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # irreversible: no way back to root, no raising the hard limits above

    workdir = os.path.realpath(os.getcwd())
    proc_self = ("/proc/self", "/proc/thread-self", "/proc/%d" % os.getpid())

    def _inside(path, root):
        return path == root or path.startswith(root + os.sep)

    def _resolve(p):
        if isinstance(p, int):
            return None
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        return os.path.realpath(os.path.join(workdir, os.fspath(p)))

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_events = {
        "socket.__new__": "network access",
        "socket.connect": "network access",
        "socket.bind": "network access",
        "socket.getaddrinfo": "network access",
        "socket.gethostbyname": "network access",
        "socket.sendto": "network access",
        "subprocess.Popen": "starting processes",
        "os.system": "starting processes",
        "os.exec": "starting processes",
        "os.posix_spawn": "starting processes",
        "os.spawn": "starting processes",
        "os.fork": "starting processes",
        "os.forkpty": "starting processes",
        "os.kill": "sending signals",
        "os.killpg": "sending signals",
        "ctypes.dlopen": "loading native code",
        "ctypes.dlsym": "loading native code",
        "ctypes.cdata": "raw memory access",
    }
    blocked_modules = ("ctypes", "_ctypes", "_posixsubprocess", "cffi", "multiprocessing")
    path_events = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "os.chdir", "os.chroot")

    max_files = int(lim["max_files_written"])
    written = set()

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            p = _resolve(path)
            if p is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not _inside(p, workdir):
                raise PermissionError("sandbox: writing outside the working directory is not allowed: %s" % p)
            if writing and p not in written:
                # RLIMIT_FSIZE bounds each file; this bounds how many, so the disk use of a run is bounded.
                if len(written) >= max_files:
                    raise PermissionError("sandbox: more than %d files written" % max_files)
                written.add(p)
            if p.startswith("/proc/") and not any(_inside(p, s) for s in proc_self):
                raise PermissionError("sandbox: reading other processes' /proc entries is not allowed")
        elif event in blocked_events:
            raise PermissionError("sandbox: %s is not allowed (%s)" % (blocked_events[event], event))
        elif event == "import":
            name = args[0] or ""
            if name.split(".")[0] in blocked_modules:
                raise ImportError("sandbox: importing %s is not allowed" % name)
        elif event in path_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)):
                    p = _resolve(a)
                    if p is not None and not _inside(p, workdir):
                        raise PermissionError("sandbox: %s outside the working directory is not allowed" % event)

    # Modules the harness itself needs are imported before the hook; untrusted code gets fresh imports only
    # of what the hook allows (a module already in sys.modules would not raise an "import" event).
    for name in blocked_modules:
        for m in list(sys.modules):
            if m == name or m.startswith(name + "."):
                del sys.modules[m]
    if payload.get("audit_hook", True):
        sys.addaudithook(hook)
    _run(payload, emit)


def _run(payload, emit):
    tests = payload["tests"]
    total = len(tests)
    emit(t="start", total=total)
    ns = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        code = compile(payload["program"], "<completion>", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in source
        emit(t="done", passed=0, total=total, phase="compile", error="%s: %s" % (type(e).__name__, e))
        return
    passed = 0
    try:
        exec(code, ns)
        if payload.get("setup"):
            exec(compile(payload["setup"], "<test setup>", "exec"), ns)
        ep = payload.get("entry_point")
        if ep:
            if ep not in ns:
                emit(t="done", passed=0, total=total, phase="entry_point",
                     error="entry point %r is not defined by the completion" % ep)
                return
            ns["candidate"] = ns[ep]
    except MemoryError:
        emit(t="memory", phase="program")
        return
    except BaseException as e:  # noqa: BLE001 - SystemExit included: exit(0) must not pass any test
        emit(t="done", passed=0, total=total, phase="program", error="%s: %s" % (type(e).__name__, str(e)[:300]))
        return
    first_error = ""
    for i, t in enumerate(tests):
        try:
            exec(compile(t, "<test %d>" % i, "exec"), ns)
            ok = True
        except MemoryError:
            emit(t="memory", phase="test %d" % i)
            return
        except BaseException as e:  # noqa: BLE001
            ok = False
            if not first_error:
                first_error = "test %d: %s: %s" % (i, type(e).__name__, str(e)[:200])
        passed += ok
        emit(t="test", i=i, ok=ok)
    emit(t="done", passed=passed, total=total, phase="tests", error=first_error)


_prelude()
