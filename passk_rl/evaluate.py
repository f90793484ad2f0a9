"""Held-out evaluation: unbiased pass@k with bootstrap confidence intervals over problems, and run comparison.

Library:
- ``curve_dict(n, counts, ks)`` and ``evaluate_pool(gen, verifier, task, prompts, ...)``: the reduction the trainer
  uses for its evaluations (per-prompt correct counts → ``passk_rl.estimators.pass_at_k_curve``).
- ``evaluate_models(models, ...)``: sample every model with a real ``GeneratorPool``, score with a real
  ``VerifierPool`` (one private local Ray cluster for all models), write ``<out>/<label>.json`` per model and
  ``<out>/pass_at_k.png``.
- ``compare(run_dirs, out_dir)``: read each run's ``summary.json`` (+ ``config.yaml`` for method / K / seed),
  pool seeds per method, write ``comparison.md``, ``comparison.json``, ``pass_at_k.png`` and ``pareto.png``, and
  compute, for each k, which method is best and whether the method trained with K = k wins by more than the noise.

Command line (run from the repository root)::

    python -m passk_rl.evaluate --model PATH_OR_RUN_DIR [--model ...] [--label NAME ...] --task arith \\
        [--task-params YAML] [--split test] [--num-prompts N] --n 256 --k 1,2,4,8,16,32,64,128 \\
        [--temperature 1.0] [--max-tokens 32] [--seed 0] [--out DIR]
    python -m passk_rl.evaluate compare RUN_DIR [RUN_DIR ...] --out DIR [--k 1,4,16,64] [--verdict-k 1,4,16]
    python -m passk_rl.evaluate plot-run RUN_DIR

A model is an HF directory, a run directory (its ``final_model/`` is used) or ``builtin:arith-base``. Every model
is sampled with the same seed (common random numbers), so differences between models carry less sampling noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from passk_rl.estimators import bootstrap_means, pass_at_k, pass_at_k_curve, percentile_interval
from passk_rl.tasks import STATUSES, Prompt, Task

BUILTIN_MODELS = ("builtin:arith-base",)
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128)


# ============================================================================================ reduction
def curve_dict(n: int, counts: Sequence[int], ks: Sequence[int], *, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """{"pass_at_k": {"k": {"mean", "lo", "hi"}}} for per-prompt correct ``counts`` out of ``n`` samples.

    mean: the mean over prompts of the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021);
    lo/hi: the 95 % percentile bootstrap interval over prompts (``n_boot`` resamples, ``seed``).
    """
    c = np.asarray(counts, dtype=np.int64)
    res = pass_at_k_curve(np.full_like(c, n), c, list(ks), n_boot=n_boot, seed=seed)
    out = {}
    for i, k in enumerate(ks):
        out[str(k)] = {"mean": float(res.mean[i]), "lo": float(res.lo[i]), "hi": float(res.hi[i])}
    return {"pass_at_k": out}


def evaluate_pool(gen: Any, verifier: Any, task: Task, prompts: List[Prompt], *, tokenizer: Any, n: int,
                  ks: Sequence[int], temperature: float, max_tokens: int, seed: int,
                  threshold: float = 1.0, keep_samples: bool = False) -> Dict[str, Any]:
    """Sample ``n`` completions per prompt with ``gen``, verify with ``verifier``, reduce to pass@k.

    A sample counts as correct when its reward is ≥ ``threshold``. ks above n are dropped. Returns
    ``curve_dict`` plus "n", "num_prompts", "counts" (per prompt), "prompt_ids", "verifier_status" (verdicts per
    status), "reward_mean", "ks" (those reported), "generate_seconds" and "verify_seconds"; with ``keep_samples``
    also "samples": ``[prompt][sample]`` of {"text", "reward", "status"}.
    """
    texts = [task.format_prompt(p, tokenizer) for p in prompts]
    t0 = time.perf_counter()
    samples = gen.generate(texts, n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)
    t1 = time.perf_counter()
    flat_prompts = [p for p in prompts for _ in range(n)]
    verdicts = verifier.verify(flat_prompts, [s.text for group in samples for s in group])
    t2 = time.perf_counter()
    rewards = np.array([v.reward for v in verdicts], dtype=np.float64).reshape(len(prompts), n)
    status = {s: 0 for s in STATUSES}
    for v in verdicts:
        status[v.status] += 1
    counts = (rewards >= threshold).sum(axis=1)
    ks_used = [int(k) for k in ks if k <= n]
    out = curve_dict(n, counts, ks_used, seed=seed)
    out.update({"n": n, "num_prompts": len(prompts), "counts": counts.tolist(),
                "prompt_ids": [p.id for p in prompts], "verifier_status": status,
                "reward_mean": float(rewards.mean()), "ks": ks_used,
                "generate_seconds": t1 - t0, "verify_seconds": t2 - t1})
    if keep_samples:
        out["samples"] = [[{"text": s.text, "reward": float(verdicts[i * n + j].reward),
                            "status": verdicts[i * n + j].status} for j, s in enumerate(group)]
                          for i, group in enumerate(samples)]
    return out


# ===================================================================================== model evaluation
def parse_ks(text: str | Sequence[int]) -> List[int]:
    """"1,2,4" (or a list) → [1, 2, 4]; sorted, unique, each ≥ 1 (ValueError naming the bad entry)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            k = int(s)
        except ValueError:
            raise ValueError(f"k list: {s!r} is not an integer (expected e.g. 1,2,4,8)") from None
        if k < 1:
            raise ValueError(f"k list: k={k} must be >= 1")
        out.append(k)
    if not out:
        raise ValueError(f"k list: no k values in {text!r}")
    return sorted(set(out))


def check_ks(n: int, ks: Sequence[int]) -> None:
    """Raise ValueError when a requested k cannot be estimated from n samples per problem."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample per problem")
    bad = [k for k in ks if k > n]
    if bad:
        raise ValueError(f"k={bad[0]} exceeds n={n}: the unbiased pass@k estimator needs k <= n samples per "
                         f"problem (raise --n to at least {max(bad)} or drop k > {n})")


@dataclass(frozen=True)
class ModelRef:
    spec: str  # as given
    path: str  # the HF directory to load
    label: str
    run_dir: Optional[str] = None  # set when spec was a run directory


def _hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def resolve_model(spec: str, *, build: bool = True) -> Tuple[str, Optional[str]]:
    """(HF directory, run directory or None) for a model spec.

    ``builtin:arith-base`` → the committed tiny base model (checked when ``build``); a run directory
    (has ``summary.json``/``config.yaml``/``final_model``) → its ``final_model``; an HF directory → itself.
    Raises FileNotFoundError naming the spec when nothing loadable is there.
    """
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {spec!r}; known: {list(BUILTIN_MODELS)}")
        from passk_rl.tasks.make_base import BUILTIN_DIR, builtin_base_model

        return str(builtin_base_model() if build else BUILTIN_DIR), None
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"model {spec!r}: no such directory")
    if not p.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not a directory (expected an HF model dir or a run dir)")
    if _hf_dir(p):
        return str(p.resolve()), None
    if (p / "final_model").is_dir() or (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
        fm = p / "final_model"
        if not _hf_dir(fm):
            raise FileNotFoundError(f"model {spec!r}: run directory without {fm}/config.json "
                                    f"(did the run finish? final_model/ is written after the last step)")
        return str(fm.resolve()), str(p.resolve())
    raise FileNotFoundError(f"model {spec!r}: {p} is neither an HF model directory (no config.json) nor a run "
                            f"directory (no final_model/)")


def _safe_label(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+=@-]+", "_", label).strip("._")
    if not s:
        raise ValueError(f"label {label!r} has no usable characters for a file name")
    return s


def default_label(spec: str, run_dir: Optional[str]) -> str:
    if spec.startswith("builtin:"):
        return spec.split(":", 1)[1]
    return Path(run_dir or spec.rstrip("/")).name or "model"


def resolve_models(specs: Sequence[str], labels: Optional[Sequence[str]] = None, *,
                   build: bool = True) -> List[ModelRef]:
    """Resolve every model (and its label) before anything starts; raise on the first bad one."""
    if not specs:
        raise ValueError("no --model given")
    if labels and len(labels) != len(specs):
        raise ValueError(f"{len(labels)} --label values for {len(specs)} --model values; give one label per model "
                         f"or none")
    refs, seen = [], set()
    for i, spec in enumerate(specs):
        path, run_dir = resolve_model(spec, build=build)
        label = _safe_label(labels[i] if labels else default_label(spec, run_dir))
        if label in seen:
            if labels:
                raise ValueError(f"label {label!r} is given twice")
            j = 2
            while f"{label}-{j}" in seen:
                j += 1
            label = f"{label}-{j}"
        seen.add(label)
        refs.append(ModelRef(spec=spec, path=path, label=label, run_dir=run_dir))
    return refs


def init_local_ray(num_cpus: int = 4) -> bool:
    """Start a private local Ray cluster unless one is initialised already; True when this call started it.

    Unlike the trainer it never joins a Ray job's cluster: ``evaluate_models`` promises one private cluster."""
    from cluster.ray_init import start_ray

    return start_ray(address="local", num_cpus=num_cpus, log_to_driver=False, join_ray_job=False, log=_log)


def _log(msg: str) -> None:
    print(f"[passk_rl.evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate_models(models: Sequence[str], *, labels: Optional[Sequence[str]] = None, task: str = "arith",
                    task_params: Optional[Mapping[str, Any]] = None, split: str = "test",
                    num_prompts: Optional[int] = None, n: int, ks: Sequence[int] = DEFAULT_KS,
                    temperature: float = 1.0, max_tokens: int = 32, seed: int = 0,
                    out_dir: str | Path = "eval_out", num_engines: int = 1, kv_cache_gib: float = 0.5,
                    max_model_len: int = 256, dtype: str = "float32", max_num_seqs: int = 256,
                    verifier_workers: int = 1,
                    verifier_timeout_s: float = 10.0, n_boot: int = 1000, ray_cpus: int = 4, plot: bool = True,
                    keep_samples: bool = False, share_engine: bool = True,
                    log: Callable[[str], None] = _log) -> Dict[str, Dict[str, Any]]:
    """Evaluate each model on the same prompts with the same sampling seed; ``{label: result}``.

    Each result is ``evaluate_pool``'s dict plus "label", "model" (spec), "model_path", "run_dir", "task",
    "task_params", "split", "temperature", "max_tokens", "seed", "seconds"; it is also written to
    ``<out_dir>/<label>.json``. With ``plot``, all curves go to ``<out_dir>/pass_at_k.png``; with ``keep_samples``
    the results (and files) also hold every completion with its verdict. With ``share_engine`` (default) models of
    one architecture are evaluated on one engine, each loaded in place; otherwise each gets a fresh engine.
    Every argument is checked (k ≤ n, models exist, task/split valid) before Ray or any engine starts.
    """
    from passk_rl.tasks import make_task

    ks = parse_ks(ks)
    check_ks(n, ks)
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts}: must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (pass@k of greedy decoding is pass@1)")
    refs = resolve_models(models, labels)
    params = dict(task_params or {})
    try:
        task_obj = make_task(task, **params)
    except TypeError as e:
        raise ValueError(f"task parameters for {task!r}: {e}") from None
    prompts = task_obj.prompts(split)
    if not prompts:
        raise ValueError(f"task {task!r} has no prompts in split {split!r}")
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from transformers import AutoTokenizer

    from actors.generator import GeneratorPool
    from actors.verifier import VerifierPool

    from cluster.weight_sync import ShmSafetensorsTransport, checkpoint_params, handle_for_model_dir

    started = init_local_ray(ray_cpus)
    results: Dict[str, Dict[str, Any]] = {}
    verifier = gen = None
    # Models of one architecture share one engine: the next model's weights are loaded in place (the same
    # validated reload a training sync uses), which saves an engine start (~20 s) per model. Sampling depends
    # only on the weights and the per-request seeds, so a model evaluated either way gives the same samples.
    transport = ShmSafetensorsTransport(run_name=f"evaluate-{os.getpid()}", keep_last=1)
    engine_model = engine_arch = None
    try:
        verifier = VerifierPool(task, params, num_workers=verifier_workers, timeout_s=verifier_timeout_s,
                                num_cpus_per_worker=0.25)
        for i, ref in enumerate(refs):
            t0 = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(ref.path)
            arch = (Path(ref.path, "config.json").read_text(), checkpoint_params(ref.path))
            if gen is not None and (not share_engine or arch != engine_arch):
                gen.shutdown()
                gen = None
            if gen is None:
                log(f"{ref.label}: starting an engine on {ref.path}")
                gen = GeneratorPool(num_engines, dict(model_path=ref.path, device="cpu", seed=seed,
                                                      kv_cache_bytes=int(kv_cache_gib * 2**30),
                                                      max_model_len=max_model_len, dtype=dtype,
                                                      max_num_seqs=max_num_seqs, transport=transport),
                                    device="cpu", num_cpus_per_engine=0.5)
                engine_model, engine_arch = ref.path, arch
            elif ref.path != engine_model:
                gen.sync_weights(handle_for_model_dir(ref.path, step=i))
                engine_model = ref.path
            res = evaluate_pool(gen, verifier, task_obj, prompts, tokenizer=tokenizer, n=n, ks=ks,
                                temperature=temperature, max_tokens=max_tokens, seed=seed,
                                keep_samples=keep_samples)
            res["pass_at_k"] = curve_dict(n, res["counts"], ks, n_boot=n_boot, seed=seed)["pass_at_k"]
            res.update({"label": ref.label, "model": ref.spec, "model_path": ref.path, "run_dir": ref.run_dir,
                        "task": task, "task_params": params, "split": split, "temperature": temperature,
                        "max_tokens": max_tokens, "seed": seed, "seconds": time.perf_counter() - t0})
            (out / f"{ref.label}.json").write_text(json.dumps(res, indent=2))
            results[ref.label] = res
            log(f"{ref.label}: {len(prompts)} prompts × n={n} in {res['seconds']:.0f}s  " + "  ".join(
                f"pass@{k}={res['pass_at_k'][str(k)]['mean']:.3f}" for k in ks))
    finally:
        if gen is not None:
            gen.shutdown()
        if verifier is not None:
            verifier.shutdown()
        transport.cleanup(keep_last=0)
        if started:
            ray.shutdown()
    if plot:
        from passk_rl.plots import plot_pass_at_k

        path = plot_pass_at_k(results, out / "pass_at_k.png",
                              title=f"{task}/{split}: pass@k ({len(prompts)} problems, n={n}, T={temperature})")
        log(f"wrote {path}")
    return results


# ============================================================================================ comparison
@dataclass
class RunRecord:
    run_dir: Path
    name: str
    method: str
    target_k: Optional[int]
    seed: int
    final: Dict[str, Any]
    base: Optional[Dict[str, Any]] = None
    config: Dict[str, Any] = field(default_factory=dict)


def method_of(cfg: Mapping[str, Any]) -> Tuple[str, Optional[int]]:
    """(method label, the K it trains for) from a run's resolved config dict.

    Shapings that ignore k (grpo, rloo, dr_grpo) are pass@1 methods: target K = 1. A k-shaping with a fixed
    schedule targets that K; with an adaptive schedule the target is None (no single K).
    """
    from passk_rl import shaping

    alg = cfg.get("algorithm") or {}
    name = alg.get("shaping")
    if not name:
        raise ValueError("config has no algorithm.shaping")
    sched = cfg.get("schedule") or {}
    try:
        uses_k = shaping.info(name).uses_k
    except ValueError:
        uses_k = True  # an unknown (newer) shaping: describe it by its schedule
    if not uses_k:
        return name, 1
    kind = sched.get("kind", "fixed")
    params = sched.get("params") or {}
    if kind == "fixed":
        k = int(params.get("k", 1))
        return f"{name} K={k}", k
    return f"{name} ({kind} K)", None


def load_run(run_dir: str | Path, *, method: Optional[str] = None) -> RunRecord:
    """A run's summary (needs ``final_eval``) and config; ``method`` overrides the label from the config."""
    import yaml

    d = Path(run_dir)
    summ_path = d / "summary.json"
    if not summ_path.is_file():
        raise FileNotFoundError(f"run {d}: no summary.json (the run did not finish, or evaluation was off)")
    try:
        summary = json.loads(summ_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{summ_path}: not valid JSON: {e}") from None
    final = summary.get("final_eval")
    if not isinstance(final, dict) or "pass_at_k" not in final:
        raise ValueError(f"{summ_path}: no final_eval with pass_at_k (keys: {sorted(summary)})")
    cfg: Dict[str, Any] = {}
    if (d / "config.yaml").is_file():
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
    if cfg:
        label, target = method_of(cfg)
        seed = int((cfg.get("run") or {}).get("seed", 0))
    else:
        label, target, seed = d.name, None, 0
    return RunRecord(run_dir=d, name=d.name, method=method or label, target_k=target, seed=seed, final=final,
                     base=summary.get("base_eval"), config=cfg)


def _fmt(v: Optional[Mapping[str, float]]) -> str:
    if v is None:
        return "—"
    return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def _fmt_diff(v: Mapping[str, float]) -> str:
    return f"{v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]"


def _per_problem(ev: Mapping[str, Any], k: int) -> Optional[np.ndarray]:
    """Per-problem unbiased pass@k of one evaluation, or None when it has no counts or k > n."""
    if "counts" not in ev or "n" not in ev or k > int(ev["n"]):
        return None
    c = np.asarray(ev["counts"], dtype=np.int64)
    return np.asarray(pass_at_k(np.full_like(c, int(ev["n"])), c, np.full_like(c, k)), dtype=np.float64)


def _interval(v: np.ndarray, *, n_boot: int, seed: int, ci: float) -> Dict[str, float]:
    """Mean of per-problem values ``v`` and its percentile-bootstrap interval over problems.

    Every call with the same ``seed`` on the same problems resamples the same problems, so the interval of a
    difference of two methods is paired and agrees with the two methods' own intervals."""
    m = float(v.mean()) if v.size else float("nan")
    if n_boot == 0 or v.size == 0:
        return {"mean": m, "lo": m, "hi": m}
    lo, hi = percentile_interval(bootstrap_means(v, n_boot=n_boot, seed=seed), ci)
    return {"mean": m, "lo": float(lo), "hi": float(hi)}


class _Pool:
    """Method-level statistics: each method's per-problem estimate is averaged over its seeds, then bootstrapped
    over problems with resamples shared across methods (paired). Falls back to averaging run-level summaries
    (no paired differences) when runs lack counts or were evaluated on different problems."""

    def __init__(self, runs: Sequence[RunRecord], methods: Sequence[str], *, n_boot: int, seed: int, ci: float):
        self.runs, self.methods, self.ci = list(runs), list(methods), ci
        self.n_boot, self.seed = n_boot, seed
        ids = [tuple(r.final.get("prompt_ids") or ()) for r in self.runs]
        self.paired = all("counts" in r.final and "n" in r.final for r in self.runs) and len(set(ids)) == 1
        self.p = len(self.runs[0].final["counts"]) if self.paired else 0
        self._cache: Dict[Tuple[str, int], Optional[np.ndarray]] = {}

    def runs_of(self, method: str) -> List[RunRecord]:
        return [r for r in self.runs if r.method == method]

    def per_problem(self, method: str, k: int) -> Optional[np.ndarray]:
        key = (method, k)
        if key not in self._cache:
            rows = [_per_problem(r.final, k) for r in self.runs_of(method)]
            self._cache[key] = None if any(x is None for x in rows) else np.mean(rows, axis=0)
        return self._cache[key]

    def stat(self, method: str, k: int) -> Optional[Dict[str, float]]:
        if self.paired:
            v = self.per_problem(method, k)
            if v is None:
                return None
            return _interval(v, n_boot=self.n_boot, seed=self.seed, ci=self.ci)
        vals = [r.final["pass_at_k"].get(str(k)) for r in self.runs_of(method)]
        if not vals or any(v is None for v in vals):
            return None
        return {key: float(np.mean([v[key] for v in vals])) for key in ("mean", "lo", "hi")}

    def diff(self, a: str, b: str, k: int) -> Optional[Dict[str, float]]:
        """pass@k(a) − pass@k(b) with a paired bootstrap CI; None without paired data."""
        if not self.paired:
            return None
        va, vb = self.per_problem(a, k), self.per_problem(b, k)
        if va is None or vb is None:
            return None
        return _interval(va - vb, n_boot=self.n_boot, seed=self.seed, ci=self.ci)


def verdicts(pool: _Pool, target: Mapping[str, Optional[int]], ks: Sequence[int]) -> List[Dict[str, Any]]:
    """For each k: the ranking, the best method, whether it trains with K = k, and whether the best K = k
    method beats the best other method by more than the noise.

    outcome: "supported" (the K = k method is ahead and the 95 % CI of the difference, paired over problems,
    excludes 0; without paired data: the two methods' CIs do not overlap), "contradicted" (another method is
    ahead by that criterion), "inconclusive", or "untested" (no method trains with K = k, or fewer than two
    methods have pass@k).
    """
    out = []
    for k in ks:
        stats = {m: pool.stat(m, k) for m in pool.methods}
        stats = {m: s for m, s in stats.items() if s is not None}
        ranking = sorted(stats, key=lambda m: -stats[m]["mean"])
        v: Dict[str, Any] = {"k": int(k), "ranking": [{"method": m, **stats[m]} for m in ranking],
                             "matched": [m for m in ranking if target.get(m) == k]}
        # Per-seed winners only over seeds in which every method ran (else a seed's "winner" is by default).
        seeds = sorted(set.intersection(*({r.seed for r in pool.runs_of(m)} for m in pool.methods)))
        per_seed = {}
        for s in seeds:
            row = {r.method: r.final["pass_at_k"][str(k)]["mean"] for r in pool.runs
                   if r.seed == s and str(k) in r.final["pass_at_k"]}
            if row:
                per_seed[str(s)] = max(row, key=row.get)
        v["per_seed_winner"] = per_seed
        if len(ranking) < 2:
            v.update(best=ranking[0] if ranking else None, outcome="untested",
                     text=f"pass@{k}: fewer than two methods report pass@{k}; nothing to compare.")
            out.append(v)
            continue
        best, runner = ranking[0], ranking[1]
        v["best"], v["runner_up"] = best, runner
        v["best_is_matched"] = best in v["matched"]
        v["lead"] = pool.diff(best, runner, k)
        others = [m for m in ranking if m not in v["matched"]]
        if not v["matched"] or not others:
            v["outcome"] = "untested"
            v["text"] = (f"pass@{k}: best is `{best}` ({_fmt(stats[best])}); no method trains with K={k}"
                         if not v["matched"] else f"pass@{k}: every method trains with K={k}; nothing to compare")
            out.append(v)
            continue
        top_m, top_o = v["matched"][0], others[0]
        gap = pool.diff(top_m, top_o, k)
        if gap is not None:
            criterion = "paired bootstrap CI of the difference over problems"
            ahead, behind = gap["lo"] > 0, gap["hi"] < 0
        else:
            criterion = "non-overlap of the two methods' CIs"
            ahead = stats[top_m]["lo"] > stats[top_o]["hi"]
            behind = stats[top_m]["hi"] < stats[top_o]["lo"]
        v.update(top_matched=top_m, top_other=top_o, gap=gap, criterion=criterion,
                 outcome="supported" if ahead else "contradicted" if behind else "inconclusive")
        s_best = (f"best is `{best}` ({_fmt(stats[best])}), "
                  + ("a" if v["best_is_matched"] else "not a") + f" K={k} method")
        g = (_fmt_diff(gap) if gap is not None
             else f"{stats[top_m]['mean'] - stats[top_o]['mean']:+.3f} (CIs {_fmt(stats[top_m])} vs {_fmt(stats[top_o])})")
        if ahead:
            s_gap = f"the K={k} method `{top_m}` beats the best other method `{top_o}` by {g}: outside the noise"
        elif behind:
            s_gap = f"the best other method `{top_o}` beats the K={k} method `{top_m}`: difference {g}, outside the noise"
        else:
            s_gap = f"`{top_m}` − `{top_o}` = {g}: within the noise"
        seeds_txt = ", ".join(f"seed {s}: `{m}`" for s, m in per_seed.items()) or "— (no seed run by every method)"
        consistent = len(set(per_seed.values())) == 1 if per_seed else False
        v["seed_consistent"] = consistent
        v["text"] = (f"pass@{k}: {s_best}; {s_gap} ({criterion}) → **{v['outcome']}**. "
                     f"Per-seed winners: {seeds_txt}" + (" (the same in every seed)." if consistent and len(per_seed) > 1
                                                       else "."))
        out.append(v)
    return out


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path, *, ks: Sequence[int] = (1, 4, 16, 64),
            verdict_ks: Sequence[int] = (1, 4, 16), pareto_k: Optional[int] = None,
            methods: Optional[Mapping[str, str]] = None, n_boot: int = 2000, seed: int = 0, ci: float = 0.95,
            title: Optional[str] = None) -> Dict[str, Any]:
    """Compare finished runs: tables (per method pooled over seeds, and per run), plots and the verdict.

    Args:
        run_dirs: run directories, each with ``summary.json`` (``final_eval``, optionally ``base_eval``) and
            ``config.yaml`` (method = shaping + fixed K, seed = run.seed).
        out_dir: receives ``comparison.md``, ``comparison.json``, ``pass_at_k.png``, ``pareto.png``.
        ks: k values in the tables; verdict_ks: k values judged; pareto_k: y axis of the Pareto plot (default
            the largest of ``ks`` every run can estimate).
        methods: optional {run_dir: method label} overriding the labels derived from the configs.
        n_boot, seed, ci: bootstrap over problems (resamples shared by all methods: paired differences).

    Returns a dict with "methods", "runs", "table" (markdown text), "verdicts", "paired" and the written
    "paths" ({"table", "json", "pass_at_k_plot", "pareto_plot"}).
    """
    from passk_rl.plots import plot_pareto, plot_pass_at_k

    if not run_dirs:
        raise ValueError("compare: no run directories given")
    ks, verdict_ks = parse_ks(ks), parse_ks(verdict_ks)
    methods = {str(Path(k)): v for k, v in (methods or {}).items()}
    runs = [load_run(d, method=methods.get(str(Path(d)))) for d in run_dirs]
    seen: Dict[Tuple[str, int], Path] = {}
    for r in runs:
        key = (r.method, r.seed)
        if key in seen:
            raise ValueError(f"compare: runs {seen[key]} and {r.run_dir} are both method {r.method!r} with seed "
                             f"{r.seed}; give distinct method labels (methods=...) or drop one")
        seen[key] = r.run_dir
    order = list(dict.fromkeys(r.method for r in runs))
    targets = {r.method: r.target_k for r in runs}
    for m in order:
        tk = {r.target_k for r in runs if r.method == m}
        if len(tk) > 1:
            raise ValueError(f"compare: method {m!r} has runs with different target K {sorted(tk, key=str)}")
    pool = _Pool(runs, order, n_boot=n_boot, seed=seed, ci=ci)
    n_min = min(int(r.final.get("n", max(int(k) for k in r.final["pass_at_k"]))) for r in runs)
    base = next((r.base for r in runs if r.base), None)
    base_ks = lambda k: (base["pass_at_k"].get(str(k)) if base else None)  # noqa: E731

    # ---- tables
    head = "| method | trains for K | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    sep = "|" + "---|" * (3 + len(ks))
    rows = [head, sep]
    if base is not None:
        rows.append("| base model | — | — | " + " | ".join(_fmt(base_ks(k)) for k in ks) + " |")
    method_stats: Dict[str, Dict[str, Any]] = {}
    for m in order:
        st = {str(k): pool.stat(m, k) for k in ks}
        seeds = sorted(r.seed for r in pool.runs_of(m))
        method_stats[m] = {"target_k": targets[m], "seeds": seeds, "pass_at_k": st}
        rows.append(f"| {m} | {targets[m] if targets[m] is not None else 'adaptive'} | "
                    f"{', '.join(map(str, seeds))} | " + " | ".join(_fmt(st[str(k)]) for k in ks) + " |")
    run_rows = ["| run | method | seed | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                "|" + "---|" * (3 + len(ks))]
    for r in runs:
        run_rows.append(f"| {r.name} | {r.method} | {r.seed} | "
                        + " | ".join(_fmt(r.final["pass_at_k"].get(str(k))) for k in ks) + " |")
    spread_rows = []
    if any(len(method_stats[m]["seeds"]) > 1 for m in order):
        spread_rows = ["| method | " + " | ".join(f"pass@{k} min–max over seeds" for k in ks) + " |",
                       "|" + "---|" * (1 + len(ks))]
        for m in order:
            cells = []
            for k in ks:
                vals = [r.final["pass_at_k"][str(k)]["mean"] for r in pool.runs_of(m) if str(k) in r.final["pass_at_k"]]
                cells.append(f"{min(vals):.3f} – {max(vals):.3f}" if vals else "—")
            spread_rows.append(f"| {m} | " + " | ".join(cells) + " |")
    vs = verdicts(pool, targets, verdict_ks)
    ci_txt = (f"{int(ci * 100)} % CI: percentile bootstrap over the {pool.p} evaluation problems "
              f"({n_boot} resamples) of the seed-averaged per-problem unbiased estimate; it measures evaluation "
              f"noise, not seed-to-seed variation (see the per-run table)"
              if pool.paired else
              "runs lack per-problem counts or used different problems: method values are averages of the "
              "per-run means and CI ends (approximate)")
    md = [f"# {title or 'Run comparison'}", "",
          f"Held-out pass@k per method (mean over seeds; {ci_txt}).", "", *rows, "",
          "Per run (95 % CI over problems):", "", *run_rows, ""]
    if spread_rows:
        md += ["Seed spread of the per-run means:", "", *spread_rows, ""]
    md += ["## Does training with K = k give the best pass@k?", ""]
    md += [f"- {v['text']}" for v in vs] + [""]
    table = "\n".join(md)

    # ---- plots
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_ks = [k for k in DEFAULT_KS if k <= n_min] or [1]
    curves: Dict[str, Dict[str, Any]] = {}
    if base is not None:
        curves["base model"] = base
    for m in order:
        pts = {str(k): pool.stat(m, k) for k in plot_ks}
        curves[m] = {"pass_at_k": {k: v for k, v in pts.items() if v is not None}}
    curves = {lab: c for lab, c in curves.items() if c["pass_at_k"]}
    p_plot = plot_pass_at_k(curves, out / "pass_at_k.png", title=title and f"{title}: held-out pass@k")
    if pareto_k is None:
        cand = [k for k in ks if k <= n_min and k > 1]
        pareto_k = max(cand) if cand else max(plot_ks)
    points = {}
    if base is not None and base_ks(1) and base_ks(pareto_k):
        points["base model"] = tuple((base_ks(k)["mean"], base_ks(k)["lo"], base_ks(k)["hi"]) for k in (1, pareto_k))
    for r in runs:
        a, b = r.final["pass_at_k"].get("1"), r.final["pass_at_k"].get(str(pareto_k))
        if a and b:
            label = f"{r.method} (seed {r.seed})" if len(pool.runs_of(r.method)) > 1 else r.method
            points[label] = ((a["mean"], a["lo"], a["hi"]), (b["mean"], b["lo"], b["hi"]))
    p_pareto = plot_pareto(points, out / "pareto.png", k=pareto_k) if points else None

    result = {"methods": method_stats, "order": order, "paired": pool.paired, "num_problems": pool.p,
              "base": {str(k): base_ks(k) for k in ks} if base else None,
              "runs": [{"run_dir": str(r.run_dir), "name": r.name, "method": r.method, "seed": r.seed,
                        "target_k": r.target_k,
                        "pass_at_k": {str(k): r.final["pass_at_k"].get(str(k)) for k in ks}} for r in runs],
              "ks": ks, "verdict_ks": verdict_ks, "pareto_k": pareto_k, "verdicts": vs, "table": table}
    (out / "comparison.md").write_text(table)
    paths = {"table": str(out / "comparison.md"), "json": str(out / "comparison.json"),
             "pass_at_k_plot": str(p_plot), "pareto_plot": str(p_pareto) if p_pareto else None}
    result["paths"] = paths
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    return result


# ================================================================================================== CLI
def _yaml_mapping(text: Optional[str], what: str) -> Dict[str, Any]:
    import yaml

    if not text:
        return {}
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: not valid YAML: {e}") from None
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{what}: expected a mapping like '{{num_count: 3}}', got {v!r}")
    return v


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passk_rl.evaluate",
                                description="Held-out pass@k of one or more models (subcommands: compare, plot-run; "
                                            "see `python -m passk_rl.evaluate compare -h`).")
    p.add_argument("--model", action="append", required=True,
                   help="HF model dir, run dir (uses its final_model/) or builtin:arith-base; repeatable")
    p.add_argument("--label", action="append", default=None, help="name per --model (default: dir name)")
    p.add_argument("--task", default="arith")
    p.add_argument("--task-params", default=None, help="YAML mapping of task parameters, e.g. '{seed: 0}'")
    p.add_argument("--split", default="test")
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts of the split (default: all)")
    p.add_argument("--n", type=int, default=256, help="samples per prompt")
    p.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="comma-separated k values (each <= n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model")
    p.add_argument("--out", default="eval_out", help="output directory")
    p.add_argument("--num-engines", type=int, default=1)
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine decodes at once")
    p.add_argument("--verifier-workers", type=int, default=1)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-plot", action="store_true")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passk_rl.evaluate compare",
                                description="Compare finished runs: markdown table, pass@k and Pareto plots, verdict.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--k", default="1,4,16,64", help="k values in the tables")
    p.add_argument("--verdict-k", default="1,4,16", help="k values judged")
    p.add_argument("--pareto-k", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--title", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "compare":
            a = _compare_parser().parse_args(argv[1:])
            res = compare(a.run_dirs, a.out, ks=parse_ks(a.k), verdict_ks=parse_ks(a.verdict_k),
                          pareto_k=a.pareto_k, n_boot=a.n_boot, title=a.title)
            print(res["table"])
            print("wrote " + ", ".join(v for v in res["paths"].values() if v))
            return 0
        if argv and argv[0] == "plot-run":
            from passk_rl.plots import plot_run

            if len(argv) != 2:
                print("usage: python -m passk_rl.evaluate plot-run RUN_DIR", file=sys.stderr)
                return 2
            for p in plot_run(argv[1]):
                print(f"wrote {p}")
            return 0
        a = _eval_parser().parse_args(argv)
        ks = parse_ks(a.k)
        check_ks(a.n, ks)  # before anything starts
        evaluate_models(a.model, labels=a.label, task=a.task, task_params=_yaml_mapping(a.task_params, "--task-params"),
                        split=a.split, num_prompts=a.num_prompts, n=a.n, ks=ks, temperature=a.temperature,
                        max_tokens=a.max_tokens, seed=a.seed, out_dir=a.out, num_engines=a.num_engines,
                        kv_cache_gib=a.kv_cache_gib, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                        verifier_workers=a.verifier_workers, n_boot=a.n_boot, plot=not a.no_plot)
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # vLLM spawns processes: the entry point must be guarded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
