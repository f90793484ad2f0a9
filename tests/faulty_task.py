"""Test fixture, not a product task: ``faulty`` wraps another task and makes its verifier fail on purpose, for
testing that failures are counted. It registers through ``PASSK_RL_TASK_MODULES=tests.faulty_task``, which
tests/conftest.py sets for the test process and everything it starts (launched runs, Ray workers, Ray jobs).

``faulty`` delegates prompts and verification to an inner task, except on a deterministic fraction of
(prompt id, completion) pairs where the verifier instead
- raises (``raise_frac``) → the pool reports ``error``;
- hangs (``hang_frac``) for ``hang_s`` seconds → the pool's per-sample limit reports ``timeout``. ``hang_mode``:
  ``sleep`` (releases the GIL), ``spin`` (a Python busy loop), ``gil`` (one long C call that holds the GIL, so
  only killing the process ends it — exercises the pool's actor restart);
- kills its own process (``crash_frac``, ``os._exit``) → the pool restarts the actor and reports ``error``.
Which pairs fail is a pure function of ``seed``, the prompt id and the completion (``fault_for``), so a test can
predict the exact counts. This is a real verifier path (the pool cannot tell it from a broken task), not a mock.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Dict, List, Optional

from passk_rl.tasks.base import Prompt, Task, Verdict, make_task, register_task

HANG_MODES = ("sleep", "spin", "gil")


@register_task("faulty")
class FaultyTask(Task):
    """Args: inner (task name), inner_params (its parameters), raise_frac, hang_frac, crash_frac (fractions of
    pairs, summing to ≤ 1), hang_s (how long a hang lasts), hang_mode, honor_interrupt (False: a hang ignores
    the worker's interrupt, leaving a stuck thread that makes the pool recycle the actor), seed."""

    name = "faulty"

    def __init__(
        self,
        inner: str = "arith",
        inner_params: Optional[Dict[str, Any]] = None,
        raise_frac: float = 0.0,
        hang_frac: float = 0.0,
        crash_frac: float = 0.0,
        hang_s: float = 3600.0,
        hang_mode: str = "sleep",
        honor_interrupt: bool = True,
        seed: int = 0,
    ):
        for k, v in (("raise_frac", raise_frac), ("hang_frac", hang_frac), ("crash_frac", crash_frac)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"task faulty: {k} must be in [0, 1], got {v!r}")
        if raise_frac + hang_frac + crash_frac > 1.0 + 1e-12:
            raise ValueError("task faulty: raise_frac + hang_frac + crash_frac must be <= 1")
        if hang_mode not in HANG_MODES:
            raise ValueError(f"task faulty: hang_mode must be one of {HANG_MODES}, got {hang_mode!r}")
        if inner == "faulty":
            raise ValueError("task faulty: inner cannot be 'faulty'")
        self.inner = make_task(inner, **(inner_params or {}))
        self.continuous = self.inner.continuous
        self.raise_frac, self.hang_frac, self.crash_frac = float(raise_frac), float(hang_frac), float(crash_frac)
        self.hang_s = float(hang_s)
        self.hang_mode = hang_mode
        self.honor_interrupt = bool(honor_interrupt)
        self.seed = int(seed)
        self._generation = 0  # bumped by interrupt(): hangs that started earlier end
        self._gen_lock = threading.Lock()

    def fault_for(self, prompt_id: str, completion: str) -> Optional[str]:
        """``"raise"``, ``"hang"``, ``"crash"`` or None for this pair (deterministic)."""
        h = hashlib.sha256(f"{self.seed}\x00{prompt_id}\x00{completion}".encode("utf-8")).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        if u < self.raise_frac:
            return "raise"
        if u < self.raise_frac + self.hang_frac:
            return "hang"
        if u < self.raise_frac + self.hang_frac + self.crash_frac:
            return "crash"
        return None

    def prompts(self, split: str) -> List[Prompt]:
        return self.inner.prompts(split)

    def format_prompt(self, prompt: Prompt, tokenizer: Any = None) -> str:
        return self.inner.format_prompt(prompt, tokenizer)

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        fault = self.fault_for(prompt.id, completion)
        if fault == "raise":
            raise RuntimeError(f"faulty: injected verifier failure for prompt {prompt.id!r}")
        if fault == "crash":
            os._exit(17)
        if fault == "hang":
            self._hang()
        return self.inner.verify(prompt, completion)

    def _hang(self) -> None:
        start_gen = self._generation
        end = time.monotonic() + self.hang_s
        if self.hang_mode == "gil":
            # A single C-level loop: the interpreter never gets to switch threads, so nothing but killing the
            # process stops it before it ends (~hang_s seconds at ~1e8 iterations/s, capped).
            n = int(min(self.hang_s, 1e6) * 1e8)
            sum(range(n))
            return
        while time.monotonic() < end and (self._generation == start_gen or not self.honor_interrupt):
            if self.hang_mode == "sleep":
                time.sleep(0.05)
        if self._generation != start_gen and self.honor_interrupt:
            # Interrupted: the caller has given up on this sample; stop here rather than compete with the
            # next sample for the inner task's resources.
            raise RuntimeError("faulty: injected hang interrupted")

    # optional hooks used by the verifier worker
    def interrupt(self) -> None:
        with self._gen_lock:
            self._generation += 1
        hook = getattr(self.inner, "interrupt", None)
        if hook is not None:
            hook()

    def warmup(self) -> None:
        hook = getattr(self.inner, "warmup", None)
        if hook is not None:
            hook()

    def close(self) -> None:
        hook = getattr(self.inner, "close", None)
        if hook is not None:
            hook()
