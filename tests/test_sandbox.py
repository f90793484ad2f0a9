"""The code sandbox, for real: each case runs the sandbox's child and judge processes; nothing is mocked.

The verdict must be unforgeable: a wrong program scores 0 whatever it does to its own interpreter (frame and gc
introspection, writing verdict-like lines to every descriptor, exiting early), whatever it returns (objects with
a lying ``__eq__``, subclasses of builtins, huge or endless outputs), and whatever it tries against the machine
(network, files outside its directory, processes, ptrace, the parent's environment). A correct program scores 1,
an honest wrong one 0. Each OS layer is also tested on its own (audit hook off) where this machine provides it;
``test_layers_are_reported`` prints which layers are active here and why any is not, and tests that need a
missing layer are skipped with that reason.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import threading
import time

import pytest

import passk_rl.verify.sandbox as sandbox_module
from passk_rl.tasks import make_task
from passk_rl.verify import Sandbox, SandboxLimits
from passk_rl.verify import _sandbox_codec as codec

DATA = os.path.join(os.path.dirname(__file__), "data")
ADD = "def add(a, b):\n    return a + b\n"
WRONG_ADD = "def add(a, b):\n    return a - b\n"
ADD_TESTS = ["assert candidate(1, 2) == 3", "assert candidate(-1, 1) == 0", "assert candidate(2, 2) == 4"]
LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512)


@pytest.fixture(scope="module")
def sb():
    return Sandbox(LIMITS)


@pytest.fixture(scope="module")
def sb_os_only():
    """Only the OS layers (no audit hook): namespaces, user, rlimits, Landlock, seccomp."""
    return Sandbox(LIMITS, audit_hook=False)


@pytest.fixture(scope="module")
def sb_ns_only():
    """Namespaces, user and rlimits alone (no hook, Landlock or seccomp): shows what those enforce by themselves."""
    return Sandbox(LIMITS, audit_hook=False, landlock=False, seccomp=False)


def need(sbx: Sandbox, *layers: str) -> None:
    info = sbx.info()["layers"]
    missing = [f"{n}: {info[n]['reason']}" for n in layers if not info[n]["active"]]
    if missing:
        pytest.skip("layer not active on this machine: " + "; ".join(missing))


def check(sbx: Sandbox, program: str, tests=ADD_TESTS, **kw):
    return sbx.run(program, tests, entry_point=kw.pop("entry_point", "add"), **kw)


# ------------------------------------------------------------------------------------------------ layers
def test_layers_are_reported(sb, sb_os_only, sb_ns_only):
    for name, sbx in (("all layers", sb), ("OS layers only", sb_os_only), ("namespaces only", sb_ns_only)):
        layers = sbx.info()["layers"]
        assert set(layers) == set(sandbox_module.LAYERS)
        for layer, v in layers.items():
            assert isinstance(v["active"], bool)
            assert bool(v["reason"]) != v["active"], (name, layer, v)  # an inactive layer always says why
        print(f"\n[{name}] " + ", ".join(f"{k}={'on' if v['active'] else 'OFF (' + v['reason'] + ')'}"
                                       for k, v in layers.items()))
    assert sb.info()["layers"]["audit_hook"]["active"] and sb.info()["layers"]["rlimits"]["active"]
    assert not sb_os_only.info()["layers"]["audit_hook"]["active"]
    assert "turned off" in sb_ns_only.info()["layers"]["seccomp"]["reason"]


def test_a_layer_the_kernel_refuses_is_left_out_with_a_logged_reason(monkeypatch, caplog):
    # Not a valid BPF program: the kernel refuses it in the child, as it would refuse seccomp where unsupported.
    monkeypatch.setattr(sandbox_module, "build_seccomp_filter", lambda: b"\xff" * 8)
    with caplog.at_level(logging.WARNING, logger=sandbox_module.__name__):
        sbx = Sandbox(LIMITS)
    layer = sbx.info()["layers"]["seccomp"]
    assert layer["active"] is False and "PR_SET_SECCOMP" in layer["reason"], layer
    assert any("seccomp" in r.getMessage() and "not active" in r.getMessage() for r in caplog.records)
    # Verification goes on without it.
    assert check(sbx, ADD).reward == 1.0
    assert (check(sbx, WRONG_ADD).status, check(sbx, WRONG_ADD).reward) == ("ok", 0.0)


# ------------------------------------------------------------------------------------------ basic verdicts
def test_correct_and_partial(sb):
    r = check(sb, ADD)
    assert (r.status, r.passed, r.total, r.reward) == ("ok", 3, 3, 1.0)
    r = check(sb, WRONG_ADD)
    assert (r.status, r.passed, r.reward) == ("ok", 0, 0.0)
    r = check(sb, "def add(a, b):\n    return 4\n")
    assert (r.status, r.passed, r.total) == ("ok", 1, 3)
    assert r.reward == pytest.approx(1 / 3)
    assert "first failure: test 0" in r.detail


def test_values_cross_the_boundary_faithfully(sb):
    prog = """
import math
class Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b
def chain(pairs):
    return sum(1 for p in pairs if p.a < p.b)
def kinds():
    return (1, 2.5, None, True, 'é', b'\\x00', [1, 2], {1, 2}, frozenset([3]), {(1, 2): [3]}, 3 + 4j,
            2 ** 100, range(3))
def gen(n):
    return (i * i for i in range(n))
def views():
    d = {'b': 1, 'a': 2}
    return d.keys(), d.values(), d.items()
def sort_in_place(xs):
    xs.sort()
def fail(x):
    raise ValueError('bad %r' % x)
def area(r):
    return math.pi * r * r
def nan():
    return float('nan')
def same(x):
    return x
"""
    tests = [
        "assert chain([Pair(1, 2), Pair(3, 1), Pair(0, 5)]) == 2",  # program objects travel as handles
        "assert kinds() == (1, 2.5, None, True, 'é', b'\\x00', [1, 2], {1, 2}, frozenset([3]), {(1, 2): [3]}, "
        "3 + 4j, 2 ** 100, range(3))",
        "assert list(gen(4)) == [0, 1, 4, 9] and gen(2) != [0, 1]",
        "k, v, i = views()\nassert k == {'a', 'b'} and list(k) == ['b', 'a'] and list(v) == [1, 2] and "
        "i == {('a', 2), ('b', 1)}",
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
        "try:\n    fail(1)\nexcept ValueError as e:\n    assert 'bad 1' in str(e)\n"
        "else:\n    raise AssertionError('no error')",
        "assert math.isclose(area(2), 12.566, rel_tol=1e-3)",  # math: the program's import, the judge's module
        "x = nan()\nassert x != x",
        "assert same(True) is True and same(None) is None and same(2 ** 70) == 2 ** 70",
        "p = Pair(1, 2)\nassert same(p) is p and same(p) != Pair(1, 2)",
    ]
    r = sb.run(prog, tests)
    assert (r.status, r.passed, r.total) == ("ok", len(tests), len(tests)), r


def test_a_test_that_cannot_send_its_argument_is_an_error_not_a_wrong_answer(sb):
    tests = ["assert candidate(1, 2) == 3", "assert candidate(lambda: 1, 2) == 3", "assert candidate(2, 2) == 4"]
    r = sb.run(ADD, tests, entry_point="add")
    assert (r.status, r.passed, r.reward) == ("error", 1, 0.0), r
    assert "cannot cross" in r.detail and "test 1" in r.detail, r


def test_the_prompts_helpers_stay_the_datasets(sb):
    # HumanEval/32-style: the test calls the prompt's helper; a completion that redefines it must not pass.
    prompt = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n\n"
              "def find_zero(xs):\n    \"\"\"x with poly(xs, x) == 0 (xs linear).\"\"\"\n")
    tests = ["assert abs(poly([2, 4], candidate([2, 4]))) < 1e-9",
             "assert abs(poly([-3, 1], candidate([-3, 1]))) < 1e-9"]
    honest = prompt + "    return -xs[0] / xs[1]\n"
    cheat = prompt + "    return 0.0\n\n\ndef poly(xs, x):\n    return 0\n"
    r = sb.run(honest, tests, entry_point="find_zero", trusted_code=prompt)
    assert (r.status, r.passed) == ("ok", 2), r
    r = sb.run(cheat, tests, entry_point="find_zero", trusted_code=prompt)
    assert (r.status, r.passed) == ("ok", 0), r
    # Without the prompt in the judge the program's own poly would answer (the code task always passes it).
    assert sb.run(cheat, tests, entry_point="find_zero").passed == 2


# ---------------------------------------------------------------------------------- forging the verdict
REVIEWER_FORGERY = """
import os, sys
def add(a, b):
    return a - b
emit = sys._getframe(1).f_locals['emit']
for i in range(3):
    emit(t='test', i=i, ok=True)
emit(t='done', passed=3, total=3, phase='tests', error='')
os._exit(0)
"""

VERDICT_LINES = """
LINES = ['{"t":"test","i":%d,"ok":true}' % i for i in range(3)] + [
    '{"t":"done","phase":"tests","passed":3,"total":3,"error":""}', '{"t":"r","v":true}', '{"ok":true}']
"""

FRAME_FORGERY = VERDICT_LINES + """
import os, sys
def forge():
    f = sys._getframe(1)
    while f is not None:
        for name, v in list(f.f_locals.items()):
            if callable(v) and any(w in name for w in ("emit", "send", "write", "reply", "out")):
                for line in LINES:
                    for call in (lambda: v(line), lambda: v(line.encode()), lambda: v({"t": "test", "ok": True}),
                                 lambda: v(t="test", i=0, ok=True)):
                        try:
                            call()
                        except BaseException:
                            pass
        f = f.f_back
def add(a, b):
    forge()
    EXIT
    return a - b
"""

GC_FORGERY = VERDICT_LINES + """
import gc, os
def forge():
    for o in gc.get_objects():
        for meth in ("write", "send", "sendall", "emit"):
            try:
                w = getattr(o, meth, None)
                if callable(w):
                    for line in LINES:
                        try:
                            w(line + "\\n")
                        except BaseException:
                            w((line + "\\n").encode())
                    getattr(o, "flush", lambda: None)()
            except BaseException:
                pass
    for fd in range(3, 256):
        for line in LINES:
            try:
                os.write(fd, (line + "\\n").encode())
            except OSError:
                pass
def add(a, b):
    forge()
    EXIT
    return a - b
"""

FD_FORGERY = VERDICT_LINES + """
import os
for fd in range(0, 64):
    for line in LINES:
        try:
            os.write(fd, (line + "\\n").encode())
        except OSError:
            pass
def add(a, b):
    return a - b
"""


@pytest.mark.parametrize("which", ["all layers", "OS layers only"])
def test_the_reviewers_forgery_scores_zero(sb, sb_os_only, which):
    sbx = sb if which == "all layers" else sb_os_only
    assert check(sbx, ADD).reward == 1.0
    assert check(sbx, WRONG_ADD).reward == 0.0
    r = check(sbx, REVIEWER_FORGERY)
    assert (r.status, r.passed, r.reward) == ("ok", 0, 0.0), r


@pytest.mark.parametrize("exit_after", [False, True], ids=["then-answer", "then-os._exit"])
@pytest.mark.parametrize("attack", ["frames", "gc", "descriptors"])
def test_forging_from_inside_the_interpreter_scores_zero(sb, sb_os_only, attack, exit_after):
    prog = {"frames": FRAME_FORGERY, "gc": GC_FORGERY, "descriptors": FD_FORGERY}[attack]
    prog = prog.replace("EXIT", "os._exit(0)" if exit_after else "pass")
    for sbx in (sb, sb_os_only):
        r = check(sbx, prog)
        assert r.reward == 0.0 and r.passed == 0, (attack, r)
        assert r.status == "ok", r  # a wrong program, not a sandbox failure


CHEATS = {
    "always-equal object": """
class Yes:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = object.__hash__
def add(a, b):
    return Yes()
""",
    "int subclass with a lying __eq__": """
class Lie(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __int__(self): return 3
    def __index__(self): return 3
    __hash__ = int.__hash__
def add(a, b):
    return Lie(a - b)
""",
    "float subclass with a lying __eq__": """
class Lie(float):
    def __eq__(self, other): return True
    __hash__ = float.__hash__
def add(a, b):
    return Lie(a - b)
""",
    "object claiming to be an int": """
class Fake:
    __class__ = int
    def __eq__(self, other): return True
    __hash__ = object.__hash__
def add(a, b):
    return Fake()
""",
    "patched comparison machinery": """
import builtins, operator
operator.eq = lambda a, b: True
builtins.isinstance = lambda *a: True
def add(a, b):
    return a - b
""",
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_answers_that_cheat_the_comparison_score_zero(sb, cheat):
    r = check(sb, CHEATS[cheat])
    assert (r.status, r.passed, r.reward) == ("ok", 0, 0.0), r


def test_an_honest_subclass_is_compared_by_its_value(sb):
    # The cheats above fail because of their values, not their types: the same subclass with the right value passes.
    r = check(sb, "class Num(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
                  "def add(a, b):\n    return Num(a + b)\n")
    assert (r.status, r.passed) == ("ok", 3), r


def test_huge_and_endless_outputs(sb):
    # A smaller cap and a generous wall clock, so that the verdict does not depend on how loaded the machine is.
    lim = SandboxLimits(timeout_s=60.0, memory_mb=512, max_output_bytes=256 * 1024)
    for body in ("return 'x' * (8 * 2 ** 20)",
                 "def g():\n        while True:\n            yield a\n    return g()",
                 # raw bytes on every descriptor, no newline: the judge stops reading at the cap
                 "import os\n    for fd in range(3, 64):\n        try:\n"
                 "            os.write(fd, b'7' * (4 * 2 ** 20))\n        except OSError:\n            pass\n"
                 "    return a + b"):
        r = check(sb, "def add(a, b):\n    " + body + "\n", limits=lim)
        assert (r.status, r.reward) == ("error", 0.0) and "exceeded 262144 bytes" in r.detail, (body, r)
    r = check(sb, "def add(a, b):\n    x = []\n    for _ in range(10 ** 5):\n        x = [x]\n    return x\n",
              limits=lim)
    assert (r.status, r.reward) == ("ok", 0.0) and "nested" in r.detail, r


# ---------------------------------------------------------------------------------------- limits, statuses
def test_infinite_loop_is_timeout(sb):
    t0 = time.monotonic()
    r = check(sb, "def add(a, b):\n    while True:\n        pass\n")
    assert r.status == "timeout" and r.reward == 0.0
    assert "limit" in r.detail
    assert time.monotonic() - t0 < 30  # killed, not waited out


def test_sleeping_program_is_timeout(sb):
    r = check(sb, "import time\ntime.sleep(1000)\n" + ADD)
    assert r.status == "timeout" and "wall-clock" in r.detail


def test_cpu_limit_is_timeout():
    # Generous wall clock, 1 CPU second: RLIMIT_CPU ends the loop (SIGXCPU, relayed by the pid namespace's init).
    sbx = Sandbox(SandboxLimits(timeout_s=60.0, cpu_s=1, memory_mb=512))
    r = sbx.run("while True:\n    pass\n", ["assert True"])
    assert r.status == "timeout", r
    assert "CPU time limit" in r.detail


@pytest.mark.parametrize("alloc", ["x = bytearray(10**11)", "x = [0] * (10**10)", "x = 'a' * (2**40)"])
def test_huge_allocation_is_killed(sb, alloc):
    r = check(sb, alloc + "\n" + ADD)
    assert r.status == "error" and r.reward == 0.0
    assert "memory limit" in r.detail and "512 MiB" in r.detail


def test_allocation_inside_a_test_is_killed(sb):
    r = check(sb, "def add(a, b):\n    return bytearray(10**11)\n")
    assert r.status == "error" and "memory limit" in r.detail and "test 0" in r.detail


def test_early_exit_does_not_pass_tests(sb):
    r = check(sb, "import sys\nsys.exit(0)\n" + ADD)
    assert (r.status, r.reward) == ("ok", 0.0) and "SystemExit" in r.detail
    r = check(sb, "import os\nos._exit(0)\n" + ADD)
    assert (r.status, r.reward) == ("ok", 0.0) and "exited before" in r.detail
    # exit inside the function: that call fails, the rest still run
    r = sb.run("import sys\ndef add(a, b):\n    if a == 1:\n        sys.exit(0)\n    return a + b\n", ADD_TESTS,
               entry_point="add")
    assert (r.status, r.passed, r.total) == ("ok", 2, 3), r
    # the program ending its interpreter mid-way keeps only the tests answered before
    r = sb.run("import os\ndef add(a, b):\n    if a == 2:\n        os._exit(0)\n    return a + b\n", ADD_TESTS,
               entry_point="add")
    assert (r.status, r.passed) == ("ok", 2) and "exited before" in r.detail, r


def test_format_failures(sb):
    r = check(sb, "def add(a, b) return 1")
    assert r.status == "wrong_format" and "SyntaxError" in r.detail
    r = check(sb, "def plus(a, b):\n    return a + b\n")
    assert r.status == "wrong_format" and "entry point" in r.detail


def test_interrupt_kills_running(sb):
    res = []
    t = threading.Thread(target=lambda: res.append(sb.run("import time\ntime.sleep(100)\n", ["assert True"])))
    t.start()
    time.sleep(1.0)
    sb.interrupt()
    t.join(10)
    assert not t.is_alive() and res[0].status in ("error", "timeout")


def test_limits_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=1)
    with pytest.raises(ValueError, match="max_output_bytes"):
        SandboxLimits(max_output_bytes=10)


# ---------------------------------------------------------------------------------------------- network
PROBE_SOCKET = """
import socket
def probe(port):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        return "connected"
    except BaseException as e:
        return "blocked: " + type(e).__name__
"""


@pytest.fixture()
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    yield srv.getsockname()[1]
    srv.close()


def test_socket_is_blocked(sb, listener):
    # Control: the parent can reach the listener, so a failure in the sandbox is the sandbox's doing.
    with socket.create_connection(("127.0.0.1", listener), timeout=2):
        pass
    r = sb.run(PROBE_SOCKET, [f"assert candidate({listener}).startswith('blocked')"], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r
    r = check(sb, "import socket\nsocket.socket()\n" + ADD)
    assert r.reward == 0.0 and "network access" in r.detail


def test_network_namespace_alone_blocks_loopback(sb_ns_only, listener):
    need(sb_ns_only, "network_namespace")
    r = sb_ns_only.run(PROBE_SOCKET, [f"assert candidate({listener}).startswith('blocked')"], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


def test_seccomp_alone_refuses_sockets(sb_os_only, listener):
    need(sb_os_only, "seccomp")
    r = sb_os_only.run(PROBE_SOCKET, [f"assert candidate({listener}) == 'blocked: PermissionError'"],
                       entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


# ------------------------------------------------------------------------------------------- filesystem
@pytest.fixture()
def outside_dir():
    # World-writable and world-readable, so only the sandbox (not file permissions) can stop the access.
    d = tempfile.mkdtemp(prefix="passk-outside-")
    os.chmod(d, 0o777)
    secret = os.path.join(d, "secret.txt")
    with open(secret, "w") as f:
        f.write("hunter2")
    os.chmod(secret, 0o644)
    yield d
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    os.rmdir(d)


WRITE_PROBE = """
import os
def probe(target, outside_dir):
    out = []
    for how in ("open", "os.open"):
        try:
            if how == "open":
                open(target, "w").write("x")
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT))
            out.append("wrote")
        except BaseException as e:
            out.append("blocked")
    try:
        os.remove(outside_dir + "/secret.txt")
        out.append("removed")
    except BaseException:
        out.append("blocked")
    with open("inside.txt", "w") as f:  # the private working directory is writable
        f.write("ok")
    out.append(open("inside.txt").read())
    return out
"""

READ_PROBE = """
import os
def probe(paths):
    out = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
            out.append("read")
        except BaseException:
            out.append("blocked")
    try:
        os.listdir("/")
        out.append("listed")
    except BaseException:
        out.append("blocked")
    with open("mine.txt", "w") as f:
        f.write("x")
    out.append(open("mine.txt").read())
    return out
"""


@pytest.mark.parametrize("which", ["all layers", "Landlock alone"])
def test_write_outside_workdir_fails(sb, sb_os_only, outside_dir, which):
    sbx = sb if which == "all layers" else sb_os_only
    if which != "all layers":
        need(sbx, "landlock")
    target = os.path.join(outside_dir, "escape.txt")
    test = f"assert candidate({target!r}, {outside_dir!r}) == ['blocked', 'blocked', 'blocked', 'ok']"
    r = sbx.run(WRITE_PROBE, [test], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r
    assert not os.path.exists(target) and os.path.exists(os.path.join(outside_dir, "secret.txt"))


@pytest.mark.parametrize("which", ["all layers", "Landlock alone"])
def test_read_outside_workdir_fails(sb, sb_os_only, outside_dir, which):
    sbx = sb if which == "all layers" else sb_os_only
    if which != "all layers":
        need(sbx, "landlock")
    paths = [os.path.join(outside_dir, "secret.txt"),  # another run's or the parent's files
             os.path.join(DATA, "code", "mbpp.jsonl"),  # the dataset: its expected answers
             sandbox_module.__file__, "/etc/passwd"]
    for p in paths:  # readable by anyone, so only the sandbox can stop the read
        assert os.stat(p).st_mode & 0o004, p
    r = sbx.run(READ_PROBE, [f"assert candidate({paths!r}) == ['blocked'] * {len(paths)} + ['blocked', 'x']"],
                entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


def test_disk_use_is_bounded():
    sbx = Sandbox(SandboxLimits(timeout_s=10.0, memory_mb=512, file_size_mb=1, max_files_written=3))
    prog = """
def probe():
    out = []
    try:
        with open("big.bin", "wb") as f:
            f.write(b"x" * (2 * 1024 * 1024))
        out.append("wrote 2 MiB")
    except OSError as e:
        out.append("size capped")
    n = 0
    try:
        for i in range(10):
            open("f%d.txt" % i, "w").close()
            n += 1
    except PermissionError:
        pass
    out.append(n)
    return out
"""
    r = sbx.run(prog, ["assert candidate() == ['size capped', 2]"], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


def test_unprivileged_user_alone_cannot_write_root_dirs(sb_ns_only):
    need(sb_ns_only, "unprivileged_user")
    d = tempfile.mkdtemp(prefix="passk-rootonly-")  # 0700, owned by root
    try:
        prog = (f"def probe():\n    try:\n        open({d!r} + '/x', 'w')\n        return 'wrote'\n"
                "    except PermissionError:\n        return 'denied'\n")
        r = sb_ns_only.run(prog, ["assert candidate() == 'denied'"], entry_point="probe")
        assert (r.status, r.passed) == ("ok", 1), r
        assert os.listdir(d) == []
    finally:
        os.rmdir(d)


# -------------------------------------------------------------------------------- processes, the parent
def test_parent_environment_secrets_are_invisible(sb, sb_ns_only, monkeypatch):
    monkeypatch.setenv("PASSK_TEST_SECRET", "hunter2-secret")
    prog = """
import os
def probe(parent):
    seen = [k for k, v in os.environ.items() if "hunter2" in v or k == "PASSK_TEST_SECRET"]
    leaked = False
    for pid in {os.getppid(), parent}:
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                leaked = leaked or b"hunter2" in f.read()
        except OSError:
            pass
    return seen, leaked, sorted(os.environ)
"""
    tests = [f"assert candidate({os.getpid()})[0] == []", f"assert candidate({os.getpid()})[1] is False",
             f"assert set(candidate({os.getpid()})[2]) <= {{'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', "
             "'PYTHONHASHSEED', 'PYTHONIOENCODING', 'LC_CTYPE'}"]
    r = sb.run(prog, tests, entry_point="probe")
    assert (r.status, r.passed) == ("ok", 3), r
    if sb_ns_only.info()["run_as_uid"] is not None or sb_ns_only.info()["layers"]["pid_namespace"]["active"]:
        # Without hook or Landlock: another user's /proc/<pid>/environ is refused, or the pid is not visible.
        r = sb_ns_only.run(prog, tests, entry_point="probe")
        assert (r.status, r.passed) == ("ok", 3), r


PROCESS_PROBE = """
import os
def probe():
    out = []
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        out.append("forked")
    except BaseException as e:
        out.append(type(e).__name__)
    try:
        import subprocess
        subprocess.run(["true"])
        out.append("ran")
    except BaseException as e:
        out.append(type(e).__name__)
    return out
"""


@pytest.mark.parametrize("which", ["all layers", "seccomp alone"])
def test_processes_cannot_be_started(sb, sb_os_only, which):
    sbx = sb if which == "all layers" else sb_os_only
    if which != "all layers":
        need(sbx, "seccomp")
    r = sbx.run(PROCESS_PROBE, ["r = candidate()\nassert r[0] != 'forked' and r[1] != 'ran', r"], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r
    t0 = time.monotonic()
    r = check(sbx, "import os\nwhile True:\n    os.fork()\n" + ADD)  # fork bomb
    assert (r.status, r.reward) == ("ok", 0.0) and "PermissionError" in r.detail, r
    assert time.monotonic() - t0 < LIMITS.timeout_s  # refused at once, not contained until the deadline


def test_ptrace_and_signals_cannot_reach_other_processes(sb, sb_os_only):
    r = check(sb, "import ctypes\n" + ADD)
    assert r.reward == 0.0 and "importing ctypes is not allowed" in r.detail, r
    need(sb_os_only, "seccomp")
    prog = """
import ctypes, os
def probe(target):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    out = {}
    r = libc.ptrace(ctypes.c_long(0), ctypes.c_long(0), None, None)  # PTRACE_TRACEME
    out["traceme"] = (r, ctypes.get_errno())
    r = libc.ptrace(ctypes.c_long(16), ctypes.c_long(target), None, None)  # PTRACE_ATTACH
    out["attach"] = r
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    buf = ctypes.create_string_buffer(8)
    local, remote = Iov(ctypes.cast(buf, ctypes.c_void_p), 8), Iov(0x400000, 8)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    out["vm_readv"] = libc.process_vm_readv(target, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    for name, pid in (("kill_parent", target), ("kill_init", 1)):
        try:
            os.kill(pid, 0)
            out[name] = "alive"
        except OSError as e:
            out[name] = type(e).__name__
    return out
"""
    test = (f"r = candidate({os.getpid()})\n"
            "assert r['traceme'] == (-1, 1), r\n"  # EPERM: seccomp (any process may ask to be traced otherwise)
            "assert r['attach'] == -1 and r['vm_readv'] == -1, r\n"
            "assert r['kill_parent'] != 'alive' and r['kill_init'] != 'alive', r")
    r = sb_os_only.run(prog, [test], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


def test_pid_namespace_hides_other_processes(sb_ns_only):
    need(sb_ns_only, "pid_namespace", "mount_namespace")
    prog = """
import os
def probe(target):
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    try:
        os.kill(target, 0)
        seen = "alive"
    except OSError as e:
        seen = type(e).__name__
    return pids, seen, os.getpid()
"""
    r = sb_ns_only.run(prog, [f"assert candidate({os.getpid()}) == ([1, 2], 'ProcessLookupError', 2)"],
                       entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


# ------------------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("value", [
    None, True, 0, -5, 2 ** 80, -(2 ** 200), 1.5, -0.0, math.inf, "a\"\n\u00e9\ud800", b"\x00\xff", bytearray(b"ab"),
    [1, (2, [3])], (), {1: "a", (1, 2): [None], "k": {2.5}}, {1, 2}, frozenset({"x"}), 3 + 4j, range(1, 9, 2),
    {"a": 1, "b": 2}.keys(), {"a": 1, "b": 2}.items(),
])
def test_codec_round_trips_plain_data(value):
    back = codec.decode(codec.encode(value, 1 << 20))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("text", [
    "", "[1,", '{"x": 1}', "[1] 2", '{"i": "zz"}', '{"d": [[[1], 2]]}', '{"t": 5}', '{"h": 1}', '{"r": [1, 2, 0]}',
    "[" * 5000 + "]" * 5000, "1" * 5000, "pickle", '{"t": [1], "s": [2]}',
])
def test_codec_rejects_anything_but_its_own_encoding(text):
    with pytest.raises(codec.CodecError):
        codec.decode(text)  # no handle table: handles are refused too


def test_codec_refuses_objects_and_bounds_size():
    class Obj:
        pass

    with pytest.raises(codec.CodecError):
        codec.encode(Obj(), 1 << 20)
    with pytest.raises(codec.CodecTooBig):
        codec.encode("x" * 5000, 1024)
    assert codec.decode(codec.encode([Obj()], 1 << 20, handle_of=lambda o: 7), handle=lambda h: ("handle", h)) == [
        ("handle", 7)]


# --------------------------------------------------------------------------------- the code task on files
@pytest.fixture(scope="module")
def code_task():
    return make_task("code", test_files=[os.path.join(DATA, "code", "humaneval.jsonl"),
                                         os.path.join(DATA, "code", "mbpp.jsonl")], timeout_s=5.0, memory_mb=512)


def test_code_task_canonical_solutions_pass(code_task):
    prompts = code_task.prompts("test")
    assert len(prompts) == 6
    for p in prompts:
        sol = p.meta["canonical_solution"]
        v = code_task.verify(p, sol)  # completion-style (HumanEval body) or full code (MBPP)
        assert (v.reward, v.status) == (1.0, "ok"), (p.id, v)
        fenced = "Here you go:\n```python\n" + p.answer["prompt_code"] + sol + "```\nDone."
        v = code_task.verify(p, fenced)  # chat-style answer with a fenced block
        assert (v.reward, v.status) == (1.0, "ok"), (p.id, v)


def test_code_task_partial_and_bad_completions(code_task):
    p = next(p for p in code_task.prompts("test") if p.id == "Local/0")  # running_max, 4 real tests
    assert len(p.answer["tests"]) == 4  # `assert True` dropped
    v = code_task.verify(p, "    return xs\n")  # right only for []
    assert v.status == "ok" and v.reward == pytest.approx(1 / 4)
    v = code_task.verify(p, "    return [max(xs[: i + 1]) for i in range(len(xs))] if len(xs) != 3 else xs\n")
    assert v.status == "ok" and v.reward == pytest.approx(2 / 4)
    v = code_task.verify(p, "    while True:\n        pass\n")
    assert v.status == "timeout" and v.reward == 0.0
    v = code_task.verify(p, "    return [\n")
    assert v.status == "wrong_format"
    all_task = make_task("code", test_files=os.path.join(DATA, "code", "humaneval.jsonl"), reward="all",
                         timeout_s=5.0)
    assert all_task.continuous is False
    assert all_task.verify(p, "    return xs\n").reward == 0.0


def test_code_task_forgery_scores_zero(code_task):
    p = next(p for p in code_task.prompts("test") if p.id == "Local/0")
    forged = ("```python\nimport os, sys\nfrom typing import List\n\ndef running_max(xs: List[int]) -> List[int]:\n"
              "    return xs\n\nemit = sys._getframe(1).f_locals['emit']\nfor i in range(4):\n"
              "    emit(t='test', i=i, ok=True)\nemit(t='done', passed=4, total=4, phase='tests', error='')\n"
              "os._exit(0)\n```")
    v = code_task.verify(p, forged)
    assert (v.reward, v.status) == (0.0, "ok"), v
