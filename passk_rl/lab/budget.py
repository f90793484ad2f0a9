"""Run sizes for --quick and full lab runs (one place, so the report can print them)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Budget:
    quick: bool
    seeds: int                     # independent seeds for training experiments
    mc_groups: int                 # Monte-Carlo groups per case in the bias check
    bias_ns: Tuple[int, ...]
    p_grid: Tuple[float, ...]      # success rates for the exact bias table
    var_ns: Tuple[int, ...]
    var_points: int                # log-spaced p values in the variance sweep
    n_prompts: int                 # training prompts (and as many held-out prompts)
    n_answers: int
    n_features: int
    group_n: int                   # samples per prompt per step in the phase experiments
    steps: int                     # training steps in the phase experiments
    lr: float
    eval_every: int
    exact_phase1: bool             # also train phase-1 methods with the exact expected update
    phase2_ks: Tuple[int, ...]
    cx_ks: Tuple[int, ...]
    cx_p0: Tuple[float, ...]
    cx_reps: int                   # replicate prompts per (K, p0) in the complexity experiment
    cx_cap: int                    # step cap in the complexity experiment
    cx_lr: float


def make_budget(quick: bool, seeds: Optional[int] = None) -> Budget:
    if seeds is not None and seeds < 2:
        raise ValueError(f"--seeds must be >= 2 to give a confidence interval, got {seeds}")
    if quick:
        s = seeds or 3
        return Budget(quick=True, seeds=s, mc_groups=20000, bias_ns=(4, 8, 64),
                      p_grid=(1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8), var_ns=(16,), var_points=7,
                      n_prompts=96, n_answers=32, n_features=16, group_n=64, steps=100, lr=0.02, eval_every=10,
                      exact_phase1=False, phase2_ks=(1, 4, 16, 64), cx_ks=(1, 4, 16, 64), cx_p0=(0.01,),
                      cx_reps=4 * s, cx_cap=600, cx_lr=0.1)
    s = seeds or 8
    return Budget(quick=False, seeds=s, mc_groups=100000, bias_ns=(4, 8, 16, 64),
                  p_grid=(1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8), var_ns=(16, 64), var_points=13,
                  n_prompts=256, n_answers=32, n_features=16, group_n=64, steps=150, lr=0.02, eval_every=10,
                  exact_phase1=True, phase2_ks=(1, 2, 4, 8, 16, 32, 64), cx_ks=(1, 2, 4, 8, 16, 32, 64),
                  cx_p0=(0.001, 0.01), cx_reps=4 * s, cx_cap=3000, cx_lr=0.1)
