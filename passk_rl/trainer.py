"""The driver: one training step is the named phases generate → verify → stats/K → shape → update → sync → log.

The driver holds no model; it moves prompts, token ids, rewards and advantages between the actors:
``GeneratorPool`` (vLLM engines), ``VerifierPool`` (task verifiers in their own processes), the named
``PHatService`` actor (p̂ statistics and K), and ``LearnerGroup`` (DeepSpeed ZeRO ranks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from passk_rl import shaping
from passk_rl.config import Config, dump_yaml
from passk_rl.metrics import PHASES, JsonlWriter, PhaseTimer, batch_pass_at_k
from passk_rl.tasks import STATUSES, Prompt, make_task


def resolve_model_path(path: str) -> str:
    """``builtin:arith-base`` → the tiny base model committed in the package (checked); else the path as given.

    The built-in model is the seed-0 build whatever the run's seed: runs with different seeds start from the
    same weights, on every machine, which is what comparing their final pass@k against the base needs.
    """
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name != "arith-base":
            raise ValueError(f"model.path: unknown built-in model {name!r}; known: ['arith-base']")
        from passk_rl.tasks.make_base import builtin_base_model

        return str(builtin_base_model())
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {p} has no config.json (expected a Hugging Face model directory)")
        return str(p.resolve())
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in path:
        raise FileNotFoundError(f"model.path: {path!r} is not a local directory and cannot be fetched offline")
    return path  # a hub id: vLLM/transformers fetch or read it from the local HF cache


def init_ray(cfg: Config) -> bool:
    """Join the Ray job's cluster when run through ``ray job submit``; else ``cluster.address``.

    Returns True when this call started a cluster (so shutdown stops only what we started).
    """
    import ray

    if ray.is_initialized():
        return False
    in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    # Worker processes import passk_rl/actors/cluster: make the repo importable for them too.
    root = str(Path(__file__).resolve().parent.parent)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                        "TOKENIZERS_PARALLELISM": "false",
                        # vLLM's per-request INFO lines would bury the run's own status line in the job log.
                        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}
    if in_job:
        ray.init(address="auto", runtime_env=env)
        return False
    if cfg.cluster.address == "local":
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or max(4, os.cpu_count() or 1),
                 include_dashboard=False, runtime_env=env)
        return True
    ray.init(address=cfg.cluster.address, runtime_env=env)
    return False


def _json_state(state: Any) -> Any:
    return [_json_state(x) for x in state] if isinstance(state, tuple) else state


def _tuple_state(state: Any) -> Any:
    return tuple(_tuple_state(x) for x in state) if isinstance(state, list) else state


def paired_change(before: Dict[str, Any], after: Dict[str, Any], *, seed: int = 0) -> Dict[str, Any]:
    """Per-k change in held-out pass@k between two evaluations of the same prompts, with a paired bootstrap
    interval over prompts: {"k": {"mean", "lo", "hi"}}."""
    from passk_rl.estimators import pass_at_k_paired_diff

    if before["prompt_ids"] != after["prompt_ids"] or before["n"] != after["n"]:
        raise ValueError("paired_change: the two evaluations used different prompts or n")
    ks = [int(k) for k in before["pass_at_k"] if k in after["pass_at_k"]]
    r = pass_at_k_paired_diff(before["n"], before["counts"], after["counts"], ks, seed=seed)
    return {str(k): {"mean": float(r.mean[i]), "lo": float(r.lo[i]), "hi": float(r.hi[i])} for i, k in enumerate(ks)}


class TrainingAborted(RuntimeError):
    """The run stopped itself because its numbers went wrong (the message says which and where)."""


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.started_ray = False
        self.gen = self.verifier = self.learner = self.phat = self.dash = None
        self.placement = None
        self.transport = None
        self.status_totals = {s: 0 for s in STATUSES}
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.log(f"run {cfg.run.name}: writing to {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists() and not cfg.run.resume:
            metrics.unlink()
        self.metrics = JsonlWriter(metrics)

        # Everything that can fail on bad input happens before any actor starts.
        self.task = make_task(cfg.task.name, **cfg.task.params)
        self.train_prompts = self.task.prompts(cfg.task.train_split)
        if cfg.data.max_prompts:
            self.train_prompts = self.train_prompts[: cfg.data.max_prompts]
        self.eval_prompts = self.task.prompts(cfg.task.eval_split)[: cfg.eval.num_prompts]
        if not self.train_prompts:
            raise ValueError(f"task {cfg.task.name!r} has no prompts in split {cfg.task.train_split!r}")
        self.model_path = resolve_model_path(cfg.model.path)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.rng = random.Random(cfg.run.seed)
        self.order: List[int] = []

        import ray

        from actors.generator import GeneratorPool
        from actors.learner import LearnerGroup
        from actors.phat import create_phat_actor
        from actors.verifier import VerifierPool
        from cluster.devices import device_spec
        from cluster.placement import reserve
        from cluster.weight_sync import make_transport
        from passk_rl.metrics import create_dashboard_actor

        self.started_ray = init_ray(cfg)
        spec = device_spec(cfg.cluster.device)
        t0 = time.perf_counter()
        self.placement = reserve(spec, num_engines=cfg.generator.num_engines, tp=cfg.generator.tensor_parallel_size,
                                 cpus_per_engine=cfg.generator.num_cpus_per_engine,
                                 world_size=cfg.learner.world_size, cpus_per_rank=cfg.learner.num_cpus_per_rank,
                                 strategy=cfg.cluster.placement_strategy)
        self.phat = create_phat_actor(cfg.run.name, estimator=cfg.estimator.kind,
                                      estimator_params=cfg.estimator.params, schedule=cfg.schedule.kind,
                                      schedule_params=cfg.schedule.params, n=cfg.generator.n)
        if cfg.logging.ray_metrics:
            self.dash = create_dashboard_actor(cfg.run.name, cfg.logging.pass_at_ks)
        self.transport = make_transport(cfg.sync.transport, root=cfg.sync.root, run_name=cfg.run.name)
        self.verifier = VerifierPool(cfg.task.name, cfg.task.params, num_workers=cfg.verifier.num_workers,
                                     timeout_s=cfg.verifier.timeout_s,
                                     num_cpus_per_worker=cfg.verifier.num_cpus_per_worker)
        g = cfg.generator
        self.gen = GeneratorPool(
            g.num_engines,
            dict(model_path=self.model_path, device=cfg.cluster.device, seed=cfg.run.seed,
                 kv_cache_bytes=int(g.kv_cache_gib * 2**30), max_model_len=cfg.model.max_model_len,
                 dtype=cfg.model.dtype, tensor_parallel_size=g.tensor_parallel_size, enforce_eager=g.enforce_eager,
                 gpu_memory_utilization=g.gpu_memory_utilization, max_num_seqs=g.max_num_seqs,
                 transport=self.transport),
            device=cfg.cluster.device, num_cpus_per_engine=g.num_cpus_per_engine,
            placement_group=self.placement.generator_pg, bundle_indices=list(range(g.num_engines)),
        )
        L = cfg.learner
        self.learner = LearnerGroup(
            L.world_size, self.model_path, device=cfg.cluster.device, num_cpus_per_rank=L.num_cpus_per_rank,
            placement_group=self.placement.learner_pg, zero_stage=L.zero_stage, lr=L.lr,
            weight_decay=L.weight_decay, betas=tuple(L.betas), grad_clip=L.grad_clip,
            micro_batch_size=L.micro_batch_size, clip_low=L.clip_low, clip_high=L.clip_high,
            aggregation=L.aggregation, kl_coef=L.kl_coef, kl_estimator=L.kl_estimator, ref_model=L.kl_coef > 0,
            # The generator reports raw (temperature-1) logprobs, so the learner scores at temperature 1 too:
            # the PPO ratio is then exactly 1 on the first epoch when weights are in sync.
            temperature=1.0,
            gradient_checkpointing=L.gradient_checkpointing, seed=cfg.run.seed,
            bf16=cfg.model.dtype == "bfloat16",
        )
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
        if cfg.eval.enabled:
            base = self.run_dir / "eval" / "step_000000.json"
            summary["base_eval"] = json.loads(base.read_text()) if first > 1 and base.is_file() else self.evaluate(step=0)
        t_start = time.perf_counter()
        for step in range(first, cfg.run.steps + 1):
            record = self.step(step)
            if cfg.eval.enabled and cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.steps:
                record["eval"] = self.evaluate(step=step)
            if cfg.run.checkpoint_interval and step % cfg.run.checkpoint_interval == 0:
                self.save_checkpoint(step)
        summary["train_seconds"] = time.perf_counter() - t_start
        if cfg.run.steps > 0:
            self.save_checkpoint(cfg.run.steps, final=True)
        if cfg.eval.enabled:
            summary["final_eval"] = self.evaluate(step=cfg.run.steps)
            summary["change"] = paired_change(summary["base_eval"], summary["final_eval"], seed=cfg.run.seed)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            from passk_rl.plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(self.run_dir)]
        except Exception as e:  # the run itself is done and saved; a plotting problem must not lose it
            self.log(f"plotting failed ({type(e).__name__}: {e}); metrics and summary are saved")
        self.print_summary(summary)
        return summary

    def step(self, step: int) -> Dict[str, Any]:
        cfg, g = self.cfg, self.cfg.generator
        timer = PhaseTimer()
        import ray

        with timer.phase("generate"):
            prompts = self.next_prompts()
            texts = [self.task.format_prompt(p, self.tokenizer) for p in prompts]
            samples = self.gen.generate(texts, n=g.n, temperature=g.temperature, top_p=g.top_p,
                                        max_tokens=g.max_tokens, seed=cfg.run.seed * 1_000_003 + step)
        with timer.phase("verify"):
            flat_prompts = [p for p in prompts for _ in range(g.n)]
            flat_completions = [s.text for group in samples for s in group]
            verdicts = self.verifier.verify(flat_prompts, flat_completions)
            rewards = np.array([v.reward for v in verdicts], dtype=np.float64).reshape(len(prompts), g.n)
            status_counts = self.verifier.last_counts()  # the pool counts every verdict of this call
            for s, c in status_counts.items():
                self.status_totals[s] += c
        with timer.phase("stats"):
            verified = np.array([v.status not in ("timeout", "error") for v in verdicts]).reshape(rewards.shape)
            decision = ray.get(self.phat.observe.remote([p.id for p in prompts], rewards, step=step,
                                                        verified=verified))
        with timer.phase("shape"):
            k_used = self.admissible_k(decision.k)
            k_arg, params, p_hat = self.shaping_args(decision, k_used)
            advantages = shaping.shape(cfg.algorithm.shaping, torch.tensor(rewards, dtype=torch.float64), k=k_arg,
                                       p_hat=p_hat, **params).numpy()
            self.check_advantages(step, prompts, rewards, advantages, k_arg, params)
            # A sample whose verifier timed out or crashed has no verdict: its reward of 0 stays in the group's
            # baseline, but it is not pushed down as if it were wrong.
            advantages = np.where(verified, advantages, 0.0)
        with timer.phase("update"):
            batch = [
                {"prompt_token_ids": s.prompt_token_ids, "response_token_ids": s.token_ids,
                 "behaviour_logprobs": s.logprobs, "advantage": float(advantages[i, j])}
                for i, group in enumerate(samples) for j, s in enumerate(group)
            ]
            train_metrics = self.learner.train_step(batch, step=step)
            update_skipped = self.check_update(step, prompts, advantages, train_metrics)
        with timer.phase("sync"):
            handle = self.learner.publish_weights(self.transport, step=step)
            self.gen.sync_weights(handle)
            probe = self.sync_probe(batch[0]) if cfg.sync.probe else None
        with timer.phase("log"):
            gen_tokens = sum(len(s.token_ids) for group in samples for s in group)
            record: Dict[str, Any] = {
                "step": step,
                "k": k_used,
                "k_schedule": decision.k,
                "k_weights": decision.k_weights,
                "p_hat_global": decision.p_global,
                "p_hat_samples": decision.total_samples,
                "verified_samples": int(verified.sum()),
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
                "gen_tokens_per_s": gen_tokens / max(timer.seconds["generate"], 1e-9),
                "sync_probe_max_abs_diff": probe,
                "learner": train_metrics,
            }
        record["phase_seconds"] = dict(timer.seconds)
        record["step_seconds"] = timer.total()
        record["samples_per_s"] = len(batch) / max(timer.total(), 1e-9)
        self.metrics.write(record)
        if self.dash is not None:
            self.dash.report.remote(record)
        if cfg.logging.console_every and step % cfg.logging.console_every == 0:
            ks = " ".join(f"pass@{k}={record[f'pass@{k}']:.3f}" for k in cfg.logging.pass_at_ks if f"pass@{k}" in record)
            self.log(f"step {step}/{cfg.run.steps}  K={k_used}  p̂={decision.p_global:.3f}  "
                     f"reward={record['reward_mean']:.3f}  {ks}  fail={record['verifier_failures']}  "
                     f"{record['step_seconds']:.1f}s ({record['samples_per_s']:.1f} samples/s)")
        return record

    def admissible_k(self, k: int) -> int:
        """The schedule's K moved into the range the configured shaping accepts for n samples per prompt
        (e.g. ``pkpo_loo_minus_one`` needs 2 ≤ K ≤ n − 1); shaping-agnostic schedules need not know it."""
        info = shaping.info(self.cfg.algorithm.shaping)
        if not info.uses_k:
            return int(k)
        n = self.cfg.generator.n
        hi = n - 1 if info.needs_k_le_n_minus_1 else n
        return int(min(max(int(k), info.min_k), hi))

    def shaping_args(self, decision: Any, k: int):
        """(k, params, p_hat) for ``shaping.shape``: the Ks come from the weights for multi-K shapings, and p̂ from
        the central actor only for plug-in shapings with ``p_hat_source: estimator``."""
        a = self.cfg.algorithm
        params = dict(a.shaping_params)
        info = shaping.info(a.shaping)
        if info.uses_k_weights:
            if decision.k_weights:
                params["weights"] = decision.k_weights
            k = 1
        p_hat = None
        if a.p_hat_source == "estimator" and info.uses_p_hat:
            p_hat = torch.tensor(decision.p_hat, dtype=torch.float64)
        return k, params, p_hat

    def check_advantages(self, step: int, prompts: List[Prompt], rewards: np.ndarray, advantages: np.ndarray,
                         k: int, params: Dict[str, Any]) -> None:
        """Stop before the update when an advantage is non-finite or beyond ``guard.max_advantage_ratio`` × the
        largest the shaping's group form can give at this n: training on it would let a few samples set the
        direction of the whole step (gradient clipping only rescales it)."""
        bad = shaping.scale_violations(self.cfg.algorithm.shaping, rewards, advantages, k=k,
                                       ratio=self.cfg.guard.max_advantage_ratio, **params)
        if bad.size:
            bound = shaping.advantage_bound(self.cfg.algorithm.shaping, rewards.shape[1], k=k, **params) \
                if np.all((rewards == 0) | (rewards == 1)) else float("nan")
            worst = [f"{prompts[i].id} (max |A| {np.abs(advantages[i]).max():.4g}, {int(rewards[i].sum())}/"
                     f"{rewards.shape[1]} correct)" for i in bad[:5]]
            raise TrainingAborted(
                f"step {step}: advantages of {bad.size} prompt(s) are non-finite or exceed "
                f"guard.max_advantage_ratio={self.cfg.guard.max_advantage_ratio} × the largest the group form of "
                f"{self.cfg.algorithm.shaping!r} gives at n={rewards.shape[1]} ({bound:.4g}): {', '.join(worst)}. "
                f"Check algorithm.p_hat_source / algorithm.shaping_params.")

    def check_update(self, step: int, prompts: List[Prompt], advantages: np.ndarray,
                     metrics: Dict[str, Any]) -> bool:
        """True when the learner skipped this update (non-finite loss or gradient: DeepSpeed drops the step); stops
        the run after ``guard.max_skipped_steps`` such steps in a row, or at once on a gradient norm above
        ``guard.max_grad_norm``, naming the prompts with the largest |advantage|."""
        g = self.cfg.guard
        gn, loss = float(metrics.get("grad_norm", float("nan"))), float(metrics.get("loss", float("nan")))
        top = np.argsort(-np.abs(advantages).max(axis=1))[:5]
        culprits = ", ".join(f"{prompts[i].id} (max |A| {np.abs(advantages[i]).max():.4g})" for i in top)
        if not (np.isfinite(gn) and np.isfinite(loss)):
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            self.log(f"step {step}: loss {loss} / gradient norm {gn} not finite; the update was skipped "
                     f"({self.skipped_in_a_row} in a row). Largest advantages: {culprits}")
            if self.skipped_in_a_row >= g.max_skipped_steps:
                raise TrainingAborted(f"step {step}: {self.skipped_in_a_row} updates in a row skipped for a "
                                      f"non-finite loss or gradient (guard.max_skipped_steps={g.max_skipped_steps})")
            return True
        self.skipped_in_a_row = 0
        if gn > g.max_grad_norm:
            raise TrainingAborted(f"step {step}: gradient norm {gn:.4g} > guard.max_grad_norm={g.max_grad_norm:g} "
                                  f"(before clipping); largest advantages: {culprits}")
        return False

    def sync_probe(self, sample: Dict[str, Any]) -> float:
        """Largest |generator − learner| logprob on one fixed completion, right after the sync."""
        gen_lp = self.gen.score([sample["prompt_token_ids"]], [sample["response_token_ids"]])[0]
        learn_lp = self.learner.compute_logprobs([sample])[0]
        return float(np.max(np.abs(np.asarray(gen_lp) - np.asarray(learn_lp)))) if len(gen_lp) else 0.0

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self, *, step: int) -> Dict[str, Any]:
        from passk_rl.evaluate import evaluate_pool

        e = self.cfg.eval
        t0 = time.perf_counter()
        res = evaluate_pool(self.gen, self.verifier, self.task, self.eval_prompts, tokenizer=self.tokenizer,
                            n=e.n, ks=e.ks, temperature=e.temperature, max_tokens=self.cfg.generator.max_tokens,
                            # The same sampling seeds at every evaluation (common random numbers): the
                            # difference between two evaluations then carries less sampling noise.
                            seed=self.cfg.run.seed + 7919)
        res["step"] = step
        res["seconds"] = time.perf_counter() - t0
        if self.dash is not None:
            self.dash.report_eval.remote(res)
        out = self.run_dir / "eval"
        out.mkdir(exist_ok=True)
        (out / f"step_{step:06d}.json").write_text(json.dumps(res, indent=2))
        self.log(f"eval @ step {step} (held-out, {len(self.eval_prompts)} prompts × n={e.n}): " +
                 "  ".join(f"pass@{k}={res['pass_at_k'][str(k)]['mean']:.3f}" for k in e.ks))
        return res

    # ------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, step: int, *, final: bool = False) -> None:
        import ray

        ck = self.run_dir / "checkpoints" / f"step_{step:06d}"
        ck.mkdir(parents=True, exist_ok=True)
        self.learner.save_checkpoint(str(ck / "learner"), step=step)
        torch.save(ray.get(self.phat.state_dict.remote()), ck / "phat.pt")
        (ck / "driver.json").write_text(json.dumps({"step": step, "order": self.order,
                                                    "rng": _json_state(self.rng.getstate())}))
        if final:
            self.learner.export_hf(str(self.run_dir / "final_model"))
        ckpts = sorted((self.run_dir / "checkpoints").glob("step_*"))
        for old in ckpts[: -self.cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> int:
        """Restore the newest checkpoint of this run (learner + optimizer, p̂ actor, data order and RNG, publish
        its weights to the engines); returns its step, or 0 when there is none. Metrics of later steps that the
        interrupted run wrote after that checkpoint are dropped so metrics.jsonl stays one record per step."""
        import ray

        ckpts = sorted((self.run_dir / "checkpoints").glob("step_*"))
        if not ckpts:
            self.log("run.resume: no checkpoint yet, starting from step 1")
            return 0
        ck = ckpts[-1]
        step = int(ck.name.split("_")[1])
        self.learner.load_checkpoint(str(ck / "learner"))
        ray.get(self.phat.load_state_dict.remote(torch.load(ck / "phat.pt", weights_only=False)))
        driver = json.loads((ck / "driver.json").read_text())
        self.order = list(driver["order"])
        self.rng.setstate(_tuple_state(driver["rng"]))
        self.gen.sync_weights(self.learner.publish_weights(self.transport, step=step))
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))
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
        for obj in (self.gen, self.learner, self.verifier):
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception as e:  # shutting down must not hide the run's own error
                    print(f"[passk_rl] shutdown of {type(obj).__name__} failed: {e}", file=sys.stderr)
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
