"""The driver: one training step is the named phases generate → verify → stats/K → shape → update → sync → log.

The driver holds no model; it moves prompts, token ids, rewards and advantages between the actors:
``GeneratorPool`` (vLLM engines), ``VerifierPool`` (task verifiers in their own processes), the named
``PHatService`` actor (p̂ statistics and K), and ``LearnerGroup`` (DeepSpeed ZeRO ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from passk_rl import evaluation, shaping
from passk_rl.config import Config, dump_yaml, to_dict
from passk_rl.metrics import PhaseTimer, Trackers, batch_pass_at_k
from passk_rl.models.resolve import resolve_model
from passk_rl.rollout import RolloutStage
from passk_rl.tasks import STATUSES, Prompt, make_task


def init_ray(cfg: Config, worker_log: Optional[Path] = None) -> bool:
    """Join the Ray job's cluster when run through ``ray job submit``; else ``cluster.address``. ``worker_log``:
    where every actor's output goes (quiet runs) instead of the console.

    Returns True when this call started a cluster (so shutdown stops only what we started).
    """
    from cluster.ray_init import start_ray

    return start_ray(address=cfg.cluster.address, num_cpus=cfg.cluster.num_cpus or max(4, os.cpu_count() or 1),
                     worker_log=worker_log)


def _json_state(state: Any) -> Any:
    return [_json_state(x) for x in state] if isinstance(state, tuple) else state


def _tuple_state(state: Any) -> Any:
    return tuple(_tuple_state(x) for x in state) if isinstance(state, list) else state


class TrainingAborted(RuntimeError):
    """The run stopped itself because its numbers went wrong (the message says which and where)."""


class Preempted(RuntimeError):
    """A stop was asked for (SIGTERM, ``ray job stop``): a checkpoint was written at the step boundary."""


class RunDirError(ValueError):
    """The run directory holds another run and the config neither resumes nor overwrites it."""


def checkpoint_root(cfg: Config, run_dir: Path) -> Path:
    """``run.checkpoint_dir/<name>`` when set (e.g. storage every node reaches), else ``<run dir>/checkpoints``."""
    if cfg.run.checkpoint_dir:
        return Path(cfg.run.checkpoint_dir).expanduser().resolve() / cfg.run.name
    return run_dir / "checkpoints"


def prepare_run_dir(cfg: Config) -> Path:
    """``<output_dir>/<name>``, absolute; an existing run there is continued (resume), deleted (overwrite) or
    refused: metrics and checkpoints of two runs are never mixed. Raises before any actor starts."""
    out = Path(cfg.run.output_dir).expanduser()
    if not out.is_absolute() and os.environ.get("RAY_JOB_ID"):
        # inside `ray job submit --working-dir` the cwd is Ray's temporary copy of the working dir, deleted later
        raise RunDirError(f"run.output_dir={cfg.run.output_dir!r} is relative inside a Ray job, where it would land "
                          f"in Ray's temporary copy of the working directory; give an absolute path")
    run_dir = (out / cfg.run.name).resolve()
    ckpts = checkpoint_root(cfg, run_dir)
    holds_run = (run_dir.is_dir() and any((run_dir / f).exists() for f in
                                          ("metrics.jsonl", "checkpoints", "summary.json", "final_model"))
                 or ckpts.is_dir() and any(ckpts.iterdir()))
    if holds_run and not cfg.run.resume:
        if not cfg.run.overwrite:
            raise RunDirError(f"{run_dir} already holds a run; set run.resume=true to continue it, "
                              f"run.overwrite=true to delete it and start over, or another run.name")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(ckpts, ignore_errors=True)
    return run_dir


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name
        self.ckpt_root = checkpoint_root(cfg, self.run_dir)
        self.stop_signal: Optional[str] = None
        self.started_ray = False
        self.gen = self.verifier = self.learner = self.phat = self.dash = None
        self.placement = None
        self.transport = self.weight_sync = None
        self.status_totals = {s: 0 for s in STATUSES}
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self._health: List[Dict[str, int]] = []  # per-step verdict counts of the verifier health window
        self._probed = False  # the first sync of this process is always probed
        self.last_step = 0  # the last step finished (trained, synced, logged)
        self._first_step, self._t_loop = 1, time.perf_counter()  # where this process's loop began: the ETA

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir = prepare_run_dir(cfg)
        self.ckpt_root = checkpoint_root(cfg, self.run_dir)
        self.log(f"run {cfg.run.name}: writing to {self.run_dir}"
                 + (f" (checkpoints: {self.ckpt_root})" if self.ckpt_root.parent != self.run_dir else ""))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists() and not cfg.run.resume:
            metrics.unlink()
        self.trackers = Trackers(self.run_dir, cfg.logging.trackers, run_name=cfg.run.name, config=to_dict(cfg),
                                 resume=cfg.run.resume)

        # Everything that can fail on bad input happens before any actor starts.
        self.task = make_task(cfg.task.name, **cfg.task.params)
        self.train_prompts = self.task.prompts(cfg.task.train_split)
        if cfg.data.max_prompts:
            self.train_prompts = self.train_prompts[: cfg.data.max_prompts]
        self.eval_prompts = self.task.prompts(cfg.task.eval_split)[: cfg.eval.num_prompts]
        if not self.train_prompts:
            raise ValueError(f"task {cfg.task.name!r} has no prompts in split {cfg.task.train_split!r}")
        self.model_path = resolve_model(cfg.model.path, key="model.path", hub=True).path
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.rng = random.Random(cfg.run.seed)
        self.order: List[int] = []

        import ray

        from actors.generator import EngineStartError, GeneratorPool
        from actors.learner import LearnerGroup
        from actors.phat import create_phat_actor
        from actors.verifier import VerifierPool
        from cluster.devices import device_spec
        from cluster.placement import reserve
        from cluster.transports import WeightSync, transport_from_config
        from passk_rl.metrics import create_dashboard_actor

        worker_log = None if cfg.logging.verbose else self.run_dir / "worker.log"
        if worker_log is not None:
            from cluster.worker_logs import quiet_driver

            quiet_driver(worker_log)
            self.log(f"library and actor output: {worker_log} (logging.verbose=true shows it here)")
        self.started_ray = init_ray(cfg, worker_log)
        if worker_log is not None:
            quiet_driver(worker_log)  # ray.init gives Ray's logger its console handler again
        # After ray.init: Ray's core worker installs its own fatal-signal handler for SIGTERM, which would kill
        # the driver mid-step. `ray job stop` and schedulers' preemption send SIGTERM: finish the step, checkpoint,
        # exit (the job needs a grace period longer than a step: RAY_JOB_STOP_WAIT_TIME_S, see scripts/run.sh).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self.request_stop("SIGTERM"))
        spec = device_spec(cfg.cluster.device)
        t0 = time.perf_counter()
        self.placement = reserve(spec, num_engines=cfg.generator.num_engines, tp=cfg.generator.tensor_parallel_size,
                                 cpus_per_engine=cfg.generator.num_cpus_per_engine,
                                 world_size=cfg.learner.world_size, cpus_per_rank=cfg.learner.num_cpus_per_rank,
                                 strategy=cfg.cluster.placement_strategy,
                                 generator_resources=cfg.cluster.generator_resources,
                                 learner_resources=cfg.cluster.learner_resources)
        self.phat = create_phat_actor(cfg.run.name, estimator=cfg.estimator.kind,
                                      estimator_params=cfg.estimator.params, schedule=cfg.schedule.kind,
                                      schedule_params=cfg.schedule.params, n=cfg.generator.n,
                                      shaping=cfg.algorithm.shaping)
        if cfg.logging.ray_metrics:
            self.dash = create_dashboard_actor(cfg.run.name, cfg.logging.pass_at_ks)
        self.transport = transport_from_config(cfg)
        self.verifier = VerifierPool.from_config(cfg)
        # Engines and learner ranks start side by side: each start takes tens of seconds here, minutes for a 7B
        # model on accelerators, and they need nothing from each other until the first weight sync.
        self.gen = GeneratorPool.from_config(cfg, self.model_path, transport=self.transport,
                                             placement_group=self.placement.generator_pg, wait=False)
        self.learner = LearnerGroup.from_config(cfg, self.model_path, placement_group=self.placement.learner_pg,
                                                wait=False)
        try:
            self.gen.wait_ready()
        except EngineStartError as e:  # once, with the engine's reason: a restart would fail the same way
            raise TrainingAborted(f"{e}; model.path={cfg.model.path}") from None
        self.learner.wait_ready()
        self.weight_sync = WeightSync(self.learner, self.gen, self.transport,
                                      workers_per_engine=cfg.generator.tensor_parallel_size)
        g, L = cfg.generator, cfg.learner
        # where every part runs (several nodes: engines and ranks may sit on different ones)
        (self.run_dir / "placement.json").write_text(json.dumps({
            "generators": [i.get("node_id") for i in self.gen.engine_info], "learner": self.learner.node_ids(),
            "driver": ray.get_runtime_context().get_node_id()}, indent=1))
        self.rollout = RolloutStage(gen=self.gen, verifier=self.verifier, task=self.task, tokenizer=self.tokenizer,
                                    draw=self.next_prompts, order_state=lambda: (list(self.order), self.rng.getstate()),
                                    n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                                    seed=cfg.run.seed, max_staleness=cfg.algorithm.max_staleness)
        self.log(f"actors up in {time.perf_counter() - t0:.1f}s: {g.num_engines} generator engine(s), "
                 f"{cfg.verifier.num_workers} verifier(s), {L.world_size} learner rank(s), p̂ actor "
                 f"{cfg.estimator.kind}/{cfg.schedule.kind}")

    # ------------------------------------------------------------------------------------------- loop
    def next_prompts(self) -> List[Prompt]:
        out = []
        while len(out) < self.cfg.data.prompts_per_step:
            if not self.order:
                self.order = list(range(len(self.train_prompts)))
                if self.cfg.data.shuffle:
                    self.rng.shuffle(self.order)
            out.append(self.train_prompts[self.order.pop()])
        return out

    def train(self) -> Dict[str, Any]:
        cfg = self.cfg
        summary: Dict[str, Any] = {"run": cfg.run.name}
        first = 1
        if cfg.run.resume:
            first = self.resume() + 1
            self.last_step = first - 1
        if cfg.eval.enabled:
            base = self.run_dir / "eval" / "step_000000.json"
            summary["base_eval"] = json.loads(base.read_text()) if first > 1 and base.is_file() else self.evaluate(step=0)
        t_start = self._t_loop = time.perf_counter()
        self._first_step = first
        for step in range(first, cfg.run.steps + 1):
            with self.faults(step):
                self._start_state = (*self.rollout.untrained_order_state(), dict(self.status_totals),
                                     self.skipped_total)
                self._updated = False
                self.step(step)
                self.last_step = step
                if cfg.eval.enabled and cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.steps:
                    self.evaluate(step=step)
                if cfg.run.checkpoint_interval and step % cfg.run.checkpoint_interval == 0:
                    self.save_checkpoint(step)
            if self.stop_signal is not None and step < cfg.run.steps:
                with self.faults(step):
                    ck = self.save_checkpoint(step)
                raise Preempted(f"{self.stop_signal} received: stopped after step {step} with a checkpoint at {ck}; "
                                f"continue with run.resume=true")
        summary["train_seconds"] = time.perf_counter() - t_start
        with self.faults(cfg.run.steps):
            if cfg.run.steps > 0:
                self.save_checkpoint(cfg.run.steps, final=True)
            if cfg.eval.enabled:
                summary["final_eval"] = self.evaluate(step=cfg.run.steps)
                summary["change"] = evaluation.change(summary["base_eval"], summary["final_eval"], seed=cfg.run.seed)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            from passk_rl.plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(self.run_dir)]
            for p in summary["plots"]:
                self.trackers.log_image(f"figures/{Path(p).stem}", Path(p), step=cfg.run.steps)
        except Exception as e:  # the run itself is done and saved; a plotting problem must not lose it
            self.log(f"plotting failed ({type(e).__name__}: {e}); metrics and summary are saved")
        self.print_summary(summary)
        return summary

    @contextlib.contextmanager
    def faults(self, step: int) -> Iterator[None]:
        """What happens when a part dies during ``step`` (its phases, its evaluation or its checkpoint).

        A generator engine the pool could not bring back (``EngineLost``): a checkpoint of the last consistent
        state is written (the previous step when the engines died while sampling — nothing of this step was used
        yet; this step once its update was applied) and the run stops, to be continued with ``run.resume=true``.
        A learner rank or the p̂ actor dying loses state that only a checkpoint has: the run stops naming the
        newest complete checkpoint, which stays untouched."""
        import ray

        from actors.generator import EngineLost
        from passk_rl import checkpoint

        try:
            yield
        except EngineLost as e:
            if self._updated:
                ck = self.save_checkpoint(step)
            else:
                ck = self.save_checkpoint(step - 1, state=self._start_state)
            raise TrainingAborted(f"step {step}: {e}. Checkpoint of step {checkpoint.step_of(ck)} written to {ck}; "
                                  f"continue with run.resume=true once the engines can start") from e
        except ray.exceptions.RayActorError as e:
            newest, _ = checkpoint.usable(self.ckpt_root, log=lambda m: None)
            where = f"the newest complete checkpoint is {newest}" if newest else "there is no checkpoint yet"
            raise TrainingAborted(f"step {step}: an actor died ({str(e).splitlines()[0][:300]}); {where}, untouched; "
                                  f"continue with run.resume=true") from e

    def step(self, step: int) -> Dict[str, Any]:
        cfg, g = self.cfg, self.cfg.generator
        timer = PhaseTimer()
        import ray

        with timer.phase("generate"):  # and verify: the rollout stage samples and verifies (passk_rl/rollout.py)
            ro = self.rollout.get(step)
            prompts, samples, verdicts, rewards, truncated = ro.prompts, ro.samples, ro.verdicts, ro.rewards, ro.truncated
        # What the driver waited for: all of both when the batch was made now, the rest of it when prefetched.
        waited = timer.seconds["generate"]
        timer.seconds["verify"] = min(ro.verify_seconds, waited)
        timer.seconds["generate"] = waited - timer.seconds["verify"]
        status_counts = ro.status_counts
        for s, c in status_counts.items():
            self.status_totals[s] += c
        self.check_verifier_health(step, status_counts)
        with timer.phase("stats"):
            # A sample whose verifier timed out or crashed has no verdict (nor, when asked, a truncated answer): it is
            # no evidence about the policy, so p̂ leaves it out, and its group is shaped on the other samples alone
            # (it neither enters the baseline nor gets an advantage).
            verified = np.array([v.status not in ("timeout", "error") for v in verdicts]).reshape(rewards.shape)
            keep = verified & ~truncated if g.mask_truncated else verified
            decision = ray.get(self.phat.observe.remote([p.id for p in prompts], rewards, step=step, verified=keep))
        with timer.phase("shape"):
            k_arg, params, p_hat = self.shaping_args(decision)
            advantages = shaping.shape_masked(cfg.algorithm.shaping, rewards, keep, k=k_arg, p_hat=p_hat, **params)
            bad_advantages = self.check_advantages(step, prompts, rewards, advantages, k_arg, params)
        if step < cfg.run.steps:
            self.rollout.prefetch(step + 1)  # max_staleness 1: the next batch is sampled while the learner trains
        with timer.phase("update"):
            batch = ro.learner_batch(advantages)  # columns (passk_rl/batch.py); batch[0] is one sample's dict
            if bad_advantages:
                train_metrics: Dict[str, Any] = {"skipped": "advantages"}
                update_skipped = True
            else:
                train_metrics = self.learner.train_step(batch, step=step)
                update_skipped = self.check_update(step, prompts, advantages, train_metrics)
            self._updated = True
        with timer.phase("sync"):
            self.rollout.wait_idle()  # an engine never swaps weights in the middle of a batch
            self.weight_sync.sync(step)
            self.rollout.synced(step)
            probe = self.sync_probe(step, batch[0]) if self.probe_due(step) else None
        with timer.phase("log"):
            gen_tokens = sum(len(s.token_ids) for group in samples for s in group)
            # identifies exactly what was sampled: an exact resume reproduces it step for step
            digest = hashlib.sha256(np.array([t for group in samples for s in group for t in (*s.token_ids, -1)],
                                             dtype=np.int64).tobytes()).hexdigest()[:16]
            record: Dict[str, Any] = {
                "step": step,
                "staleness": (step - 1) - ro.weights_version,
                "rollout_generate_s": ro.generate_seconds,
                "rollout_verify_s": ro.verify_seconds,
                "k": decision.k,
                "k_requested": decision.k_requested if decision.k is not None else None,
                "k_weights": decision.k_weights,
                "k_mean": float(np.mean(decision.k_rows)) if getattr(decision, "k_rows", None) else None,
                "p_hat_global": decision.p_global,
                "p_hat_samples": decision.total_samples,
                "verified_samples": int(verified.sum()),
                "truncation_rate": float(truncated.mean()),
                "reward_mean": float(rewards.mean()),
                **batch_pass_at_k(rewards, cfg.logging.pass_at_ks),
                "verifier_status": status_counts,
                "verifier_failures": status_counts["timeout"] + status_counts["error"],
                "verifier_status_total": dict(self.status_totals),
                "advantage_abs_mean": float(np.abs(advantages).mean()),
                "advantage_abs_max": float(np.abs(advantages).max()),
                "update_skipped": update_skipped,
                "updates_skipped_total": self.skipped_total,
                "gen_tokens": gen_tokens,
                "samples_digest": digest,
                "gen_tokens_per_s": gen_tokens / max(ro.generate_seconds, 1e-9),
                "sync_probe_max_abs_diff": probe,
                "engine_restarts": self.gen.restarts,
                "learner": train_metrics,
            }
        record["phase_seconds"] = dict(timer.seconds)
        record["step_seconds"] = timer.total()
        record["samples_per_s"] = len(batch) / max(timer.total(), 1e-9)
        self.trackers.log_step(record, p_hat=decision.p_hat)
        if self.dash is not None:
            self.dash.report.remote(record)
        if cfg.logging.console_every and step % cfg.logging.console_every == 0:
            ks = " ".join(f"pass@{k}={record[f'pass@{k}']:.3f}" for k in cfg.logging.pass_at_ks if f"pass@{k}" in record)
            k_text = "—" if decision.k is None else (
                "{" + ",".join(f"{k}:{w:g}" for k, w in decision.k_weights.items()) + "}" if decision.k_weights
                else str(decision.k))
            self.log(f"step {step}/{cfg.run.steps}  K={k_text}  p̂={decision.p_global:.3f}  "
                     f"reward={record['reward_mean']:.3f}  {ks}  fail={record['verifier_failures']}  "
                     f"{record['step_seconds']:.1f}s ({record['samples_per_s']:.1f} samples/s)  "
                     f"ETA {self.eta(step)}")
        return record

    def eta(self, step: int) -> str:
        """Time left for the remaining steps at this process's mean wall time per step so far (evaluations and
        checkpoints included), as H:MM:SS."""
        done = step - self._first_step + 1
        per_step = (time.perf_counter() - self._t_loop) / max(done, 1)
        left = int(round(per_step * max(self.cfg.run.steps - step, 0)))
        return f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"

    def shaping_args(self, decision: Any):
        """(k, params, p_hat) for ``shaping.shape`` from the p̂ actor's decision (which already holds a K the shaping
        accepts): the Ks come from the weights for multi-K shapings, and p̂ from the central actor only for plug-in
        shapings with ``p_hat_source: estimator``."""
        a = self.cfg.algorithm
        params = dict(a.shaping_params)
        info = shaping.info(a.shaping)
        k = decision.k if decision.k is not None else 1
        if getattr(decision, "k_rows", None):  # a per-prompt K schedule: one K per group
            k = np.asarray(decision.k_rows, dtype=np.int64)
        if info.uses_k_weights:
            params["weights"] = decision.k_weights
            k = 1
        p_hat = None
        if a.p_hat_source == "estimator" and info.uses_p_hat:
            p_hat = torch.tensor(decision.p_hat, dtype=torch.float64)
        return k, params, p_hat

    def bad_step(self, step: int, what: str, *, skipped: bool) -> None:
        """Count a step whose numbers went wrong (logged with the prompts by the caller); ``guard.max_bad_steps``
        of them in a row stop the run with that message."""
        self.skipped_in_a_row += 1
        self.skipped_total += int(skipped)
        self.log(f"step {step}: {what} ({self.skipped_in_a_row} bad step(s) in a row)")
        if self.skipped_in_a_row >= self.cfg.guard.max_bad_steps:
            raise TrainingAborted(f"step {step}: {self.skipped_in_a_row} bad steps in a row "
                                  f"(guard.max_bad_steps={self.cfg.guard.max_bad_steps}); the last: {what}")

    def check_advantages(self, step: int, prompts: List[Prompt], rewards: np.ndarray, advantages: np.ndarray,
                         k: int, params: Dict[str, Any]) -> bool:
        """True (the update is skipped) when an advantage is non-finite or beyond ``guard.max_advantage_ratio`` ×
        the largest the shaping's group form can give at this n: training on it would let a few samples set the
        direction of the whole step (gradient clipping only rescales it)."""
        bad = shaping.scale_violations(self.cfg.algorithm.shaping, rewards, advantages, k=k,
                                       ratio=self.cfg.guard.max_advantage_ratio, **params)
        if not bad.size:
            return False
        bound = shaping.advantage_bound(self.cfg.algorithm.shaping, rewards.shape[1], k=k, **params) \
            if np.all((rewards == 0) | (rewards == 1)) else float("nan")
        worst = [f"{prompts[i].id} (max |A| {np.abs(advantages[i]).max():.4g}, {int(rewards[i].sum())}/"
                 f"{rewards.shape[1]} correct)" for i in bad[:5]]
        self.bad_step(step, f"advantages of {bad.size} prompt(s) are non-finite or exceed "
                            f"guard.max_advantage_ratio={self.cfg.guard.max_advantage_ratio} × the largest the group "
                            f"form of {self.cfg.algorithm.shaping!r} gives at n={rewards.shape[1]} ({bound:.4g}): "
                            f"{', '.join(worst)}; the update was skipped. Check algorithm.p_hat_source / "
                            f"algorithm.shaping_params", skipped=True)
        return True

    def check_verifier_health(self, step: int, counts: Dict[str, int]) -> None:
        """Stop when more than ``verifier.max_unverified_frac`` of the last ``verifier.health_window`` steps' samples
        got no verdict: a dead or broken verifier pool would otherwise make every advantage 0 and the run would
        "train" on nothing."""
        v = self.cfg.verifier
        self._health.append(dict(counts))
        del self._health[:-v.health_window]
        total = sum(sum(c.values()) for c in self._health)
        bad = {s: sum(c.get(s, 0) for c in self._health) for s in ("timeout", "error")}
        if total and len(self._health) == v.health_window and sum(bad.values()) / total > v.max_unverified_frac:
            reasons = "; ".join(self.verifier.restart_reasons[-3:]) or "none recorded"
            raise TrainingAborted(
                f"step {step}: {sum(bad.values())} of the last {total} samples ({v.health_window} steps) got no verdict "
                f"(timeout: {bad['timeout']}, error: {bad['error']}) > verifier.max_unverified_frac="
                f"{v.max_unverified_frac}; verifier restarts {self.verifier.restarts}, failed restarts "
                f"{self.verifier.restart_failures}; recent verifier failures: {reasons}")

    def check_update(self, step: int, prompts: List[Prompt], advantages: np.ndarray,
                     metrics: Dict[str, Any]) -> bool:
        """True when the learner skipped this update (non-finite loss or gradient: DeepSpeed drops the step). A
        gradient norm above ``guard.max_grad_norm`` (the step was applied, clipped to learner.grad_clip) is a bad
        step too; both are logged with the prompts of the largest |advantage|."""
        g = self.cfg.guard
        gn, loss = float(metrics.get("grad_norm", float("nan"))), float(metrics.get("loss", float("nan")))
        top = np.argsort(-np.abs(advantages).max(axis=1))[:5]
        culprits = ", ".join(f"{prompts[i].id} (max |A| {np.abs(advantages[i]).max():.4g})" for i in top)
        if not (np.isfinite(gn) and np.isfinite(loss)):
            self.bad_step(step, f"loss {loss} / gradient norm {gn} not finite, the update was skipped; largest "
                                f"advantages: {culprits}", skipped=True)
            return True
        if gn > g.max_grad_norm:
            self.bad_step(step, f"gradient norm {gn:.4g} > guard.max_grad_norm={g.max_grad_norm:g} (before "
                                f"clipping to {self.cfg.learner.grad_clip:g}); largest advantages: {culprits}",
                          skipped=False)
            return False
        self.skipped_in_a_row = 0
        return False

    def probe_due(self, step: int) -> bool:
        """The first sync of this process always probes (a wrong weight mapping shows at once), then every
        ``sync.probe_interval`` steps."""
        s = self.cfg.sync
        return s.probe and (not self._probed or step % s.probe_interval == 0)

    def sync_probe(self, step: int, sample: Dict[str, Any]) -> float:
        """Largest |generator − learner| logprob on one fixed completion, right after the sync, over every engine;
        above ``sync.probe_tolerance`` the run stops (with a checkpoint of this step: the learner is sound)."""
        self._probed = True
        per_engine = self.gen.score_every_engine([sample["prompt_token_ids"]], [sample["response_token_ids"]])
        learn_lp = np.asarray(self.learner.compute_logprobs([sample], temperature=1.0)[0])  # vLLM scores at T=1
        if not len(learn_lp):
            return 0.0
        diffs = [float(np.max(np.abs(np.asarray(lp[0]) - learn_lp))) for lp in per_engine]
        tol = self.cfg.sync.probe_tolerance or (1e-3 if self.cfg.model.dtype == "float32" else 5e-2)
        if max(diffs) > tol:
            ck = self.save_checkpoint(step)
            worst = max(range(len(diffs)), key=diffs.__getitem__)
            raise TrainingAborted(
                f"step {step}: after the weight sync, engine {worst}'s logprobs differ from the learner's by "
                f"{diffs[worst]:.3g} > sync.probe_tolerance={tol:g} (per engine: "
                f"{', '.join(f'{d:.3g}' for d in diffs)}): the engines are not sampling from the weights being "
                f"trained. Checkpoint of step {step} written to {ck}")
        return max(diffs)

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self, *, step: int) -> Dict[str, Any]:
        e = self.cfg.eval
        t0 = time.perf_counter()
        res = evaluation.score(self.gen, self.verifier, self.task, self.eval_prompts, tokenizer=self.tokenizer,
                               n=e.n, ks=e.ks, temperature=e.temperature, max_tokens=self.cfg.generator.max_tokens,
                               # The same sampling seeds at every evaluation (common random numbers): the
                               # difference between two evaluations then carries less sampling noise.
                               seed=self.cfg.run.seed + 7919)
        res["step"] = step
        res["seconds"] = time.perf_counter() - t0
        if self.dash is not None:
            self.dash.report_eval.remote(res)
        self.trackers.log_eval(res, step=step)
        out = self.run_dir / "eval"
        out.mkdir(exist_ok=True)
        (out / f"step_{step:06d}.json").write_text(json.dumps(res, indent=2))
        self.log(f"eval @ step {step} (held-out, {len(self.eval_prompts)} prompts × n={e.n}): " +
                 "  ".join(f"pass@{k}={res['pass_at_k'][str(k)]['mean']:.3f}" for k in e.ks))
        return res

    # ------------------------------------------------------------------------------------- checkpoint
    def request_stop(self, why: str) -> None:
        """Ask the loop to checkpoint and stop at the next step boundary (signal handlers call this)."""
        self.stop_signal = why
        self.log(f"{why} received: stopping after the current step with a checkpoint")

    def save_checkpoint(self, step: int, *, final: bool = False, state: Optional[tuple] = None) -> Path:
        """Learner (model + optimizer), p̂ actor and driver state (data order, RNG, counters), committed atomically
        (``passk_rl.checkpoint``): a crash mid-save never leaves a checkpoint that resume would load. ``state``
        (order, rng state, status totals, skipped total) replaces the driver's current one (the state a step
        started from, when it failed before using anything)."""
        import ray

        from passk_rl import checkpoint

        # prompts drawn for a batch not trained on yet (max_staleness 1) go back: a resume draws them again
        order, rng_state, totals, skipped = state or (*self.rollout.untrained_order_state(), self.status_totals,
                                                       self.skipped_total)
        root = self.ckpt_root
        tmp = root / "(not created)"
        try:
            tmp = checkpoint.staging_dir(root, step)
            self.learner.save_checkpoint(str(tmp / "learner"), step=step)
            torch.save(ray.get(self.phat.state_dict.remote()), tmp / "phat.pt")
            (tmp / "driver.json").write_text(json.dumps({
                "step": step, "order": order, "rng": _json_state(rng_state), "status_totals": totals,
                "skipped_total": skipped}))
            ck = checkpoint.commit(root, tmp, step, keep=self.cfg.run.keep_checkpoints)
        except ray.exceptions.RayActorError:
            raise  # a dead learner / p̂ actor: Trainer.faults says so
        except Exception as e:  # noqa: BLE001 - a full disk shows up as OSError here, as RuntimeError from torch.save
            shutil.rmtree(tmp, ignore_errors=True)  # the partial save would only take space; it is never loaded
            newest, _ = checkpoint.usable(root, log=lambda m: None)
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            try:
                free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free on {root}"
            except OSError:
                free = ""
            raise TrainingAborted(f"the checkpoint of step {step} could not be written ({type(cause).__name__}: "
                                  f"{str(cause).strip().splitlines()[-1][:300]}{free}); the newest complete "
                                  f"checkpoint, {newest or 'none'}, is intact") from e
        if final:
            self.learner.export_hf(str(self.run_dir / "final_model"))
        return ck

    def resume(self) -> int:
        """Restore the newest usable checkpoint of this run (learner + optimizer, p̂ actor, data order, RNG and
        counters; its weights published to the engines); returns its step, or 0 when there is none. A checkpoint
        that does not match its manifest is skipped for an older one. Metrics of later steps that the interrupted
        run wrote after that checkpoint are dropped so metrics.jsonl stays one record per step."""
        import ray

        from passk_rl import checkpoint

        root = self.ckpt_root
        ck, skipped = checkpoint.usable(root, log=self.log)
        if ck is None:
            if skipped:
                raise RuntimeError(f"run.resume: no usable checkpoint in {root}: " + "; ".join(skipped))
            self.log("run.resume: no checkpoint yet, starting from step 1")
            return 0
        step = checkpoint.step_of(ck)
        self.learner.load_checkpoint(str(ck / "learner"))
        ray.get(self.phat.load_state_dict.remote(torch.load(ck / "phat.pt", weights_only=False)))
        driver = json.loads((ck / "driver.json").read_text())
        self.order = list(driver["order"])
        self.rng.setstate(_tuple_state(driver["rng"]))
        self.status_totals.update(driver.get("status_totals", {}))
        self.skipped_total = int(driver.get("skipped_total", 0))
        self.weight_sync.sync(step)
        self.rollout.synced(step)
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))
        self.trackers.resumed(step)
        self.log(f"resumed from {ck} (step {step})")
        return step

    # ---------------------------------------------------------------------------------------- helpers
    def print_summary(self, summary: Dict[str, Any]) -> None:
        if "base_eval" not in summary or "final_eval" not in summary:
            return
        lines = ["", f"held-out pass@k, base → final ({len(self.eval_prompts)} prompts, n={self.cfg.eval.n}):"]
        for k in self.cfg.eval.ks:
            b = summary["base_eval"]["pass_at_k"][str(k)]
            f = summary["final_eval"]["pass_at_k"][str(k)]
            d = summary["change"][str(k)]
            lines.append(f"  pass@{k:<4} {b['mean']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}]  →  "
                         f"{f['mean']:.3f} [{f['lo']:.3f}, {f['hi']:.3f}]   change {d['mean']:+.3f} "
                         f"[{d['lo']:+.3f}, {d['hi']:+.3f}] (paired, same prompts and sampling seeds)")
        lines.append(f"run directory: {self.run_dir.resolve()}")
        for p in summary.get("plots", []):
            lines.append(f"plot: {p}")
        self.log("\n".join(lines))

    @staticmethod
    def log(msg: str) -> None:
        print(f"[passk_rl {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def shutdown(self) -> None:
        if getattr(self, "rollout", None) is not None:
            self.rollout.close()
        if getattr(self, "trackers", None) is not None:
            self.trackers.close()
        for obj in (self.gen, self.learner, self.verifier):
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception as e:  # shutting down must not hide the run's own error
                    print(f"[passk_rl] shutdown of {type(obj).__name__} failed: {e}", file=sys.stderr)
        if self.weight_sync is not None:
            try:
                self.weight_sync.close()  # the collective transport's store
            except Exception as e:  # noqa: BLE001 - shutting down must not hide the run's own error
                print(f"[passk_rl] closing the weight sync failed: {e}", file=sys.stderr)
        if self.transport is not None:
            try:
                self.transport.cleanup(keep_last=0)  # the published weights in /dev/shm are this run's only
            except Exception as e:
                print(f"[passk_rl] cleaning up published weights failed: {e}", file=sys.stderr)
        if self.placement is not None:
            try:
                self.placement.remove()
            except Exception:
                pass
        if self.started_ray:
            import ray

            ray.shutdown()
