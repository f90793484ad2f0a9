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
    rc, message = 1, ""
    try:
        trainer.setup()
        trainer.train()
        rc = 0
    except RunDirError as e:
        rc, message = 2, f"config error: {e}"
    except TrainingAborted as e:
        rc, message = 4, f"training stopped: {e}"
    except Preempted as e:
        rc, message = 5, f"preempted: {e}"
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
        raise
    finally:
        if message and rc != 1:
            print(message, file=sys.stderr, flush=True)
        trainer.shutdown()
        if rc != 2:  # a refused run directory holds another run: nothing of this one goes there
            write_exit_status(trainer, rc, message)
    return rc


def write_exit_status(trainer, rc: int, message: str) -> None:
    """``<run dir>/exit_status.json``: the exit code, the last step finished and why it stopped, for whoever
    launched the job without seeing its process (scripts/run.sh goes through ``ray job submit``)."""
    import json

    run_dir = Path(trainer.run_dir)
    if not run_dir.is_dir():
        return
    try:
        (run_dir / "exit_status.json").write_text(json.dumps(
            {"code": rc, "last_step": trainer.last_step, "message": message}) + "\n")
    except OSError:
        pass

if __name__ == "__main__":
    # vLLM spawns processes: the entry point must be guarded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
