"""CLI: python -m passk_rl.lab EXPERIMENT [--quick] [--seeds N] [--out DIR]."""

from __future__ import annotations

import argparse
import sys

from passk_rl.lab.experiments import EXPERIMENTS, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passk_rl.lab",
                                 description="Exact policy-gradient lab for the seed's Pass@K claims.")
    ap.add_argument("experiment", choices=EXPERIMENTS + ("all",))
    ap.add_argument("--quick", action="store_true", help="small sizes (all: ~1 min on one core)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds for training experiments (>= 2)")
    ap.add_argument("--out", default="runs/lab", help="output directory (report.md, *.png, results.json)")
    a = ap.parse_args(argv)
    cmd = "python -m passk_rl.lab " + " ".join(sys.argv[1:] if argv is None else argv)
    import matplotlib
    import torch

    matplotlib.use("Agg")
    # the lab's tensors are small: extra intra-op threads only add contention on a shared machine
    torch.set_num_threads(1)
    run(a.experiment, quick=a.quick, seeds=a.seeds, out=a.out, command=cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
