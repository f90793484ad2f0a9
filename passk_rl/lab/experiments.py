"""Experiment registry and the driver behind ``python -m passk_rl.lab``."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

from passk_rl.lab import keep, phases, theory
from passk_rl.lab.budget import Budget, make_budget
from passk_rl.lab.report import write

EXPERIMENTS = ("bias", "variance", "phase1", "phase2", "phase3", "complexity", "keep")

INTRO = """**The simulator.** A population of prompts, each with a softmax policy over a finite set of answers (2 of 32
correct), binary rewards, and initial success rates drawn from a mixed difficulty distribution (45 % of prompts
with p < 0.03, 35 % medium, 20 % easy). Two policies: *tabular* (one free logit per prompt and answer; prompts are
independent) and *shared* (logits = base + Φw with one parameter vector w for all prompts: a temperature direction
plus generalising "skill" features whose transfer differs between prompts, so improving one prompt can hurt
another — as in a real model). Exact pass@k per prompt is 1 − (1 − p)^k. Because a shaping is a
permutation-equivariant function of the binary reward vector, its expected update is exactly
D(p)·∇p with D(p) = E_{c'~Bin(n−1,p)}[A₊(c'+1) − A₋(c')] (lab/exact.py), which the Monte-Carlo checks below
confirm with sampled answers. All shapings, p̂ estimators and K schedules are the math core's
(`passk_rl.shaping`, `passk_rl.stats`, `passk_rl.schedule`), used unchanged. Training uses Adam (scale-free, as
in LLM practice), so constant factors of a shaping do not matter, only how it weights prompts and samples.

How to read a verdict: *holds* = the numbers agree with the claim (for comparisons: not significantly beaten);
*fails* = the numbers contradict it; *holds only if / except* = it depends on a condition the numbers isolate;
*inconclusive* / *not supported* = the intervals cannot decide."""


def run_one(name: str, out_dir: str, b: Budget, cache: Dict) -> Dict[str, Any]:
    if name == "bias":
        return theory.exp_bias(out_dir, b)
    if name == "variance":
        return theory.exp_variance(out_dir, b)
    if name == "complexity":
        return theory.exp_complexity(out_dir, b)
    if name == "phase1":
        return phases.exp_phase1(out_dir, b, cache)
    if name == "phase2":
        return phases.exp_phase2(out_dir, b, cache)
    if name == "phase3":
        return phases.exp_phase3(out_dir, b, cache)
    if name == "keep":
        return keep.exp_keep(out_dir, b, cache)
    raise ValueError(f"unknown experiment {name!r}; choose from {EXPERIMENTS + ('all',)}")


def run(experiment: str, *, quick: bool = False, seeds: Optional[int] = None, out: str = "runs/lab",
        command: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Run one experiment (or 'all'), write the report; returns {"report": path, "results": [...]}."""
    names: Sequence[str] = EXPERIMENTS if experiment == "all" else (experiment,)
    for n in names:
        if n not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {n!r}; choose from {EXPERIMENTS + ('all',)}")
    b = make_budget(quick, seeds)
    t0 = time.perf_counter()
    cache: Dict = {}
    results: List[Dict[str, Any]] = []
    for n in names:
        log(f"[lab] {n} ...")
        res = run_one(n, out, b, cache)
        log(f"[lab] {n} done in {res['seconds']:.1f}s")
        results.append(res)
    seconds = time.perf_counter() - t0
    cmd = command or f"python -m passk_rl.lab {experiment}" + (" --quick" if quick else "") + (
        f" --seeds {seeds}" if seeds else "") + f" --out {out}"
    header = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), numpy/torch on CPU",
              "budget": ("quick" if quick else "full") + f", {b.seeds} seeds",
              "run sizes": (f"{b.n_prompts} prompts × n={b.group_n}, {b.steps} steps (phases); MC groups "
                            f"{b.mc_groups}; complexity: {b.cx_reps} prompts per p0, cap {b.cx_cap} steps")}
    path = write(out, results, command=cmd, seconds=seconds, header=header, intro=INTRO)
    log(f"[lab] report: {path} ({seconds:.1f}s)")
    return {"report": path, "results": results, "seconds": seconds}
