"""Throughput of passk_rl.shaping.shape: advantages per second for every shaping.

    python benchmarks/bench_shaping.py                     # the issue's grid, binary rewards
    python benchmarks/bench_shaping.py --threads 2 --dtype float32 --p-hat

Part 1: G = 1024 groups, n in {8, 64, 256}, k in {1, 8, 64}, binary rewards; million samples (advantages)
per second, best of --repeats timed calls after a warm-up ("n/a": the shaping cannot take that k at
that n). Target: >= 10 M samples/s for the binary shapings at n = 64.
Part 2: continuous-reward PKPO (the sorted O(n log n) path) at a fixed total of samples, n from 64 up:
time per sample should grow like log n, i.e. time / (samples * log2 n) stays about flat.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from passk_rl import shaping  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: memoised tables, allocator
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def params_for(name: str, k: int) -> dict:
    return {"weights": {1: 0.5, k: 0.5}} if name == "multi_k" and k > 1 else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=1024)
    ap.add_argument("--ns", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--p-hat", action="store_true", help="pass an external p_hat (G,) to plug-in shapings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"# passk_rl.shaping throughput | torch {torch.__version__} | {platform.processor() or platform.machine()} "
          f"| threads={args.threads} | dtype={args.dtype} | G={args.groups} | p_hat={'external' if args.p_hat else 'group'}")
    print("# binary rewards, M samples/s (best of %d); target >= 10 at n=64\n" % args.repeats)

    header = f"{'shaping':<20} {'n':>5} " + " ".join(f"{'k=' + str(k):>9}" for k in args.ks)
    print(header)
    print("-" * len(header))
    at64 = {}
    for name in shaping.SHAPINGS:
        meta = shaping.info(name)
        for n in args.ns:
            r = torch.randint(0, 2, (args.groups, n), generator=gen).to(dtype)
            p_hat = torch.rand(args.groups, generator=gen, dtype=torch.float64) if args.p_hat and meta.uses_p_hat else None
            cells = []
            for k in args.ks:
                kw = params_for(name, k)
                try:
                    shaping.shape(name, r[:1], k=k, p_hat=None if p_hat is None else p_hat[:1], **kw)
                except ValueError:
                    cells.append(f"{'n/a':>9}")
                    continue
                t = best_time(lambda: shaping.shape(name, r, k=k, p_hat=p_hat, **kw), args.repeats)
                rate = r.numel() / t / 1e6
                cells.append(f"{rate:9.1f}")
                if n == 64:
                    at64[(name, k)] = rate
            print(f"{name:<20} {n:>5} " + " ".join(cells))
    if at64:
        worst = min(at64.items(), key=lambda kv: kv[1])
        print(f"\n# n=64: slowest binary shaping {worst[0][0]} (k={worst[0][1]}) at {worst[1]:.1f} M samples/s; "
              f"target 10 M/s {'met' if worst[1] >= 10 else 'NOT met'}")

    print("\n# continuous rewards, pkpo family (sorted O(n log n) path), fixed total of 2^18 samples")
    header = f"{'shaping':<20} {'k':>4} {'n':>6} {'G':>6} {'ms':>8} {'ns/sample':>10} {'ns/(sample*log2 n)':>19}"
    print(header)
    print("-" * len(header))
    total = 1 << 18
    for name, k in (("pkpo", 8), ("pkpo_loo", 8), ("pkpo_loo_minus_one", 8)):
        for n in (64, 128, 256, 512, 1024, 2048, 4096):
            g = total // n
            r = torch.rand(g, n, generator=gen, dtype=dtype)
            t = best_time(lambda: shaping.shape(name, r, k=k), max(3, args.repeats // 2))
            per = t / r.numel() * 1e9
            print(f"{name:<20} {k:>4} {n:>6} {g:>6} {t * 1e3:8.2f} {per:10.1f} {per / math.log2(n):19.2f}")


if __name__ == "__main__":
    main()
