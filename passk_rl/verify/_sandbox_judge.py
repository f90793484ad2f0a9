# Sandbox judge: runs the tests and decides which pass. Started by sandbox.py as
# ``python -I -S -c "<import this module from its directory>; main()"``: standard library only.
#
# Only dataset code runs here (the tests, their setup, the prompt's own helpers); the program runs in the
# sandboxed child. Each name the program defines is a proxy here: calling it sends the arguments to the child
# and turns its answer back into plain data (or an opaque handle that only equals itself), so the comparisons
# in the tests are the interpreter's own. The child can lie about what its functions return; it cannot reach
# this process, its memory or its stdout, which only the parent reads.
#
# Records to the parent, one JSON object per line: start, layers (what the child applied before any
# untrusted code ran), test (i, ok), done (phase, error, where).
import builtins
import os
import resource
import sys

from _sandbox_codec import CodecError, CodecTooBig, decode_plain, dump_json, load_json, to_plain


class _ChildGone(BaseException):
    """The child closed its answer pipe (exited, was killed, or closed the descriptor)."""


class _RunOver(BaseException):
    """The run ends here: a memory error or an oversized answer in the child, or a test argument that cannot be
    sent (BaseException so that a test's own ``except Exception`` cannot turn it into a pass)."""


class SandboxProtocolError(Exception):
    """The child's answer was not a well-formed reply."""


class ProgramError(Exception):
    """The program raised an exception that is not a builtin exception type."""


class _Channel:
    def __init__(self, to_child, from_child, cap):
        self.to_child = to_child
        self.from_child = from_child
        self.cap = cap
        self.buf = bytearray()
        self.gone = False
        self.over = None  # (phase, detail) once the run must end
        self.handles = {}

    def send(self, obj):
        if self.gone:
            raise _ChildGone()
        data = dump_json(obj).encode("ascii") + b"\n"
        try:
            while data:
                n = os.write(self.to_child, data)
                data = data[n:]
        except (BrokenPipeError, OSError):
            self.gone = True
            raise _ChildGone() from None

    def recv(self):
        """The next line from the child, parsed; _ChildGone at end of file; _RunOver past the size cap."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                break
            if len(self.buf) > self.cap:
                self.over = ("too_big", "an answer of the program exceeded %d bytes" % self.cap)
                raise _RunOver()
            try:
                chunk = os.read(self.from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.gone = True
                raise _ChildGone()
            self.buf += chunk
        try:
            msg = load_json(line)
        except CodecError:
            raise SandboxProtocolError("the program's answer is not valid JSON") from None
        if type(msg) is not dict:
            raise SandboxProtocolError("the program's answer is not a JSON object")
        return msg

    def handle(self, h):
        obj = self.handles.get(h)
        if obj is None:
            obj = self.handles[h] = _Handle(h)
        return obj

    def handle_id(self, o):
        return o.id if type(o) is _Handle else None

    def call(self, name, args, kwargs, where):
        try:
            a = to_plain(list(args), self.cap, self.handle_id)
            k = to_plain(dict(kwargs), self.cap, self.handle_id)
        except (CodecError, CodecTooBig) as e:
            # The test's doing, not the program's: the run is an error, not a wrong answer.
            self.over = ("unsendable", "a test passes %s() a value that cannot cross the sandbox boundary (%s)"
                         % (name, str(e) or "over max_output_bytes"))
            raise _RunOver() from None
        self.send({"t": "call", "f": name, "a": a, "k": k, "where": where})
        msg = self.recv()
        kind = msg.get("t")
        if kind == "r":
            try:
                value = decode_plain(msg.get("v"), self.handle)
                for i, new in _mutations(msg.get("m"), args):
                    _apply_mutation(args[i], decode_plain(new, self.handle))
            except CodecError as e:
                raise SandboxProtocolError("malformed answer from the program: %s" % e) from None
            return value
        if kind == "exc":
            raise _program_exception(msg.get("type"), msg.get("msg"))
        if kind == "memory":
            self.over = ("memory", str(msg.get("phase") or where)[:100])
            raise _RunOver()
        if kind == "big":
            self.over = ("too_big", "an answer of the program exceeded %d bytes" % self.cap)
            raise _RunOver()
        raise SandboxProtocolError("unexpected answer from the program")


class _Handle:
    """A value the program returned that is not plain data. Equal only to itself, whatever it was."""

    __slots__ = ("id",)

    def __init__(self, h):
        self.id = h

    def __repr__(self):
        return "<program object #%d>" % self.id


def _mutations(m, args):
    if m is None:
        return []
    if type(m) is not list:
        raise CodecError("malformed list of changed arguments")
    out = []
    for item in m:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not int or not 0 <= item[0] < len(args):
            raise CodecError("malformed changed argument")
        out.append((item[0], item[1]))
    return out


def _apply_mutation(target, new):
    # An argument the function changed in place: the test holds the judge's copy, so update it the same way.
    t = type(target)
    if t is not type(new) or t not in (list, dict, set, bytearray):
        raise CodecError("a changed argument has a different type")
    if t is list or t is bytearray:
        target[:] = new
    else:
        target.clear()
        target.update(new)


def _program_exception(name, msg):
    text = str(msg)[:300] if msg is not None else ""
    cls = getattr(builtins, name, None) if type(name) is str and name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(text)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
            pass
    return ProgramError("%s: %s" % (name if type(name) is str else "?", text))


class _Proxy:
    """Stands for a function of the program; calling it runs the function in the child."""

    __slots__ = ("_name", "_channel", "_where")

    def __init__(self, name, channel, where):
        self._name = name
        self._channel = channel
        self._where = where

    def __call__(self, *args, **kwargs):
        return self._channel.call(self._name, args, kwargs, self._where[0])

    def __repr__(self):
        return "<function %s of the program>" % self._name


_PLAIN_MODULES = frozenset((
    "array", "bisect", "calendar", "cmath", "collections", "collections.abc", "copy", "datetime", "decimal",
    "difflib", "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "numbers",
    "operator", "os.path", "random", "re", "statistics", "string", "struct", "sys", "textwrap", "time", "types",
    "typing", "unicodedata"))


def _names_used(tests):
    used = set()
    stack = []
    for t in tests:
        try:
            stack.append(compile(t, "<test>", "exec"))
        except (SyntaxError, ValueError):
            pass
    while stack:
        co = stack.pop()
        used.update(co.co_names)
        stack.extend(c for c in co.co_consts if isinstance(c, type(_names_used.__code__)))
    return used


def main():
    payload = load_json(sys.stdin.buffer.read().decode("utf-8"))
    out = sys.stdout

    def emit(**rec):
        out.write(dump_json(rec) + "\n")
        out.flush()

    lim = payload["limits"]
    cpu = int(lim["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if lim.get("memory_mb"):
        mem = int(lim["memory_mb"]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if payload.get("same_user_as_child"):
        # Where the child runs as this process's user, non-dumpable keeps it from this process's memory
        # (/proc/<pid>/mem, ptrace) even if every other layer were missing.
        import ctypes
        if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
            emit(t="done", phase="judge", error="prctl(PR_SET_DUMPABLE, 0) failed")
            return

    tests = payload["tests"]
    total = len(tests)
    emit(t="start", total=total)
    ch = _Channel(payload["to_child_fd"], payload["from_child_fd"], int(payload["max_reply_bytes"]))
    try:
        layers = ch.recv()
    except (_ChildGone, _RunOver, SandboxProtocolError):
        emit(t="done", phase="child_exit", error="", where="start-up")
        return
    if layers.get("t") != "layers":
        emit(t="done", phase="child_exit", error="", where="start-up")
        return
    emit(t="layers", applied=layers.get("applied"), failed=layers.get("failed"))
    if layers.get("failed") and payload.get("strict", True):
        emit(t="done", phase="layers", error=str(layers.get("failed")))
        return

    # Dataset code, run while the child compiles and runs the program.
    ns = {"__name__": "__judge__", "__builtins__": builtins}
    try:
        if payload.get("trusted_code"):
            exec(compile(payload["trusted_code"], "<trusted code>", "exec"), ns)
        if payload.get("setup"):
            exec(compile(payload["setup"], "<test setup>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001
        emit(t="done", phase="judge", error="%s: %s" % (type(e).__name__, str(e)[:300]))
        return

    try:
        ready = ch.recv()
    except _ChildGone:
        emit(t="done", phase="child_exit", error="", where="the program")
        return
    except _RunOver:
        emit(t="done", phase=ch.over[0], error=ch.over[1], where="the program")
        return
    except SandboxProtocolError as e:
        emit(t="done", phase="program", error=str(e))
        return
    kind = ready.get("t")
    if kind == "memory":
        emit(t="done", phase="memory", error="", where="the program")
        return
    if kind == "fail" and ready.get("phase") in ("compile", "entry_point", "program"):
        emit(t="done", phase=ready["phase"], error=str(ready.get("error"))[:500])
        return
    names = ready.get("names") if kind == "ready" else None
    if type(names) is not list:
        emit(t="done", phase="program", error="the program's start-up answer is malformed")
        return

    where = ["the program"]
    ep = payload.get("entry_point")
    defined = set(ns)
    for name in names[:10000]:
        if type(name) is str and name.isidentifier() and not name.startswith("__") and name not in defined:
            ns[name] = _Proxy(name, ch, where)
    if ep:
        ns[ep] = ns["candidate"] = _Proxy(ep, ch, where)
    # Tests written against the program's namespace use the modules it imported (MBPP: math.isclose after the
    # solution's ``import math``): the judge imports its own copy, only of modules without import side effects.
    modules = ready.get("modules")
    if type(modules) is dict:
        used = _names_used(tests)
        for name, mod in modules.items():
            if type(mod) is str and name in used and name not in ns and mod in _PLAIN_MODULES:
                try:
                    ns[name] = __import__(mod, fromlist=["_"])
                except ImportError:
                    pass

    passed = 0
    first_error = ""
    for i, t in enumerate(tests):
        where[0] = "test %d" % i
        try:
            exec(compile(t, "<test %d>" % i, "exec"), ns)
            ok = True
        except (_ChildGone, _RunOver):
            ok = False
        except BaseException as e:  # noqa: BLE001
            ok = False
            if not first_error:
                first_error = "test %d: %s: %s" % (i, type(e).__name__, str(e)[:200])
        if ch.over is not None:  # even where a test swallowed the exception
            emit(t="done", phase=ch.over[0], error=ch.over[1], where=where[0])
            return
        if ch.gone:
            emit(t="done", phase="child_exit", error=first_error, where=where[0])
            return
        passed += ok
        emit(t="test", i=i, ok=ok)
    emit(t="done", phase="tests", error=first_error)
