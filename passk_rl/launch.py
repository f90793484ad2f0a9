"""Entry point: ``python -m passk_rl.launch --config configs/NAME.yaml [dotted.key=value ...] [--dry-run]``.

Inside a Ray job (``ray job submit -- python -m passk_rl.launch ...``) it joins the job's cluster; otherwise it
joins ``cluster.address`` or starts a private local cluster. The config is loaded and checked, and the
placement plan computed, before any actor starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from passk_rl.config import ConfigError, dump_yaml, installation_problems, load_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m passk_rl.launch", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the config, the placement plan and per-device memory; start nothing")
    p.add_argument("--phase-times", default=None, metavar="METRICS_JSONL",
                   help="with --dry-run: a synchronous run's metrics.jsonl; projects what max_staleness=1 gains")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run.steps=5")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from passk_rl.plan import make_plan

        plan = make_plan(cfg) if (args.dry_run or cfg.cluster.device != "cpu") else None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    problems = installation_problems(cfg)
    if args.dry_run:
        print("# resolved config\n" + dump_yaml(cfg))
        print("# placement and memory plan\n" + plan.render())
        for problem in problems:
            print(f"# note, on this machine: {problem}")
        if args.phase_times:
            import json

            from passk_rl.plan import overlap_projection

            rows = [json.loads(x) for x in Path(args.phase_times).read_text().splitlines() if x.strip()][1:]
            mean = {k: sum(r["phase_seconds"].get(k, 0.0) for r in rows) / max(len(rows), 1)
                    for k in rows[0]["phase_seconds"]} if rows else {}
            print("# overlap (from " + args.phase_times + ")\n" + overlap_projection(mean))
        return 0 if plan.fits else 3
    if problems:
        print("config error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if plan is not None and not plan.fits:
        print("the placement plan does not fit:\n" + plan.render(), file=sys.stderr)
        return 3
    from passk_rl.trainer import Preempted, RunDirError, Trainer, TrainingAborted

    trainer = Trainer(cfg)  # it handles SIGTERM (preemption) once Ray is up: a checkpoint at the step boundary
    try:
        trainer.setup()
        trainer.train()
    except RunDirError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingAborted as e:
        print(f"training stopped: {e}", file=sys.stderr, flush=True)
        return 4
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return 5
    finally:
        trainer.shutdown()
    return 0


if __name__ == "__main__":
    # vLLM spawns processes: the entry point must be guarded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
