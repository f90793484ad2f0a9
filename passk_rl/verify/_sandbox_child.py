# Sandbox child: runs the untrusted program and answers the judge's calls. Started by sandbox.py as
# ``python -I -S -c "<import this module from its directory>; main()"``: standard library only, and imported
# as a top-level module (so the interpreter's cached bytecode is used) with its directory taken off sys.path
# before any untrusted code runs.
#
# This process never decides whether a test passed. It reads its configuration, then one line per call
# ("call function f with these arguments") from the judge, and answers each with the function's return value
# encoded as plain data (see _sandbox_codec.py). The judge, a separate process this one shares no memory with
# and cannot reach, runs the tests and compares. So the worst a program can do with this process (frame or gc
# introspection, writing to any descriptor it finds) is to answer a call wrongly, or not at all.
#
# Order matters: pid-namespace init (fork), resource limits, drop privileges, Landlock, seccomp, audit hook,
# report which layers hold, and only then compile and run untrusted code.
import builtins
import os
import resource
import stat
import sys

from _sandbox_codec import CodecError, CodecTooBig, decode_plain, dump_json, dumps, load_json, to_plain

_CHILD_MAX_NAMES = 10000
CONFIG_FILE = ".passk-sandbox-config.json"


def main():
    in_pid_namespace = os.getpid() == 1
    if in_pid_namespace:
        _be_init()  # returns only in the forked worker
    req = os.fdopen(os.dup(0), "rb")
    rep = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def write_line(text):
        rep.write(text.encode("ascii") + b"\n")
        rep.flush()

    # The configuration is a file the parent left in the working directory (so that this process starts
    # without waiting for the judge); it is gone before any untrusted code runs.
    with open(CONFIG_FILE, "rb") as f:
        cfg = load_json(f.read())
    os.unlink(CONFIG_FILE)
    try:
        applied, failed = _apply_layers(cfg)
    except Exception as e:  # noqa: BLE001 - stderr is /dev/null by now: the judge passes the reason on
        write_line(dump_json({"t": "layers", "applied": [], "failed": {"start-up": "%s: %s" % (type(e).__name__, e)}}))
        os._exit(1)
    if in_pid_namespace:
        applied.append("pid_namespace")
    write_line(dump_json({"t": "layers", "applied": applied, "failed": failed}))
    if failed and cfg.get("strict", True):
        os._exit(0)
    _serve(cfg, req, write_line)
    os._exit(0)


def _be_init():
    # unshare --pid --fork made this process the namespace's init, and the kernel ignores default-action
    # signals sent to an init (SIGXCPU from RLIMIT_CPU included). So the program runs in a forked worker and
    # this process only relays its end: 128 + signal number when it was killed, like a shell.
    pid = os.fork()
    if pid == 0:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # the worker's pipes must close when the worker dies, not when init does
    os.close(devnull)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


# ----------------------------------------------------------------------------------------------- layers
def _apply_layers(cfg):
    applied = []
    failed = {}
    lim = cfg["limits"]
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
    applied.append("rlimits")

    uid = cfg.get("drop_to_uid")
    if uid is not None and os.geteuid() == 0:
        # RLIMIT_NPROC counts every process of the user, so it is only meaningful for a dedicated user.
        nproc = int(lim["max_processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        os.setgroups([])
        os.setgid(cfg["drop_to_gid"])
        os.setuid(uid)  # irreversible: no way back to root, no raising the hard limits above
        applied.append("unprivileged_user")

    workdir = os.path.realpath(os.getcwd())
    read_roots = _read_roots()
    if cfg.get("landlock") or cfg.get("seccomp_bpf"):
        import ctypes  # the audit hook (when on) takes it out of sys.modules again
        if cfg.get("landlock"):
            try:
                _landlock(ctypes, workdir, read_roots)
                applied.append("landlock")
            except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
                failed["landlock"] = "%s: %s" % (type(e).__name__, e)
        if cfg.get("seccomp_bpf"):
            try:
                _seccomp(ctypes, bytes.fromhex(cfg["seccomp_bpf"]))
                applied.append("seccomp")
            except Exception as e:  # noqa: BLE001
                failed["seccomp"] = "%s: %s" % (type(e).__name__, e)
    if cfg.get("audit_hook", True):
        _install_audit_hook(workdir, read_roots, int(lim["max_files_written"]))
        applied.append("audit_hook")
    return applied, failed


def _read_roots():
    """What the program may read besides its working directory: the interpreter's own files and shared
    libraries, never the parent's data, other users' files, or other processes."""
    roots = []
    for p in list(sys.path) + [sys.base_prefix, sys.base_exec_prefix, "/usr", "/lib", "/lib64", "/lib32",
                               "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero",
                               "/dev/null", "/proc/self"]:
        if p and os.path.exists(p):
            r = os.path.realpath(p)
            if r not in roots and r != "/":
                roots.append(r)
    return roots


def _landlock(ctypes, workdir, read_roots):
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    L, U32 = ctypes.c_long, ctypes.c_uint32

    def check(r, what):
        if r < 0:
            e = ctypes.get_errno()
            hint = {38: " (kernel built without Landlock)", 95: " (Landlock disabled at boot)"}.get(e, "")
            raise OSError(e, "%s: %s%s" % (what, os.strerror(e), hint))
        return r

    abi = check(syscall(L(444), None, ctypes.c_size_t(0), U32(1)), "landlock_create_ruleset(VERSION)")
    fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        fs |= 1 << 13  # refer
    if abi >= 3:
        fs |= 1 << 14  # truncate
    if abi >= 5:
        fs |= 1 << 15  # ioctl_dev
    file_rights = fs & (1 | 2 | 4 | (1 << 14) | (1 << 15))
    read = 4 | 8  # read_file | read_dir

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    # ABI 4 handles TCP bind/connect (no rule: none allowed); ABI 6 scopes abstract unix sockets and signals
    # to this domain (no signal to the judge or the parent even where the pid namespace is missing).
    attr = Attr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = check(syscall(L(444), ctypes.byref(attr), ctypes.c_size_t(size), U32(0)), "landlock_create_ruleset")
    try:
        def allow(path, rights):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= file_rights
                rule = PathBeneath(rights & fs, fd)
                check(syscall(L(445), L(ruleset), L(1), ctypes.byref(rule), U32(0)), "landlock_add_rule(%s)" % path)
            finally:
                os.close(fd)

        for p in read_roots:
            allow(p, read)
        allow("/dev/null", 2 | 4 | (1 << 14))
        allow(workdir, fs)
        check(libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0)), "prctl(PR_SET_NO_NEW_PRIVS)")
        check(syscall(L(446), L(ruleset), U32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _seccomp(ctypes, bpf):
    # The filter was compiled by the trusted parent (libseccomp via pyseccomp); loading raw BPF here keeps
    # libseccomp out of the sandbox.
    if not bpf or len(bpf) % 8:
        raise ValueError("seccomp program of %d bytes is not a whole number of BPF instructions" % len(bpf))
    libc = ctypes.CDLL(None, use_errno=True)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = Prog(len(bpf) // 8, ctypes.addressof(buf))
    ul = ctypes.c_ulong
    for args, what in (((ctypes.c_int(38), ul(1), ul(0), ul(0), ul(0)), "prctl(PR_SET_NO_NEW_PRIVS)"),
                       ((ctypes.c_int(22), ul(2), ctypes.byref(prog), ul(0), ul(0)), "prctl(PR_SET_SECCOMP)")):
        if libc.prctl(*args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "%s: %s" % (what, os.strerror(e)))


def _install_audit_hook(workdir, read_roots, max_files):
    proc_self = ("/proc/self", "/proc/thread-self", "/proc/%d" % os.getpid())
    readable = tuple(read_roots) + (workdir,) + proc_self

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
    listing_events = ("os.listdir", "os.scandir", "glob.glob")
    written = set()

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            p = _resolve(path)
            if p is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if p == os.devnull:
                return
            if writing and not _inside(p, workdir):
                raise PermissionError("sandbox: writing outside the working directory is not allowed: %s" % p)
            if writing and p not in written:
                # RLIMIT_FSIZE bounds each file; this bounds how many, so the disk use of a run is bounded.
                if len(written) >= max_files:
                    raise PermissionError("sandbox: more than %d files written" % max_files)
                written.add(p)
            if not any(_inside(p, r) for r in readable):
                raise PermissionError("sandbox: reading outside the working directory and the interpreter's "
                                      "files is not allowed: %s" % p)
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
        elif event in listing_events and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = _resolve(args[0])
            if p is not None and not any(_inside(p, r) for r in readable):
                raise PermissionError("sandbox: listing outside the working directory is not allowed: %s" % p)

    # Modules the harness itself needed are dropped so that untrusted code gets fresh imports only of what the
    # hook allows (a module already in sys.modules would not raise an "import" event).
    for name in blocked_modules:
        for m in list(sys.modules):
            if m == name or m.startswith(name + "."):
                del sys.modules[m]
    sys.addaudithook(hook)


# ------------------------------------------------------------------------------------------ the program
def _serve(cfg, req, write_line):
    cap = int(cfg["max_reply_bytes"])

    def send(msg):
        write_line(dump_json(msg))

    ns = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        code = compile(cfg["program"], "<completion>", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in source
        send({"t": "fail", "phase": "compile", "error": "%s: %s" % (type(e).__name__, e)})
        return
    try:
        exec(code, ns)
        if cfg.get("setup"):
            exec(compile(cfg["setup"], "<test setup>", "exec"), ns)
        ep = cfg.get("entry_point")
        if ep and ep not in ns:
            send({"t": "fail", "phase": "entry_point", "error": "entry point %r is not defined by the completion" % ep})
            return
        names = []
        modules = {}
        for k, v in list(ns.items()):
            if type(k) is not str or k.startswith("__"):
                continue
            if isinstance(v, type(sys)):
                modules[k] = str(getattr(v, "__name__", ""))  # e.g. a test's math.isclose after the program's import
            elif callable(v):
                names.append(k)
    except MemoryError:
        send({"t": "memory", "phase": "program"})
        return
    except BaseException as e:  # noqa: BLE001 - SystemExit included: exit(0) must not pass any test
        send({"t": "fail", "phase": "program", "error": _describe(e)})
        return
    send({"t": "ready", "names": names[:_CHILD_MAX_NAMES], "modules": dict(list(modules.items())[:_CHILD_MAX_NAMES])})

    handles = {}
    handle_ids = {}

    def handle_of(o):
        h = handle_ids.get(id(o))
        if h is None:
            h = len(handles) + 1
            handles[h] = o  # kept alive, so id(o) stays unique for this run
            handle_ids[id(o)] = h
        return h

    def handle(h):
        if h not in handles:
            raise CodecError("unknown handle %r" % h)
        return handles[h]

    while True:
        line = req.readline()
        if not line:
            return
        msg = load_json(line)
        try:
            fn = ns[msg["f"]]
            args = decode_plain(msg["a"], handle)
            kwargs = decode_plain(msg["k"], handle)
            mutable = [(i, dumps(to_plain(a, cap, handle_of), cap)) for i, a in enumerate(args)
                       if type(a) in (list, dict, set, bytearray)]
        except MemoryError:
            send({"t": "memory", "phase": msg.get("where", "a test")})
            continue
        except BaseException as e:  # noqa: BLE001
            send({"t": "exc", "type": type(e).__name__, "msg": _describe(e, with_type=False)})
            continue
        try:
            result = fn(*args, **kwargs)
        except MemoryError:
            send({"t": "memory", "phase": msg.get("where", "a test")})
            continue
        except BaseException as e:  # noqa: BLE001 - the judge decides what a raised exception means
            send({"t": "exc", "type": type(e).__name__, "msg": _describe(e, with_type=False)})
            continue
        try:
            reply = {"t": "r", "v": to_plain(result, cap, handle_of)}
            changed = []
            for i, before in mutable:
                after = to_plain(args[i], cap, handle_of)
                if dumps(after, cap) != before:
                    changed.append([i, after])  # an argument the function changed in place
            if changed:
                reply["m"] = changed
            text = dumps(reply, cap)
        except CodecTooBig:
            send({"t": "big"})
            continue
        except MemoryError:
            send({"t": "memory", "phase": msg.get("where", "a test")})
            continue
        except BaseException as e:  # noqa: BLE001 - e.g. a generator that raises while being read
            send({"t": "exc", "type": type(e).__name__, "msg": _describe(e, with_type=False)})
            continue
        try:
            write_line(text)
        except MemoryError:
            send({"t": "memory", "phase": msg.get("where", "a test")})


def _describe(e, with_type=True):
    try:
        text = str(e)[:300]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = "<unprintable>"
    return "%s: %s" % (type(e).__name__, text) if with_type else text
