"""Phase 1 of the research seed: does shaping with K = k give the best held-out pass@k?

    python scripts/phase1.py [--config configs/experiments/phase1.yaml] [--seeds 0 1] [--methods grpo pkpo_k4 ...]
                             [--out docs/results/phase1] [--runs-dir runs/phase1] [--dry-run] [--force]
                             [--set dotted.key=value ...] [--eval-n N] [--eval-num-prompts N] [--eval-ks 1,2,4]

Steps (each a subprocess, so every one starts and stops its own private local Ray cluster):
1. ``python -m passk_rl.evaluate`` on the base model (once: every run starts from it, and every evaluation uses the
   same prompts and sampling seed);
2. for each method × seed: ``python -m passk_rl.launch`` (training, its own evaluation off), then
   ``python -m passk_rl.evaluate`` on the run directory's final model; the base and final evaluations are merged
   into the run's ``summary.json`` and ``plot_run`` draws its figures;
3. ``passk_rl.evaluate.compare`` over all runs, then ``<out>/report.md``: pass@k tables with CIs (per method pooled
   over seeds, and per run), the plots, and a verdict computed from the numbers for each judged k.

Finished runs (``summary.json`` with ``final_eval``) are skipped unless ``--force``, so an interrupted sweep resumes.
``--dry-run`` resolves and checks every config (unknown keys, K admissible for the shaping at n, placement plan,
eval k ≤ n), prints the commands, and starts nothing; a bad config is an error before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from passk_rl.config import ConfigError, dump_yaml, load_config  # noqa: E402

EXPERIMENT_KEYS = {"base_config", "runs_dir", "seeds", "common", "eval", "report", "methods"}
EVAL_KEYS = {"split", "num_prompts", "n", "ks", "temperature", "seed", "max_tokens"}
REPORT_KEYS = {"ks", "verdict_ks", "pareto_k"}
METHOD_KEYS = {"name", "label", "overrides"}


class ExperimentError(ValueError):
    """A problem in the experiment file or its resolved run configs (names the key / method)."""


@dataclass
class PlannedRun:
    method: str  # name in the experiment file
    label: str
    seed: int
    name: str  # run.name
    run_dir: Path
    overrides: List[str]
    shaping: str
    k: int
    cfg: Any  # resolved passk_rl.config.Config


# ------------------------------------------------------------------------------------------------ planning
def _as_override(key: str, value: Any) -> str:
    """``key=value`` that the launch parser (``yaml.safe_load`` of the value) reads back to ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    if yaml.safe_load(text) != value:
        text = json.dumps(value)  # JSON is YAML
    return f"{key}={text}"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def load_experiment(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    try:
        exp = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(exp, dict):
        raise ExperimentError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(exp) - EXPERIMENT_KEYS)
    if unknown:
        raise ExperimentError(f"{path}: unknown key {unknown[0]!r}; known keys: {sorted(EXPERIMENT_KEYS)}")
    for key in ("base_config", "methods"):
        if key not in exp:
            raise ExperimentError(f"{path}: missing key {key!r}")
    for section, known in (("eval", EVAL_KEYS), ("report", REPORT_KEYS)):
        bad = sorted(set(exp.get(section) or {}) - known)
        if bad:
            raise ExperimentError(f"{path}: unknown key '{section}.{bad[0]}'; known keys: {sorted(known)}")
    if not isinstance(exp["methods"], list) or not exp["methods"]:
        raise ExperimentError(f"{path}: 'methods' must be a non-empty list")
    names = set()
    for i, m in enumerate(exp["methods"]):
        if not isinstance(m, dict) or "name" not in m:
            raise ExperimentError(f"{path}: methods[{i}] must be a mapping with a 'name'")
        bad = sorted(set(m) - METHOD_KEYS)
        if bad:
            raise ExperimentError(f"{path}: methods[{i}] ({m['name']}): unknown key {bad[0]!r}; known: "
                                  f"{sorted(METHOD_KEYS)}")
        if m["name"] in names:
            raise ExperimentError(f"{path}: method name {m['name']!r} appears twice")
        names.add(m["name"])
    return exp


def plan_runs(exp: Dict[str, Any], *, seeds: Sequence[int], methods: Optional[Sequence[str]], runs_dir: Path,
              extra: Sequence[str]) -> List[PlannedRun]:
    """Resolve every run's config (strictly) and check that its K is admissible; raise before anything runs."""
    from passk_rl import shaping
    from passk_rl.plan import make_plan

    base = ROOT / exp["base_config"] if not Path(exp["base_config"]).is_absolute() else Path(exp["base_config"])
    known = [m["name"] for m in exp["methods"]]
    chosen = list(methods) if methods else known
    for name in chosen:
        if name not in known:
            raise ExperimentError(f"--methods: unknown method {name!r}; known: {known}")
    common = [_as_override(k, v) for k, v in (exp.get("common") or {}).items()]
    runs = []
    for m in exp["methods"]:
        if m["name"] not in chosen:
            continue
        own = [_as_override(k, v) for k, v in (m.get("overrides") or {}).items()]
        for seed in seeds:
            name = f"phase1-{m['name']}-s{seed}"
            ov = common + own + [_as_override("run.seed", int(seed)), _as_override("run.name", name),
                                 _as_override("run.output_dir", _rel(runs_dir))] + list(extra)
            try:
                cfg = load_config(base, ov)
            except ConfigError as e:
                raise ExperimentError(f"method {m['name']!r} seed {seed}: {e}") from None
            info = shaping.info(cfg.algorithm.shaping)
            k = int(cfg.schedule.params.get("k", 1)) if cfg.schedule.kind == "fixed" else None
            if k is None:
                raise ExperimentError(f"method {m['name']!r}: phase 1 compares fixed K; schedule.kind is "
                                      f"{cfg.schedule.kind!r}")
            try:
                info.check_k(cfg.generator.n, k)
            except ValueError as e:
                # The trainer would silently move K into range; a phase-1 method must train with the K it names.
                raise ExperimentError(f"method {m['name']!r}: {e} (generator.n={cfg.generator.n})") from None
            if cfg.eval.enabled:
                raise ExperimentError(f"method {m['name']!r}: set eval.enabled=false (phase 1 evaluates the base "
                                      f"model once and each final model with passk_rl.evaluate)")
            try:
                plan = make_plan(cfg)
            except ConfigError as e:
                raise ExperimentError(f"method {m['name']!r} seed {seed}: {e}") from None
            if not plan.fits:
                raise ExperimentError(f"method {m['name']!r} seed {seed}: the placement plan does not fit:\n"
                                      + plan.render())
            runs.append(PlannedRun(method=m["name"], label=str(m.get("label") or m["name"]), seed=int(seed),
                                   name=name, run_dir=runs_dir / name, overrides=ov, shaping=cfg.algorithm.shaping,
                                   k=k if info.uses_k else 1, cfg=cfg))
    if not runs:
        raise ExperimentError("no runs selected")
    first = runs[0].cfg
    for r in runs[1:]:
        for what, a, b in (("model.path", first.model.path, r.cfg.model.path),
                           ("task.name", first.task.name, r.cfg.task.name),
                           ("task.params", first.task.params, r.cfg.task.params),
                           ("generator.max_tokens", first.generator.max_tokens, r.cfg.generator.max_tokens)):
            if a != b:
                raise ExperimentError(f"runs {runs[0].name} and {r.name} differ in {what} ({a!r} vs {b!r}); phase 1 "
                                      f"shares one base evaluation, so every run must start from the same model "
                                      f"and task")
    return runs


def eval_settings(exp: Dict[str, Any], cfg: Any, args: argparse.Namespace) -> Dict[str, Any]:
    from passk_rl.evaluate import check_ks, parse_ks

    e = dict(exp.get("eval") or {})
    s = {"split": e.get("split", cfg.task.eval_split), "num_prompts": int(e.get("num_prompts", cfg.eval.num_prompts)),
         "n": int(e.get("n", 128)), "ks": parse_ks(e.get("ks", [1, 4, 16, 64])),
         "temperature": float(e.get("temperature", 1.0)), "seed": int(e.get("seed", 0)),
         "max_tokens": int(e.get("max_tokens", cfg.generator.max_tokens))}
    if args.eval_n is not None:
        s["n"] = args.eval_n
    if args.eval_num_prompts is not None:
        s["num_prompts"] = args.eval_num_prompts
    if args.eval_ks is not None:
        s["ks"] = parse_ks(args.eval_ks)
    try:
        check_ks(s["n"], s["ks"])
    except ValueError as err:
        raise ExperimentError(f"eval: {err}") from None
    return s


def eval_command(model: str, label: str, out: Path, cfg: Any, ev: Dict[str, Any]) -> List[str]:
    cmd = [sys.executable, "-m", "passk_rl.evaluate", "--model", model, "--label", label, "--out", str(out),
           "--task", cfg.task.name, "--split", ev["split"], "--num-prompts", str(ev["num_prompts"]),
           "--n", str(ev["n"]), "--k", ",".join(map(str, ev["ks"])), "--temperature", str(ev["temperature"]),
           "--max-tokens", str(ev["max_tokens"]), "--seed", str(ev["seed"]),
           "--max-model-len", str(cfg.model.max_model_len), "--no-plot"]
    if cfg.task.params:
        cmd += ["--task-params", json.dumps(cfg.task.params)]
    return cmd


def train_command(exp: Dict[str, Any], run: PlannedRun) -> List[str]:
    return [sys.executable, "-m", "passk_rl.launch", "--config", str(exp["base_config"]), *run.overrides]


def _show(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c if c != sys.executable else "python") for c in cmd)


# ------------------------------------------------------------------------------------------------ running
def run_logged(cmd: Sequence[str], log_path: Path, what: str) -> float:
    """Run ``cmd`` from the repository root with output to ``log_path``; raise with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    print(f"[phase1 {time.strftime('%H:%M:%S')}] {what}: {_show(cmd)}\n    log: {log_path}", flush=True)
    with open(log_path, "w") as fh:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}) after {seconds:.0f}s; last lines of {log_path}:\n"
                           f"{tail}")
    print(f"[phase1 {time.strftime('%H:%M:%S')}] {what}: done in {seconds:.0f}s", flush=True)
    return seconds


def eval_matches(res: Dict[str, Any], ev: Dict[str, Any], model: Optional[str] = None) -> bool:
    """Whether a saved evaluation was made with the settings ``ev`` (and of ``model``, when given)."""
    try:
        same = (res["split"] == ev["split"] and res["num_prompts"] == ev["num_prompts"] and res["n"] == ev["n"]
                and float(res["temperature"]) == ev["temperature"] and res["seed"] == ev["seed"]
                and res["max_tokens"] == ev["max_tokens"] and set(ev["ks"]) <= {int(k) for k in res["pass_at_k"]})
    except (KeyError, TypeError, ValueError):
        return False
    return same and (model is None or res.get("model") == model)


def run_state(run: PlannedRun, ev: Dict[str, Any], *, force: bool) -> str:
    """"train" (no finished run), "evaluate" (trained, final evaluation missing or made with other settings) or
    "done". A finished run made with a different config is an error unless ``force`` (it would be mixed in)."""
    d = run.run_dir
    if force or not (d / "config.yaml").is_file() or not (d / "final_model" / "config.json").is_file():
        return "train"
    if yaml.safe_load((d / "config.yaml").read_text()) != yaml.safe_load(dump_yaml(run.cfg)):
        raise ExperimentError(f"{d} holds a finished run made with a different config than {run.name} resolves to "
                              f"now; use --force to retrain it or another --runs-dir")
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "evaluate"
    final = summary.get("final_eval")
    if "phase1" in summary and isinstance(final, dict) and eval_matches(final, ev):
        return "done"
    return "evaluate"


def merge_summary(run: PlannedRun, base_eval: Dict[str, Any], final_eval: Dict[str, Any], timing: Dict[str, float]) -> None:
    p = run.run_dir / "summary.json"
    summary = json.loads(p.read_text()) if p.is_file() else {"run": run.name}
    summary["base_eval"] = dict(base_eval, step=0)
    summary["final_eval"] = dict(final_eval, step=run.cfg.run.steps)
    summary["phase1"] = {"method": run.method, "label": run.label, "seed": run.seed, "shaping": run.shaping,
                         "k": run.k, "seconds": timing}
    p.write_text(json.dumps(summary, indent=2))


# ------------------------------------------------------------------------------------------------- report
def _outcome_summary(verdicts: Sequence[Dict[str, Any]]) -> List[str]:
    groups: Dict[str, List[int]] = {}
    for v in verdicts:
        groups.setdefault(v["outcome"], []).append(v["k"])
    meaning = {"supported": "the K = k method is ahead by more than the noise",
               "contradicted": "a method trained with another K is ahead by more than the noise",
               "inconclusive": "the difference between the best K = k method and the best other method is within "
                               "the noise",
               "untested": "no K = k method among the runs (or nothing to compare)"}
    return [f"- **{o}** at k ∈ {{{', '.join(map(str, ks))}}}: {meaning[o]}." for o, ks in groups.items()]


def write_report(out: Path, exp_path: Path, exp: Dict[str, Any], runs: Sequence[PlannedRun], ev: Dict[str, Any],
                 cmp: Dict[str, Any], timings: Dict[str, Dict[str, float]], argv: Sequence[str]) -> Path:
    c = runs[0].cfg
    total = sum(v for t in timings.values() for v in t.values() if v is not None)
    lines = [
        "# Phase 1: does shaping with K = k give the best pass@k?", "",
        "Generated by `scripts/phase1.py` from the numbers of the runs listed below; nothing in this file is written "
        "by hand. Rerun the command to regenerate it.", "",
        f"Command: `python scripts/phase1.py {' '.join(shlex.quote(a) for a in argv)}` "
        f"(experiment file `{exp_path.relative_to(ROOT) if exp_path.is_relative_to(ROOT) else exp_path}`).", "",
        "## Setup", "",
        f"- Model: `{c.model.path}` (every run starts from it); task `{c.task.name}`"
        + (f" with parameters `{json.dumps(c.task.params)}`." if c.task.params else "."),
        f"- Training: {c.run.steps} steps × {c.data.prompts_per_step} prompts × n = {c.generator.n} samples "
        f"(temperature {c.generator.temperature}, max {c.generator.max_tokens} tokens), lr {c.learner.lr}, "
        f"{c.learner.world_size} learner ranks (ZeRO-{c.learner.zero_stage}), seeds "
        f"{sorted({r.seed for r in runs})}.",
        f"- Evaluation: {ev['num_prompts']} `{ev['split']}` prompts × n = {ev['n']} samples, temperature "
        f"{ev['temperature']}, sampling seed {ev['seed']} for every model (common random numbers); unbiased pass@k "
        f"(Chen et al. 2021) with 95 % bootstrap CIs over problems.",
        "- Methods (shaping, K it trains for):",
    ]
    seen = set()
    for r in runs:
        if r.method not in seen:
            seen.add(r.method)
            lines.append(f"  - `{r.label}`: `{r.shaping}`, K = {r.k}")
    lines += ["", "## Results", "", cmp["table"].split("\n", 2)[2] if cmp["table"].startswith("# ") else cmp["table"],
              "", "![held-out pass@k per method](pass_at_k.png)", "",
              f"![pass@1 vs pass@{cmp['pareto_k']}](pareto.png)", "",
              "## Verdict (computed)", "", *_outcome_summary(cmp["verdicts"]), "",
              "Training curves per run: " + ", ".join(f"[{r.name}](training/{r.name}.png)" for r in runs), "",
              "## Wall time", "", "| run | train s | eval s |", "|---|---|---|"]
    for name, t in timings.items():
        cells = [f"{t[key]:.0f}" if t.get(key) is not None else "—" for key in ("train", "eval")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Total {total / 60:.1f} min of subprocess wall time (train: training process incl. its Ray "
              f"cluster and actor start; eval: evaluation process incl. its engine start)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/phase1.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/experiments/phase1.yaml", help="experiment file")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment file's seeds")
    p.add_argument("--methods", nargs="+", default=None, help="method names from the experiment file (default: all)")
    p.add_argument("--out", default="docs/results/phase1", help="report, tables and plots go here")
    p.add_argument("--runs-dir", default=None, help="training runs go here (default: the experiment's runs_dir)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra training override for every run (repeatable), e.g. --set run.steps=2")
    p.add_argument("--eval-n", type=int, default=None)
    p.add_argument("--eval-num-prompts", type=int, default=None)
    p.add_argument("--eval-ks", default=None, help="comma-separated k values of the evaluation")
    p.add_argument("--dry-run", action="store_true", help="resolve and check everything, print commands, run nothing")
    p.add_argument("--force", action="store_true", help="rerun runs that already finished")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    exp_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    try:
        exp = load_experiment(exp_path)
        runs_dir = Path(args.runs_dir or exp.get("runs_dir", "runs/phase1"))
        runs_dir = runs_dir if runs_dir.is_absolute() else ROOT / runs_dir
        seeds = args.seeds if args.seeds is not None else [int(s) for s in exp.get("seeds", [0])]
        runs = plan_runs(exp, seeds=seeds, methods=args.methods, runs_dir=runs_dir, extra=args.extra)
        ev = eval_settings(exp, runs[0].cfg, args)
        rep = dict(exp.get("report") or {})
        from passk_rl.evaluate import parse_ks

        report_ks = parse_ks(rep.get("ks", [1, 4, 16, 64]))
        verdict_ks = parse_ks(rep.get("verdict_ks", [1, 4, 16]))
        pareto_k = int(rep.get("pareto_k", max(report_ks)))
        dropped = sorted({k for k in report_ks + verdict_ks + [pareto_k] if k > ev["n"]})
        if dropped:
            # Report columns only (training is unaffected): a smaller --eval-n for a quick check drops them.
            print(f"note: report k {dropped} exceed eval n={ev['n']} and are left out of the report", file=sys.stderr)
            report_ks = [k for k in report_ks if k <= ev["n"]] or [1]
            verdict_ks = [k for k in verdict_ks if k <= ev["n"]] or [1]
            pareto_k = pareto_k if pareto_k <= ev["n"] else max(k for k in ev["ks"] if k <= ev["n"])
    except (ExperimentError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    base_dir = runs_dir / "base_eval"
    base_model = runs[0].cfg.model.path
    base_cmd = eval_command(base_model, "base", base_dir, runs[0].cfg, ev)
    try:
        states = {r.name: run_state(r, ev, force=args.force) for r in runs}
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base_json = base_dir / "base.json"
    base_ok = (not args.force and base_json.is_file()
               and eval_matches(json.loads(base_json.read_text()), ev, model=base_model))

    if args.dry_run:
        print(f"# phase 1: {len(runs)} runs ({len({r.method for r in runs})} methods × seeds {seeds}); "
              f"runs in {runs_dir}, report in {out}")
        print("# base evaluation (once)" + ("  [done: reused]" if base_ok else "") + f"\n{_show(base_cmd)}")
        for r in runs:
            c = r.cfg
            state = states[r.name]
            print(f"\n# {r.name}: {r.label} — shaping {r.shaping}, K={r.k}, n={c.generator.n}, "
                  f"{c.run.steps} steps × {c.data.prompts_per_step} prompts, lr {c.learner.lr}, seed {r.seed}"
                  + {"done": "  [finished: skipped]", "evaluate": "  [trained: evaluation only]", "train": ""}[state])
            if state == "train":
                print(_show(train_command(exp, r)))
            if state != "done":
                print(_show(eval_command(str(r.run_dir), "final", r.run_dir / "final_eval", c, ev)))
        print(f"\n# then: compare({len(runs)} run dirs) → {out}/comparison.md, pass_at_k.png, pareto.png; "
              f"{out}/report.md")
        print(f"\n# resolved config of {runs[0].name}\n{dump_yaml(runs[0].cfg)}")
        return 0

    from passk_rl.evaluate import compare
    from passk_rl.plots import plot_run

    logs = runs_dir / "logs"
    timings: Dict[str, Dict[str, float]] = {}
    try:
        if not base_ok:
            t = run_logged(base_cmd, logs / "base_eval.log", "base evaluation")
            (base_dir / "timing.json").write_text(json.dumps({"eval": t}))
        base_eval = json.loads(base_json.read_text())
        for i, r in enumerate(runs, start=1):
            state = states[r.name]
            if state == "done":
                print(f"[phase1] {r.name}: finished earlier, skipped (--force reruns it)", flush=True)
                continue
            if state == "train":
                t_train = run_logged(train_command(exp, r), logs / f"{r.name}.train.log",
                                     f"[{i}/{len(runs)}] train {r.name}")
            else:
                old = json.loads((r.run_dir / "summary.json").read_text()) if (r.run_dir / "summary.json").is_file() else {}
                t_train = (old.get("phase1") or {}).get("seconds", {}).get("train")
            final_dir = r.run_dir / "final_eval"
            t_eval = run_logged(eval_command(str(r.run_dir), "final", final_dir, r.cfg, ev), logs / f"{r.name}.eval.log",
                                f"[{i}/{len(runs)}] evaluate {r.name}")
            merge_summary(r, base_eval, json.loads((final_dir / "final.json").read_text()),
                          {"train": t_train, "eval": t_eval})
            plot_run(r.run_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept and skipped next time", file=sys.stderr)
        return 130

    # Wall times as recorded when each step ran (also for runs skipped now because they finished earlier).
    if (base_dir / "timing.json").is_file():
        timings["base model"] = json.loads((base_dir / "timing.json").read_text())
    for r in runs:
        timings[r.name] = json.loads((r.run_dir / "summary.json").read_text())["phase1"]["seconds"]
    out.mkdir(parents=True, exist_ok=True)
    cmp = compare([r.run_dir for r in runs], out, ks=report_ks, verdict_ks=verdict_ks, pareto_k=pareto_k,
                  methods={str(r.run_dir): r.label for r in runs}, title="Phase 1")
    (out / "training").mkdir(exist_ok=True)
    for r in runs:
        if (r.run_dir / "training.png").is_file():
            shutil.copyfile(r.run_dir / "training.png", out / "training" / f"{r.name}.png")
    report = write_report(out, exp_path, exp, runs, ev, cmp, timings, argv)
    print(cmp["table"])
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    # The subprocesses start vLLM (which spawns processes); this script itself does not, but keep the guard.
    sys.exit(main())
