"""End-to-end throughput of training variants side by side: samples/s, generated tokens/s, the share of each phase
(generate, verify, stats, shape, update, sync, log) in the step time, and each variant's speed as a ratio to the
first one, all measured in this one invocation (this machine is shared and noisy: compare ratios from one run).

    python benchmarks/bench_e2e.py [--config configs/tiny_cpu.yaml] [--steps 8] [--rounds 1]
        [--variant NAME="dotted.key=value ..."]... [dotted.key=value ...]

Default variants: ``sync`` (algorithm.max_staleness=0, today's exact loop) and ``async`` (max_staleness=1 with
truncated importance weights). ``--rounds 2`` runs A B A B … so a drift of the machine's load hits every variant.
Each variant starts its own private Ray cluster and actors; the first step of each is warm-up and left out.
Figures go to stdout and, as JSON, to ``<output_dir>/bench-e2e-<time>/bench_e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passk_rl.metrics import PHASES, read_jsonl  # noqa: E402

DEFAULT_VARIANTS = {"sync": "algorithm.max_staleness=0",
                    "async": "algorithm.max_staleness=1 learner.off_policy=tis"}


def run_variant(config: str, overrides: List[str], steps: int, out_dir: Path, name: str) -> Dict[str, Any]:
    from passk_rl.config import load_config
    from passk_rl.trainer import Trainer

    cfg = load_config(config, [*overrides, f"run.steps={steps}", "eval.enabled=false", f"run.name={name}",
                               f"run.output_dir={out_dir}", "logging.ray_metrics=false", "run.overwrite=true"])
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    try:
        trainer.setup()
        setup_s = time.perf_counter() - t0
        trainer.train()
    finally:
        trainer.shutdown()
    recs = read_jsonl(trainer.run_dir / "metrics.jsonl")
    steady = recs[1:] or recs
    step_s = sum(r["step_seconds"] for r in steady)
    samples = sum(r["samples_per_s"] * r["step_seconds"] for r in steady)
    tokens = sum(r["gen_tokens"] for r in steady)
    gen_s = sum(r.get("rollout_generate_s", r["phase_seconds"]["generate"]) for r in steady)
    phase = {p: sum(r["phase_seconds"].get(p, 0.0) for r in steady) for p in PHASES}
    return {"overrides": overrides, "steps": len(recs), "setup_seconds": setup_s,
            "warmup_step_seconds": recs[0]["step_seconds"], "step_seconds_mean": step_s / len(steady),
            "samples_per_s": samples / step_s, "gen_tokens_per_s_generating": tokens / max(gen_s, 1e-9),
            "gen_tokens_per_s_step": tokens / step_s, "phase_share": {p: phase[p] / step_s for p in PHASES},
            "samples_per_step": cfg.data.prompts_per_step * cfg.generator.n,
            "staleness": [r.get("staleness", 0) for r in recs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="k=v ..."')
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="applied to every variant")
    args = ap.parse_args()
    variants = dict(DEFAULT_VARIANTS)
    if args.variant:
        variants = {}
        for v in args.variant:
            name, _, spec = v.partition("=")
            variants[name] = spec
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench_e2e_"))
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name, spec in variants.items():
            ov = [*args.overrides, *shlex.split(spec)]
            print(f"[bench_e2e] round {rnd + 1}/{args.rounds}: {name} ({' '.join(ov) or 'no overrides'})", flush=True)
            results[name].append(run_variant(args.config, ov, args.steps, out_dir, f"{name}-{rnd}"))

    def mean(name: str, key: str) -> float:
        return sum(r[key] for r in results[name]) / len(results[name])

    first = next(iter(variants))
    print(f"\nbench_e2e  {args.config}  {' '.join(args.overrides)}  ({args.steps} steps per run, first left out; "
          f"{args.rounds} round(s))")
    print(f"{'variant':<12} {'samples/s':>10} {'× ' + first:>10} {'step s':>8} {'tok/s gen':>10} {'setup s':>8}  "
          f"phase shares")
    for name in variants:
        sps = mean(name, "samples_per_s")
        shares = {p: sum(r["phase_share"][p] for r in results[name]) / len(results[name]) for p in PHASES}
        print(f"{name:<12} {sps:10.1f} {sps / mean(first, 'samples_per_s'):10.2f} {mean(name, 'step_seconds_mean'):8.2f} "
              f"{mean(name, 'gen_tokens_per_s_generating'):10.0f} {mean(name, 'setup_seconds'):8.1f}  "
              + " ".join(f"{p} {100 * v:.0f}%" for p, v in shares.items() if v >= 0.005))
    path = out_dir / "bench_e2e.json"
    path.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "variants": variants,
                                "results": results}, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
