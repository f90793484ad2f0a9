"""Verifications per second for each verifier: in-process, and through a VerifierPool of 1 and M Ray actors.

    python benchmarks/bench_verifiers.py                      # gsm8k, math, code (+ arith if present), M=2
    python benchmarks/bench_verifiers.py --n 400 --workers 1,2,4 --verifiers math,code

Workload: the small files under tests/data (or --gsm8k/--math/--code files in the same layouts), each prompt
paired with a right and a wrong completion, repeated to --n samples. Every pool is started and warmed up
before timing; the timed section is one ``pool.verify`` call over all samples (what one training step does).
Prints a table; nothing is asserted (speed targets live here, not in tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passk_rl.tasks import TASKS, Prompt, make_task  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")


def gsm8k_workload(files: List[str]) -> Tuple[Dict, List[Prompt], List[str]]:
    params = {"train_files": files}
    ps = make_task("gsm8k", **params).prompts("train")
    pairs = [(p, f"Step by step... so the result is {p.answer}.\n#### {p.answer}") for p in ps] + [
        (p, "I think it is\n#### 3") for p in ps]
    return params, [p for p, _ in pairs], [c for _, c in pairs]


def math_workload(files: List[str]) -> Tuple[Dict, List[Prompt], List[str]]:
    params = {"train_files": files}
    ps = make_task("math", **params).prompts("train")
    pairs = [(p, f"Reasoning...\nThe answer is $\\boxed{{{p.answer}}}$.") for p in ps] + [
        (p, "so \\boxed{\\frac{7}{3}}") for p in ps]
    return params, [p for p, _ in pairs], [c for _, c in pairs]


def code_workload(files: List[str]) -> Tuple[Dict, List[Prompt], List[str]]:
    params = {"train_files": files, "timeout_s": 5.0}
    ps = make_task("code", **params).prompts("train")
    pairs = []
    for p in ps:
        sol = p.meta["canonical_solution"]
        pairs.append((p, sol))
        pairs.append((p, "```python\n" + sol.replace("return", "return None and") + "\n```"))
    return params, [p for p, _ in pairs], [c for _, c in pairs]


def arith_workload(_: List[str]) -> Tuple[Dict, List[Prompt], List[str]]:
    ps = make_task("arith").prompts("train")[:64]
    # Well-formed expressions over the given numbers: some hit the target, most do not.
    sums = ["+".join(map(str, p.answer["numbers"])) for p in ps]
    prods = ["*".join(map(str, p.answer["numbers"])) for p in ps]
    return {}, ps + ps, sums + prods


WORKLOADS: Dict[str, Callable] = {"gsm8k": gsm8k_workload, "math": math_workload, "code": code_workload,
                                  "arith": arith_workload}


def repeat_to(n: int, prompts: List[Prompt], comps: List[str]) -> Tuple[List[Prompt], List[str]]:
    k = -(-n // len(prompts))
    return (prompts * k)[:n], (comps * k)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="samples per measurement")
    ap.add_argument("--workers", default="1,2", help="pool sizes to measure, comma-separated")
    ap.add_argument("--verifiers", default="gsm8k,math,code,arith")
    ap.add_argument("--timeout-s", type=float, default=20.0, help="per-sample limit in the pool")
    ap.add_argument("--num-cpus-per-worker", type=float, default=0.25)
    ap.add_argument("--gsm8k", nargs="+", default=[os.path.join(DATA, "gsm8k", "train.jsonl")])
    ap.add_argument("--math", nargs="+", default=[os.path.join(DATA, "math", "train.jsonl")])
    ap.add_argument("--code", nargs="+", default=[os.path.join(DATA, "code", "humaneval.jsonl"),
                                                  os.path.join(DATA, "code", "mbpp.jsonl")])
    ap.add_argument("--skip-local", action="store_true", help="skip the in-process baseline")
    args = ap.parse_args()

    import ray

    from actors.verifier import VerifierPool

    workers = [int(x) for x in args.workers.split(",") if x]
    names = [v for v in args.verifiers.split(",") if v]
    files = {"gsm8k": args.gsm8k, "math": args.math, "code": args.code, "arith": []}
    ray.init(address="local", num_cpus=max(4, max(workers)), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name in names:
            if name not in TASKS:
                print(f"[skip] task {name!r} is not registered here")
                continue
            params, prompts, comps = WORKLOADS[name](files[name])
            prompts, comps = repeat_to(args.n, prompts, comps)
            if not args.skip_local:
                task = make_task(name, **params)
                warm = getattr(task, "warmup", None)
                if warm:
                    warm()
                t0 = time.perf_counter()
                vs = [task.verify(p, c) for p, c in zip(prompts, comps)]
                dt = time.perf_counter() - t0
                close = getattr(task, "close", None)
                if close:
                    close()
                rows.append((name, "in-process", len(vs), dt, _status_summary(vs)))
            for m in workers:
                pool = VerifierPool(name, params, num_workers=m, timeout_s=args.timeout_s,
                                    num_cpus_per_worker=args.num_cpus_per_worker)
                try:
                    pool.verify(prompts[: 4 * m], comps[: 4 * m])  # warm caches in every actor
                    t0 = time.perf_counter()
                    vs = pool.verify(prompts, comps)
                    dt = time.perf_counter() - t0
                finally:
                    pool.shutdown()
                rows.append((name, f"pool M={m}", len(vs), dt, _status_summary(vs)))
            _print_table(rows)
    finally:
        ray.shutdown()
    print(f"\nmachine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; ray {ray.__version__}")
    _print_table(rows)


def _status_summary(vs) -> str:
    counts: Dict[str, int] = {}
    for v in vs:
        counts[v.status] = counts.get(v.status, 0) + 1
    mean = sum(v.reward for v in vs) / max(1, len(vs))
    return " ".join(f"{k}={n}" for k, n in sorted(counts.items())) + f" mean_reward={mean:.2f}"


def _print_table(rows) -> None:
    print(f"\n{'verifier':<8} {'mode':<11} {'samples':>7} {'seconds':>8} {'verif/s':>9}  statuses")
    for name, mode, n, dt, summary in rows:
        print(f"{name:<8} {mode:<11} {n:>7} {dt:>8.2f} {n / dt:>9.1f}  {summary}")


if __name__ == "__main__":
    main()
