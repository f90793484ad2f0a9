"""passk-rl against a single-process peer on the same work: TRL's GRPOTrainer (HF generate, one process) and
passk-rl's loop (vLLM engine + 2 DeepSpeed ranks + verifier actors), same base model, task, 64 prompts × 16
samples of ≤ 32 tokens per step, GRPO advantage, measured in one invocation, interleaved (A B A B …), so the
ratio is not a comparison across differently loaded moments of this shared machine.

    python benchmarks/bench_trl.py --trl-python /path/to/venv-with-trl/bin/python [--steps 8] [--rounds 2]
        [--variant NAME="dotted.key=value ..."]...

TRL is not a dependency of passk-rl: give a Python where `pip install trl==1.16.0` was run (its own venv keeps
passk-rl's pinned packages untouched), e.g. `python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0
"transformers<5.20" trl==1.16.0 datasets`. The first step of every run is warm-up and left out.
"""

from __future__ import annotations

import argparse
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

from bench_e2e import run_variant  # noqa: E402


def run_trl(python: str, steps: int, out_dir: Path, tag: str) -> dict:
    from passk_rl.tasks.make_base import BUILTIN_DIR

    out = out_dir / f"trl-{tag}.json"
    r = subprocess.run([python, str(ROOT / "benchmarks" / "_trl_grpo_worker.py"), "--model", str(BUILTIN_DIR),
                        "--steps", str(steps), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false"))
    if r.returncode != 0:
        raise RuntimeError(f"the TRL run failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    res = json.loads(out.read_text())
    steady = res["step_seconds"][1:] or res["step_seconds"]
    return {"samples_per_s": res["samples_per_step"] * len(steady) / sum(steady),
            "step_seconds_mean": sum(steady) / len(steady), "setup_seconds": res["setup_seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", required=True, help="a Python interpreter with trl installed")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="k=v ..."')
    args = ap.parse_args()
    check = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"error: {args.trl_python} cannot import trl ({check.stderr.strip()[-300:]}); see this script's "
              f"docstring for how to make one", file=sys.stderr)
        return 2
    # GRPO with the group std, as TRL's loss_type grpo; the same batch, lr and length as the TRL run
    common = ["algorithm.shaping=grpo", "algorithm.p_hat_source=group", "schedule.kind=fixed", "schedule.params={k: 1}",
              "data.prompts_per_step=64", "generator.n=16", "generator.max_tokens=32", "learner.lr=3e-4"]
    variants = {"passk-rl sync": "algorithm.max_staleness=0"}
    for v in args.variant:
        name, _, spec = v.partition("=")
        variants[name] = spec
    out_dir = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    res = {"trl": []} | {name: [] for name in variants}
    for rnd in range(args.rounds):
        print(f"[bench_trl] round {rnd + 1}/{args.rounds}: TRL {check.stdout.strip()}", flush=True)
        res["trl"].append(run_trl(args.trl_python, args.steps, out_dir, str(rnd)))
        for name, spec in variants.items():
            print(f"[bench_trl] round {rnd + 1}/{args.rounds}: {name}", flush=True)
            res[name].append(run_variant(args.config, [*common, *shlex.split(spec)], args.steps, out_dir,
                                         f"{name.replace(' ', '_')}-{rnd}"))
    mean = {name: sum(r["samples_per_s"] for r in rs) / len(rs) for name, rs in res.items()}
    print(f"\nsamples/s, steady ({args.steps} steps per run, first left out; {args.rounds} interleaved round(s)):")
    for name in res:
        per = ", ".join(f"{r['samples_per_s']:.1f}" for r in res[name])
        print(f"  {name:<22} {mean[name]:8.1f}   ({per})   × TRL {mean[name] / mean['trl']:.2f}")
    (out_dir / "bench_trl.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out_dir / 'bench_trl.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
