"""passk-rl against a single-process peer on the same work: TRL's GRPOTrainer (HF generate, one process) and
passk-rl's loop (vLLM engine + DeepSpeed ranks + verifier actors), same base model, task, prompts per step, samples
per prompt, answer length limit, learning rate and GRPO loss, measured in one invocation, interleaved
(TRL, sync, async, TRL, sync, async, …), so the ratios are not comparisons across differently loaded moments of this
shared machine.

    python benchmarks/bench_trl.py [--config configs/tiny_cpu.yaml] [--trl-python /tmp/trlvenv/bin/python]
        [--steps 8] [--rounds 1] [--variant NAME="dotted.key=value ..."]... [--json FILE]

Workloads: the toy one (``configs/tiny_cpu.yaml``, the default: 0.4 M parameters, 64 prompts × 16 samples of
≤ 32 tokens) and the compute-dominated one (``configs/bench_medium.yaml``: ~20 M parameters, 8 prompts × 8 samples
of ≤ 192 tokens; its model is built here when missing, ``passk_rl.tasks.make_bench_model``). The config defines the
work; both sides train with GRPO (group-normalised advantages, each answer's token mean averaged over answers:
TRL's ``loss_type grpo`` = passk-rl's ``learner.aggregation seq_mean_token_mean``). Variants: ``passk-rl sync``
(``algorithm.max_staleness=0``) and ``passk-rl async`` (``max_staleness=1`` with truncated importance weights), plus
any ``--variant``. Reported: steady samples/s and generated tokens/s (the first step of every run is warm-up and
left out), each as a ratio to TRL, next to the issue-18 targets; the figures also go to ``--json``.

TRL is not a dependency of passk-rl: give a Python where TRL was installed into its own venv (passk-rl's pinned
packages stay untouched), e.g. ``python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0
transformers==5.19.0 "trl==1.16.*" datasets`` (torch 2.13.0 CPU is the wheel passk-rl's venv uses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_e2e import machine_note, resolve_bench_model, run_variant  # noqa: E402

# GRPO on both sides, whatever the config's own shaping (the toy config trains Pass@K by default)
GRPO = ["algorithm.shaping=grpo", "algorithm.p_hat_source=group", "schedule.kind=fixed", "schedule.params={k: 1}",
        "learner.aggregation=seq_mean_token_mean"]
DEFAULT_VARIANTS = {"passk-rl sync": "algorithm.max_staleness=0",
                    "passk-rl async": "algorithm.max_staleness=1 learner.off_policy=tis"}
# issue 18's targets: samples/s as a multiple of TRL's, per workload (config file name)
TARGETS = {"tiny_cpu": {"passk-rl sync": 1.0}, "bench_medium": {"passk-rl sync": 1.5, "passk-rl async": 1.7}}


def run_trl(python: str, cfg, model_path: str, steps: int, out_dir: Path, tag: str, threads: int = 2) -> dict:
    out = out_dir / f"trl-{tag}.json"
    cmd = [python, str(ROOT / "benchmarks" / "_trl_grpo_worker.py"), "--model", model_path, "--steps", str(steps),
           "--task", cfg.task.name, "--task-params", json.dumps(cfg.task.params), "--split", cfg.task.train_split,
           "--prompts", str(cfg.data.prompts_per_step), "--n", str(cfg.generator.n),
           "--max-tokens", str(cfg.generator.max_tokens), "--lr", str(cfg.learner.lr),
           "--micro-batch", str(cfg.learner.micro_batch_size), "--loss-type", "grpo", "--threads", str(threads),
           "--out", str(out)]
    load_before = os.getloadavg()[0]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false"))
    if r.returncode != 0:
        raise RuntimeError(f"the TRL run failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    res = json.loads(out.read_text())
    skip = 1 if len(res["step_seconds"]) > 1 else 0
    steady = res["step_seconds"][skip:]
    tokens = res.get("gen_tokens", [])[skip:]
    return {"command": shlex.join(cmd), "samples_per_s": res["samples_per_step"] * len(steady) / sum(steady),
            "gen_tokens_per_s_step": sum(tokens) / sum(steady) if len(tokens) == len(steady) else None,
            "step_seconds_mean": sum(steady) / len(steady), "setup_seconds": res["setup_seconds"],
            "step_seconds": res["step_seconds"], "gen_tokens": res.get("gen_tokens"),
            "samples_per_step": res["samples_per_step"], "load_average_1min": [load_before, os.getloadavg()[0]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="a Python interpreter with trl installed")
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first is warm-up, left out)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="k=v ..."',
                    help="another passk-rl variant, beside the default sync and async ones")
    ap.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the TRL process (on a loaded machine 2 threads that must meet at every "
                         "operator can run far slower than 1; see docs/results/speed/report.md)")
    ap.add_argument("--json", default=None, help="also write the figures here (default: in the run directory)")
    args = ap.parse_args()
    check = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"error: {args.trl_python} cannot import trl ({check.stderr.strip()[-300:]}); see this script's "
              f"docstring for how to make one", file=sys.stderr)
        return 2
    from passk_rl.config import load_config

    model_path = resolve_bench_model(args.config)
    cfg = load_config(args.config, [*GRPO, f"model.path={model_path}"])
    variants = dict(DEFAULT_VARIANTS)
    for v in args.variant:
        name, _, spec = v.partition("=")
        variants[name] = spec
    out_dir = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    started = datetime.datetime.now(datetime.timezone.utc)
    res = {"trl": []} | {name: [] for name in variants}
    path = Path(args.json) if args.json else out_dir / "bench_trl.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "bench_trl", "config": args.config, "started_utc": started.isoformat(timespec="seconds"),
           "command": shlex.join([sys.executable, *sys.argv]), "steps": args.steps, "rounds": args.rounds,
           "trl_version": check.stdout.strip(), "variants": variants, "runs": res, "summary": None}
    for rnd in range(args.rounds):
        print(f"[bench_trl] round {rnd + 1}/{args.rounds}: TRL {check.stdout.strip()}", flush=True)
        res["trl"].append(run_trl(args.trl_python, cfg, model_path, args.steps, out_dir, str(rnd), args.trl_threads))
        path.write_text(json.dumps(doc, indent=2))  # what is done so far, should a later run fail or be stopped
        for name, spec in variants.items():
            print(f"[bench_trl] round {rnd + 1}/{args.rounds}: {name}", flush=True)
            res[name].append(run_variant(args.config, [*GRPO, f"model.path={model_path}", *shlex.split(spec)],
                                         args.steps, out_dir, f"{name.replace(' ', '_')}-{rnd}"))
            path.write_text(json.dumps(doc, indent=2))

    def mean(name: str, key: str):
        vals = [r[key] for r in res[name] if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    targets = TARGETS.get(Path(args.config).stem, {})
    g = cfg.generator
    print(f"\nbench_trl  {args.config}  ({cfg.data.prompts_per_step} prompts × {g.n} samples of ≤ {g.max_tokens} tokens "
          f"per step, lr {cfg.learner.lr:g}, GRPO; {args.steps} steps per run, first left out; {args.rounds} "
          f"interleaved round(s); {machine_note()})")
    print(f"{'':<18} {'samples/s':>10} {'× TRL':>7} {'gen tok/s':>10} {'× TRL':>7} {'step s':>8} {'setup s':>8}  target")
    summary = {}
    for name in res:
        sps, tps = mean(name, "samples_per_s"), mean(name, "gen_tokens_per_s_step")
        base_t = mean("trl", "gen_tokens_per_s_step")
        x = sps / mean("trl", "samples_per_s")
        xt = tps / base_t if tps and base_t else None
        tgt = targets.get(name)
        verdict = "" if tgt is None else f"≥ {tgt:.1f}× TRL: {'met' if x >= tgt else f'missed by {tgt - x:.2f}×'}"
        print(f"{name:<18} {sps:10.1f} {x:7.2f} {tps or float('nan'):10.0f} {xt or float('nan'):7.2f} "
              f"{mean(name, 'step_seconds_mean'):8.1f} {mean(name, 'setup_seconds'):8.1f}  {verdict}")
        summary[name] = {"samples_per_s": sps, "x_trl_samples": x, "gen_tokens_per_s": tps, "x_trl_tokens": xt,
                         "step_seconds": mean(name, "step_seconds_mean"), "target_x_trl": tgt,
                         "target_met": None if tgt is None else x >= tgt}
    doc.update(machine=machine_note(), summary=summary)
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
