"""Experiments on the real pipeline: methods × learning rates × seeds, one paired evaluation, a computed report.

    python -m passk_rl.experiment configs/experiments/NAME.yaml [--dry-run] [--until tune|final|eval|report]
                                  [--force] [--set dotted.key=value ...]

What it does, in order (every training run is ``python -m passk_rl.launch`` in a subprocess with its own private
Ray cluster, so a run here is exactly a run a user launches):

1. **tune** — every method trains once on the tuning seed at each learning rate of its grid (``lr: tune``), at
   a fixed rate (``lr: 3.0e-4``) or at the rate another method chose (``lr: <method>``). All these models are
   evaluated on the *validation* split (carved from train, never the test split) in one paired evaluation, and
   each method keeps the rate with the best validation pass@K for the K it trains for (``trains_for``; pass@1
   for pass@1 methods).
2. **final** — finalists train on every seed of ``seeds`` at their chosen rate: the ``finalists.baselines`` best
   pass@1 baselines (by validation pass@1) and the ``finalists.candidates`` best pass@K methods (by validation
   pass@K), plus methods that list their own ``seeds``. The others stay one-seed breadth runs.
3. **eval** — the base model and every chosen-rate model (all seeds) on the test split: same prompts, same
   sampling seeds (common random numbers), one engine whose weights are swapped in place between models.
4. **report** — ``<out>/report.md``, ``summary.json``, ``pass_at_k.png`` (curves with bands),
   ``pareto.png`` (pass@1 vs pass@K, every seed and the method means), ``training.png`` (reward per step). Every
   interval includes seed-to-seed variation: a two-level bootstrap over seeds and problems, with a Student-t
   interval over the per-seed means beside it. "best pass@K method" and "best pass@1 baseline" are chosen on the
   validation split; the test split only measures them.

Nothing is redone that is done: a finished run (``final_model/`` and the same resolved config) and an
evaluation made with the same settings of the same weights (sha256) are reused, so an interrupted experiment
resumes where it stopped; ``--force`` redoes runs. A bad experiment file or run config is an error naming the
key before anything starts. ``--dry-run`` prints the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from passk_rl import evaluation
from passk_rl.config import Config, ConfigError, config_from_dict, to_dict
from passk_rl.experiment_plan import ROOT, ExperimentError, ExperimentSpec, Planner, Run, load_experiment


# ================================================================================================ running
def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _same_config(saved: Path, cfg: Config) -> bool:
    """Whether a finished run's config.yaml is ``cfg``: the saved YAML is re-read into today's config tree (keys
    added since then take their defaults), so an unrelated new option does not invalidate finished runs."""
    try:
        old = config_from_dict(yaml.safe_load(saved.read_text()))
    except (ConfigError, yaml.YAMLError, OSError):
        return False
    a, b = to_dict(old), to_dict(cfg)
    for d in (a, b):
        for key in ("output_dir", "overwrite", "resume"):  # where and how it was launched, not what was trained
            d["run"].pop(key, None)
    return a == b


def run_finished(run: Run) -> bool:
    return (run.model_dir / "config.json").is_file() and (run.run_dir / "summary.json").is_file()


class Runner:
    def __init__(self, spec: ExperimentSpec, planner: Planner, *, force: bool = False, dry_run: bool = False):
        self.spec, self.planner, self.force, self.dry_run = spec, planner, force, dry_run
        self.logs = planner.runs_dir / "logs"
        self.t0 = time.perf_counter()
        self.trained = 0
        self.train_seconds = 0.0
        self.pending_total = 0
        self.forced: set = set()

    # ------------------------------------------------------------------------------------------ training
    def state(self, run: Run) -> str:
        if self.force and run.name not in self.forced:
            return "train"
        if not run_finished(run):
            return "train"
        if not _same_config(run.run_dir / "config.yaml", run.cfg):
            raise ExperimentError(f"{run.run_dir} holds a finished run made with another config than {run.name} "
                                  f"resolves to now; use --force to retrain it, or another runs_dir")
        return "done"

    def train(self, runs: Sequence[Run], stage: str) -> None:
        todo = [r for r in runs if self.state(r) == "train"]
        done = len(runs) - len(todo)
        _log(f"{stage}: {len(runs)} runs, {done} finished earlier (reused), {len(todo)} to train")
        for i, r in enumerate(todo, start=1):
            c = r.cfg
            what = (f"{stage} [{i}/{len(todo)}] {r.name}: {c.algorithm.shaping}, {c.run.steps} steps × "
                    f"{c.data.prompts_per_step} prompts × n={c.generator.n}")
            if self.dry_run:
                print(f"  {what}\n    python -m passk_rl.launch --config {self.planner.base} "
                      + " ".join(shlex.quote(o) for o in r.overrides))
                continue
            eta = ""
            if self.trained:
                per = self.train_seconds / self.trained
                eta = f"  (~{per / 60:.1f} min/run, ~{per * (len(todo) - i + 1) / 60:.0f} min left in this stage)"
            _log(what + eta)
            t0 = time.perf_counter()
            self._launch(r)
            self.trained += 1
            self.train_seconds += time.perf_counter() - t0
            self.forced.add(r.name)
            _log(f"{r.name}: trained in {(time.perf_counter() - t0) / 60:.1f} min "
                 f"(experiment so far {(time.perf_counter() - self.t0) / 60:.0f} min)")

    def _launch(self, run: Run) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{run.name}.train.log"
        # an unfinished run's directory (a crash, an interrupted experiment) is replaced, never mixed into
        cmd = [sys.executable, "-m", "passk_rl.launch", "--config", str(self.planner.base), *run.overrides,
               "run.overwrite=true"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   TOKENIZERS_PARALLELISM="false")
        # (a slow Ray start is retried inside the launch: cluster/ray_init.py)
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode == 0 and run_finished(run):
            return
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"training {run.name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_dir(self, split: str, num_prompts: int, n: int, seed: int, temperature: float) -> Path:
        return self.planner.runs_dir / "evals" / f"{split}-p{num_prompts}-n{n}-seed{seed}-T{temperature:g}"

    def evaluate(self, models: Dict[str, Path], *, split: str, num_prompts: int, n: int, ks: Sequence[int],
                 seed: int, temperature: float, stage: str) -> Dict[str, Dict[str, Any]]:
        """{label: evaluation} of each model dir on ``split``; evaluations of the same weights with the same
        settings are reused. All new ones run in one process on one engine (weights swapped in place)."""
        from passk_rl.evaluate import evaluate_models

        d = self.eval_dir(split, num_prompts, n, seed, temperature)
        out: Dict[str, Dict[str, Any]] = {}
        todo: Dict[str, Path] = {}
        for label, path in models.items():
            f = d / f"{label}.json"
            sha = _weights_sha(path) if path.exists() else None
            if f.is_file() and not self.dry_run:
                res = json.loads(f.read_text())
                if res.get("weights_sha256") == sha and set(map(int, ks)) <= {int(k) for k in res["pass_at_k"]}:
                    out[label] = res
                    continue
            todo[label] = path
        _log(f"{stage}: {len(models)} models on {split} ({num_prompts} prompts × n={n}), {len(out)} evaluated "
             f"earlier (reused), {len(todo)} to evaluate")
        if not todo or self.dry_run:
            return out
        cfg = self.planner.run(self.spec.methods[0].name, self.spec.tune.lrs[0], self.spec.tune.seed).cfg
        t0 = time.perf_counter()
        res = evaluate_models([str(p) for p in todo.values()], labels=list(todo), task=cfg.task.name,
                              task_params=cfg.task.params, split=split, num_prompts=num_prompts, n=n, ks=ks,
                              temperature=temperature, max_tokens=cfg.generator.max_tokens, seed=seed, out_dir=d,
                              max_model_len=cfg.model.max_model_len, dtype=cfg.model.dtype, plot=False,
                              log=lambda m: _log(f"{stage}: {m}"))
        for label, r in res.items():
            r["weights_sha256"] = _weights_sha(todo[label])
            (d / f"{label}.json").write_text(json.dumps(r, indent=1))
            out[label] = r
        _log(f"{stage}: evaluated {len(todo)} models in {(time.perf_counter() - t0) / 60:.1f} min")
        return out


def _weights_sha(model_dir: Path) -> str:
    from passk_rl.files import sha256_file

    return sha256_file(Path(model_dir) / "model.safetensors")


def _metric(res: Dict[str, Any], k: int) -> float:
    return float(res["pass_at_k"][str(k)]["mean"])


def rank_on_validation(spec: ExperimentSpec, val_at) -> Tuple[List[str], List[str]]:
    """Baselines by validation pass@1, best first; candidates by validation pass@K, those keeping pass@1 within
    ``pass1_slack`` of the best baseline first. Only the validation split decides; the test split measures."""
    baselines = sorted(spec.baselines, key=lambda m: -val_at(m, 1))
    floor = (val_at(baselines[0], 1) - spec.pass1_slack) if baselines and spec.pass1_slack is not None else -math.inf
    candidates = sorted(spec.candidates, key=lambda m: (val_at(m, 1) < floor, -val_at(m, spec.k)))
    return baselines, candidates


# ================================================================================================ stages
@dataclasses.dataclass
class Outcome:
    chosen_lr: Dict[str, float]
    val: Dict[str, Dict[str, Any]]  # run name -> validation evaluation
    finalists: List[str]
    seeds: Dict[str, List[int]]  # method -> seeds with a finished run at the chosen lr
    test: Dict[str, Dict[str, Any]]  # run name (and "base") -> test evaluation


def execute(spec: ExperimentSpec, *, until: str = "report", force: bool = False, dry_run: bool = False) -> Outcome:
    planner = Planner(spec)
    planner.check_all()
    runner = Runner(spec, planner, force=force, dry_run=dry_run)
    t = spec.tune
    chosen: Dict[str, float] = {}
    val: Dict[str, Dict[str, Any]] = {}

    # 1. tune: own grids / fixed rates first, then the methods that borrow a chosen rate.
    for group in ([m for m in spec.methods if not (isinstance(m.lr, str) and m.lr != "tune")],
                  [m for m in spec.methods if isinstance(m.lr, str) and m.lr != "tune"]):
        if not group:
            continue
        runs = [planner.run(m.name, lr, t.seed) for m in group for lr in planner.grid(m.name, chosen)]
        runner.train(runs, "tune")
        val.update(runner.evaluate({r.name: r.model_dir for r in runs}, split=t.split, num_prompts=t.num_prompts,
                                   n=t.n, ks=sorted({1, spec.k, *(planner.trains_for(m.name) for m in group)}),
                                   seed=t.eval_seed, temperature=spec.eval.temperature, stage="tune"))
        for m in group:
            grid = planner.grid(m.name, chosen)
            if dry_run:
                chosen[m.name] = grid[0]
                continue
            k = planner.trains_for(m.name)
            scores = [(_metric(val[planner.run(m.name, lr, t.seed).name], k), lr) for lr in grid]
            chosen[m.name] = max(scores)[1]
            if len(grid) > 1:
                _log(f"tune: {m.name} → lr {chosen[m.name]:g} (validation pass@{k}: "
                     + ", ".join(f"{lr:g}: {s:.3f}" for s, lr in scores) + ")")
    if until == "tune":
        return Outcome(chosen, val, [], {}, {})

    # 2. finalists on every seed (chosen on validation: baselines by pass@1, candidates by pass@K).
    def val_at(method: str, k: int) -> float:
        return -math.inf if dry_run else _metric(val[planner.run(method, chosen[method], t.seed).name], k)

    ranked_base, ranked_cand = rank_on_validation(spec, val_at)
    finalists = ranked_base[: spec.finalists.baselines] + ranked_cand[: spec.finalists.candidates]
    seeds = {m.name: sorted(set(m.seeds or (spec.seeds if m.name in finalists else [t.seed])) | {t.seed})
             for m in spec.methods}
    _log(f"final: finalists {finalists} on seeds {spec.seeds}")
    runner.train([planner.run(m, chosen[m], s) for m in seeds for s in seeds[m] if s != t.seed], "final")
    if until == "final":
        return Outcome(chosen, val, finalists, seeds, {})

    # 3. one paired test evaluation of the base and every chosen-rate model.
    e = spec.eval
    models = {"base": Path(_base_model_path(planner))}
    for m, ss in seeds.items():
        for s in ss:
            r = planner.run(m, chosen[m], s)
            models[r.name] = r.model_dir
    test = runner.evaluate(models, split=e.split, num_prompts=e.num_prompts, n=e.n, ks=e.ks, seed=e.seed,
                           temperature=e.temperature, stage="eval")
    return Outcome(chosen, val, finalists, seeds, test)


def _base_model_path(planner: Planner) -> str:
    from passk_rl.models.resolve import resolve_model

    return resolve_model(planner.run(planner.spec.methods[0].name, planner.spec.tune.lrs[0],
                                     planner.spec.tune.seed).cfg.model.path, key="model.path").path


# ================================================================================================ analysis
def analyse(spec: ExperimentSpec, planner: Planner, oc: Outcome) -> Dict[str, Any]:
    """Every number of the report: per method (seed × problem intervals), the chosen pair's differences
    (``passk_rl.evaluation``: the pipeline every held-out number goes through)."""
    e = spec.eval
    base = oc.test["base"]
    ids = base["prompt_ids"]
    for name, res in oc.test.items():
        if res["prompt_ids"] != ids or res["n"] != base["n"]:
            raise ExperimentError(f"evaluation of {name} used other prompts or n than the base's")
    big_k = max(k for k in e.ks if k >= spec.k)
    report_ks = sorted({1, spec.k, big_k, *e.ks})

    def records(method: str, seeds: Sequence[int]) -> List[Dict[str, Any]]:
        return [oc.test[planner.run(method, oc.chosen_lr[method], s).name] for s in seeds]

    methods: Dict[str, Any] = {}
    for m in spec.methods:
        ss = oc.seeds[m.name]
        row = {"label": m.label or m.name, "lr": oc.chosen_lr[m.name], "seeds": ss,
               "trains_for": planner.trains_for(m.name), "finalist": m.name in oc.finalists, "k": {}}
        for k in report_ks:
            row["k"][k] = dataclasses.asdict(evaluation.interval(records(m.name, ss), k, n_boot=spec.n_boot, seed=k))
        methods[m.name] = row
    base_row = {k: dataclasses.asdict(evaluation.interval([base], k, n_boot=spec.n_boot, seed=k)) for k in report_ks}

    t = spec.tune

    def val_at(method: str, k: int) -> float:
        return _metric(oc.val[planner.run(method, oc.chosen_lr[method], t.seed).name], k)

    ranked_base, ranked_cand = rank_on_validation(spec, val_at)
    best_base = ranked_base[0] if ranked_base else None
    best_cand = ranked_cand[0] if ranked_cand else None
    comparison: Dict[str, Any] = {}
    if best_base and best_cand:
        shared = sorted(set(oc.seeds[best_base]) & set(oc.seeds[best_cand]))
        for k in report_ks:
            d = evaluation.difference(records(best_cand, shared), records(best_base, shared), k, n_boot=spec.n_boot,
                                      seed=1000 + k)
            comparison[k] = dataclasses.asdict(d)
        vs_base = evaluation.difference(records(best_cand, oc.seeds[best_cand]), [base], big_k, n_boot=spec.n_boot,
                                        seed=7)
        comparison["vs_base_at_big_k"] = dataclasses.asdict(vs_base)
        comparison["seeds"] = shared
    tuning = {}
    for m in spec.methods:
        grid = planner.grid(m.name, oc.chosen_lr)
        tuning[m.name] = {f"{lr:g}": {str(k): _metric(oc.val[planner.run(m.name, lr, t.seed).name], k)
                                      for k in sorted({1, spec.k, planner.trains_for(m.name)})} for lr in grid}
    return {"k": spec.k, "big_k": big_k, "ks": report_ks, "methods": methods, "base": base_row,
            "best_pass1_baseline": best_base, "best_passk_method": best_cand, "comparison": comparison,
            "tuning": tuning, "num_prompts": len(ids), "n": base["n"]}


def verdict(a: Dict[str, Any], *, max_pass1_loss: float = 0.02) -> Dict[str, Any]:
    """The three conditions of a win, computed: pass@K ahead of the baseline (both seed-level intervals above 0),
    pass@1 lost by at most ``max_pass1_loss`` (the mean difference; its interval is reported beside it), and
    pass@4K not below the base (the mean difference)."""
    c = a["comparison"]
    if not c:
        return {"ok": False, "why": "no baseline/candidate pair"}
    k = a["k"]
    win = c[k]["lo"] > 0 and (math.isnan(c[k]["t_lo"]) or c[k]["t_lo"] > 0)
    p1 = c[1]["mean"] >= -max_pass1_loss
    keep = c["vs_base_at_big_k"]["mean"] >= 0
    return {"pass_at_k_ahead": bool(win), "pass1_within": bool(p1), "pass_big_k_not_below_base": bool(keep),
            "ok": bool(win and p1 and keep)}


# ================================================================================================ report
def _fmt(iv: Dict[str, Any], *, t: bool = False, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    s = f"{f.format(iv['mean'])} [{f.format(iv['lo'])}, {f.format(iv['hi'])}]"
    if t and not math.isnan(iv["t_lo"]):
        s += f" (t: [{f.format(iv['t_lo'])}, {f.format(iv['t_hi'])}])"
    return s


def write_report(spec: ExperimentSpec, planner: Planner, oc: Outcome, a: Dict[str, Any], argv: Sequence[str]) -> Path:
    from passk_rl import plots

    out = planner.out
    out.mkdir(parents=True, exist_ok=True)
    k, big = a["k"], a["big_k"]
    ks = a["ks"]
    v = verdict(a)
    c0 = planner.run(spec.methods[0].name, oc.chosen_lr[spec.methods[0].name], spec.tune.seed).cfg
    curves = {"base": {"pass_at_k": {str(kk): a["base"][kk] for kk in ks}}}
    for name, row in a["methods"].items():
        if row["finalist"]:
            curves[f"{row['label']} ({len(row['seeds'])} seeds)"] = {"pass_at_k": {str(kk): row["k"][kk] for kk in ks}}
    plots.plot_pass_at_k(curves, out / "pass_at_k.png",
                         title="held-out pass@k, finalists (bands: 95 % bootstrap over seeds and problems)")
    pts = {row["label"]: ((row["k"][1]["mean"], row["k"][1]["lo"], row["k"][1]["hi"]),
                          (row["k"][k]["mean"], row["k"][k]["lo"], row["k"][k]["hi"])) for row in a["methods"].values()}
    pts["base"] = ((a["base"][1]["mean"],) * 3, (a["base"][k]["mean"],) * 3)
    seed_pts = {row["label"]: list(zip(row["k"][1]["per_seed"], row["k"][k]["per_seed"]))
                for row in a["methods"].values()}
    plots.plot_pareto(pts, out / "pareto.png", k=k, seed_points=seed_pts,
                      title=f"pass@1 vs pass@{k}: small dots = seeds, markers = method means (95 % CIs)")
    training = {}
    for name, row in a["methods"].items():
        rows = []
        for s in row["seeds"]:
            path = planner.run(name, row["lr"], s).run_dir / "metrics.jsonl"
            rows.append(plots.read_jsonl(path) if path.is_file() else [])
        training[row["label"]] = rows
    plots.plot_training_by_method(training, out / "training.png", keys=("reward_mean", f"pass@{k}" if k in
                                  c0.logging.pass_at_ks else "reward_mean"))

    L = [f"# {spec.name}: does training for pass@{k} beat a tuned pass@1 baseline at pass@{k}?", "",
         "Generated by `python -m passk_rl.experiment` from the runs' numbers; nothing here is written by hand.", "",
         f"Command: `python -m passk_rl.experiment {' '.join(shlex.quote(x) for x in argv)}`", "", "## Setup", "",
         f"- Base model `{c0.model.path}`, task `{c0.task.name}`; every run: {c0.run.steps} steps × "
         f"{c0.data.prompts_per_step} prompts × n = {c0.generator.n} samples (temperature {c0.generator.temperature}, "
         f"≤ {c0.generator.max_tokens} tokens), {c0.learner.world_size} DeepSpeed ZeRO-{c0.learner.zero_stage} ranks, "
         f"vLLM generator, same trainer (`python -m passk_rl.launch`). Equal samples for every method.",
         f"- Learning rate per method: best validation pass@K for the K it trains for over {spec.tune.lrs} "
         f"(seed {spec.tune.seed}; `{spec.tune.split}` split: {spec.tune.num_prompts} prompts × n = {spec.tune.n}, "
         f"carved from the RL puzzles, disjoint from test).",
         f"- Finalists (chosen on validation): {', '.join(f'`{m}`' for m in oc.finalists)} on seeds {spec.seeds}; "
         f"the other methods have one seed (breadth).",
         f"- Test: {a['num_prompts']} `{spec.eval.split}` prompts × n = {a['n']}, sampling seed {spec.eval.seed} for every "
         f"model (paired). Intervals: 95 % two-level bootstrap over training seeds and problems ({spec.n_boot} "
         f"resamples); (t: …) is a Student-t interval over the per-seed means.", "",
         "## Verdict (computed)", ""]
    cmp = a["comparison"]
    if cmp:
        bb, bc = a["best_pass1_baseline"], a["best_passk_method"]
        rule = (f"validation pass@{k} among the candidates whose validation pass@1 is within {spec.pass1_slack} of "
                f"the best baseline's (then the others)" if spec.pass1_slack is not None else f"validation pass@{k}")
        L += [f"Best pass@1 baseline (validation pass@1): **{bb}**; best pass@{k} method ({rule}): **{bc}**; "
              f"paired over seeds {cmp['seeds']}.", "",
              f"| {bc} − {bb} | difference (test) |", "|---|---|"]
        for kk in ks:
            L.append(f"| pass@{kk} | {_fmt(cmp[kk], t=True, signed=True)} |")
        L += ["", f"{bc} − base at pass@{big}: {_fmt(cmp['vs_base_at_big_k'], t=True, signed=True)}", "",
              f"- pass@{k} ahead of the baseline, CI above 0: **{'yes' if v['pass_at_k_ahead'] else 'no'}**",
              f"- pass@1 lost by at most 2 points (mean difference ≥ −0.02): "
              f"**{'yes' if v['pass1_within'] else 'no'}**",
              f"- pass@{big} not below the base (mean difference ≥ 0): "
              f"**{'yes' if v['pass_big_k_not_below_base'] else 'no'}**",
              f"- **all three: {'yes' if v['ok'] else 'no'}**", ""]
    if spec.frontier:
        L += plots.frontier_section(a, spec.frontier, out)
    L += ["## Held-out results per method", "",
          "| method | lr | seeds | " + " | ".join(f"pass@{kk}" for kk in ks) + " |",
          "|---|---|---|" + "---|" * len(ks),
          "| base | — | — | " + " | ".join(_fmt(a["base"][kk]) for kk in ks) + " |"]
    for name, row in a["methods"].items():
        mark = " ★" if row["finalist"] else ""
        L.append(f"| {row['label']}{mark} | {row['lr']:g} | {len(row['seeds'])} | "
                 + " | ".join(_fmt(row["k"][kk]) for kk in ks) + " |")
    L += ["", "★ finalist. One-seed rows carry only the problem-level interval.", "",
          "![pass@k](pass_at_k.png)", "", f"![pass@1 vs pass@{k}](pareto.png)", "", "![training](training.png)", "",
          "## Learning-rate tuning (validation, seed %d)" % spec.tune.seed, "",
          "| method | trains for | " + " | ".join(f"lr {lr:g}" for lr in spec.tune.lrs) + " | chosen |",
          "|---|---|" + "---|" * len(spec.tune.lrs) + "---|"]
    for name, grid in a["tuning"].items():
        kk = str(a["methods"][name]["trains_for"])
        cells = [f"{grid[f'{lr:g}'][kk]:.3f}" if f"{lr:g}" in grid else "—" for lr in spec.tune.lrs]
        L.append(f"| {a['methods'][name]['label']} | pass@{kk} | " + " | ".join(cells)
                 + f" | {oc.chosen_lr[name]:g} |")
    L += ["", f"Validation at the chosen rate (seed {spec.tune.seed}), which picked the pair compared above:", "",
          f"| method | validation pass@1 | validation pass@{k} |", "|---|---|---|"]
    for name in a["methods"]:
        res = oc.val.get(planner.run(name, oc.chosen_lr[name], spec.tune.seed).name)
        if res is not None:
            L.append(f"| {a['methods'][name]['label']} | {_metric(res, 1):.3f} | {_metric(res, k):.3f} |")
    L += ["", "## Methods", ""]
    for m in spec.methods:
        L.append(f"- `{m.name}`: " + ", ".join(f"`{key}={val}`" for key, val in m.overrides.items()))
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")

    summary = {"k": k, "seeds": spec.seeds, "methods": {
        name: {f"pass@{kk}": [row["k"][kk]["mean"], row["k"][kk]["lo"], row["k"][kk]["hi"]] for kk in (1, k, big)}
        | {"seeds": row["seeds"], "lr": row["lr"]} for name, row in a["methods"].items()},
        "base": {f"pass@{kk}": a["base"][kk]["mean"] for kk in (1, k, big)},
        "best_passk_method": a["best_passk_method"], "best_pass1_baseline": a["best_pass1_baseline"]}
    if cmp:
        summary["diff_at_k"] = [cmp[k]["mean"], cmp[k]["lo"], cmp[k]["hi"]]
        summary["diff_at_1"] = [cmp[1]["mean"], cmp[1]["lo"], cmp[1]["hi"]]
        summary["diff_at_k_t"] = [cmp[k]["t_lo"], cmp[k]["t_hi"]]
        summary["diff_at_1_t"] = [cmp[1]["t_lo"], cmp[1]["t_hi"]]
        summary["best_vs_base_at_%d" % big] = [cmp["vs_base_at_big_k"][x] for x in ("mean", "lo", "hi")]
        summary["verdict"] = v
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "analysis.json").write_text(json.dumps(a, indent=1, default=float))
    return path


# ================================================================================================ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m passk_rl.experiment", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="experiment file (configs/experiments/*.yaml)")
    ap.add_argument("--until", choices=("tune", "final", "eval", "report"), default="report",
                    help="stop after this stage")
    ap.add_argument("--force", action="store_true", help="retrain runs that finished earlier")
    ap.add_argument("--dry-run", action="store_true", help="resolve and check everything, print the plan, run nothing")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run (repeatable), e.g. --set run.steps=2")
    args = ap.parse_args(argv)
    try:
        spec = load_experiment(args.experiment, args.sets)
        if args.dry_run:
            Planner(spec).check_all()
        oc = execute(spec, until=args.until, force=args.force, dry_run=args.dry_run)
    except ExperimentError as e:
        print(f"experiment error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"experiment stopped: {e}", file=sys.stderr)
        return 1
    if args.dry_run or args.until != "report":
        return 0
    planner = Planner(spec)
    a = analyse(spec, planner, oc)
    path = write_report(spec, planner, oc, a, argv)
    _log(f"wrote {path} and {path.parent / 'summary.json'}")
    print(path.read_text().split("## Held-out results per method")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
