"""Pass@K shapings: the seed's plug-ins (passk_grpo, passk_alpha, log_passk), the unbiased PKPO family, Chen et al.'s
analytic group advantage and the multi-K scalarisation, each registered next to its advantage function with its
declared objective F(p) for 0/1 rewards. All accept a per-row K (see ``api.shape``) except multi_k."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from passk_rl.shaping.kernels import (Batch, alpha_k, analytic_tables, centred, inv, log_pass, p_range_analytic,
                                      p_range_mean, pkpo_family, require_binary, sigma_of, table_adv, w_k)
from passk_rl.shaping.pass1 import PLUGIN_NOTE
from passk_rl.shaping.registry import register

PAPER_PKPO = "Walder & Karkhanis 2025, Pass@K Policy Optimization, arXiv 2505.15201"
PAPER_SEED = "passk-rl seed brief (shared/seed/pass-at-k-seed.md); cf. arXiv 2510.23049"
PAPER_CHEN = "Chen et al. 2025, Pass@k Training for Adaptively Balancing Exploration and Exploitation, arXiv 2508.10751"


# ---- objectives ----
def f_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return -torch.expm1(k * torch.log1p(-p))


def d_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return alpha_k(p, k)


def f_log_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return log_pass(p, k)


def d_log_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return w_k(p, k)


def f_passk_grpo(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    """F(p) = int_0^p K (1-t)^(K-1) / sqrt(t(1-t)) dt = 2K int_0^x cos^(2K-2)(phi) dphi, x = asin(sqrt p).

    Wallis reduction I_m = cos^(2m-1)(x) sin(x)/(2m) + (2m-1)/(2m) I_{m-1}, I_0 = x; forward
    recursion is stable because the coefficients are < 1. K = 1 gives GRPO's 2 asin(sqrt p).
    """
    x = torch.asin(torch.sqrt(p))
    s = torch.sqrt(p)
    co = torch.sqrt(1.0 - p)
    acc = x
    for m in range(1, k):
        acc = torch.pow(co, 2 * m - 1) * s / (2 * m) + (2 * m - 1) / (2 * m) * acc
    return 2.0 * k * acc


def d_passk_grpo(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return alpha_k(p, k) / torch.sqrt(p * (1.0 - p))


def f_analytic(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    # asin(sqrt P) = atan2(sqrt P, sqrt(1-P)) with both P and 1-P = (1-p)^K formed without
    # cancellation, so F keeps full precision when P_K is within 1e-16 of 0 or 1.
    log_q = k * torch.log1p(-p)
    return (2.0 / k) * torch.atan2(torch.sqrt(-torch.expm1(log_q)), torch.exp(0.5 * log_q))


def d_analytic(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    # (1-p)^(K-1) / sqrt(P (1-P)) with 1-P = (1-p)^K:  = (1-p)^(K/2-1) / sqrt(P), in log space.
    log_q_half = torch.special.xlog1py(torch.tensor(k / 2.0 - 1.0, dtype=p.dtype, device=p.device), -p)
    return torch.exp(log_q_half - 0.5 * log_pass(p, k))


# ---- the seed's plug-ins ----
@register(
    "passk_grpo", objective=f_passk_grpo, derivative=d_passk_grpo, reward_domain="unit", uses_k=True, uses_p_hat=True,
    defaults={"baseline": "mean", "eps": 1e-6, "ddof": 0, "p_clip": "group"}, p_range=p_range_mean,
    objective_formula="int_0^p K(1-t)^(K-1)/sqrt(t(1-t)) dt = 2K int_0^asin(sqrt p) cos^(2K-2)",
    advantage_formula="alpha_K(p_hat) (r_i - b_i) / max(sigma, eps), alpha_K(p) = K (1-p)^(K-1)",
    paper=PAPER_SEED,
    doc="The seed's Pass@K-GRPO pseudocode. Its population limit is NOT pass@K: the std division "
    "adds 1/sqrt(p(1-p)). K may exceed n." + PLUGIN_NOTE,
)
def adv_passk_grpo(b: Batch, *, k: int, baseline: str, eps: float, ddof: int) -> torch.Tensor:
    scale = alpha_k(b.group_p(), k) * inv(sigma_of(b, ddof), eps)
    return centred(b, baseline) * scale[:, None]


@register(
    "passk_alpha", objective=f_pass, derivative=d_pass, reward_domain="unit", uses_k=True, uses_p_hat=True,
    defaults={"baseline": "mean", "p_clip": "group"}, p_range=p_range_mean,
    objective_formula="1 - (1-p)^K", advantage_formula="alpha_K(p_hat) (r_i - b_i)", paper=PAPER_SEED,
    doc="The seed's 'optimal shaping'. Population limit ascends pass@K; with p_hat from the group "
    "it is biased at finite n. K may exceed n." + PLUGIN_NOTE,
)
def adv_passk_alpha(b: Batch, *, k: int, baseline: str) -> torch.Tensor:
    return alpha_k(b.group_p(), k)[:, None] * centred(b, baseline)


@register(
    "log_passk", objective=f_log_pass, derivative=d_log_pass, reward_domain="unit", uses_k=True, uses_p_hat=True,
    defaults={"baseline": "mean", "p_floor": 1e-6, "p_clip": "group"}, p_range=p_range_mean,
    objective_formula="log(1 - (1-p)^K)",
    advantage_formula="w_K(max(p_hat, p_floor)) (r_i - b_i), w_K = K(1-p)^(K-1)/(1-(1-p)^K)",
    paper=PAPER_SEED,
    doc="The seed's surrogate-reward weight. It ascends log pass@K (same per-prompt maximiser as "
    "pass@K, different weighting across prompts), not pass@K. p_hat is floored at p_floor "
    "(default 1e-6) because w_K -> inf as p -> 0." + PLUGIN_NOTE,
)
def adv_log_passk(b: Batch, *, k: int, baseline: str, p_floor: float) -> torch.Tensor:
    if isinstance(p_floor, bool) or not isinstance(p_floor, (int, float, np.integer, np.floating)) or not 0.0 < p_floor <= 1.0:
        raise ValueError(f"log_passk: p_floor must lie in (0, 1], got {p_floor!r}")
    return w_k(b.group_p().clamp_min(p_floor), k)[:, None] * centred(b, baseline)


# ---- PKPO family (unbiased) ----
@register(
    "pkpo", objective=f_pass, derivative=d_pass, unbiased=True, uses_k=True, baselined=False, needs_k_le_n=True,
    objective_formula="1 - (1-p)^k (max@k for continuous rewards)",
    advantage_formula="n s_i; binary: k (correct), k rho(n-1, c, k-1) (wrong)", paper=PAPER_PKPO,
    doc="Raw unbiased PKPO weight, no baseline (wrong samples get positive weight). O(n log n) for "
    "continuous rewards. p_hat is ignored.",
)
def adv_pkpo(b: Batch, *, k: int) -> torch.Tensor:
    return pkpo_family(b, [("raw", k, 1.0)])


@register(
    "pkpo_loo", objective=f_pass, derivative=d_pass, unbiased=True, uses_k=True, needs_k_le_n_minus_1=True,
    defaults={"variant": "centred"}, zero_on_constant=lambda opts: opts["variant"] == "centred",
    objective_formula="1 - (1-p)^k (max@k for continuous rewards)",
    advantage_formula="centred: n s_i - k rho_{-i}; paper: n s_i - n k/(n-1) rho_{-i} (rho_{-i}: max@k of the other n-1)",
    paper=PAPER_PKPO,
    doc="PKPO weight minus a leave-one-out baseline (independent of sample i, so unbiased). "
    "variant='centred' (default) uses (k/n) rho_{-i}: advantages sum to 0 in every group, vanish on "
    "all-equal groups and equal RLOO at k = 1. variant='paper' uses the mean of the other samples' "
    "(n-1)-sample weights, (k/(n-1)) rho_{-i}, which reproduces the reference numbers but is not "
    "centred (all-correct groups get -k/(n-1) each). Needs k <= n-1.",
)
def adv_pkpo_loo(b: Batch, *, k: int, variant: str) -> torch.Tensor:
    if variant not in ("centred", "paper"):
        raise ValueError(f"pkpo_loo: variant must be 'centred' or 'paper', got {variant!r}")
    return pkpo_family(b, [("loo_" + variant, k, 1.0)])


@register(
    "pkpo_loo_minus_one", objective=f_pass, derivative=d_pass, unbiased=True, uses_k=True, min_k=2, needs_k_le_n=True,
    objective_formula="1 - (1-p)^k (max@k for continuous rewards)",
    advantage_formula="n/C(n,k) sum_{I ∋ i} (max_I g - max_{I minus i} g); binary: k C(n-c,k-1)/C(n-1,k-1) (correct), 0 (wrong)",
    paper=PAPER_PKPO + "; Tang et al. 2025, arXiv 2503.19595 (k = n)",
    doc="PKPO 'loo-1' weight: baseline is the same subset statistic without sample i, so unbiased. "
    "Works at k = n; needs k >= 2.",
)
def adv_pkpo_loo_minus_one(b: Batch, *, k: int) -> torch.Tensor:
    return pkpo_family(b, [("loo_minus_one", k, 1.0)])


# ---- Chen et al. analytic ----
def _analytic_sigma_floor(n: int, k: int, opts: Mapping[str, Any]) -> float:
    """The smallest sigma(P_K(p_hat)) that keeps every p_hat-mode advantage within the group form's own maximum.

    In p_hat mode A = num(c) / sigma(P_K(p_hat)) with the same numerators as the group form, whose own advantages are
    num(c) / sigma(R(c)). Clipping P_K(p_hat) into the statistic's range still lets sigma(P_K(p_hat)) fall far below
    the sigma of the count actually seen (one success among n = 16, K = 4 at p_hat ~ 1 gave |A| = 32 against a bound
    of 1.73), so the denominator is floored at max_c |num(c)| / bound: then |A| <= bound for every group and p_hat.
    """
    baseline = opts.get("baseline", "mean")
    if n < 2 or (baseline == "loo" and k > n - 1):
        return 0.0
    grp = analytic_tables(n, k, baseline, True)
    bound = float(max(np.abs(grp[0]).max(), np.abs(grp[1]).max()))
    num = analytic_tables(n, k, baseline, False)
    top = float(max(np.abs(num[0]).max(), np.abs(num[1]).max()))
    return top / bound if bound > 0 else 0.0


@register(
    "passk_analytic", objective=f_analytic, derivative=d_analytic, continuous_ok=False, reward_domain="binary",
    uses_k=True, uses_p_hat=True, needs_k_le_n=True,
    defaults={"baseline": "mean", "eps": 1e-6, "p_clip": "group"}, p_range=p_range_analytic,
    sigma_floor=_analytic_sigma_floor,
    objective_formula="(2/K) asin(sqrt(P_K)), P_K = 1 - (1-p)^K",
    advantage_formula="((n/k) s_i - rho(n,c,k)) / sigma, sigma = sqrt(R(1-R)), R = rho(n,c,k) or P_K(p_hat)",
    paper=PAPER_CHEN,
    doc="Chen et al. analytic group advantage (A_+ = (1-R)/sigma, A_- = (1-R-C(N_neg-1,k-1)/C(N-1,k-1))/sigma). "
    "0/1 rewards only. With p_hat = true p (p_clip=0): exact grad F for baseline='loo' (k <= n-1), "
    "(1 - k/n) grad F for baseline='mean'. eps floors sigma only when p_hat is supplied (group-mode "
    "ratios are bounded and computed in log space). With p_clip='group' (default) an outside p_hat is clipped "
    "into the group statistic's range and sigma(P_K(p_hat)) is floored so that no advantage exceeds the group "
    "form's own maximum at n.",
)
def adv_passk_analytic(b: Batch, *, k: int, baseline: str, eps: float, sigma_floor: float = 0.0) -> torch.Tensor:
    require_binary(b, "passk_analytic")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    if baseline == "loo" and k > b.n - 1:
        raise ValueError(f"passk_analytic with baseline='loo' needs k <= n-1, got k={k}, n={b.n}")
    if b.p_hat is None:
        return table_adv(b, analytic_tables(b.n, k, baseline, True))
    num = table_adv(b, analytic_tables(b.n, k, baseline, False))
    big_p = -torch.expm1(k * torch.log1p(-b.p_hat))
    sigma = torch.sqrt((big_p * (1.0 - big_p)).clamp_min(0.0))
    return num * inv(sigma.clamp_min(sigma_floor), eps)[:, None]


# ---- multi-K scalarisation ----
def multi_terms(n: int | None, k: int, weights: Mapping[int, float] | None, term: str) -> list[tuple[str, int, float]]:
    """Validated (kind, k, w) list for multi_k; checks n-limits when n is given."""
    if term not in ("loo_minus_one", "loo"):
        raise ValueError(f"multi_k: term must be 'loo_minus_one' or 'loo', got {term!r}")
    if weights is None:
        weights = {k: 1.0}
    elif not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"multi_k: weights must be a non-empty {{k: w}} mapping, got {weights!r}")
    clean: dict[int, float] = {}
    for kk, w in weights.items():
        if isinstance(kk, str) and kk.strip().isdigit():  # keys that went through JSON
            kk = int(kk)
        if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)) or kk < 1:
            raise ValueError(f"multi_k: weight keys must be integers k >= 1, got {kk!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not math.isfinite(w):
            raise ValueError(f"multi_k: weight for k={kk} must be a finite number, got {w!r}")
        clean[int(kk)] = clean.get(int(kk), 0.0) + float(w)
    if k != 1 and k != max(clean):
        raise ValueError(
            f"multi_k: got k={k} and weights over k={sorted(clean)}; pass k=1 (default) or k=max(weights)"
        )
    terms = []
    for kk, w in sorted(clean.items()):
        if term == "loo":
            kind = "loo_centred"
            if n is not None and kk > n - 1:
                raise ValueError(f"multi_k(term='loo') needs every k <= n-1, got k={kk}, n={n}")
        else:
            kind = "rloo" if kk == 1 else "loo_minus_one"
            if n is not None and (kk > n or (kk == 1 and n < 2)):
                raise ValueError(
                    f"multi_k(term='loo_minus_one') needs k <= n (and n >= 2 for the k=1 RLOO term), got k={kk}, n={n}"
                )
        terms.append((kind, kk, w))
    return terms


def check_multi(n: int, k: int, params: Mapping[str, Any]) -> None:
    multi_terms(n, k, params.get("weights"), params.get("term", "loo_minus_one"))


def f_multi(p: torch.Tensor, *, k: int, weights: Mapping[int, float] | None = None, term: str = "loo_minus_one", **_: Any) -> torch.Tensor:
    out = torch.zeros_like(p)
    for _kind, kk, w in multi_terms(None, k, weights, term):
        out = out + w * f_pass(p, k=kk)
    return out


def d_multi(p: torch.Tensor, *, k: int, weights: Mapping[int, float] | None = None, term: str = "loo_minus_one", **_: Any) -> torch.Tensor:
    out = torch.zeros_like(p)
    for _kind, kk, w in multi_terms(None, k, weights, term):
        out = out + w * alpha_k(p, kk)
    return out


@register(
    "multi_k", objective=f_multi, derivative=d_multi, unbiased=True, uses_k=True, uses_k_weights=True, needs_k_le_n=True,
    defaults={"weights": None, "term": "loo_minus_one"}, check=check_multi,
    objective_formula="sum_k w_k (1 - (1-p)^k)",
    advantage_formula="sum_k w_k A^(k); A^(1) = RLOO, A^(k>=2) = pkpo_loo_minus_one (term='loo': pkpo_loo centred)",
    paper=PAPER_PKPO + "; seed scalarisation J = sum_k w_k pass@k",
    doc="Scalarised multi-k objective. Each term is an unbiased baselined pass@k shaping, so by "
    "linearity the sum is unbiased for grad sum_k w_k pass@k. weights=None means {k: 1}.",
)
def adv_multi_k(b: Batch, *, k: int, weights: Mapping[int, float] | None, term: str) -> torch.Tensor:
    return pkpo_family(b, multi_terms(b.n, k, weights, term))
