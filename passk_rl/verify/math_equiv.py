"""Math answers: extraction from completions and equivalence checking with math-verify, safe in any thread.

Extraction (pure functions, no sympy):
- ``extract_hash_answer``: the text after the last ``####`` (GSM8K's convention).
- ``last_boxed``: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (MATH's convention), braces balanced.
- ``extract_answer_phrase``: what follows the last "the answer is".
- ``last_number``: the last number in the text (GSM8K "flexible" extraction).

Equivalence (``MathChecker``): math-verify parses both sides to sympy and compares them (fractions, LaTeX forms,
sets, intervals, matrices, units in ``\\text{}``, thousands separators). math-verify's own timeout uses
``signal.alarm``, which raises off the main thread — and a caller that catches that as "not equal" scores every
sample 0 without anyone noticing (verl PR #5635). So ``MathChecker`` calls math-verify with its timeouts
disabled inside a private child process and enforces the limit from outside: the parent waits on a pipe with
``select`` and kills the child when the limit passes. That works in every thread and every process; a killed
child is restarted on the next check. A timeout or a crash is reported as such (status ``timeout``/``error``),
never as a wrong answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Optional

# --------------------------------------------------------------------------------------------- extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``; None if absent.

    Braces are matched by depth so nested LaTeX (``\\boxed{\\frac{1}{2}}``) is kept whole; an unclosed box
    yields None (a truncated completion has no answer).
    """
    best = -1
    cmd_len = 0
    for cmd in _BOX_COMMANDS:
        i = text.rfind(cmd)
        if i > best:
            best, cmd_len = i, len(cmd)
    if best < 0:
        return None
    j = best + cmd_len
    while j < len(text) and text[j].isspace():
        j += 1
    if j >= len(text):
        return None
    if text[j] != "{":
        if j == best + cmd_len:
            return None  # "\boxedx": another command, not a box
        # "\boxed 5": the argument is the next token
        m = re.match(r"([^\s$]+)", text[j:])
        return m.group(1) if m else None
    depth = 0
    for k in range(j, len(text)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k].strip()
    return None


def extract_hash_answer(text: str, marker: str = "####") -> Optional[str]:
    """The rest of the line after the last ``marker`` (GSM8K's ``#### 42``); None if absent or empty."""
    i = text.rfind(marker)
    if i < 0:
        return None
    rest = text[i + len(marker) :].strip().splitlines()
    ans = rest[0].strip() if rest else ""
    return ans or None


_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*(.+)", re.IGNORECASE)


def extract_answer_phrase(text: str) -> Optional[str]:
    """What follows the last "the answer is" on its line (trailing period dropped); None if absent."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    ans = matches[-1].group(1).strip().splitlines()[0].strip()
    ans = ans.rstrip(".").strip()
    return ans or None


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> Optional[str]:
    """The last number in ``text`` with thousands separators removed (``"1,234.5"`` → ``"1234.5"``)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "")


_LEADING_NUMBER = re.compile(r"^(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d/^*+\-])(.*)$", re.DOTALL)


def normalize_numeric_answer(ans: str) -> str:
    """Normalise an extracted numeric answer: drop ``$``/``\\$``, a trailing period, thousands separators and
    trailing unit words (``"$1,234.00."`` → ``"1234.00"``, ``"18 dollars"`` → ``"18"``).

    Anything that is not "a number followed by words" (``"3/4"``, ``"\\frac{1}{2}"``, ``"2^{10}"``) is returned
    with only the currency signs and the trailing period removed, for math-verify to parse.
    """
    s = ans.strip().replace("\\$", "").replace("$", "").strip()
    s = s.rstrip(".").strip()
    m = _LEADING_NUMBER.match(s)
    if m:
        rest = m.group(2)
        # A unit or a word may follow the number, but no more math (digits or operators).
        if not re.search(r"[\d=/^*+]", rest):
            return m.group(1).replace(",", "")
    return s


def gsm8k_gold_answer(answer_field: str) -> Optional[str]:
    """The final answer of a GSM8K ``answer`` field (the text after ``####``), normalised; None if absent."""
    ans = extract_hash_answer(answer_field)
    return normalize_numeric_answer(ans) if ans is not None else None


# ------------------------------------------------------------------------------------------ equivalence


@dataclasses.dataclass(frozen=True)
class MathCheck:
    """Result of one equivalence check.

    ``status``: ``ok`` (``equal`` is meaningful), ``wrong_format`` (math-verify found no answer in the
    prediction), ``timeout`` (the limit passed; the child was killed) or ``error`` (the child failed).
    ``gold``/``pred`` are the strings math-verify matched (for logs).
    """

    status: str
    equal: bool = False
    detail: str = ""
    gold: str = ""
    pred: str = ""


_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from passk_rl.verify._math_child import main; main({memory_mb!r})"
)


class MathChecker:
    """math-verify equivalence checks in a private child process, with a wall-clock limit per check.

    Thread-safe (checks are serialised by a lock); usable from any thread of any process. The child starts on
    the first check (≈1 s: sympy import) or on ``start()``; it is killed after a timeout and restarted lazily.

    Args:
        timeout_s: wall-clock limit of one check (parse both sides + compare), excluding child start-up.
        memory_mb: address-space limit of the child (RLIMIT_AS), so a pathological expression cannot exhaust
            the machine; ``None`` for no limit.
        startup_timeout_s: limit for the child to import math-verify and report ready.
    """

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: Optional[int] = 4096, startup_timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"MathChecker: timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.startup_timeout_s = float(startup_timeout_s)
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._buf = b""
        self._next_id = 0
        self.restarts = 0  # children started after the first (each follows a timeout, a crash or close())
        self._starts = 0
        self._busy = False  # a request is in flight (interrupt() only acts then)
        self._dirty = False  # interrupt() killed the child: restart before the next request

    # -- process management
    def start(self) -> None:
        """Start the child now (otherwise the first check does)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._dirty:
            # interrupt() killed the child; it may not be reaped yet (poll() can still say "running").
            self._dirty = False
            self._kill()
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            self._reap()
        if self._starts:
            self.restarts += 1
        self._starts += 1
        code = _BOOT.format(root=_PKG_ROOT, memory_mb=self.memory_mb)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the child's warnings go to our stderr (the actor's log)
            close_fds=True,
        )
        self._buf = b""
        msg = self._read_line(time.monotonic() + self.startup_timeout_s)
        if msg is None or msg.get("ready") is not True:
            self._kill()
            raise RuntimeError(f"math-verify child failed to start: {msg!r}")

    def _kill(self) -> None:
        p = self._proc
        if p is not None and p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        self._reap()

    def _reap(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        for f in (p.stdin, p.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def interrupt(self) -> None:
        """Abort the check in flight, if any (from any thread, without the lock): its child is killed and the
        check returns ``error`` promptly. Used by the verifier worker when its own per-sample limit passes
        first. An idle child is left alone."""
        p = self._proc
        if self._busy and p is not None and p.poll() is None:
            self._dirty = True
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __enter__(self) -> "MathChecker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            p = self._proc
            if p is not None and p.poll() is None:
                p.kill()
        except Exception:
            pass

    # -- protocol
    def _read_line(self, deadline: float) -> Optional[Dict[str, Any]]:
        """Next JSON line from the child, or None at EOF; raises TimeoutError past ``deadline``."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def check(self, gold: str, pred: str, *, pred_mode: str = "boxed", timeout_s: Optional[float] = None) -> MathCheck:
        """Is ``pred`` mathematically equal to ``gold``?

        Args:
            gold: the reference answer (LaTeX or plain, without ``\\boxed``).
            pred: with ``pred_mode="boxed"``, an extracted answer (parsed as if it were ``\\boxed{pred}``);
                with ``pred_mode="any"``, a whole completion that math-verify searches for its answer.
            timeout_s: overrides the checker's limit for this call.
        """
        if pred_mode not in ("boxed", "any"):
            raise ValueError(f"pred_mode must be 'boxed' or 'any', got {pred_mode!r}")
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        with self._lock:
            try:
                self._ensure_started()
            except Exception as e:  # noqa: BLE001 - reported as a verifier error, never a silent 0
                return MathCheck("error", detail=f"math-verify child failed to start: {e}")
            assert self._proc is not None and self._proc.stdin is not None
            self._next_id += 1
            req = {"id": self._next_id, "gold": gold, "pred": pred, "mode": pred_mode}
            self._busy = True
            try:
                os.write(self._proc.stdin.fileno(), (json.dumps(req) + "\n").encode())
                resp = self._read_line(time.monotonic() + limit)
            except TimeoutError:
                self._kill()
                return MathCheck("timeout", detail=f"math-verify exceeded {limit:g}s (child killed)")
            except (OSError, ValueError) as e:
                self._kill()
                return MathCheck("error", detail=f"math-verify child failed: {type(e).__name__}: {e}")
            finally:
                self._busy = False
            if resp is None:
                code = self._proc.poll() if self._proc is not None else None
                self._kill()
                return MathCheck("error", detail=f"math-verify child died (exit code {code})")
            if resp.get("id") != req["id"]:
                self._kill()
                return MathCheck("error", detail="math-verify child protocol out of sync (restarted)")
        if resp.get("error"):
            return MathCheck("error", detail=str(resp["error"]))
        if not resp.get("pred_found", False):
            return MathCheck("wrong_format", detail="math-verify found no answer in the prediction",
                             gold=resp.get("gold", ""))
        return MathCheck("ok", equal=bool(resp["equal"]), gold=resp.get("gold", ""), pred=resp.get("pred", ""))


class LazyMathChecker:
    """A ``MathChecker`` made on first use: tasks hold one so that building a task (e.g. in the driver, only to
    read prompts) starts no process. Pickles without its process (the copy starts its own)."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: Optional[int] = 4096):
        MathChecker(timeout_s=timeout_s, memory_mb=memory_mb)  # validate arguments now, start nothing
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._checker: Optional[MathChecker] = None
        self._lock = threading.Lock()

    def get(self) -> MathChecker:
        with self._lock:
            if self._checker is None:
                self._checker = MathChecker(timeout_s=self.timeout_s, memory_mb=self.memory_mb)
            return self._checker

    def check(self, gold: str, pred: str, *, pred_mode: str = "boxed") -> MathCheck:
        return self.get().check(gold, pred, pred_mode=pred_mode)

    def warmup(self) -> None:
        """Start the child and run one check (sympy's first comparisons are slow to set up)."""
        c = self.get()
        c.start()
        c.check("\\frac{1}{2}", "0.5")

    def interrupt(self) -> None:
        c = self._checker
        if c is not None:
            c.interrupt()

    def close(self) -> None:
        c, self._checker = self._checker, None
        if c is not None:
            c.close()

    def __getstate__(self) -> Dict[str, Any]:
        return {"timeout_s": self.timeout_s, "memory_mb": self.memory_mb}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
