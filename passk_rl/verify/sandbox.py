"""Run untrusted code (a model's completion) against tests, with a verdict the code cannot forge.

Two processes per run, neither of them this one:
- the **child** runs the program, in a fresh interpreter under every isolation layer below. It never sees a
  test or an expected value: it only answers calls ("run f on these arguments") with the return value encoded
  as plain data (``_sandbox_codec``: builtins only, JSON, no pickle);
- the **judge** runs the tests: dataset code only (the tests, their setup, the prompt's own helpers), trusted
  and so run outside the sandbox, under CPU and memory limits. Each name the program defines is a proxy
  there, so ``candidate(1, 2)`` sends the arguments to the child and the answer back becomes a plain value
  (or an opaque handle equal only to itself) that the test compares with the interpreter's own ``==``. The
  judge reports pass/fail per test on its stdout, which only this process reads; the child has no descriptor
  of it and cannot see, signal or trace the judge.
So frame or gc introspection in the child, writing to any descriptor it finds, lying ``__eq__``, subclasses of
builtins, can at most make a function answer wrongly: only a right answer passes a test.

Isolation layers of the child, each independent of the others (defence in depth), as this machine allows
(``Sandbox.info()["layers"]`` says which hold and why any does not; a missing one is logged, not fatal):
- ``python -I -S`` (no site-packages, no PYTHON* variables), its own session, killed at the wall-clock limit;
- resource limits before untrusted code runs: CPU seconds, address space, file size, open files, no core
  dumps, and (as a dedicated user) processes;
- namespaces via ``unshare``: network (no interface but a down loopback), pid + mount (a private /proc in
  which only the sandbox's processes exist);
- an unprivileged user (``nobody``) when running as root: cannot raise its limits, read root's files or
  other users' processes;
- Landlock: reads only under the interpreter's own files and shared libraries, writes only in the private
  working directory; no TCP; signals and abstract unix sockets scoped to the sandbox;
- seccomp (filter compiled here with libseccomp through ``pyseccomp``): no new processes or programs, no
  ptrace / process_vm_*, no signals, no sockets, no namespace or mount changes, no io_uring, bpf, keyrings;
- a Python audit hook (PEP 578): the same rules inside the interpreter, with readable error messages;
- a private temporary working directory (also HOME and TMPDIR), deleted afterwards, and a scrubbed
  environment (only PATH, HOME, TMPDIR, LANG/LC_ALL, PYTHONHASHSEED, PYTHONIOENCODING).

Status of a run (``SandboxResult.status``): ``ok`` (reward = passed / total), ``wrong_format`` (the program does
not compile or does not define the entry point), ``timeout`` (wall-clock or CPU limit), ``error`` (memory limit,
an answer over ``max_output_bytes``, killed by a signal, a test whose own code fails or that passes the program
a value that cannot cross, or the sandbox itself failed).

Known limits: values cross as plain builtin data (None, bool, int, float, complex, str, bytes, bytearray, list,
tuple, dict, set, frozenset, range; iterators as their items) or as handles, so a test that passes a callable or
an instance of a class of its own to the program is an ``error`` for every program; an argument the function
changes in place is copied back only at the top level of positional arguments (lists, dicts, sets, bytearrays).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _bootstrap(module: str) -> str:
    # Imported, not passed as source, so each run loads cached bytecode instead of compiling ~25 kB twice; the
    # directory leaves sys.path before any untrusted code runs.
    return f"import sys; sys.path.insert(0, {_HERE!r}); import {module} as m; del sys.path[0]; m.main()"


_CHILD_CODE = _bootstrap("_sandbox_child")
_CHILD_CONFIG = ".passk-sandbox-config.json"  # _sandbox_child.CONFIG_FILE
_JUDGE_CODE = _bootstrap("_sandbox_judge")

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROBE_CODE = "import sys, json, resource, builtins; assert sys.version_info >= (3, 8); print('ok')"
_DIAG_BYTES = 1 << 14

# Denied with EPERM in the child (clone only without CLONE_THREAD: threads stay possible). Each is either a way
# out of the sandbox or towards the judge and the parent, or kernel attack surface no test needs.
_SECCOMP_DENY = (
    "fork", "vfork", "execve", "execveat",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "socket", "socketpair",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "name_to_handle_at", "open_by_handle_at",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "syslog", "personality", "quotactl", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
)
_CLONE_THREAD = 0x00010000

LAYERS = ("rlimits", "network_namespace", "pid_namespace", "mount_namespace", "unprivileged_user", "landlock",
          "seccomp", "audit_hook")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    timeout_s: wall-clock seconds for the whole run (start-up, program, all tests).
    cpu_s: CPU seconds (RLIMIT_CPU) of the child and of the judge, each; default ``ceil(timeout_s)``.
    memory_mb: address space (RLIMIT_AS) in MiB; an allocation beyond it raises MemoryError in the child.
    file_size_mb: largest file the program may write (RLIMIT_FSIZE).
    max_files_written: how many files the program may create or write (so disk use ≤ this × file_size_mb).
    max_open_files: RLIMIT_NOFILE.
    max_output_bytes: the largest answer (one return value, encoded) the judge accepts from the program.
    max_processes: RLIMIT_NPROC of the sandbox user (only when the child runs as a dedicated user: the limit
        counts all of that user's processes and threads, concurrent runs included).
    """

    timeout_s: float = 10.0
    cpu_s: Optional[int] = None
    memory_mb: Optional[int] = 1024
    file_size_mb: int = 16
    max_files_written: int = 32
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20
    max_processes: int = 256

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"SandboxLimits.cpu_s must be >= 1, got {self.cpu_s!r}")
        if self.memory_mb is not None and self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb must be >= 64 (the interpreter needs it), got {self.memory_mb!r}")
        if self.max_output_bytes < 1024:
            raise ValueError(f"SandboxLimits.max_output_bytes must be >= 1024, got {self.max_output_bytes!r}")
        if self.max_processes < 8:
            raise ValueError(f"SandboxLimits.max_processes must be >= 8, got {self.max_processes!r}")

    @property
    def effective_cpu_s(self) -> int:
        return int(self.cpu_s) if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str
    passed: int
    total: int
    detail: str = ""

    @property
    def reward(self) -> float:
        """Fraction of tests passed when the run finished (``ok``); 0 otherwise."""
        if self.status != "ok" or self.total <= 0:
            return 0.0
        return self.passed / self.total


def _probe(cmd: Sequence[str], *, user: Optional[int] = None, group: Optional[int] = None) -> Tuple[bool, str]:
    """(whether ``cmd`` printed ok, why not)."""
    kw: Dict[str, Any] = {}
    if user is not None:
        kw.update(user=user, group=group, extra_groups=[])
    try:
        r = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={"PATH": _SAFE_PATH}, cwd="/", timeout=30, **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{type(e).__name__}: {e}"
    if r.returncode == 0 and r.stdout.strip() == b"ok":
        return True, ""
    return False, f"exit code {r.returncode}: {r.stderr.decode('utf-8', 'replace').strip()[-300:]}"


def build_seccomp_filter() -> bytes:
    """The child's seccomp program as raw BPF for this machine's architecture (see ``_SECCOMP_DENY``).
    Raises ImportError without ``pyseccomp`` and OSError when libseccomp refuses."""
    import errno

    import pyseccomp

    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    eperm = pyseccomp.ERRNO(errno.EPERM)
    for name in _SECCOMP_DENY:
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
            continue  # not a system call on this architecture (e.g. vfork on some)
        f.add_rule(eperm, name)
    f.add_rule(eperm, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, _CLONE_THREAD, 0))
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "clone3") >= 0:
        # clone3 takes its flags in memory, out of a filter's reach; ENOSYS makes libc fall back to clone.
        f.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


class Sandbox:
    """Runs ``program`` + tests as described in the module docstring.

    Args:
        limits: default limits (``run`` accepts per-call overrides).
        python: interpreter for the child and the judge; default: this interpreter if the sandbox user can run
            it, else the system ``python3``. Both use only the standard library (``-S``).
        isolate_network: a fresh network namespace.
        isolate_processes: fresh pid and mount namespaces (a private /proc).
        drop_privileges: when root, run the untrusted code as ``sandbox_uid``/``sandbox_gid`` (nobody).
        landlock, seccomp: those layers, where the kernel (and for seccomp, libseccomp) provides them.
        tmp_root: where private working directories are created (default: the system temp dir).
        audit_hook: install the in-interpreter audit hook (turn off only to test the OS layers alone).

    Layers this machine refuses are left out with a logged warning (``info()["layers"]`` gives the reason);
    a run never starts with fewer layers than were found to work here. Thread-safe: runs may overlap.
    """

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        *,
        python: Optional[str] = None,
        isolate_network: bool = True,
        isolate_processes: bool = True,
        drop_privileges: bool = True,
        sandbox_uid: int = 65534,
        sandbox_gid: int = 65534,
        tmp_root: Optional[str] = None,
        audit_hook: bool = True,
        landlock: bool = True,
        seccomp: bool = True,
    ):
        self.limits = limits
        self.audit_hook = bool(audit_hook)
        self.tmp_root = tmp_root
        self._live: Dict[int, subprocess.Popen] = {}
        self._live_lock = threading.Lock()
        self._layers: Dict[str, Dict[str, Any]] = {}
        is_root = os.geteuid() == 0
        self.uid: Optional[int] = sandbox_uid if (drop_privileges and is_root) else None
        self.gid: Optional[int] = sandbox_gid if self.uid is not None else None

        # The interpreter must be runnable by the sandbox user (e.g. a pyenv under /root is not).
        candidates = [python] if python else [sys.executable, shutil.which("python3", path=_SAFE_PATH), "/usr/bin/python3"]
        self.python: Optional[str] = None
        for c in candidates:
            if c and _probe([c, "-I", "-S", "-c", _PROBE_CODE], user=self.uid, group=self.gid)[0]:
                self.python = c
                break
        if self.python is None and self.uid is not None:
            self._note("unprivileged_user", False, f"no interpreter among {candidates} runs as uid {self.uid}")
            self.uid = self.gid = None
            for c in candidates:
                if c and _probe([c, "-I", "-S", "-c", _PROBE_CODE])[0]:
                    self.python = c
                    break
        if self.python is None:
            raise RuntimeError(f"sandbox: no usable Python interpreter among {candidates}")
        if not drop_privileges:
            self._note("unprivileged_user", False, "turned off (drop_privileges=False)")
        elif not is_root:
            self._note("unprivileged_user", False, "not root: the child runs as the current user")

        self.ns_prefix = self._choose_namespaces(isolate_network, isolate_processes, is_root)

        self._seccomp_bpf: Optional[str] = None
        if seccomp:
            try:
                self._seccomp_bpf = build_seccomp_filter().hex()
            except Exception as e:  # noqa: BLE001 - any failure means: run without this layer, say why
                self._note("seccomp", False, f"cannot build the filter ({type(e).__name__}: {e}); "
                                             "install pyseccomp and libseccomp2")
        else:
            self._note("seccomp", False, "turned off (seccomp=False)")
        self._landlock = bool(landlock)
        if not landlock:
            self._note("landlock", False, "turned off (landlock=False)")
        if not audit_hook:
            self._note("audit_hook", False, "turned off (audit_hook=False)")

        # Ask the child which of the in-process layers the kernel accepts, then keep those and check that a
        # run with exactly them works.
        probe_limits = dataclasses.replace(limits, timeout_s=max(30.0, limits.timeout_s), cpu_s=None)
        r, layers = self._run("def f():\n    return 1\n", ["assert candidate() == 1"], "", "f", probe_limits, "",
                              strict=False)
        if layers is None:
            raise RuntimeError(f"sandbox: the probe run failed before its layers were in place: {r.detail}")
        applied = set(layers.get("applied") or [])
        failed = dict(layers.get("failed") or {})
        if "start-up" in failed:  # limits or the user switch: nothing to run without
            raise RuntimeError(f"sandbox: the child could not set itself up: {failed['start-up']}")
        for name, reason in sorted(failed.items()):
            self._note(name, False, str(reason))
            if name == "landlock":
                self._landlock = False
            elif name == "seccomp":
                self._seccomp_bpf = None
        for name in LAYERS:
            if name in applied:
                self._layers[name] = {"active": True, "reason": ""}
        r, _ = self._run("def f():\n    return 1\n", ["assert candidate() == 1"], "", "f", probe_limits, "",
                         strict=True)
        if (r.status, r.passed) != ("ok", 1):
            raise RuntimeError(f"sandbox: a trivial correct program does not pass here: {r}")
        for name in LAYERS:
            self._layers.setdefault(name, {"active": False, "reason": "not applied (no reason reported)"})

    def _note(self, layer: str, active: bool, reason: str) -> None:
        if not active and layer not in self._layers:
            logger.warning("sandbox: layer %s is not active: %s", layer, reason)
        self._layers[layer] = {"active": active, "reason": reason}

    def _choose_namespaces(self, isolate_network: bool, isolate_processes: bool, is_root: bool) -> List[str]:
        """The ``unshare`` prefix with the most of the wanted namespaces that this machine grants."""
        wanted = {"network_namespace": isolate_network, "pid_namespace": isolate_processes,
                  "mount_namespace": isolate_processes}
        net = ["-n"] if isolate_network else []
        attempts = [net + (["-p", "-f", "-m", "--mount-proc"] if isolate_processes else [])]
        if isolate_network and isolate_processes:
            attempts.append(net)  # at least the network, when pid/mount namespaces are refused
        unshare = shutil.which("unshare", path=_SAFE_PATH)
        prefix: List[str] = []
        reasons: List[str] = []
        if unshare is None:
            reasons.append(f"no unshare on {_SAFE_PATH}")
        elif attempts[0]:
            for flags in attempts:
                # A user namespace (-r) is what lets a non-root user create the others; as root it is not
                # needed, and it would forbid dropping to an unmapped user.
                for user_ns in ([False, True] if is_root else [True]):
                    if user_ns and self.uid is not None:
                        continue
                    cand = [unshare] + (["-r"] if user_ns else []) + flags + ["--"]
                    ok, why = _probe(cand + [self.python, "-I", "-S", "-c", _PROBE_CODE])  # type: ignore[list-item]
                    if ok:
                        prefix = cand
                        break
                    reasons.append(f"'unshare {' '.join(cand[1:-1])}' failed: {why}")
                if prefix:
                    break
        granted = {"network_namespace": "-n" in prefix, "pid_namespace": "-p" in prefix,
                   "mount_namespace": "-m" in prefix}
        for name, want in wanted.items():
            if granted[name]:
                self._layers[name] = {"active": True, "reason": ""}
            else:
                self._note(name, False, "; ".join(reasons) if want else "turned off")
        return prefix

    def info(self) -> Dict[str, Any]:
        """Which isolation layers are active, and why any is not (for logs and tests)."""
        return {
            "python": self.python,
            "network_namespace": self._layers.get("network_namespace", {}).get("active", False),
            "run_as_uid": self.uid,
            "audit_hook": self.audit_hook,
            "layers": {k: dict(v) for k, v in self._layers.items()},
            "limits": dataclasses.asdict(self.limits),
        }

    def interrupt(self) -> None:
        """Kill every run in progress (their ``run`` calls return ``error``)."""
        with self._live_lock:
            procs = list(self._live.values())
        for p in procs:
            _kill_group(p)

    def run(
        self,
        program: str,
        tests: Sequence[str],
        *,
        setup: str = "",
        entry_point: Optional[str] = None,
        limits: Optional[SandboxLimits] = None,
        trusted_code: str = "",
    ) -> SandboxResult:
        """Run ``program`` (then ``setup``) in the child; in the judge run ``trusted_code`` (dataset code such as
        the prompt's helpers: the names it defines stay the judge's own, except ``entry_point``) and ``setup``,
        bind ``candidate`` to ``entry_point`` (if given) and the program's other functions to their names,
        then each test (a statement that raises on failure, typically an assert)."""
        trusted_code = _needed_by_tests(trusted_code, entry_point, list(tests) + [setup])
        return self._run(program, tests, setup, entry_point, limits or self.limits, trusted_code, strict=True)[0]

    def _run(self, program: str, tests: Sequence[str], setup: str, entry_point: Optional[str],
             lim: SandboxLimits, trusted_code: str, *, strict: bool) -> Tuple[SandboxResult, Optional[Dict]]:
        cap = int(lim.max_output_bytes)
        child_cfg = {
            "program": program,
            "setup": setup,
            "entry_point": entry_point,
            "limits": {
                "cpu_s": lim.effective_cpu_s,
                "memory_mb": lim.memory_mb,
                "file_size_mb": lim.file_size_mb,
                "max_open_files": lim.max_open_files,
                "max_files_written": lim.max_files_written,
                "max_processes": lim.max_processes,
            },
            "max_reply_bytes": cap,
            "drop_to_uid": self.uid,
            "drop_to_gid": self.gid,
            "audit_hook": self.audit_hook,
            "landlock": self._landlock,
            "seccomp_bpf": self._seccomp_bpf,
            "strict": strict,
        }
        judge_cfg = {
            "tests": list(tests),
            "setup": setup,
            "trusted_code": trusted_code,
            "entry_point": entry_point,
            "max_reply_bytes": cap,
            "limits": {"cpu_s": lim.effective_cpu_s, "memory_mb": lim.memory_mb},
            "same_user_as_child": self.uid is None,
            "strict": strict,
        }
        workdir = tempfile.mkdtemp(prefix="passk-sbx-", dir=self.tmp_root)
        try:
            if self.uid is not None:
                os.chown(workdir, self.uid, self.gid)  # type: ignore[arg-type]
            os.chmod(workdir, 0o700)
            # Read (and deleted) by the child before any untrusted code runs; it holds no test.
            with open(os.path.join(workdir, _CHILD_CONFIG), "w", encoding="utf-8") as f:
                json.dump(child_cfg, f)
            env = {
                "PATH": _SAFE_PATH,
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "PYTHONHASHSEED": "0",
                "PYTHONIOENCODING": "utf-8",
            }
            return self._execute(env, workdir, judge_cfg, len(tests), lim)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _execute(self, env: Dict[str, str], workdir: str, judge_cfg: Dict[str, Any], total: int,
                 lim: SandboxLimits) -> Tuple[SandboxResult, Optional[Dict]]:
        start = time.monotonic()
        deadline = start + lim.timeout_s
        # Two pipes between judge and child only; this process keeps no end of them.
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        child = judge = None
        try:
            try:
                child = subprocess.Popen(self.ns_prefix + [self.python, "-I", "-S", "-c", _CHILD_CODE],
                                         stdin=to_child_r, stdout=from_child_w, stderr=subprocess.PIPE,
                                         cwd=workdir, env=env, start_new_session=True, close_fds=True)
                judge = subprocess.Popen([self.python, "-I", "-S", "-c", _JUDGE_CODE],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd="/", env={k: env[k] for k in ("PATH", "LANG", "LC_ALL", "PYTHONHASHSEED",
                                                                            "PYTHONIOENCODING")},
                                         start_new_session=True, close_fds=True,
                                         pass_fds=(to_child_w, from_child_r))
            finally:
                for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                    os.close(fd)
        except OSError as e:
            if child is not None:
                _kill_group(child)
                child.wait()
                _close_pipes(child)
            return SandboxResult("error", 0, total, f"sandbox failed to start: {e}"), None
        with self._live_lock:
            self._live[child.pid] = child
            self._live[judge.pid] = judge
        try:
            judge_cfg = dict(judge_cfg, to_child_fd=to_child_w, from_child_fd=from_child_r)
            try:
                assert judge.stdin is not None
                judge.stdin.write(json.dumps(judge_cfg).encode("utf-8"))
                judge.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # the judge died at once; its exit status says why
            records, diag, timed_out = _collect(judge, child, deadline)
            done = next((r for r in reversed(records) if r.get("t") == "done"), None)
            # The child's exit status matters only when it ended the run; otherwise the verdict is complete.
            if timed_out or done is None or done.get("phase") != "child_exit":
                _kill_group(child)
            try:
                child_rc = child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(child)
                child_rc = child.wait(timeout=5)
                timed_out = True
            try:  # it has closed its stdout: let it finish, so that its own exit status (e.g. SIGXCPU) is seen
                judge_rc = judge.wait(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                _kill_group(judge)
                judge_rc = judge.wait(timeout=5)
        finally:
            for p in (child, judge):
                if p.poll() is None:
                    _kill_group(p)
                    p.wait(timeout=5)
                _close_pipes(p)
            with self._live_lock:
                self._live.pop(child.pid, None)
                self._live.pop(judge.pid, None)
        layers = next((r for r in records if r.get("t") == "layers"), None)
        result = _interpret(records, done, judge_rc, child_rc, diag, total, lim, timed_out,
                            pid_namespace=self._layers.get("pid_namespace", {}).get("active", False))
        return result, layers


def _needed_by_tests(trusted_code: str, entry_point: Optional[str], sources: Sequence[str]) -> str:
    """``trusted_code`` when the tests use a name it defines (other than the entry point), else "": running it
    in the judge would change nothing, and a prompt's imports (``typing``: ~10 ms) are not free."""
    if not trusted_code.strip():
        return ""
    try:
        tree = ast.parse(trusted_code)
    except (SyntaxError, ValueError):
        return ""  # a prompt that is not a module on its own (a body to be continued) defines nothing usable
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    defined.discard(entry_point or "")
    for src in sources:
        try:
            used = {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}
        except (SyntaxError, ValueError):
            return trusted_code
        if used & defined:
            return trusted_code
    return ""


def _close_pipes(p: subprocess.Popen) -> None:
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            p.kill()
        except ProcessLookupError:
            pass


def _collect(judge: subprocess.Popen, child: subprocess.Popen, deadline: float):
    """Read the judge's records until it closes its stdout or the deadline passes; keep the tails of both
    processes' stderr for error messages. Returns (records, {"judge": str, "child": str}, timed_out)."""
    assert judge.stdout is not None and judge.stderr is not None and child.stderr is not None
    out_fd = judge.stdout.fileno()
    bufs = {out_fd: bytearray(), judge.stderr.fileno(): bytearray(), child.stderr.fileno(): bytearray()}
    open_fds = set(bufs)
    timed_out = False
    while out_fd in open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        r, _, _ = select.select(list(open_fds), [], [], left)
        if not r:
            timed_out = True
            break
        for fd in r:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
            elif fd == out_fd or len(bufs[fd]) < _DIAG_BYTES:
                bufs[fd] += chunk
    # Whatever the judge wrote last before dying, and the child's start-up errors, without blocking.
    for fd in list(open_fds):
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if len(bufs[fd]) < _DIAG_BYTES:
                bufs[fd] += chunk
    records = []
    for line in bytes(bufs[out_fd]).decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    diag = {"judge": bytes(bufs[judge.stderr.fileno()]).decode("utf-8", "replace").strip()[-500:],
            "child": bytes(bufs[child.stderr.fileno()]).decode("utf-8", "replace").strip()[-500:]}
    return records, diag, timed_out


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)


def _interpret(records: List[Dict[str, Any]], done: Optional[Dict[str, Any]], judge_rc: Optional[int],
               child_rc: Optional[int], diag: Dict[str, str], total: int, lim: SandboxLimits, timed_out: bool,
               *, pid_namespace: bool) -> SandboxResult:
    passed = len({r.get("i") for r in records if r.get("t") == "test" and r.get("ok") is True})
    progress = f"{passed}/{total} tests passed before"
    if timed_out:
        return SandboxResult("timeout", passed, total,
                             f"wall-clock limit {lim.timeout_s:g}s exceeded ({progress} the limit; killed)")
    if done is None:
        if judge_rc == -signal.SIGXCPU:
            return SandboxResult("timeout", passed, total, f"CPU time limit {lim.effective_cpu_s}s exceeded in the "
                                                           f"judge ({progress} the limit)")
        return SandboxResult("error", passed, total, f"sandbox judge exited with code {judge_rc} without a verdict: "
                                                     f"{diag['judge']}")
    phase = done.get("phase")
    error = str(done.get("error") or "")
    where = str(done.get("where") or "")
    if phase == "too_big":
        return SandboxResult("error", passed, total, f"sandbox output exceeded {lim.max_output_bytes} bytes in "
                                                     f"{where} (killed)")
    if phase == "memory":
        return SandboxResult("error", passed, total,
                             f"memory limit exceeded (RLIMIT_AS {lim.memory_mb} MiB) in {where}; killed")
    if phase == "layers":
        return SandboxResult("error", 0, total, f"sandbox layers could not be applied: {error}")
    if phase == "judge":
        return SandboxResult("error", 0, total, f"the tests' own code failed in the judge: {error}")
    if phase == "unsendable":
        return SandboxResult("error", passed, total, f"{error} in {where}")
    if phase == "child_exit":
        sig: Optional[int] = None
        if child_rc is not None and child_rc < 0:
            sig = -child_rc
        elif pid_namespace and child_rc is not None and child_rc > 128:
            sig = child_rc - 128  # relayed by the namespace's init, like a shell does
        if sig == signal.SIGXCPU:
            return SandboxResult("timeout", passed, total,
                                 f"CPU time limit {lim.effective_cpu_s}s exceeded ({progress} the limit; SIGXCPU)")
        if sig is not None:
            hint = " (CPU hard limit or the out-of-memory killer)" if sig == signal.SIGKILL else ""
            return SandboxResult("error", passed, total, f"sandbox killed by {_signal_name(sig)}{hint} in {where}; "
                                                         f"{progress} it")
        if child_rc == 0:
            # The program ended its interpreter itself (e.g. os._exit(0)): tests it did not answer do not pass.
            return SandboxResult("ok", passed, total, f"program exited before the tests finished ({where}); "
                                                      f"{progress} exit")
        return SandboxResult("error", passed, total,
                             f"sandbox exited with code {child_rc} in {where} without a result: {diag['child']}")
    if phase in ("compile", "entry_point"):
        return SandboxResult("wrong_format", 0, total, error)
    if phase == "program":
        return SandboxResult("ok", 0, total, f"program raised before the tests: {error}")
    if phase == "tests":
        return SandboxResult("ok", passed, total, f"{passed}/{total} tests passed" + (
            f"; first failure: {error}" if error else ""))
    return SandboxResult("error", passed, total, f"sandbox judge reported an unknown phase {phase!r}")
