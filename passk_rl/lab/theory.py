"""Experiments on the seed's theory: bias, variance (Theorem 3, Lemma 2) and sample complexity (Theorem 2)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from passk_rl.lab import core
from passk_rl.lab.budget import Budget
from passk_rl.lab.ci import excludes_zero, fmt_ci, mean_ci
from passk_rl.lab.env import EnvConfig, Population
from passk_rl.lab.exact import (advantage_table, binom_pmf, drift, geometry_terms, grad_moments, pass_k_slope,
                                uniform_geometry, advantage_moments)
from passk_rl.lab.report import figure, pyplot
from passk_rl.lab.train import Method, train

TOL = 1e-6  # relative tolerance for "exactly unbiased" in enumerated (float64) results


# ----------------------------------------------------------------------------------------------- helpers
class Variant(NamedTuple):
    label: str
    name: str
    src: str            # "group" (p̂ from the group) or "oracle" (p̂ = the true p, independent of the group)
    params: tuple = ()  # extra shaping parameters ((key, value), ...)

    def kw(self, k: int) -> Dict[str, Any]:
        # The true p is exact: the clip that guards an estimated p̂ (shaping's p_clip) would only blur it.
        oracle = {"p_clip": 0.0} if self.src == "oracle" else {}
        return {**core.default_params(self.name, k), **oracle, **dict(self.params)}


def variants() -> List[Variant]:
    """Every core shaping; p̂-using shapings also with p̂ = true p; the seed's α_K also with a LOO baseline."""
    names = core.shaping_module().SHAPINGS
    out = []
    for name in names:
        out.append(Variant(name, name, "group"))
        if core.uses_p_hat(name):
            out.append(Variant(f"{name} [p̂=true p]", name, "oracle"))
    if "passk_alpha" in names:
        out.append(Variant("passk_alpha [loo, p̂=true p]", "passk_alpha", "oracle", (("baseline", "loo"),)))
    return out


def find_variant(label: str) -> Variant:
    for v in variants():
        if v.label == label:
            return v
    raise ValueError(f"unknown shaping variant {label!r}")


@functools.lru_cache(maxsize=4096)
def group_tables(v: Variant, n: int, k: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A₊(c), A₋(c) of a group-p̂ variant (cached: they depend on (n, k) only). None if the core refuses."""
    try:
        return advantage_table(core.shape_fn(v.name, k=k, params=v.kw(k)), n)
    except ValueError:
        return None


def exact_drift(v: Variant, *, n: int, k: int, p: np.ndarray) -> Optional[np.ndarray]:
    """D(p) for a shaping variant at (n, k). None if the core refuses (n, k) (e.g. k > n)."""
    if v.src == "oracle":
        try:
            Ap, Am = advantage_table(core.shape_fn(v.name, k=k, params=v.kw(k)), n, p_hat=p)
        except ValueError:
            return None
    else:
        t = group_tables(v, n, k)
        if t is None:
            return None
        Ap, Am = t
    return drift(Ap, Am, p, n)


def declared_slope(v: Variant, p: np.ndarray, *, k: int) -> np.ndarray:
    return core.objective_slope(v.name, p, k=k, params=v.kw(k))


def rel_err(D: np.ndarray, F: np.ndarray) -> np.ndarray:
    """|D − F'| / |F'| with a floor so that F' ≈ 0 (saturated pass@K) does not divide by round-off."""
    return np.abs(D - F) / np.maximum(np.abs(F), 1e-9 * (1.0 + np.abs(D).max(initial=0.0)))


def mc_drift(v: Variant, *, n: int, k: int, p: float, groups: int, seed: int,
             n_answers: int = 8, n_correct: int = 2) -> np.ndarray:
    """Monte-Carlo draws of D̂ = ⟨g, ∇p⟩ / ‖∇p‖² for one prompt (uniform geometry), one per sampled group.

    E[D̂] = D(p) exactly (g is linear in ∇log π), so the mean of these draws checks the enumeration and measures
    the bias D − F' with a sampling interval, from real sampled answers.
    """
    rng = np.random.default_rng(seed)
    pi, mask = uniform_geometry(p, n_answers=n_answers, n_correct=n_correct)
    grad_p = pi * (mask - p)
    ys = rng.choice(n_answers, size=(groups, n), p=pi)
    r = mask[ys].astype(np.float64)
    fn = core.shape_fn(v.name, k=k, params=v.kw(k))
    A = fn(r, np.full(groups, p) if v.src == "oracle" else None)
    proj = (np.eye(n_answers) - pi) @ grad_p  # ⟨e_y − π, ∇p⟩ per answer y
    return (A * proj[ys]).mean(axis=1) / float(grad_p @ grad_p)


# ----------------------------------------------------------------------------------------------- bias
def exp_bias(out_dir: str, b: Budget) -> Dict[str, Any]:
    t0 = time.perf_counter()
    ps = np.asarray(b.p_grid)
    Ks = (1, 4, 16)
    var = variants()
    raw: Dict[str, Any] = {"p_grid": ps.tolist(), "drift": {}}

    # 1. exact bias against the declared objective, every variant, n, K, p
    summary_rows, measured_unbiased = [], {}
    for v in var:
        row: List[Any] = [v.label, "yes" if (core.is_unbiased(v.name) and v.src == "group") else "no"]
        worst_all, any_ok = 0.0, False
        for n in b.bias_ns:
            worst = float("nan")
            for K in Ks:
                if K > n:
                    continue
                D = exact_drift(v, n=n, k=K, p=ps)
                if D is None:
                    continue
                F = declared_slope(v, ps, k=K)
                e = float(rel_err(D, F).max())
                raw["drift"][f"{v.label}|n={n}|K={K}"] = {"D": D.tolist(), "F'": F.tolist(),
                                                           "passK'": pass_k_slope(ps, K).tolist()}
                worst = e if math.isnan(worst) else max(worst, e)
            row.append(worst)
            if not math.isnan(worst):
                worst_all, any_ok = max(worst_all, worst), True
        measured_unbiased[v.label] = any_ok and worst_all < TOL
        row.append("yes" if measured_unbiased[v.label] else "no")
        summary_rows.append(row)

    # 2. detail at small n: E[update]/F'(p) and E[update]/(d pass@K/dp)
    n_det, K_det = 8, 4
    detail: Dict[str, Dict[str, List[float]]] = {}
    detail_rows = []
    for v in var:
        D = exact_drift(v, n=n_det, k=K_det, p=ps)
        if D is None:
            continue
        F, S = declared_slope(v, ps, k=K_det), pass_k_slope(ps, K_det)
        detail[v.label] = {"vs_declared": (D / F).tolist(), "vs_passK": (D / S).tolist()}
        detail_rows.append([v.label] + [float(x) for x in D / F] + [float(x) for x in D / S])

    # 3. independent but noisy p̂ = ĉ/m from m other samples: Jensen bias of α_K(p̂) (LOO baseline; with an
    #    independent p̂ the group size only enters through the unbiased RLOO factor, so n = 16 suffices)
    jensen_rows, jensen = [], {}
    if "passk_alpha" in core.shaping_module().SHAPINGS:
        for K in (4, 16):
            fn = core.shape_fn("passk_alpha", k=K, params={"baseline": "loo"})
            for m in (16, 64, 256):
                Ap, Am = advantage_table(fn, 16, p_hat=np.arange(m + 1) / m)
                ratios = []
                for p in ps:
                    w = binom_pmf(m, np.array([p]))[0]
                    D = float(w @ drift(Ap, Am, np.full(m + 1, p), 16))
                    ratios.append(D / float(pass_k_slope(np.array([p]), K)[0]))
                jensen[f"K={K}|m={m}"] = ratios
                jensen_rows.append([K, m] + ratios)

    # 4. population direction: cos(E[update], ∇ objective) over mixed-difficulty tabular populations at init
    cos_res: Dict[str, List[float]] = {}
    settings = [(4, 8), (4, 64), (16, 16), (16, 64)]
    P_cos = min(b.n_prompts, 128)
    for s in range(b.seeds):
        pop = Population(EnvConfig(n_prompts=P_cos, n_answers=b.n_answers, policy="tabular"), seed=1000 + s)
        pi = pop.probs(pop.init_params())
        p = pop.success(pi)
        g2 = ((pi * (pop.maskf - p[:, None])) ** 2).sum(axis=1)  # ‖∇p_x‖²; different prompts are orthogonal
        for v in var:
            for K, n in settings:
                D = exact_drift(v, n=n, k=K, p=p)
                if D is None:
                    continue
                S = pass_k_slope(p, K)
                targets = {"passK": S, "logpassK": S / np.maximum(-np.expm1(K * np.log1p(-p)), 1e-300),
                           "declared": declared_slope(v, p, k=K)}
                for tname, T in targets.items():
                    c = float((D * T * g2).sum() / math.sqrt((D * D * g2).sum() * (T * T * g2).sum() + 1e-300))
                    cos_res.setdefault(f"{v.label}|K={K}|n={n}|{tname}", []).append(c)
    cos_ci = {k: mean_ci(x) for k, x in cos_res.items()}
    cos_rows = []
    for v in var:
        row = [v.label]
        for K, n in settings:
            key = f"{v.label}|K={K}|n={n}|passK"
            row.append(fmt_ci(cos_ci[key], 4) if key in cos_ci else "n/a")
        for t in ("logpassK", "declared"):
            key = f"{v.label}|K=16|n=64|{t}"
            row.append(fmt_ci(cos_ci[key], 4) if key in cos_ci else "n/a")
        cos_rows.append(row)

    # 5. Monte-Carlo with sampled answers: measured bias vs the declared objective, with a CI
    mc_cases = [("pkpo", 8, 4), ("pkpo_loo_minus_one", 8, 4), ("rloo", 8, 1), ("passk_alpha", 8, 4),
                ("passk_alpha [p̂=true p]", 8, 4), ("passk_alpha [loo, p̂=true p]", 8, 4), ("passk_grpo", 8, 4),
                ("log_passk", 8, 4), ("grpo", 8, 1)]
    p_mc = 0.2
    mc_rows, mc_raw = [], {}
    labels = {v.label: v for v in var}
    for i, (lab, n, K) in enumerate(mc_cases):
        if lab not in labels:
            continue
        v = labels[lab]
        draws = mc_drift(v, n=n, k=K, p=p_mc, groups=b.mc_groups, seed=7 + i)
        Dex = float(exact_drift(v, n=n, k=K, p=np.array([p_mc]))[0])
        F = float(declared_slope(v, np.array([p_mc]), k=K)[0])
        ci = mean_ci(draws)
        bias = {kk: (x - F if kk in ("mean", "lo", "hi") else x) for kk, x in ci.items()}
        inside = bool(ci["lo"] <= Dex <= ci["hi"])
        mc_raw[lab] = {"n": n, "K": K, "p": p_mc, "exact_D": Dex, "F'": F, "mc": ci, "bias_vs_declared": bias,
                       "exact_within_mc_ci": inside, "measured_unbiased": measured_unbiased.get(lab, False)}
        mc_rows.append([lab, n, K, p_mc, Dex, fmt_ci(ci, 4), F, fmt_ci(bias, 4),
                        "yes" if excludes_zero(bias) else "no", "yes" if inside else "NO"])

    # figure
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for lab, d in detail.items():
        ax[0].plot(ps, d["vs_declared"], marker="o", ms=3, label=lab)
    ax[0].set_xscale("log")
    ax[0].axhline(1.0, color="k", lw=0.8)
    ax[0].set_xlabel("p")
    ax[0].set_ylabel("E[update] / F'(p)")
    ax[0].set_title(f"bias factor vs declared objective (n={n_det}, K={K_det}, exact)", fontsize=9)
    ax[0].legend(fontsize=5, ncol=2)
    ns = (4, 6, 8, 12, 16, 24, 32, 48, 64)
    for lab in ("passk_alpha", "passk_alpha [p̂=true p]", "passk_grpo", "log_passk", "passk_analytic",
                "pkpo_loo_minus_one"):
        if lab not in labels:
            continue
        v = labels[lab]
        ys = []
        for n in ns:
            D = exact_drift(v, n=n, k=4, p=np.array([0.05]))
            ys.append(float(D[0] / declared_slope(v, np.array([0.05]), k=4)[0]) if D is not None else np.nan)
        ax[1].plot(ns, ys, marker="o", ms=3, label=lab)
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("group size n")
    ax[1].set_title("bias factor vs n (p=0.05, K=4, exact)", fontsize=9)
    ax[1].legend(fontsize=6)
    fig_name = figure(out_dir, "bias.png", fig)

    # ------------------------------------------------------------------ findings (computed from the numbers)
    findings = []
    if {"passk_alpha", "passk_alpha [p̂=true p]", "passk_alpha [loo, p̂=true p]"} <= set(detail):
        dev = {lab: max(abs(x - 1) for x in detail[lab]["vs_passK"])
               for lab in ("passk_alpha", "passk_alpha [p̂=true p]", "passk_alpha [loo, p̂=true p]")}
        plug, orc_mean, orc_loo = dev["passk_alpha"], dev["passk_alpha [p̂=true p]"], dev["passk_alpha [loo, p̂=true p]"]
        jz = max(abs(x - 1) for x in jensen.get("K=4|m=64", [1.0]))
        ev = (f"E[update]/∇pass@K at n={n_det}, K={K_det}, p∈{list(b.p_grid)} (exact): group p̂ off by up to "
              f"{plug:.0%}; exact p̂ with the seed's r−r̄ off by {orc_mean:.3g} (= 1/n); exact p̂ with a "
              f"leave-one-out baseline off by {orc_loo:.1e}; independent p̂ from m=64 other samples off by up to "
              f"{jz:.0%} (Jensen)")
        if orc_loo < TOL and plug > 0.05:
            conds = ["p̂ does not depend on the current group"]
            if jz > 0.05:
                conds.append("p̂ is (near) exact — an independent but noisy p̂ is still biased")
            if orc_mean > TOL:
                conds.append("the baseline leaves sample i out (r−r̄ shrinks it by 1−1/n)")
            v_ = "holds only if " + "; ".join(conds)
        elif orc_loo < TOL:
            v_ = "holds"
        else:
            v_ = "fails"
        findings.append({"claim": "'Optimal shaping' α_K(p)·(r−r̄) is an unbiased ∇pass@K estimator",
                         "verdict": v_, "evidence": ev})
    key_lp, key_pk = "log_passk [p̂=true p]|K=16|n=64|logpassK", "log_passk [p̂=true p]|K=16|n=64|passK"
    if key_lp in cos_ci and key_pk in cos_ci:
        a, c = cos_ci[key_pk], cos_ci[key_lp]
        ev = (f"w_K·(r−r̄) with exact p̂, n=64: cos(E[update], ∇ mean pass@16) = {fmt_ci(a, 4)}; "
              f"cos(E[update], ∇ mean log pass@16) = {fmt_ci(c, 4)}; {b.seeds} mixed-difficulty populations")
        if a["hi"] < 0.99 and c["lo"] > a["hi"]:
            v_ = ("fails: E[w_K·r] is the gradient of mean log pass@K, not mean pass@K (same per-prompt "
                  "maximiser, different weighting across prompts: hard prompts get 1/pass@K more)")
        elif a["lo"] > 0.99:
            v_ = "holds"
        else:
            v_ = "inconclusive"
        findings.append({"claim": "Surrogate-reward theorem: optimising E[w_K(p)·r] is equivalent to pass@K",
                         "verdict": v_, "evidence": ev})
    key, key_g = "passk_grpo [p̂=true p]|K=16|n=64|passK", "passk_grpo|K=16|n=64|passK"
    if key in cos_ci:
        a = cos_ci[key]
        g = cos_ci.get(key_g)
        findings.append({"claim": "Pass@K-GRPO (α_K(p̂)·(r−r̄)/σ) ascends pass@K",
                         "verdict": "fails" if a["hi"] < 0.99 else ("holds" if a["lo"] > 0.99 else "inconclusive"),
                         "evidence": f"population limit (exact p̂): cos(E[update], ∇ mean pass@16) = {fmt_ci(a, 4)}; "
                                     "it ascends ∫K(1−p)^(K−1)/√(p(1−p))dp (the /σ factor)"
                                     + (f"; with the group p̂ at n=64 the finite-n bias happens to give "
                                        f"{fmt_ci(g, 4)}" if g else "")})
    zero = []
    for v in var:
        rec = raw["drift"].get(f"{v.label}|n=4|K=4")
        if rec is not None and np.all(np.abs(np.array(rec["D"])) < 1e-12):
            zero.append(v.label)
    findings.append({"claim": "(observation) shapings whose expected update vanishes identically at K = n",
                     "verdict": ", ".join(zero) if zero else "none",
                     "evidence": "E[update] = 0 at every p on the grid for n = K = 4 (exact); e.g. Chen et al.'s "
                                 "analytic advantage needs n > K: at K = n every group with a success has R = 1, σ = 0"
                     if "passk_analytic" in zero else "E[update] at n = K = 4, exact"})
    flagged = [r[0] for r in summary_rows if r[1] == "yes"]
    bad = [lab for lab in flagged if not measured_unbiased[lab]]
    findings.append({"claim": "(core check) shapings the math core flags unbiased are exactly unbiased at every "
                              "tested n ≥ K",
                     "verdict": "holds" if not bad else f"fails for {', '.join(bad)}",
                     "evidence": f"max relative |E[update] − F'| < {TOL:g} over n∈{list(b.bias_ns)}, K∈{list(Ks)}, "
                                 f"p∈{list(b.p_grid)} for: {', '.join(l for l in flagged if measured_unbiased[l])}"})
    unb = [lab for lab, r in mc_raw.items() if r["measured_unbiased"]]
    mc_zero = all(not excludes_zero(mc_raw[lab]["bias_vs_declared"]) for lab in unb)
    n_in = sum(r["exact_within_mc_ci"] for r in mc_raw.values())
    findings.append({"claim": "(lab check) Monte-Carlo with sampled answers agrees with the exact enumeration",
                     "verdict": "holds" if n_in >= len(mc_raw) - 1 and mc_zero else "fails",
                     "evidence": f"{n_in}/{len(mc_raw)} exact values inside the MC 95% CI ({b.mc_groups} groups "
                                 f"each; ~1 miss in 20 is expected); MC bias CI contains 0 for every exactly-"
                                 f"unbiased shaping: {mc_zero}"})

    sections = [
        {"heading": "Exact bias against each shaping's declared objective",
         "text": ("Max over K∈{1,4,16} (K ≤ n) and p∈" + str(list(b.p_grid)) + " of |E[update] − F'(p)|/|F'(p)|, "
                  "where F is the shaping's declared population-limit objective (`passk_rl.shaping.objective`) and "
                  "E[update] = D(p)·∇p is enumerated exactly over c ~ Binomial. 'core: unbiased' is the math core's "
                  "own flag. n/a: the shaping refuses every K at this n. The max is dominated by points where F' is "
                  "tiny (e.g. K=16 at p=0.8, F' ≈ 5e-10), so read it as biased / unbiased, not as a typical size. "
                  "exact."),
         "table": {"columns": ["shaping", "core: unbiased"] + [f"n={n}" for n in b.bias_ns] + ["measured unbiased"],
                   "rows": summary_rows}},
        {"heading": f"Bias factors at small n (n={n_det}, K={K_det})",
         "text": "E[update]/F'(p) (declared objective) and E[update]/(d pass@K/dp). 1 = unbiased. exact.",
         "table": {"columns": ["shaping"] + [f"/F' p={p:g}" for p in ps] + [f"/pass@K' p={p:g}" for p in ps],
                   "rows": detail_rows},
         "figure": fig_name},
        {"heading": "Independent but noisy p̂ (passk_alpha, LOO baseline, n=16)",
         "text": ("p̂ = ĉ/m from m samples independent of the current group (what a central estimator gives): "
                  "E[update]/∇pass@K. 1 = unbiased. exact (enumerates ĉ and c)."),
         "table": {"columns": ["K", "m"] + [f"p={p:g}" for p in ps], "rows": jensen_rows}},
        {"heading": "Which population objective does the expected update ascend?",
         "text": (f"Cosine between E[update] (summed over a mixed-difficulty population of {P_cos} prompts, "
                  "tabular policy at init) and the gradient of mean pass@K, of mean log pass@K, and of the "
                  f"shaping's declared objective. Mean ± 95% CI over {b.seeds} population seeds."),
         "table": {"columns": ["shaping"] + [f"∇pass@{K} n={n}" for K, n in settings]
                   + ["∇log pass@16 n=64", "∇declared K=16 n=64"], "rows": cos_rows}},
        {"heading": "Monte-Carlo check with sampled answers",
         "text": (f"D̂ = ⟨g, ∇p⟩/‖∇p‖² from {b.mc_groups} sampled groups per row (8 answers, 2 correct); "
                  "mean ± 95% CI. 'bias' = D̂ − F'(p) for the declared objective."),
         "table": {"columns": ["shaping", "n", "K", "p", "exact D", "MC D̂", "F'", "bias (MC)",
                               "bias ≠ 0", "exact in CI"], "rows": mc_rows}},
    ]
    raw.update({"cos": cos_ci, "mc": mc_raw, "jensen": jensen, "detail": detail,
                "measured_unbiased": measured_unbiased})
    return {"name": "bias", "title": "E[update] vs the declared objective and vs ∇pass@K",
            "seconds": time.perf_counter() - t0, "sections": sections, "findings": findings, "raw": raw,
            "setup": "Binary rewards; exact expectations by enumerating c ~ Binomial(n, p) (lab/exact.py)."}


# ----------------------------------------------------------------------------------------------- variance
def _tables(v: Variant, *, n: int, k: int, p: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    if v.src != "oracle":
        return group_tables(v, n, k)
    try:
        Ap, Am = advantage_table(core.shape_fn(v.name, k=k, params=v.kw(k)), n, p_hat=np.array([p]))
    except ValueError:
        return None
    return Ap[0], Am[0]


def exp_variance(out_dir: str, b: Budget) -> Dict[str, Any]:
    t0 = time.perf_counter()
    ps = np.exp(np.linspace(math.log(0.002), math.log(0.9), b.var_points))
    Ks = (1, 4, 16)
    M, MC = 16, 2
    var = variants()
    geos = [geometry_terms(*uniform_geometry(float(p), n_answers=M, n_correct=MC)) for p in ps]
    res: Dict[str, Dict[str, List[float]]] = {}
    for n in b.var_ns:
        for K in Ks:
            if K > n:
                continue
            for v in var:
                rows: Dict[str, List[float]] = {"var": [], "rel_var": [], "adv_var": [], "drift": []}
                for p, geo in zip(ps, geos):
                    t = _tables(v, n=n, k=K, p=float(p))
                    if t is None:
                        rows = {}
                        break
                    gm = grad_moments(t[0], t[1], geo, n)
                    rows["var"].append(gm["var"])
                    rows["rel_var"].append(gm["rel_var"])
                    rows["drift"].append(gm["drift"])
                    rows["adv_var"].append(float(advantage_moments(t[0], t[1], np.array([p]), n)["var"][0]))
                if rows:
                    res[f"{v.label}|n={n}|K={K}"] = rows

    n0 = b.var_ns[0]
    show = sorted(set(np.linspace(0, len(ps) - 1, min(7, len(ps))).round().astype(int).tolist()))
    sections = []
    for K in (4, 16):
        rows = [[v.label] + [res[f"{v.label}|n={n0}|K={K}"]["rel_var"][i] for i in show]
                for v in var if f"{v.label}|n={n0}|K={K}" in res]
        sections.append({"heading": f"Relative variance Var[g]/‖E g‖² (n={n0}, K={K})",
                         "text": (f"Trace of the covariance of the per-group update g over its squared mean; one prompt "
                                  f"with {M} answers ({MC} correct, uniform within each set). Scale-free: multiplying "
                                  "a shaping by any f(p) leaves it unchanged. exact."),
                         "table": {"columns": ["shaping"] + [f"p={ps[i]:.3g}" for i in show], "rows": rows}})

    # Theorem 3: Var[Ã]/Var[A], Ã = α_K·(r − r̄) (the seed's optimal shaping), A = r − r̄ (dr_grpo)
    th3: Dict[str, Any] = {}
    th3_rows = []
    for lab in ("passk_alpha [p̂=true p]", "passk_alpha"):
        for K in Ks:
            kA, kB = f"{lab}|n={n0}|K={K}", f"dr_grpo|n={n0}|K={K}"
            if kA not in res or kB not in res:
                continue
            ratio = np.array(res[kA]["adv_var"]) / np.maximum(np.array(res[kB]["adv_var"]), 1e-300)
            gratio = np.array(res[kA]["var"]) / np.maximum(np.array(res[kB]["var"]), 1e-300)
            pred = 1.0 / (K * (1 - ps) ** (K - 1))
            C = ratio / pred  # stays bounded iff Var ratio = O(1/(K(1−p)^(K−1)))
            th3[f"{lab}|K={K}"] = {"ratio": ratio.tolist(), "grad_ratio": gratio.tolist(), "pred": pred.tolist(),
                                   "C": C.tolist(), "alpha_sq": ((K * (1 - ps) ** (K - 1)) ** 2).tolist()}
            th3_rows.append([lab, K, float(ratio.min()), float(ratio.max()), float(C.min()), float(C.max()),
                             float(gratio.min()), float(gratio.max())])

    # Lemma 2: (a) f·A has the same relative variance for every scale; (b) unbiased ∇pass@K estimators compared
    ref = "passk_alpha [loo, p̂=true p]"
    lemma_rows, lemma = [], {}
    for K in (4, 16):
        cands = [v.label for v in var if f"{v.label}|n={n0}|K={K}" in res and
                 np.all(rel_err(np.array(res[f"{v.label}|n={n0}|K={K}"]["drift"]), pass_k_slope(ps, K)) < TOL)]
        wins = {c: 0 for c in cands}
        for i in range(len(ps)):
            if cands:
                wins[min(cands, key=lambda c: res[f"{c}|n={n0}|K={K}"]["rel_var"][i])] += 1
        ratio_to_ref = {}
        if ref in cands:
            rv_ref = np.array(res[f"{ref}|n={n0}|K={K}"]["rel_var"])
            for c in cands:
                ratio_to_ref[c] = (np.array(res[f"{c}|n={n0}|K={K}"]["rel_var"]) / rv_ref).tolist()
        lemma[f"K={K}"] = {"unbiased": cands, "wins": wins, "rel_var_over_alphaK": ratio_to_ref}
        for c in cands:
            rv = np.array(res[f"{c}|n={n0}|K={K}"]["rel_var"])
            rr = np.array(ratio_to_ref.get(c, [np.nan]))
            lemma_rows.append([K, c, wins[c], float(np.median(rv)), float(np.min(rr)), float(np.max(rr))])
    scale_dev = 0.0
    if ref in {v.label for v in var}:
        vref = find_variant(ref)
        for p, geo in list(zip(ps, geos))[:: max(1, len(ps) // 4)]:
            t = _tables(vref, n=n0, k=4, p=float(p))
            r1 = grad_moments(t[0], t[1], geo, n0)["rel_var"]
            for lam in (0.25, 4.0):
                scale_dev = max(scale_dev, abs(grad_moments(lam * t[0], lam * t[1], geo, n0)["rel_var"] / r1 - 1))

    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for j, K in enumerate((4, 16)):
        for v in var:
            key = f"{v.label}|n={n0}|K={K}"
            if key in res and v.name not in ("dr_grpo",):
                ax[j].plot(ps, res[key]["rel_var"], marker=".", lw=1, label=v.label)
        ax[j].set_xscale("log")
        ax[j].set_yscale("log")
        ax[j].set_xlabel("p")
        ax[j].set_title(f"Var[g]/‖E g‖²  (n={n0}, K={K}, exact)", fontsize=9)
    ax[0].legend(fontsize=5, ncol=2)
    for key, d in th3.items():
        if key.startswith("passk_alpha [p̂=true p]"):
            Kl = key.split("|")[1]
            l, = ax[2].plot(ps, d["ratio"], marker=".", label=f"measured {Kl}")
            ax[2].plot(ps, d["pred"], ls="--", color=l.get_color(), label=f"Thm 3 form {Kl}")
    ax[2].set_xscale("log")
    ax[2].set_yscale("log")
    ax[2].axhline(1.0, color="k", lw=0.8)
    ax[2].set_xlabel("p")
    ax[2].set_title("Var[α_K·A]/Var[A] vs Thm 3's 1/(K(1−p)^(K−1))", fontsize=9)
    ax[2].legend(fontsize=6)
    fig_name = figure(out_dir, "variance.png", fig)

    findings = []
    o16 = th3.get("passk_alpha [p̂=true p]|K=16")
    if o16 is not None:
        C, ratio = np.array(o16["C"]), np.array(o16["ratio"])
        spread = float(C.max() / max(C.min(), 1e-300))
        up = float((ratio > 1).mean())
        is_sq = bool(np.allclose(ratio, o16["alpha_sq"], rtol=1e-6))
        ev = (f"at p={ps[0]:.3g}, K=16 the theorem's form predicts a variance ratio of {o16['pred'][0]:.3g} (a "
              f"reduction), measured {ratio[0]:.3g}. K=16, n={n0}, exact p̂: Var[α_K·A]/Var[A] = "
              f"{ratio.min():.3g}…{ratio.max():.3g} over "
              f"p∈[{ps[0]:.3g}, {ps[-1]:.3g}] (> 1, i.e. *more* variance, at {up:.0%} of points); "
              f"ratio·K(1−p)^(K−1) spans {spread:.3g}× (the theorem needs it bounded)"
              + ("; the ratio is exactly α_K(p)² — a rescaling, which leaves the relative variance unchanged"
                 if is_sq else "") + ". exact")
        findings.append({"claim": "Theorem 3: the optimal shaping reduces gradient variance by O(1/(K(1−p)^(K−1)))",
                         "verdict": "fails" if (spread > 100 or up > 0) else "holds", "evidence": ev})
    for K in (4, 16):
        L = lemma.get(f"K={K}")
        if not L or ref not in L["unbiased"]:
            continue
        others = {c: w for c, w in L["wins"].items() if c != ref}
        best_other = max(others, key=others.get) if others else None
        lower = {c: float(np.mean(np.array(r) < 1)) for c, r in L["rel_var_over_alphaK"].items() if c != ref}
        ev = (f"relative variance of λ·α_K·A is the same for every λ (max deviation {scale_dev:.1e}), so variance "
              f"cannot pick f; f = α_K is forced by unbiasedness. Unbiased ∇pass@{K} estimators at n={n0}: "
              f"{', '.join(L['unbiased'])}; lowest relative variance at each of {len(ps)} p values: {L['wins']}. exact")
        if L["wins"].get(ref, 0) == len(ps):
            v_ = ("holds only in the trivial sense (α_K is the unique unbiased member of f(p)·A), though α_K·A with "
                  "the exact p is also the lowest-variance unbiased estimator tested here")
        else:
            v_ = ("fails as a variance statement: f = α_K is merely the unique unbiased member of f(p)·A (and "
                  "needs the exact p)" + (f"; {best_other} has lower relative variance at "
                                          f"{lower.get(best_other, 0):.0%} of p values" if best_other else ""))
        findings.append({"claim": f"Lemma 2: f(p)=K(1−p)^(K−1) is the variance-minimising shaping (K={K})",
                         "verdict": v_, "evidence": ev})

    sections += [
        {"heading": "Theorem 3 check",
         "text": ("Ã = passk_alpha (α_K(p̂)·(r−r̄)), A = dr_grpo (r−r̄). 'ratio' = Var[Ã_i]/Var[A_i] (advantage "
                  "variance, as the seed states it); 'C' = ratio·K(1−p)^(K−1), which Theorem 3 says stays bounded; "
                  f"'grad ratio' = the same ratio for the update's trace covariance. n={n0}, p over the sweep. exact."),
         "table": {"columns": ["Ã", "K", "ratio min", "ratio max", "C min", "C max", "grad ratio min",
                               "grad ratio max"], "rows": th3_rows},
         "figure": fig_name},
        {"heading": "Lemma 2 check",
         "text": ("Unbiased estimators of ∇pass@K at this n (measured: E[update] = K(1−p)^(K−1)∇p to 1e-6), how "
                  f"many p values each has the lowest relative variance at, and its relative variance over that of "
                  f"α_K(p)·RLOO with the exact p ({ref}). exact."),
         "table": {"columns": ["K", "unbiased estimator", "# p where lowest", "median rel. var",
                               "min ratio to α_K·A", "max ratio to α_K·A"], "rows": lemma_rows}},
    ]
    return {"name": "variance", "title": "Gradient variance per shaping; Theorem 3 and Lemma 2",
            "seconds": time.perf_counter() - t0, "sections": sections, "findings": findings,
            "raw": {"p": ps.tolist(), "curves": res, "theorem3": th3, "lemma2": lemma,
                    "scale_invariance_dev": scale_dev},
            "setup": (f"One prompt, softmax over {M} answers ({MC} correct); exact first and second moments of the "
                      "update g = (1/n) Σ A_i ∇log π(y_i) (lab/exact.py).")}


# ----------------------------------------------------------------------------------------------- complexity
def exp_complexity(out_dir: str, b: Budget) -> Dict[str, Any]:
    """Samples until exact pass@K ≥ 1 − ε, per prompt, as K grows, against Theorem 2's form."""
    t0 = time.perf_counter()
    n = b.group_n
    eps_list = (0.1, 0.05, 0.02)
    eps_main = 0.05
    shapings = [s for s in ("pkpo_loo_minus_one", "passk_grpo") if s in core.shaping_module().SHAPINGS]
    R = b.cx_reps
    p0 = np.repeat(np.asarray(b.cx_p0, dtype=np.float64), R)
    cfg = EnvConfig(n_prompts=p0.size, n_answers=b.n_answers, policy="tabular")
    out: Dict[str, Any] = {}
    for sh in shapings:
        for K in b.cx_ks:
            pop = Population(cfg, seed=500 + K, p0=p0)
            real = core.pkpo_name(K) if sh == "pkpo_loo_minus_one" else sh
            hist = train(pop, Method(label=f"{sh}@{K}", shaping=real, k=K), steps=b.cx_cap, n=n, lr=b.cx_lr,
                         seed=900 + K, eval_every=b.cx_cap, ks=(K,),
                         stop_at={"k": K, "thresholds": [1 - e for e in eps_list]})
            hits = np.asarray(hist["first_hit"])  # (len(eps), P)
            for j, e in enumerate(eps_list):
                for q, pz in enumerate(b.cx_p0):
                    h = hits[j, q * R:(q + 1) * R]
                    cens = int((h < 0).sum())
                    N = np.where(h < 0, b.cx_cap, h).astype(np.float64) * n
                    out[f"{sh}|K={K}|p0={pz:g}|eps={e:g}"] = {"ci": mean_ci(N), "censored": cens,
                                                              "N": N.tolist()}
    rows, findings = [], []
    plt = pyplot()
    fig, ax = plt.subplots(1, len(shapings), figsize=(5.2 * len(shapings), 3.8), squeeze=False)
    for si, sh in enumerate(shapings):
        for pz in b.cx_p0:
            Ks = list(b.cx_ks)
            cis = [out[f"{sh}|K={K}|p0={pz:g}|eps={eps_main:g}"]["ci"] for K in Ks]
            m = np.array([c["mean"] for c in cis])
            ax[0][si].errorbar(Ks, np.maximum(m, 1), yerr=[m - np.maximum(np.array([c["lo"] for c in cis]), 1e-9),
                                                          np.array([c["hi"] for c in cis]) - m],
                               marker="o", ms=3, capsize=2, label=f"measured p0={pz:g}")
            pred = m[0] * np.array([K ** 2 * (1 - pz) ** (-2 * (K - 1)) for K in Ks])
            ax[0][si].plot(Ks, pred, ls="--", label=f"Thm 2 form p0={pz:g} (=measured at K=1)")
            for K, c in zip(Ks, cis):
                o = out[f"{sh}|K={K}|p0={pz:g}|eps={eps_main:g}"]
                rows.append([sh, pz, K, fmt_ci(c, 0), o["censored"],
                             float(c["mean"] / max(cis[0]["mean"], 1e-300)),
                             float(K ** 2 * (1 - pz) ** (-2 * (K - 1)))])
            # verdict numbers: growth from K_min to K_max
            c1, cK = cis[0], cis[-1]
            meas = cK["mean"] / max(c1["mean"], 1e-300)
            hi = cK["hi"] / c1["lo"] if c1["lo"] > 0 else math.inf
            lo = max(cK["lo"], 0.0) / c1["hi"]
            pred_ratio = Ks[-1] ** 2 * (1 - pz) ** (-2 * (Ks[-1] - 1))
            censored = sum(out[f"{sh}|K={K}|p0={pz:g}|eps={eps_main:g}"]["censored"] for K in Ks)
            ev = (f"{sh}, p0={pz:g}, ε={eps_main}: samples to ε-optimal pass@K grow ×{meas:.3g} "
                  f"(CI {lo:.3g}…{hi:.3g}) from K={Ks[0]} to K={Ks[-1]}; the form K²Var[r]/((1−p)^(2K)ε²) predicts "
                  f"×{pred_ratio:.3g}. {R} replicate prompts, {censored} censored at the cap")
            if hi < pred_ratio / 10:
                v = ("fails as a scaling law (over-predicts the growth in K by more than 10×); only a loose upper "
                     "bound" + ("; measured cost *falls* with K" if hi < 1 else ""))
            elif lo > pred_ratio / 10:
                v = "holds (growth in K within 10× of the form)"
            else:
                v = "inconclusive"
            findings.append({"claim": f"Theorem 2: N = O(K²Var[r]/((1−p)^(2K)ε²)) ({sh}, p0={pz:g})",
                             "verdict": v, "evidence": ev})
        ax[0][si].set_xscale("log", base=2)
        ax[0][si].set_yscale("log")
        ax[0][si].set_xlabel("K")
        ax[0][si].set_ylabel(f"samples to pass@K ≥ {1 - eps_main}")
        ax[0][si].set_title(sh, fontsize=9)
        ax[0][si].legend(fontsize=6)
    fig_name = figure(out_dir, "complexity.png", fig)
    # ε dependence at the middle K
    eps_rows = []
    Km = b.cx_ks[len(b.cx_ks) // 2]
    for sh in shapings:
        pz = b.cx_p0[-1]
        cis = {e: out[f"{sh}|K={Km}|p0={pz:g}|eps={e:g}"]["ci"] for e in eps_list}
        meas = cis[eps_list[-1]]["mean"] / max(cis[eps_list[0]]["mean"], 1e-300)
        pred = (eps_list[0] / eps_list[-1]) ** 2
        eps_rows.append([sh, Km, pz] + [fmt_ci(cis[e], 0) for e in eps_list] + [float(meas), float(pred)])
        findings.append({"claim": f"Theorem 2: N ∝ 1/ε² ({sh}, K={Km}, p0={pz:g})",
                         "verdict": ("fails as a scaling law (N grows much more slowly than 1/ε²)" if meas < pred / 3
                                     else "holds" if meas > pred / 3 and meas < pred * 3 else "inconclusive"),
                         "evidence": f"N(ε={eps_list[-1]})/N(ε={eps_list[0]}) = {meas:.3g} vs 1/ε² predicts {pred:.3g}"})
    sections = [
        {"heading": f"Samples to reach pass@K ≥ {1 - eps_main} (per prompt)",
         "text": (f"Tabular softmax prompts ({b.n_answers} answers, 2 correct) starting at p0; n={n} samples per "
                  f"step, Adam lr={b.cx_lr}; N = first step with exact pass@K ≥ 1−ε, times n. Mean ± 95% CI over "
                  f"{R} replicate prompts; censored runs count as the cap ({b.cx_cap} steps). 'ratio' = N(K)/N(K="
                  f"{b.cx_ks[0]}); 'Thm 2 ratio' = the same ratio under K²/(1−p0)^(2K)."),
         "table": {"columns": ["shaping", "p0", "K", "N", "censored", "ratio", "Thm 2 ratio"], "rows": rows},
         "figure": fig_name},
        {"heading": "Dependence on ε",
         "text": "Mean N (± 95% CI) for ε ∈ " + str(list(eps_list)) + ".",
         "table": {"columns": ["shaping", "K", "p0"] + [f"ε={e}" for e in eps_list]
                   + [f"N(ε={eps_list[-1]})/N(ε={eps_list[0]})", "1/ε² ratio"], "rows": eps_rows}},
    ]
    return {"name": "complexity", "title": "Sample complexity in K against Theorem 2",
            "seconds": time.perf_counter() - t0, "sections": sections, "findings": findings,
            "raw": {k: {"ci": v["ci"], "censored": v["censored"]} for k, v in out.items()},
            "setup": "Stochastic training of independent tabular prompts with the unbiased PKPO estimator and the "
                     "seed's Pass@K-GRPO; the ε-optimum of pass@K is 1 (p → 1). Adam makes the step scale-free, so "
                     "the K-dependent size of the pass@K gradient (the theorem's K² factor) does not set the step; "
                     "what remains is how hard each K's target is and how noisy its update is."}
