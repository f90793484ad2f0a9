"""End-to-end throughput: run N training steps of a config and print samples/s, generated tokens/s and the
share of each phase (generate, verify, stats, shape, update, sync, log) in the step time.

    python benchmarks/bench_e2e.py --config configs/tiny_cpu.yaml --steps 6 [dotted.key=value ...]

Starts a private local Ray cluster (or joins the job's), evaluation off; the first step is reported apart as
warm-up. Figures go to stdout and, as JSON, to runs/<run_name>/bench_e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passk_rl.metrics import PHASES, read_jsonl  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from passk_rl.config import load_config
    from passk_rl.trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, f"run.steps={args.steps}", "eval.enabled=false",
                                    f"run.name=bench-e2e-{int(time.time())}"])
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
    phase = {p: sum(r["phase_seconds"].get(p, 0.0) for r in steady) for p in PHASES}
    out = {
        "config": args.config, "overrides": args.overrides, "steps": len(recs), "setup_seconds": setup_s,
        "warmup_step_seconds": recs[0]["step_seconds"],
        "step_seconds_mean": step_s / len(steady), "samples_per_s": samples / step_s,
        "gen_tokens_per_s_generate_phase": tokens / max(phase["generate"], 1e-9),
        "gen_tokens_per_s_step": tokens / step_s,
        "phase_share": {p: phase[p] / step_s for p in PHASES},
        "samples_per_step": cfg.data.prompts_per_step * cfg.generator.n,
    }
    print(f"\nbench_e2e  {args.config}  {' '.join(args.overrides)}")
    print(f"  setup (actors up)          {setup_s:8.1f} s")
    print(f"  step (steady, {len(steady)} steps)     {out['step_seconds_mean']:8.2f} s   "
          f"(first step {out['warmup_step_seconds']:.2f} s)")
    print(f"  samples/s                  {out['samples_per_s']:8.1f}   ({out['samples_per_step']} per step)")
    print(f"  generated tokens/s         {out['gen_tokens_per_s_generate_phase']:8.0f} in generate, "
          f"{out['gen_tokens_per_s_step']:.0f} over the step")
    print("  phase share of step time:  " + "  ".join(f"{p} {100 * s:.1f}%" for p, s in out["phase_share"].items()))
    (trainer.run_dir / "bench_e2e.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
