"""Run metrics: per-phase timers, batch pass@k, the run's trackers (metrics.jsonl, TensorBoard, optional wandb)
and Ray dashboard gauges."""

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


TRACKERS = ("jsonl", "tensorboard", "wandb")


def flatten_scalars(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a (nested) step record as ``a/b`` tags; booleans count as 0/1, None and text are left out."""
    out: Dict[str, float] = {}
    for key, v in record.items():
        tag = f"{prefix}{key}"
        if isinstance(v, dict):
            out.update(flatten_scalars(v, tag + "/"))
        elif isinstance(v, (bool, np.bool_)):
            out[tag] = float(v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(float(v)):
            out[tag] = float(v)
    return out


class Trackers:
    """Where a run's records go: ``metrics.jsonl`` always, TensorBoard event files in the run directory, wandb in
    offline mode (its files under the run directory; ``wandb sync`` uploads them later) when asked.

    Step records become scalars (nested keys as ``learner/grad_norm``, ``phase_seconds/generate``; p̂ and K as
    their own series), the per-prompt p̂ of each step a histogram, held-out evaluations ``eval/pass@k`` scalars plus
    the pass@k curve at that step, and figures images.
    """

    def __init__(self, run_dir: Path, names: Iterable[str], *, run_name: str, config: Dict[str, Any],
                 resume: bool = False):
        names = list(dict.fromkeys(names))
        bad = [n for n in names if n not in TRACKERS]
        if bad:
            raise ValueError(f"unknown tracker {bad[0]!r}; known: {list(TRACKERS)}")
        self.run_dir = Path(run_dir)
        self.jsonl = JsonlWriter(self.run_dir / "metrics.jsonl") if "jsonl" in names else None
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if "wandb" in names:
            import os

            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no network at run time; `wandb sync` later
            self.wandb = wandb.init(project="passk-rl", name=run_name, dir=str(self.run_dir), config=config,
                                    resume="allow" if resume else None, reinit=True)

    def resumed(self, step: int) -> None:
        """A run resumed from ``step``: TensorBoard drops the events the interrupted run wrote after it (its
        ``purge_step``), as ``metrics.jsonl`` is cut back to it."""
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=int(step) + 1)

    def log_step(self, record: Dict[str, Any], *, p_hat: Optional[Iterable[float]] = None) -> None:
        step = int(record["step"])
        if self.jsonl is not None:
            self.jsonl.write(record)
        scalars = flatten_scalars({k: v for k, v in record.items() if k != "step"})
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, step)
            if p_hat is not None:
                self.tb.add_histogram("p_hat/per_prompt", np.asarray(list(p_hat), dtype=np.float64), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_eval(self, result: Dict[str, Any], *, step: int) -> None:
        curve = {int(k): float(v["mean"]) for k, v in result.get("pass_at_k", {}).items()}
        if self.tb is not None:
            for k, v in sorted(curve.items()):
                self.tb.add_scalar(f"eval/pass@{k}", v, step)
            # the curve itself at this step: x = k, one point per k (TensorBoard shows it under "Custom" as text)
            self.tb.add_text("eval/pass_at_k_curve",
                             " | ".join(f"pass@{k} = {v:.4f}" for k, v in sorted(curve.items())), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"eval/pass@{k}": v for k, v in curve.items()}, step=step)

    def log_image(self, tag: str, path: Path, *, step: int) -> None:
        if self.tb is not None:
            import matplotlib.image as mpimg

            img = mpimg.imread(str(path))
            self.tb.add_image(tag, img[..., :3], step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


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
        "engine_restarts": "generator engines restarted so far",
        "truncation_rate": "share of samples cut at max_tokens",
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
