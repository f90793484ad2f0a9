"""Verifier pool: M Ray actors (separate processes) that score completions with a task's verifier.

Layers of protection, so that no failure is ever a silent 0 and none stops the run:
1. the task's own checks run risky work in child processes with limits (math-verify, the code sandbox);
2. ``VerifierWorker`` (plain class, usable without Ray) runs each ``Task.verify`` in a helper thread with a
   per-sample wall-clock limit: an exception → ``error``, the limit → ``timeout`` (the task's optional
   ``interrupt()`` hook is called so its child processes die and the stuck thread ends); any other invalid
   result (not a Verdict, reward outside [0, 1]) → ``error``;
3. ``VerifierPool`` gives each actor a deadline per chunk (``timeout_s × len(chunk) + grace_s``): an actor that
   dies (a crash, ``os._exit``, OOM) or stops answering (a hang in C code that holds the GIL) is killed and
   replaced, and that chunk's samples are marked ``error`` / ``timeout``. An actor whose abandoned verifier
   threads are still running after a chunk is recycled the same way (its verdicts are kept).

Optional task hooks (looked up with ``getattr``): ``warmup()`` (start child processes before the first batch),
``interrupt()`` (abort in-flight checks from another thread), ``close()``.

Counters: ``VerifierPool.counts()`` → {status: n} over the pool's life, ``last_counts()`` for the latest
``verify`` call, ``stats()`` adds actor restarts; the trainer logs these to metrics.jsonl and the dashboard.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from passk_rl.tasks.base import STATUSES, Prompt, Status, Task, Verdict, make_task


def _zero_counts() -> Dict[str, int]:
    return {s: 0 for s in STATUSES}


def _validate(v: Any) -> Verdict:
    if not isinstance(v, Verdict):
        return Verdict(0.0, Status.ERROR.value, f"verifier returned {type(v).__name__}, not a Verdict")
    r = v.reward
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or not 0.0 <= r <= 1.0:
        return Verdict(0.0, Status.ERROR.value, f"verifier returned reward {r!r} outside [0, 1]")
    if v.status != Status.OK.value and r != 0.0:
        # Non-ok statuses carry no score (see tasks/base.py): keep the status, drop the reward.
        return Verdict(0.0, v.status, v.detail)
    return Verdict(float(r), v.status, v.detail)


class VerifierWorker:
    """Scores (prompt, completion) pairs with one task instance and a per-sample wall-clock limit.

    Args:
        task_name, task_params: the task, built here with ``make_task(task_name, **task_params)``.
        timeout_s: per-sample limit; a sample that exceeds it gets ``timeout``.
    """

    def __init__(self, task_name: str, task_params: Optional[Dict[str, Any]] = None, timeout_s: float = 10.0):
        if not timeout_s > 0:
            raise ValueError(f"VerifierWorker: timeout_s must be > 0, got {timeout_s!r}")
        self.task_name = task_name
        self.task: Task = make_task(task_name, **(task_params or {}))
        self.timeout_s = float(timeout_s)
        self._counts = _zero_counts()
        self._abandoned: List[threading.Thread] = []
        self._rewarm = False

    def ready(self) -> bool:
        """Start the task's helpers (if it has a ``warmup`` hook); True when done."""
        hook = getattr(self.task, "warmup", None)
        if hook is not None:
            hook()
        return True

    def verify_one(self, prompt: Prompt, completion: str) -> Verdict:
        if self._rewarm:
            # After an interrupt the task may have to restart helpers (e.g. the math-verify child, ~1 s);
            # do it here, outside the next sample's time limit.
            self._rewarm = False
            try:
                self.ready()
            except Exception:  # noqa: BLE001 - the sample itself will report what is wrong
                pass
        box: Dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["v"] = self.task.verify(prompt, completion)
            except BaseException as e:  # noqa: BLE001 - SystemExit from a task must not end the worker
                box["e"] = e
                box["tb"] = traceback.format_exc(limit=3)
            finally:
                done.set()

        t = threading.Thread(target=run, name=f"verify-{prompt.id}", daemon=True)
        t.start()
        if not done.wait(self.timeout_s):
            hook = getattr(self.task, "interrupt", None)
            if hook is not None:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - best effort; the timeout stands either way
                    pass
            self._abandoned.append(t)
            self._rewarm = True
            v = Verdict(0.0, Status.TIMEOUT.value, f"verifier exceeded {self.timeout_s:g}s for prompt {prompt.id!r}")
        elif "e" in box:
            e = box["e"]
            v = Verdict(0.0, Status.ERROR.value, f"verifier raised {type(e).__name__}: {str(e)[:300]}")
        else:
            v = _validate(box.get("v"))
        self._counts[v.status] += 1
        return v

    def verify_batch(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> List[Verdict]:
        if len(prompts) != len(completions):
            raise ValueError(f"verify_batch: {len(prompts)} prompts but {len(completions)} completions")
        return [self.verify_one(p, c) for p, c in zip(prompts, completions)]

    def verify_chunk(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Tuple[List[Verdict], int]:
        """``verify_batch`` plus the number of abandoned verifier threads still alive (the pool recycles an
        actor that has any)."""
        out = self.verify_batch(prompts, completions)
        return out, self.stuck_threads(grace_s=1.0)

    def stuck_threads(self, grace_s: float = 0.0) -> int:
        """Abandoned (timed-out) verifier threads still running, after waiting up to ``grace_s`` for them to
        end (an interrupted check usually returns within milliseconds)."""
        deadline = time.monotonic() + grace_s
        for t in self._abandoned:
            t.join(max(0.0, deadline - time.monotonic()))
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return len(self._abandoned)

    def counts(self) -> Dict[str, int]:
        return dict(self._counts)

    def close(self) -> None:
        hook = getattr(self.task, "close", None)
        if hook is not None:
            hook()


def _chunks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


class VerifierPool:
    """M verifier actors; ``verify`` splits a batch into chunks, runs them in parallel and gathers verdicts.

    Args:
        task_name, task_params: each actor builds its own task from these.
        num_workers: M actors.
        timeout_s: per-sample limit inside the actors.
        num_cpus_per_worker: Ray CPUs reserved per actor.
        chunks_per_worker: chunks per actor per batch (>1 balances uneven verification times).
        grace_s: slack added to each chunk's deadline (``timeout_s × len(chunk) + grace_s``).
        startup_timeout_s: limit for a (re)started actor to build its task and warm up.
        actor_options: extra ``ray.remote`` options (e.g. ``runtime_env``, ``resources``).

    ``verify(prompts, completions)`` takes one completion per entry (the driver flattens groups) and returns
    one ``Verdict`` per entry, in order. It never raises for verifier failures.
    """

    def __init__(
        self,
        task_name: str,
        task_params: Optional[Dict[str, Any]] = None,
        *,
        num_workers: int,
        timeout_s: float,
        num_cpus_per_worker: float = 0.25,
        chunks_per_worker: int = 2,
        grace_s: float = 10.0,
        startup_timeout_s: float = 120.0,
        actor_options: Optional[Dict[str, Any]] = None,
    ):
        import ray

        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"VerifierPool: num_workers must be a positive int, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"VerifierPool: timeout_s must be > 0, got {timeout_s!r}")
        if chunks_per_worker < 1:
            raise ValueError(f"VerifierPool: chunks_per_worker must be >= 1, got {chunks_per_worker!r}")
        # Fail in the driver, before any actor starts, on an unknown task or bad parameters.
        make_task(task_name, **(task_params or {}))
        self._ray = ray
        self.task_name = task_name
        self.task_params = dict(task_params or {})
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.chunks_per_worker = chunks_per_worker
        self.grace_s = float(grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        opts = {"num_cpus": num_cpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
        opts.update(actor_options or {})
        self._actor_cls = ray.remote(VerifierWorker).options(**opts)
        self._counts = _zero_counts()
        self._last = _zero_counts()
        self.restarts = 0
        self.restart_failures = 0
        self.restart_reasons: List[str] = []
        self._actors: List[Any] = [self._new_actor() for _ in range(num_workers)]
        ray.get([a.ready.remote() for a in self._actors], timeout=self.startup_timeout_s)

    @classmethod
    def from_config(cls, cfg: Any) -> "VerifierPool":
        """The pool a run's config asks for (``cfg.task`` and ``cfg.verifier``)."""
        v = cfg.verifier
        return cls(cfg.task.name, cfg.task.params, num_workers=v.num_workers, timeout_s=v.timeout_s,
                   num_cpus_per_worker=v.num_cpus_per_worker, chunks_per_worker=v.chunks_per_worker,
                   grace_s=v.grace_s, startup_timeout_s=v.startup_timeout_s)

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self.task_name, self.task_params, self.timeout_s)

    def _restart(self, i: int, reason: str) -> None:
        ray = self._ray
        old = self._actors[i]
        if old is not None:
            try:
                ray.kill(old, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.restarts += 1
        self.restart_reasons.append(reason)
        self._actors[i] = None
        try:
            a = self._new_actor()
            ray.get(a.ready.remote(), timeout=self.startup_timeout_s)
            self._actors[i] = a
        except Exception as e:  # noqa: BLE001 - retried at the next verify call; the driver's health check
            # (verifier.max_unverified_frac) stops the run if verdicts keep missing, and this reason is in its message
            self._actors[i] = None
            self.restart_failures += 1
            self.restart_reasons.append(f"restart of verifier actor {i} failed: {type(e).__name__}: {str(e)[:300]}")
            print(f"[passk_rl.verifier] {self.restart_reasons[-1]}", flush=True)

    def verify(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> List[Verdict]:
        ray = self._ray
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"VerifierPool.verify: {len(prompts)} prompts but {len(completions)} completions")
        n = len(prompts)
        out: List[Optional[Verdict]] = [None] * n
        for i, a in enumerate(self._actors):
            if a is None:
                self._restart(i, "actor missing after a failed restart")
        live = [i for i, a in enumerate(self._actors) if a is not None]
        if n and not live:
            out = [Verdict(0.0, Status.ERROR.value, "no verifier actor could be started") for _ in range(n)]
        elif n:
            size = max(1, math.ceil(n / (len(live) * self.chunks_per_worker)))
            todo = _chunks(n, size)[::-1]
            idle = list(live)
            running: Dict[Any, Tuple[int, Tuple[int, int], float]] = {}
            while todo or running:
                while todo and idle:
                    i = idle.pop(0)
                    lo, hi = todo.pop()
                    ref = self._actors[i].verify_chunk.remote(prompts[lo:hi], completions[lo:hi])
                    running[ref] = (i, (lo, hi), time.monotonic() + self.timeout_s * (hi - lo) + self.grace_s)
                soonest = min(d for _, _, d in running.values())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, soonest - time.monotonic()))
                if ready:  # collect everything that is done, so no finished chunk is taken for a hung one
                    ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                for ref in ready:
                    i, (lo, hi), _ = running.pop(ref)
                    try:
                        verdicts, stuck = ray.get(ref)
                    except ray.exceptions.RayActorError as e:  # the actor process died mid-chunk
                        msg = f"verifier actor died ({type(e).__name__}); restarted"
                        for k in range(lo, hi):
                            out[k] = Verdict(0.0, Status.ERROR.value, msg)
                        self._restart(i, msg)
                    except Exception as e:  # noqa: BLE001 - the worker method itself failed; the actor lives
                        msg = f"verifier actor call failed: {type(e).__name__}: {str(e)[:300]}"
                        for k in range(lo, hi):
                            out[k] = Verdict(0.0, Status.ERROR.value, msg)
                    else:
                        for k, v in zip(range(lo, hi), verdicts):
                            out[k] = v
                        if stuck:
                            self._restart(i, f"{stuck} verifier thread(s) still running after a timeout")
                    if self._actors[i] is not None:
                        idle.append(i)
                now = time.monotonic()
                for ref, (i, (lo, hi), deadline) in list(running.items()):
                    if now >= deadline:
                        running.pop(ref)
                        msg = f"verifier actor did not answer within {self.timeout_s * (hi - lo) + self.grace_s:g}s; killed and restarted"
                        for k in range(lo, hi):
                            out[k] = Verdict(0.0, Status.TIMEOUT.value, msg)
                        self._restart(i, msg)
                        if self._actors[i] is not None:
                            idle.append(i)
                if not idle and not running and todo:
                    for lo, hi in todo:
                        for k in range(lo, hi):
                            out[k] = Verdict(0.0, Status.ERROR.value, "no verifier actor could be started")
                    todo = []
        verdicts = [v if v is not None else Verdict(0.0, Status.ERROR.value, "lost verdict") for v in out]
        self._last = _zero_counts()
        for v in verdicts:
            self._last[v.status] += 1
            self._counts[v.status] += 1
        return verdicts

    def counts(self) -> Dict[str, int]:
        """Verdicts per status since the pool started."""
        return dict(self._counts)

    def last_counts(self) -> Dict[str, int]:
        """Verdicts per status of the latest ``verify`` call (per-step metrics)."""
        return dict(self._last)

    def stats(self) -> Dict[str, Any]:
        return {"counts": self.counts(), "last_counts": self.last_counts(), "actor_restarts": self.restarts,
                "restart_failures": self.restart_failures, "recent_reasons": self.restart_reasons[-3:],
                "num_workers": self.num_workers, "live_workers": sum(a is not None for a in self._actors)}

    def shutdown(self) -> None:
        ray = self._ray
        for i, a in enumerate(self._actors):
            if a is None:
                continue
            try:
                ray.get(a.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            self._actors[i] = None
