"""The code sandbox, for real: each case runs a child Python process under the sandbox's limits.

Adversarial programs (infinite loop, huge allocation, sockets, writes outside the working directory, reading the
parent's environment, forking, exiting early, forging results) must fail or be contained; a correct solution
passes; partial solutions get the fraction of tests passed. OS layers (network namespace, unprivileged user) are
also tested with the in-interpreter audit hook turned off, where this machine provides them.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import pytest

from passk_rl.tasks import make_task
from passk_rl.verify import Sandbox, SandboxLimits

DATA = os.path.join(os.path.dirname(__file__), "data")
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert candidate(1, 2) == 3", "assert candidate(-1, 1) == 0", "assert candidate(2, 2) == 4"]


@pytest.fixture(scope="module")
def sb():
    return Sandbox(SandboxLimits(timeout_s=3.0, memory_mb=512))


@pytest.fixture(scope="module")
def sb_os_only():
    """Only the OS layers (no audit hook): shows what the namespace and the unprivileged user enforce alone."""
    return Sandbox(SandboxLimits(timeout_s=3.0, memory_mb=512), audit_hook=False)


def test_correct_and_partial(sb):
    r = sb.run(ADD, ADD_TESTS, entry_point="add")
    assert (r.status, r.passed, r.total, r.reward) == ("ok", 3, 3, 1.0)
    r = sb.run("def add(a, b):\n    return 4\n", ADD_TESTS, entry_point="add")
    assert (r.status, r.passed, r.total) == ("ok", 1, 3)
    assert r.reward == pytest.approx(1 / 3)
    assert "first failure: test 0" in r.detail


def test_infinite_loop_is_timeout(sb):
    t0 = time.monotonic()
    r = sb.run("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, entry_point="add")
    assert r.status == "timeout" and r.reward == 0.0
    assert "limit" in r.detail
    assert time.monotonic() - t0 < 30  # killed, not waited out


def test_sleeping_program_is_timeout(sb):
    r = sb.run("import time\ntime.sleep(1000)\n" + ADD, ADD_TESTS, entry_point="add")
    assert r.status == "timeout" and "wall-clock" in r.detail


def test_cpu_limit_is_timeout():
    # Generous wall clock, 1 CPU second: RLIMIT_CPU ends the loop (SIGXCPU).
    sbx = Sandbox(SandboxLimits(timeout_s=60.0, cpu_s=1, memory_mb=512))
    r = sbx.run("while True:\n    pass\n", ["assert True"])
    assert r.status == "timeout", r
    assert "CPU time limit" in r.detail


@pytest.mark.parametrize("alloc", ["x = bytearray(10**11)", "x = [0] * (10**10)", "x = 'a' * (2**40)"])
def test_huge_allocation_is_killed(sb, alloc):
    r = sb.run(alloc + "\n" + ADD, ADD_TESTS, entry_point="add")
    assert r.status == "error" and r.reward == 0.0
    assert "memory limit" in r.detail and "512 MiB" in r.detail


def test_allocation_inside_a_test_is_killed(sb):
    r = sb.run("def add(a, b):\n    return bytearray(10**11)\n", ADD_TESTS, entry_point="add")
    assert r.status == "error" and "memory limit" in r.detail and "test 0" in r.detail


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
    r = sb.run("import socket\nsocket.socket()\n" + ADD, ADD_TESTS, entry_point="add")
    assert r.reward == 0.0 and "network access" in r.detail


def test_network_namespace_alone_blocks_loopback(sb_os_only, listener):
    if not sb_os_only.info()["network_namespace"]:
        pytest.skip("no network namespace on this machine (unshare unavailable); the audit hook still blocks")
    r = sb_os_only.run(PROBE_SOCKET, [f"assert candidate({listener}).startswith('blocked')"], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r


@pytest.fixture()
def outside_dir():
    # World-writable, so only the sandbox (not file permissions) can stop the write.
    d = tempfile.mkdtemp(prefix="passk-outside-")
    os.chmod(d, 0o777)
    yield d
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    os.rmdir(d)


def test_write_outside_workdir_fails(sb, outside_dir):
    target = os.path.join(outside_dir, "escape.txt")
    prog = f"""
import os
def probe():
    out = []
    for how in ("open", "os.open"):
        try:
            if how == "open":
                open({target!r}, "w").write("x")
            else:
                os.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))
            out.append("wrote")
        except BaseException as e:
            out.append("blocked")
    try:
        os.remove({outside_dir!r} + "/none")
        out.append("removed")
    except BaseException:
        out.append("blocked")
    with open("inside.txt", "w") as f:  # the private working directory is writable
        f.write("ok")
    out.append(open("inside.txt").read())
    return out
"""
    r = sb.run(prog, ["assert candidate() == ['blocked', 'blocked', 'blocked', 'ok']"], entry_point="probe")
    assert (r.status, r.passed) == ("ok", 1), r
    assert not os.path.exists(target)


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


def test_unprivileged_user_alone_cannot_write_root_dirs(sb_os_only):
    if sb_os_only.info()["run_as_uid"] is None:
        pytest.skip("not root here: the sandbox runs as the current user (the audit hook still blocks writes)")
    d = tempfile.mkdtemp(prefix="passk-rootonly-")  # 0700, owned by root
    try:
        prog = f"def probe():\n    try:\n        open({d!r} + '/x', 'w')\n        return 'wrote'\n    except PermissionError:\n        return 'denied'\n"
        r = sb_os_only.run(prog, ["assert candidate() == 'denied'"], entry_point="probe")
        assert (r.status, r.passed) == ("ok", 1), r
        assert os.listdir(d) == []
    finally:
        os.rmdir(d)


def test_parent_environment_secrets_are_invisible(sb, sb_os_only, monkeypatch):
    monkeypatch.setenv("PASSK_TEST_SECRET", "hunter2-secret")
    prog = """
import os
def probe():
    seen = [k for k, v in os.environ.items() if "hunter2" in v or k == "PASSK_TEST_SECRET"]
    try:
        with open("/proc/%d/environ" % os.getppid(), "rb") as f:
            leaked = b"hunter2" in f.read()
    except OSError:
        leaked = False
    return seen, leaked, sorted(os.environ)
"""
    tests = ["assert candidate()[0] == []", "assert candidate()[1] is False",
             "assert set(candidate()[2]) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', 'PYTHONHASHSEED', "
             "'PYTHONIOENCODING', 'LC_CTYPE'}"]
    r = sb.run(prog, tests, entry_point="probe")
    assert (r.status, r.passed) == ("ok", 3), r
    if sb_os_only.info()["run_as_uid"] is not None:
        # Without the hook, the kernel refuses an unprivileged user another user's /proc/<pid>/environ.
        r = sb_os_only.run(prog, tests, entry_point="probe")
        assert (r.status, r.passed) == ("ok", 3), r


def test_processes_cannot_be_started(sb):
    r = sb.run("import os\nos.fork()\n" + ADD, ADD_TESTS, entry_point="add")
    assert r.reward == 0.0 and "starting processes" in r.detail
    r = sb.run(ADD, ["import subprocess\nsubprocess.run(['true'])"], entry_point="add")
    assert r.passed == 0
    r = sb.run(ADD, ["import os\nos.system('true')"], entry_point="add")
    assert r.passed == 0


def test_early_exit_does_not_pass_tests(sb):
    r = sb.run("import sys\nsys.exit(0)\n" + ADD, ADD_TESTS, entry_point="add")
    assert (r.status, r.reward) == ("ok", 0.0) and "SystemExit" in r.detail
    r = sb.run("import os\nos._exit(0)\n" + ADD, ADD_TESTS, entry_point="add")
    assert (r.status, r.reward) == ("ok", 0.0) and "exited before" in r.detail
    # exit inside a test counts as that test failing, the rest still run
    r = sb.run(ADD, ["raise SystemExit(0)"] + ADD_TESTS, entry_point="add")
    assert (r.passed, r.total) == (3, 4)


def test_forged_results_are_ignored(sb):
    forge = (
        "import os\n"
        "for fd in range(3, 10):\n"
        "    try:\n"
        "        os.write(fd, b'{\"t\": \"done\", \"passed\": 3, \"total\": 3, \"phase\": \"tests\"}\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n    return None\n"
    )
    r = sb.run(forge, ADD_TESTS, entry_point="add")
    assert r.status == "ok" and r.passed == 0, r
    assert "ignored 1 unauthenticated" in r.detail


def test_format_failures(sb):
    r = sb.run("def add(a, b) return 1", ADD_TESTS, entry_point="add")
    assert r.status == "wrong_format" and "SyntaxError" in r.detail
    r = sb.run("def plus(a, b):\n    return a + b\n", ADD_TESTS, entry_point="add")
    assert r.status == "wrong_format" and "entry point" in r.detail


def test_interrupt_kills_running(sb):
    res = []
    t = threading.Thread(target=lambda: res.append(sb.run("import time\ntime.sleep(100)\n", ["assert True"])))
    t.start()
    time.sleep(0.5)
    sb.interrupt()
    t.join(10)
    assert not t.is_alive() and res[0].status in ("error", "timeout")


def test_limits_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=1)


# --------------------------------------------------------------------------------- the code task on files
@pytest.fixture(scope="module")
def code_task():
    return make_task("code", test_files=[os.path.join(DATA, "code", "humaneval.jsonl"),
                                         os.path.join(DATA, "code", "mbpp.jsonl")], timeout_s=3.0, memory_mb=512)


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
                         timeout_s=3.0)
    assert all_task.continuous is False
    assert all_task.verify(p, "    return xs\n").reward == 0.0
