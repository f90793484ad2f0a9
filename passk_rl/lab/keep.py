"""Phase 4 (issue 20): which recipe gains pass@8 without giving up pass@1, in the simulator.

Every method gets the same samples (n per prompt, the same steps) on the same environments (paired seeds). The
three conditions of the issue, against RLOO (the pass@1 baseline): pass@8 ahead with the paired CI above 0; pass@1
within 2 points (paired mean difference >= -0.02); pass@32 not below the initial policy (the paired CI of
final - initial is not entirely below 0). The Pareto figure of pass@1 against pass@32 draws the frontier traced by
the multi_k mixing weights {1: w, 8: 1 - w} and where every other method lands relative to it.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from passk_rl.lab.budget import Budget
from passk_rl.lab.ci import fmt_ci, mean_ci
from passk_rl.lab.env import pass_at_k_exact
from passk_rl.lab.phases import envs, setup_text
from passk_rl.lab.report import figure, pyplot
from passk_rl.lab.train import Method, train

KS = (1, 8, 32)
BASE = "rloo"
MIX_W = (0.875, 0.75, 0.5, 0.25)  # multi_k weight on pass@1; w = 1 is rloo, w = 0 is pkpo@8
PASS1_TOL = 0.02


def keep_methods(b: Budget) -> Tuple[List[Method], List[Method]]:
    """(frontier: rloo, multi_k mixes, pkpo@8), (the methods placed against it)."""
    half = b.steps // 2
    frontier = [Method(BASE, "rloo")]
    frontier += [Method(f"multi {{1:{w:g}, 8:{1 - w:g}}}", "multi_k", k=8, params=(("weights", ((1, w), (8, 1 - w))),))
                 for w in MIX_W]
    frontier.append(Method("pkpo@8", "pkpo_loo_minus_one", k=8))
    others = [
        Method("rs_grpo β=2", "rs_grpo", params=(("beta", 2.0),)),
        Method("rs_grpo β=4", "rs_grpo", params=(("beta", 4.0),)),
        Method("rs_grpo β=8", "rs_grpo", params=(("beta", 8.0),)),
        Method("w_reinforce λ=0.1", "w_reinforce", params=(("lam", 0.1),)),
        Method("w_reinforce λ=0.5", "w_reinforce", params=(("lam", 0.5),)),
        Method(f"two-stage K=8→1 at step {half}", "pkpo_loo_minus_one", k=1, stats="ema", schedule="two_stage",
               schedule_params=(("k", 8), ("switch_step", half))),
        Method("per-prompt K (k_max=8)", "pkpo_loo", k=1, stats="ema", schedule="per_prompt",
               schedule_params=(("k_min", 1), ("k_max", 8))),
        Method("per-prompt K (k_max=32)", "pkpo_loo", k=1, stats="ema", schedule="per_prompt",
               schedule_params=(("k_min", 1), ("k_max", 32))),
        # coefficients relative to the shaping's mean-convention update; 0.1 already pinned pass@1 near its start
        Method("rloo + fwd-KL ref 0.01", "rloo", ref_coef=0.01),
        Method("rloo + fwd-KL ref 0.03", "rloo", ref_coef=0.03),
        Method("rloo + rev-KL ref 0.01", "rloo", ref_coef=0.01, ref_kind="reverse"),
        Method("pkpo@8 + fwd-KL ref 0.01", "pkpo_loo_minus_one", k=8, ref_coef=0.01),
        Method("per-prompt K (k_max=8) + fwd-KL ref 0.01", "pkpo_loo", k=1, stats="ema", schedule="per_prompt",
               schedule_params=(("k_min", 1), ("k_max", 8)), ref_coef=0.01),
    ]
    return frontier, others


def _runs(methods: Sequence[Method], b: Budget, cache: Dict) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for m in methods:
        runs = []
        for s in range(b.seeds):
            key = ("keep", m, s, b)
            if key not in cache:
                tr, te = envs(b, s)
                cache[key] = train(tr, m, steps=b.steps, n=b.group_n, lr=b.lr, seed=10_000 + s, mode="stochastic",
                                   eval_every=b.eval_every, ks=KS, test_pop=te)
            runs.append(cache[key])
        out[m.label] = runs
    return out


def verdicts(fin: Dict[str, Dict[int, np.ndarray]], init: Dict[int, np.ndarray], labels: Sequence[str]) -> List[Dict]:
    """The issue's three conditions for every method against BASE (paired over seeds)."""
    rows = []
    for lab in labels:
        d8 = mean_ci(fin[lab][8] - fin[BASE][8])
        d1 = mean_ci(fin[lab][1] - fin[BASE][1])
        d32 = mean_ci(fin[lab][32] - init[32])
        ok8, ok1, ok32 = d8["lo"] > 0, d1["mean"] >= -PASS1_TOL, d32["hi"] >= 0
        rows.append({"method": lab, "d8": d8, "d1": d1, "d32_vs_base": d32, "pass8_ahead": ok8,
                     "pass1_kept": ok1, "pass32_kept": ok32, "all": ok8 and ok1 and ok32})
    return rows


def frontier_gap(fin: Dict[str, Dict[int, np.ndarray]], front: Sequence[str], lab: str) -> Dict[str, float] | None:
    """Per seed: the method's pass@32 minus the frontier's at the method's pass@1 (the piecewise-linear curve through
    that seed's frontier points); mean and CI over seeds. None when the method's pass@1 is outside the frontier's
    range in some seed (no interpolation there)."""
    gaps = []
    for s in range(len(fin[lab][1])):
        pts = sorted((float(fin[f][1][s]), float(fin[f][32][s])) for f in front)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x, y = float(fin[lab][1][s]), float(fin[lab][32][s])
        if not xs[0] <= x <= xs[-1]:
            return None
        gaps.append(y - float(np.interp(x, xs, ys)))
    return mean_ci(gaps)


def frontier_position(fin: Dict[str, Dict[int, np.ndarray]], front: Sequence[str], lab: str) -> str:
    """Outside (above) / inside (below) / on the multi_k frontier in pass@32 at equal pass@1, paired over seeds; when
    the method's pass@1 leaves the frontier's range in some seed, the gap of the seed means instead (no interval)."""
    g = frontier_gap(fin, front, lab)
    if g is not None:
        where = "outside" if g["lo"] > 0 else "inside" if g["hi"] < 0 else "on (CI contains 0)"
        return f"{where}: {fmt_ci(g, 4)} pass@32"
    pts = sorted((float(fin[f][1].mean()), float(fin[f][32].mean())) for f in front)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x, y = float(fin[lab][1].mean()), float(fin[lab][32].mean())
    if not xs[0] <= x <= xs[-1]:
        return f"pass@1 {'above' if x > xs[-1] else 'below'} the frontier's range (means)"
    gap = y - float(np.interp(x, xs, ys))
    return (f"{'outside' if gap > 0 else 'inside'} by {gap:+.4f} pass@32 (seed means only: its pass@1 leaves the "
            f"frontier's range in some seed)")


def exp_keep(out_dir: str, b: Budget, cache: Dict) -> Dict[str, Any]:
    t0 = time.perf_counter()
    frontier, others = keep_methods(b)
    runs = _runs(frontier + others, b, cache)
    fin = {lab: {k: np.array([r["final"]["test"][k] for r in rs]) for k in KS} for lab, rs in runs.items()}
    init = {k: np.array([pass_at_k_exact(te.success(te.probs(te.init_params())), KS)[k]
                         for _, te in (envs(b, s) for s in range(b.seeds))]) for k in KS}
    labels = [m.label for m in frontier + others]
    front = [m.label for m in frontier]
    rows = verdicts(fin, init, labels)
    table = [[r["method"]] + [fmt_ci(mean_ci(fin[r["method"]][k]), 4) for k in KS]
             + [fmt_ci(r["d1"], 4), fmt_ci(r["d8"], 4), fmt_ci(r["d32_vs_base"], 4),
                "**yes**" if r["all"] else "no: " + ", ".join(
                    w for w, ok in (("pass@8", r["pass8_ahead"]), ("pass@1", r["pass1_kept"]),
                                    ("pass@32", r["pass32_kept"])) if not ok),
                "frontier" if r["method"] in front else frontier_position(fin, front, r["method"])]
             for r in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    fx = sorted(front, key=lambda l: fin[l][1].mean())
    ax.plot([fin[l][1].mean() for l in fx], [fin[l][32].mean() for l in fx], "k--", lw=0.9,
            label="frontier: multi_k {1:w, 8:1−w}")
    for lab in labels:
        c1, c32 = mean_ci(fin[lab][1]), mean_ci(fin[lab][32])
        ax.errorbar(c1["mean"], c32["mean"], xerr=c1["half"], yerr=c32["half"], fmt="o" if lab in front else "s",
                    ms=4, capsize=2, label=lab)
    ax.axhline(init[32].mean(), color="grey", lw=0.6, ls=":", label="initial pass@32")
    ax.set_xlabel("held-out pass@1")
    ax.set_ylabel("held-out pass@32")
    ax.set_title("pass@1 vs pass@32 (mean ± 95% CI over seeds)", fontsize=9)
    ax.legend(fontsize=5.5, loc="best")
    fig_name = figure(out_dir, "keep.png", fig)
    winners = [r["method"] for r in rows if r["all"]]
    kept = [r["method"] for r in rows if r["pass1_kept"] and r["pass8_ahead"]]
    outward = [lab for lab in labels if lab not in front and frontier_position(fin, front, lab).startswith("outside:")]
    inward = [lab for lab in labels if lab not in front and frontier_position(fin, front, lab).startswith("inside:")]
    findings = [
        {"claim": "Issue 20: a method gains pass@8 over RLOO (CI > 0), keeps pass@1 within 2 points and pass@32 "
                  "not below the initial policy",
         "verdict": ("holds for " + ", ".join(winners)) if winners else "fails for every method tried",
         "evidence": "; ".join(f"{r['method']}: Δpass@8 {fmt_ci(r['d8'], 4)}, Δpass@1 {fmt_ci(r['d1'], 4)}"
                               for r in rows if r["method"] != BASE) + f" (paired vs {BASE}, {b.seeds} seeds)"},
        {"claim": "Which methods keep pass@1 (within 2 points of RLOO) while gaining pass@8 (observation)",
         "verdict": ", ".join(kept) if kept else "none",
         "evidence": "paired differences in the table below"},
        {"claim": "A method moves the pass@1–pass@32 frontier of the multi_k mixes outward (pass@32 above the "
                  "frontier at equal pass@1, paired CI > 0)",
         "verdict": (", ".join(outward) if outward else "none") + ("; inside it: " + ", ".join(inward) if inward else ""),
         "evidence": "; ".join(f"{lab}: {frontier_position(fin, front, lab)}" for lab in labels if lab not in front)},
    ]
    sections = [{"heading": "Final held-out pass@1 / pass@8 / pass@32 and the issue's three conditions",
                 "text": f"Δ columns are paired over seeds: pass@1 and pass@8 against {BASE}, pass@32 against the "
                         f"initial policy (initial pass@1/8/32 = "
                         + " / ".join(fmt_ci(mean_ci(init[k]), 4) for k in KS) + "). 'all' = pass@8 CI > 0, mean "
                         f"Δpass@1 ≥ −{PASS1_TOL}, pass@32 CI not entirely below the initial value. Two-stage: "
                         "PKPO K = 8 then K = 1 (RLOO) at half the steps; per-prompt K: pkpo_loo with "
                         "K_i = clip(ceil(1/p̂_i) − 1, 1, k_max) from an EMA p̂ read before the group; ref terms: "
                         "coef × the exact per-prompt direction lowering KL to the initial policy (forward = "
                         "KL(π_ref‖π), DPH-RL; reverse = KL(π‖π_ref)).",
                 "table": {"columns": ["method"] + [f"pass@{k}" for k in KS]
                           + ["Δpass@1 vs rloo", "Δpass@8 vs rloo", "pass@32 − initial", "all three", "frontier"],
                           "rows": table},
                 "figure": fig_name}]
    raw = {"final": {lab: {k: v.tolist() for k, v in d.items()} for lab, d in fin.items()},
           "initial": {k: v.tolist() for k, v in init.items()}, "frontier": front,
           "verdicts": [{**{k: v for k, v in r.items() if not isinstance(v, dict)},
                         **{k: v for k, v in r.items() if isinstance(v, dict)}} for r in rows]}
    return {"name": "keep", "title": "Pass@K without giving up pass@1 (issue 20)", "seconds": time.perf_counter() - t0,
            "sections": sections, "findings": findings, "setup": setup_text(b), "raw": raw}
