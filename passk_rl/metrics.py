"""Run metrics: per-phase timers, batch pass@k, the metrics.jsonl writer and Ray dashboard gauges."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np

from passk_rl.estimators import pass_at_k

PHASES = ("generate", "verify", "stats", "shape", "update", "sync", "log")


class PhaseTimer:
    """Wall-clock seconds per named phase of one step."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return sum(self.seconds.values())


def batch_pass_at_k(rewards: np.ndarray, ks: Iterable[int], *, threshold: float = 1.0) -> Dict[str, float]:
    """Mean over prompts of the unbiased pass@k of one step's (G, n) rewards (a sample passes at ≥ threshold)."""
    r = np.asarray(rewards, dtype=np.float64)
    n = r.shape[1]
    c = (r >= threshold).sum(axis=1)
    return {f"pass@{k}": float(np.mean(pass_at_k(n, c, k))) for k in ks if k <= n}


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class DashboardMetrics:
    """Gauges on the Ray dashboard (Prometheus) for the numbers a user watches while a run moves.

    Lives in a small actor (``create_dashboard_actor``) so the gauges are exported from a worker process that
    stays up for the whole run.
    """

    GAUGES = {
        "p_hat_global": "global p_hat (central estimator)",
        "k": "K used for shaping",
        "reward_mean": "mean reward of the step's samples",
        "samples_per_s": "samples per second (whole step)",
        "gen_tokens_per_s": "generated tokens per second (generate phase)",
        "verifier_failures": "verifier timeouts + errors this step",
    }

    def __init__(self, run_name: str, pass_ks: List[int]):
        from ray.util.metrics import Gauge

        tags = ("run",)
        self.run = run_name
        self.gauges = {k: Gauge(f"passk_rl_{k}", description=d, tag_keys=tags) for k, d in self.GAUGES.items()}
        self.phase = Gauge("passk_rl_phase_seconds", description="seconds per phase", tag_keys=("run", "phase"))
        self.passk = Gauge("passk_rl_batch_pass_at_k", description="batch pass@k (unbiased)", tag_keys=("run", "k"))
        self.eval_passk = Gauge("passk_rl_eval_pass_at_k", description="held-out pass@k (unbiased)",
                                tag_keys=("run", "k"))
        self.pass_ks = pass_ks

    def report_eval(self, result: Dict[str, Any]) -> None:
        for k, v in result.get("pass_at_k", {}).items():
            self.eval_passk.set(float(v["mean"]), tags={"run": self.run, "k": str(k)})

    def report(self, record: Dict[str, Any]) -> None:
        for key, g in self.gauges.items():
            if record.get(key) is not None:
                g.set(float(record[key]), tags={"run": self.run})
        for phase, sec in record.get("phase_seconds", {}).items():
            self.phase.set(float(sec), tags={"run": self.run, "phase": phase})
        for k in self.pass_ks:
            v = record.get(f"pass@{k}")
            if v is not None:
                self.passk.set(float(v), tags={"run": self.run, "k": str(k)})


def create_dashboard_actor(run_name: str, pass_ks: List[int]):
    import ray

    return ray.remote(num_cpus=0)(DashboardMetrics).remote(run_name, pass_ks)
