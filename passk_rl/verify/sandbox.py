"""Run untrusted code (a model's completion) against tests in an isolated child process.

Isolation layers, each independent of the others (defence in depth):
- a separate process (``python -I -S``: no site-packages, no PYTHON* variables, no user site) in its own
  session, killed by the parent at the wall-clock limit;
- resource limits set before untrusted code runs: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS),
  file size (RLIMIT_FSIZE), open files, no core dumps;
- when running as root: a fresh network namespace (``unshare -n``: no interface but a down loopback), and the
  child drops to an unprivileged user (``nobody``) so it can neither raise its hard limits nor read or write
  root's files nor read other processes' environments;
- a Python audit hook (PEP 578) installed before untrusted code: no sockets, no new processes, no signals, no
  ctypes, no writes / renames / deletes outside the private working directory, no other processes' /proc;
- a private temporary working directory (also HOME and TMPDIR), deleted afterwards;
- a scrubbed environment (only PATH, HOME, TMPDIR, LANG/LC_ALL, PYTHONHASHSEED, PYTHONIOENCODING).

Results travel on a private copy of the child's stdout (the program's own stdout/stderr go to /dev/null) with a
per-run random token, one record per test, so a program that exits early keeps only the tests it passed.
Known limit: the harness runs in the same interpreter as the untrusted code, so a program that introspects the
interpreter's memory could in principle find the token and forge records; the OS layers (namespace, user,
rlimits) do not depend on the interpreter.

Status of a run (``SandboxResult.status``): ``ok`` (reward = passed / total), ``wrong_format`` (the program does
not compile or does not define the entry point), ``timeout`` (wall-clock or CPU limit), ``error`` (memory limit,
killed by a signal, or the sandbox itself failed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

_PRELUDE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py"), encoding="utf-8").read()

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    timeout_s: wall-clock seconds for the whole run (start-up, program, all tests).
    cpu_s: CPU seconds (RLIMIT_CPU); default ``ceil(timeout_s)``.
    memory_mb: address space (RLIMIT_AS) in MiB; an allocation beyond it raises MemoryError in the child.
    file_size_mb: largest file the program may write (RLIMIT_FSIZE).
    max_files_written: how many files the program may create or write (so disk use ≤ this × file_size_mb).
    max_open_files: RLIMIT_NOFILE.
    max_output_bytes: cap on what the parent reads back from the child.
    """

    timeout_s: float = 10.0
    cpu_s: Optional[int] = None
    memory_mb: Optional[int] = 1024
    file_size_mb: int = 16
    max_files_written: int = 32
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"SandboxLimits.cpu_s must be >= 1, got {self.cpu_s!r}")
        if self.memory_mb is not None and self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb must be >= 64 (the interpreter needs it), got {self.memory_mb!r}")

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


def _probe(cmd: Sequence[str], *, user: Optional[int] = None, group: Optional[int] = None) -> bool:
    kw: Dict[str, Any] = {}
    if user is not None:
        kw.update(user=user, group=group, extra_groups=[])
    try:
        r = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           env={"PATH": _SAFE_PATH}, cwd="/", timeout=30, **kw)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and r.stdout.strip() == b"ok"


_PROBE_CODE = "import sys, json, resource, builtins; assert sys.version_info >= (3, 8); print('ok')"


class Sandbox:
    """Runs ``program`` + tests under the isolation described in the module docstring.

    Args:
        limits: default limits (``run`` accepts per-call overrides).
        python: interpreter for the child; default: this interpreter if the sandbox user can run it, else the
            system ``python3``. The child uses only the standard library (``-S``).
        isolate_network: use a fresh network namespace when possible (the audit hook blocks sockets anyway).
        drop_privileges: when root, run the untrusted code as ``sandbox_uid``/``sandbox_gid`` (nobody).
        tmp_root: where private working directories are created (default: the system temp dir).
        audit_hook: install the in-interpreter audit hook (turn off only to test the OS layers alone).

    ``info()`` says which layers are active on this machine. Thread-safe: several runs may proceed at once.
    """

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        *,
        python: Optional[str] = None,
        isolate_network: bool = True,
        drop_privileges: bool = True,
        sandbox_uid: int = 65534,
        sandbox_gid: int = 65534,
        tmp_root: Optional[str] = None,
        audit_hook: bool = True,
    ):
        self.limits = limits
        self.audit_hook = bool(audit_hook)
        self.tmp_root = tmp_root
        self._live: Dict[int, subprocess.Popen] = {}
        self._live_lock = threading.Lock()
        is_root = os.geteuid() == 0
        self.uid: Optional[int] = sandbox_uid if (drop_privileges and is_root) else None
        self.gid: Optional[int] = sandbox_gid if self.uid is not None else None

        # The interpreter must be runnable by the sandbox user (e.g. a pyenv under /root is not).
        candidates = [python] if python else [sys.executable, shutil.which("python3", path=_SAFE_PATH), "/usr/bin/python3"]
        self.python: Optional[str] = None
        for c in candidates:
            if c and _probe([c, "-I", "-S", "-c", _PROBE_CODE], user=self.uid, group=self.gid):
                self.python = c
                break
        if self.python is None and self.uid is not None:
            # No interpreter the sandbox user can run: keep the other layers, run as the current user.
            self.uid = self.gid = None
            for c in candidates:
                if c and _probe([c, "-I", "-S", "-c", _PROBE_CODE]):
                    self.python = c
                    break
        if self.python is None:
            raise RuntimeError(f"sandbox: no usable Python interpreter among {candidates}")

        self.net_prefix: List[str] = []
        unshare = shutil.which("unshare", path=_SAFE_PATH) if isolate_network else None
        if unshare:
            for prefix in ([unshare, "-n", "--"], [unshare, "-r", "-n", "--"]) if is_root else ([unshare, "-r", "-n", "--"],):
                if prefix[1] == "-r" and self.uid is not None:
                    continue  # a user namespace cannot setuid to an unmapped user
                if _probe(prefix + [self.python, "-I", "-S", "-c", _PROBE_CODE]):
                    self.net_prefix = prefix
                    break

    def info(self) -> Dict[str, Any]:
        """Which isolation layers are active (for logs and tests)."""
        return {
            "python": self.python,
            "network_namespace": bool(self.net_prefix),
            "run_as_uid": self.uid,
            "audit_hook": self.audit_hook,
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
    ) -> SandboxResult:
        """Execute ``program``, then ``setup``, bind ``candidate`` to ``entry_point`` (if given), then each test
        (a statement that raises on failure, typically an assert). Returns the run's status and tests passed."""
        lim = limits or self.limits
        total = len(tests)
        token = secrets.token_hex(16)
        payload = {
            "token": token,
            "program": program,
            "tests": list(tests),
            "setup": setup,
            "entry_point": entry_point,
            "limits": {
                "cpu_s": lim.effective_cpu_s,
                "memory_mb": lim.memory_mb,
                "file_size_mb": lim.file_size_mb,
                "max_open_files": lim.max_open_files,
                "max_files_written": lim.max_files_written,
            },
            "drop_to_uid": self.uid,
            "drop_to_gid": self.gid,
            "audit_hook": self.audit_hook,
        }
        workdir = tempfile.mkdtemp(prefix="passk-sbx-", dir=self.tmp_root)
        try:
            if self.uid is not None:
                os.chown(workdir, self.uid, self.gid)  # type: ignore[arg-type]
            os.chmod(workdir, 0o700)
            env = {
                "PATH": _SAFE_PATH,
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "PYTHONHASHSEED": "0",
                "PYTHONIOENCODING": "utf-8",
            }
            cmd = self.net_prefix + [self.python, "-I", "-S", "-c", _PRELUDE]
            return self._execute(cmd, env, workdir, payload, token, total, lim)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _execute(self, cmd: List[str], env: Dict[str, str], workdir: str, payload: Dict[str, Any], token: str,
                 total: int, lim: SandboxLimits) -> SandboxResult:
        start = time.monotonic()
        deadline = start + lim.timeout_s
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 cwd=workdir, env=env, start_new_session=True, close_fds=True)
        except OSError as e:
            return SandboxResult("error", 0, total, f"sandbox failed to start: {e}")
        with self._live_lock:
            self._live[p.pid] = p
        try:
            try:
                assert p.stdin is not None
                p.stdin.write(json.dumps(payload).encode("utf-8"))
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # the child died at once; its exit status says why
            out, err, timed_out, too_big = _read_bounded(p, deadline, lim.max_output_bytes)
            if timed_out or too_big:
                _kill_group(p)
            try:
                rc = p.wait(timeout=max(0.1, deadline - time.monotonic()) if not (timed_out or too_big) else 5)
            except subprocess.TimeoutExpired:
                _kill_group(p)
                rc = p.wait(timeout=5)
                timed_out = True
        finally:
            with self._live_lock:
                self._live.pop(p.pid, None)
        return _interpret(out, err, rc, token, total, lim, timed_out, too_big, time.monotonic() - start)


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


def _read_bounded(p: subprocess.Popen, deadline: float, cap: int):
    """Read the child's stdout and stderr until both close, the deadline passes, or ``cap`` bytes arrived."""
    assert p.stdout is not None and p.stderr is not None
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    streams = {out_fd: bytearray(), err_fd: bytearray()}
    open_fds = set(streams)
    timed_out = too_big = False
    while open_fds:
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
            else:
                streams[fd] += chunk
        if sum(len(b) for b in streams.values()) > cap:
            too_big = True
            break
    out, err = bytes(streams[out_fd]), bytes(streams[err_fd])
    p.stdout.close()
    p.stderr.close()
    return out, err, timed_out, too_big


def _interpret(out: bytes, err: bytes, rc: Optional[int], token: str, total: int, lim: SandboxLimits,
               timed_out: bool, too_big: bool, elapsed: float) -> SandboxResult:
    passed = 0
    done: Optional[Dict[str, Any]] = None
    memory: Optional[Dict[str, Any]] = None
    forged = 0
    for line in out.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            forged += 1
            continue
        if not isinstance(msg, dict) or msg.get("token") != token:
            forged += 1
            continue
        if msg.get("t") == "test" and msg.get("ok") is True:
            passed += 1
        elif msg.get("t") == "done":
            done = msg
        elif msg.get("t") == "memory":
            memory = msg
    progress = f"{passed}/{total} tests passed before"
    if too_big:
        return SandboxResult("error", passed, total, f"sandbox output exceeded {lim.max_output_bytes} bytes (killed)")
    if timed_out:
        return SandboxResult("timeout", passed, total,
                             f"wall-clock limit {lim.timeout_s:g}s exceeded ({progress} the limit; killed)")
    if memory is not None:
        return SandboxResult("error", passed, total,
                             f"memory limit exceeded (RLIMIT_AS {lim.memory_mb} MiB) in {memory.get('phase')}; killed")
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return SandboxResult("timeout", passed, total,
                                 f"CPU time limit {lim.effective_cpu_s}s exceeded ({progress} the limit; SIGXCPU)")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (CPU hard limit or the out-of-memory killer)" if sig == signal.SIGKILL else ""
        return SandboxResult("error", passed, total, f"sandbox killed by {name}{hint}; {progress} it")
    if done is None:
        tail = err.decode("utf-8", "replace").strip()[-500:]
        if rc == 0:
            # The program ended the interpreter itself (e.g. os._exit(0)): tests it did not run do not pass.
            return SandboxResult("ok", passed, total, f"program exited before the tests finished; {progress} exit")
        return SandboxResult("error", passed, total, f"sandbox exited with code {rc} without a result: {tail}")
    phase = done.get("phase")
    error = str(done.get("error") or "")
    if phase in ("compile", "entry_point"):
        return SandboxResult("wrong_format", 0, total, error)
    if phase == "program":
        return SandboxResult("ok", 0, total, f"program raised before the tests: {error}")
    detail = f"{passed}/{total} tests passed" + (f"; first failure: {error}" if error else "")
    if forged:
        detail += f"; ignored {forged} unauthenticated output lines"
    return SandboxResult("ok", passed, total, detail)
