"""Advantage shapings for RL with verifiable rewards, each declaring the objective F(p) it ascends.

Public API
----------
``shape(name, rewards, *, k=1, p_hat=None, **params) -> advantages``  ``(G, n)`` in, ``(G, n)`` out
``objective(name, p, *, k=1, **params)``             population-limit F(p) for 0/1 rewards
``objective_derivative(name, p, *, k=1, **params)``  F'(p)
``expected_gain(name, n, p, *, k=1, oracle_p_hat=False, **params)``  exact finite-n gain (below)
``advantage_bound(name, n, *, k=1, **params)``        largest |A| the group form gives at n (0/1 rewards)
``scale_violations(name, rewards, advantages, *, k, ratio)``  groups whose |A| exceed ratio x that bound
``shape_masked(name, rewards, keep, *, k, p_hat, **params)``  groups shaped on their kept samples only
``info(name) -> ShapingInfo``, ``SHAPINGS`` (names), ``REGISTRY`` (name -> ShapingSpec)

Conventions
-----------
``rewards`` is ``(G, n)``: G prompts (groups) x n samples. The policy loss **averages**
A_i * log pi(y_i) over the n samples of a group, so a shaping is *unbiased for F* when

    E[(1/n) * sum_i A_i * grad log pi(y_i)] = grad F(p)      exactly, for every admissible n.

PKPO (Walder & Karkhanis 2025, arXiv 2505.15201) states its weights s_i in the *sum* convention;
here A_i = n * s_i.

Why the expected update of a 0/1-reward shaping is a multiple of grad p: if A_i depends only on the
own reward r_i and the group count c, conditioning on y_1 gives

    E[(1/n) sum_i A_i grad log pi(y_i)] = gain_n(p) * grad p,
    gain_n(p) = E_{C ~ Bin(n-1, p)}[A_+(C + 1) - A_-(C)],

because sum_{y correct} pi(y) grad log pi(y) = grad p and the wrong answers contribute -grad p.
``expected_gain`` evaluates gain_n(p) with the shipped code; a shaping is unbiased for F iff
gain_n(p) = F'(p) for all p. The tests check this identity by brute-force enumeration of all M^n
sample sequences of a softmax policy.

Plug-in shapings (grpo, dr_grpo, passk_grpo, passk_alpha, log_passk, passk_analytic) scale by a
function of p_hat taken from the same group, which couples the scale with the sample and biases the
update at finite n (it converges to F'(p) as n -> inf). Passing ``p_hat`` from elsewhere (a central
estimator) removes that coupling: with ``baseline="loo"`` and p_hat equal to the true p the update
is exactly grad F; with the default ``baseline="mean"`` it is exactly (1 - 1/n) * grad F
(passk_analytic: (1 - k/n) * grad F), since the group mean includes the sample itself.

Numerics: everything is computed in float64 and cast back to the input dtype. alpha_K, w_K and
binomial ratios are evaluated in log space; for K <= 1024, n <= 1024 and p_hat anywhere in [0, 1]
no output is NaN or inf. Groups whose rewards are all equal get exactly zero advantages from every
baselined shaping (all but raw ``pkpo``).
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from passk_rl.estimators import _log_fail_ratio_table, _max_at_k_weights, as_tensor64

__all__ = [
    "shape",
    "objective",
    "objective_derivative",
    "expected_gain",
    "advantage_bound",
    "scale_violations",
    "shape_masked",
    "info",
    "ShapingInfo",
    "ShapingSpec",
    "SHAPINGS",
    "REGISTRY",
]


# ============================================================================================
# metadata
# ============================================================================================
@dataclass(frozen=True)
class ShapingInfo:
    """What a shaping promises.

    Attributes:
        name: registry name.
        unbiased: E[(1/n) sum A_i grad log pi] = grad F exactly for every admissible n, with nothing
            but the group itself (no external p_hat needed).
        continuous_ok: accepts non-binary rewards (``reward_domain`` says which).
        reward_domain: "binary" (0/1 only), "unit" (values in [0, 1]; p_hat = mean reward) or "real".
        uses_k: whether ``k`` changes the result (pass@1 shapings ignore it).
        uses_p_hat: plug-in shaping; ``p_hat`` (G,) replaces the group estimate when given.
        baselined: all-equal groups get zero advantages (for pkpo_loo: the default 'centred' variant).
        min_k: smallest admissible k.
        needs_k_le_n / needs_k_le_n_minus_1: combinatorial limit on k given the group size n.
        uses_k_weights: the Ks come from a ``weights`` {k: w} parameter (k itself must be 1 or max(weights)).
        objective_formula: F(p) for 0/1 rewards in the population limit (text).
        advantage_formula: mean-convention advantage formula (text).
        paper: source.
        doc: one-paragraph description, including bias statements.
    """

    name: str
    unbiased: bool
    continuous_ok: bool
    reward_domain: str
    uses_k: bool
    uses_p_hat: bool
    baselined: bool
    min_k: int
    needs_k_le_n: bool
    needs_k_le_n_minus_1: bool
    objective_formula: str
    advantage_formula: str
    paper: str
    doc: str
    uses_k_weights: bool = False  # takes its Ks from a {k: w} ``weights`` param (a multi-K schedule's output)

    def check_k(self, n: int, k: int) -> None:
        """Raise ValueError when (n, k) is outside what this shaping can take."""
        k_eff = k if self.uses_k else 1
        if k_eff < self.min_k:
            raise ValueError(f"shaping {self.name!r} needs k >= {self.min_k}, got k={k}")
        if self.needs_k_le_n_minus_1 and k_eff > n - 1:
            raise ValueError(
                f"shaping {self.name!r} needs k <= n-1 (a leave-one-out baseline), got k={k_eff}, n={n}"
            )
        if self.needs_k_le_n and k_eff > n:
            raise ValueError(f"shaping {self.name!r} needs k <= n, got k={k_eff}, n={n}")


@dataclass(frozen=True)
class ShapingSpec:
    """Registry entry: the advantage function, its declared objective F and F', and metadata."""

    info: ShapingInfo
    advantages: Callable[..., torch.Tensor]
    objective: Callable[..., torch.Tensor]
    derivative: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[..., None] | None = None  # extra (n, k, params) validation; default info.check_k
    # Whether all-equal groups get zero advantages under these params (then shape() zeroes them
    # exactly, removing round-off); default info.baselined.
    zero_on_constant: Callable[[Mapping[str, Any]], bool] | None = None
    # Plug-ins: the interval of p an n-sample group can express for this shaping's statistic, (n, k) -> (lo, hi);
    # an outside p_hat is clipped into it by default (``p_clip="group"``, see ``_clip_p_hat``).
    p_range: Callable[[int, int], tuple[float, float]] | None = None


@dataclass(frozen=True)
class _Batch:
    """Validated float64 rewards plus per-group summaries shared by every shaping."""

    r: torch.Tensor  # (G, n) float64
    n: int
    total: torch.Tensor  # (G, 1) row sums
    binary: bool
    c: torch.Tensor | None  # (G,) int64 counts when binary
    p_hat: torch.Tensor | None  # (G,) float64 in [0, 1] when supplied

    @property
    def device(self) -> torch.device:
        return self.r.device

    def group_p(self) -> torch.Tensor:
        """p_hat if supplied, else the group mean reward. (G,)"""
        return self.p_hat if self.p_hat is not None else self.total[:, 0] / self.n


# ============================================================================================
# shared kernels
# ============================================================================================
def _log_alpha(p: torch.Tensor, k: int) -> torch.Tensor:
    """log alpha_K(p) = log K + (K-1) log(1-p); xlog1py keeps K = 1, p = 1 at 0 (not 0*-inf = nan)."""
    return math.log(k) + torch.special.xlog1py(torch.tensor(float(k - 1), dtype=p.dtype, device=p.device), -p)


def _log_pass(p: torch.Tensor, k: int) -> torch.Tensor:
    """log(1 - (1-p)^K) via log(-expm1(K log1p(-p))); -inf at p = 0."""
    return torch.log(-torch.expm1(k * torch.log1p(-p)))


def _alpha(p: torch.Tensor, k: int) -> torch.Tensor:
    """alpha_K(p) = K (1-p)^(K-1) = d/dp pass@K, in [0, K]."""
    return torch.exp(_log_alpha(p, k))


def _w(p: torch.Tensor, k: int) -> torch.Tensor:
    """w_K(p) = K (1-p)^(K-1) / (1 - (1-p)^K) = d/dp log pass@K; +inf at p = 0 (callers floor p)."""
    return torch.exp(_log_alpha(p, k) - _log_pass(p, k))


def _inv(den: torch.Tensor, floor: float) -> torch.Tensor:
    """1 / max(den, floor) per group, and 0 where that is 1/0 (in group mode the numerator is 0 there).

    Inverting the (G,) vector and multiplying once keeps the (G, n) work to a single pass."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float, np.integer, np.floating)) or not (
        math.isfinite(floor) and floor >= 0
    ):
        raise ValueError(f"eps must be a finite number >= 0, got {floor!r}")
    den = den.clamp_min(floor) if floor > 0 else den
    ok = den > 0
    return torch.where(ok, 1.0 / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))


def _centred(b: _Batch, baseline: str) -> torch.Tensor:
    """r_i - b_i with b_i the group mean ("mean") or the mean of the other n-1 rewards ("loo")."""
    if baseline == "mean":
        return b.r - b.total / b.n
    if baseline == "loo":
        if b.n < 2:
            raise ValueError(f"baseline='loo' needs n >= 2 samples per group, got n={b.n}")
        return (b.n * b.r - b.total) / (b.n - 1)
    raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")


def _sigma(b: _Batch, ddof: int) -> torch.Tensor:
    """Group std of the rewards (G,), or sqrt(p_hat (1 - p_hat)) when p_hat is supplied."""
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if b.p_hat is not None:
        return torch.sqrt((b.p_hat * (1.0 - b.p_hat)).clamp_min(0.0))
    if b.n - ddof <= 0:  # n = 1 with ddof = 1: the (all-equal) group carries no signal anyway
        return torch.zeros(b.r.shape[0], dtype=b.r.dtype, device=b.device)
    if b.binary:  # sum of squares = c, so the variance needs no pass over (G, n)
        c = b.total[:, 0]
        return torch.sqrt((c - c * c / b.n).clamp_min(0.0) / (b.n - ddof))
    mean = b.total / b.n
    return torch.sqrt(((b.r - mean) ** 2).sum(1) / (b.n - ddof))


def _gather(b: _Batch, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Binary rewards: A = pos[c] for correct samples, neg[c] for wrong ones. pos/neg are (n+1,)."""
    assert b.c is not None
    return torch.where(b.r > 0.5, pos[b.c][:, None], neg[b.c][:, None])


def _require_binary(b: _Batch, name: str) -> None:
    if not b.binary:
        bad = b.r[(b.r != 0) & (b.r != 1)][0].item()
        raise ValueError(f"shaping {name!r} needs 0/1 rewards, got {bad!r}")


def _p_range_mean(n: int, k: int) -> tuple[float, float]:
    """[1/n, 1 - 1/n]: the group mean of n 0/1 rewards is never strictly inside (0, 1/n) or (1 - 1/n, 1), so a
    p_hat there yields a scale (1/sigma, alpha_K, w_K) no group of this size can produce."""
    return (1.0 / n, 1.0 - 1.0 / n) if n >= 2 else (0.0, 1.0)


def _p_range_analytic(n: int, k: int) -> tuple[float, float]:
    """p whose P_K = 1-(1-p)^K spans the group statistic R = rho(n, c, k) over its non-degenerate values:
    R(c=1) = k/n and R(c=n-k) = 1 - 1/C(n, k) (larger c give R = 1 exactly)."""
    if n < 2 or k >= n:
        return (0.0, 1.0)  # k = n: R is 0 or 1, the group form vanishes identically; nothing to match
    lo = -math.expm1(math.log1p(-k / n) / k)  # P_K(lo) = k/n
    log_c = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    hi = -math.expm1(-log_c / k)  # 1 - (1 - hi)^k = 1 - 1/C(n, k)
    return (lo, max(lo, hi))


def _clip_p_hat(spec: "ShapingSpec", p: torch.Tensor | None, n: int, k: int, p_clip: Any) -> torch.Tensor | None:
    """Clip an outside p_hat (G,) into the range an n-sample group can express.

    Why: a plug-in scale (1/sqrt(p(1-p)), alpha_K(p)/sigma, w_K(p), 1/sigma(P_K)) grows without bound as p_hat
    nears 0 or 1. A central estimator's p_hat for a prompt that has rarely been solved sits near 0, and the
    one success in a group then got an advantage of ~1e4 (grpo, EMA p_hat; the GRPO blow-up of issue 11).
    Clipping to the group's own range keeps every advantage within what the group form itself can give at this
    n (``advantage_bound``). Cost: for a true p outside [lo, hi] the update is no longer exactly grad F; it is
    the update for p = lo (a smaller weight on prompts rarer than 1 in n). ``p_clip=0`` turns the clip off
    (exactness tests); a number c in (0, 0.5) clips to [c, 1 - c].
    """
    if isinstance(p_clip, str):
        if p_clip != "group":
            raise ValueError(f"p_clip must be 'group' or a number in [0, 0.5), got {p_clip!r}")
        lo, hi = spec.p_range(n, k) if spec.p_range is not None else (0.0, 1.0)
    elif isinstance(p_clip, bool) or not isinstance(p_clip, (int, float, np.integer, np.floating)) or not (
        0.0 <= float(p_clip) < 0.5
    ):
        raise ValueError(f"p_clip must be 'group' or a number in [0, 0.5), got {p_clip!r}")
    else:
        lo, hi = float(p_clip), 1.0 - float(p_clip)
    if p is None:
        return None
    return p.clamp(lo, hi) if (lo > 0.0 or hi < 1.0) else p


# ---- binary tables: mean-convention advantages as functions of the count c (index 0..n) ----
def _t(n: int, k: int) -> np.ndarray:
    """C(n-c, k)/C(n, k) for c = 0..n (the probability that a k-subset has no correct sample)."""
    return np.exp(_log_fail_ratio_table(n, k))


def _rho(n: int, k: int) -> np.ndarray:
    """Unbiased pass@k rho(n, c, k) for c = 0..n, via -expm1 for full relative precision."""
    return 0.0 - np.expm1(_log_fail_ratio_table(n, k))


@functools.lru_cache(maxsize=1024)
def _binary_tables(kind: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A_+[c], A_-[c]) for c = 0..n, mean convention; entries that cannot occur are 0.

    Derivations (t(m, c, j) = C(m-c, j)/C(m, j), rho = 1 - t; sum-convention weights times n):
      raw PKPO      A_+ = k,                      A_- = k rho(n-1, c, k-1)
      LOO centred   A_+ = k t(n-1, c-1, k),       A_- = -k c t(n-1, c, k-1) / (n-k)
      LOO paper     A_+ = k - nk/(n-1) rho(n-1, c-1, k),
                    A_- = k rho(n-1, c, k-1) - nk/(n-1) rho(n-1, c, k)
      LOO-1         A_+ = k t(n-1, c-1, k-1),     A_- = 0
      RLOO          A_+ = (n-c)/(n-1),            A_- = -c/(n-1)
    The centred LOO A_- uses t(m,c,k) - t(m,c,k-1) = -c/(m-k+1) t(m,c,k-1), which avoids the
    cancellation of subtracting two pass@k values.
    """
    pos = np.zeros(n + 1)
    neg = np.zeros(n + 1)
    c = np.arange(n + 1, dtype=np.float64)
    if kind == "raw":
        pos[1:] = k
        neg[:n] = k * _rho(n - 1, k - 1)
    elif kind == "loo_centred":
        pos[1:] = k * _t(n - 1, k)
        neg[:n] = -k * c[:n] * _t(n - 1, k - 1) / (n - k)
    elif kind == "loo_paper":
        scale = n * k / (n - 1)
        pos[1:] = k - scale * _rho(n - 1, k)
        neg[:n] = k * _rho(n - 1, k - 1) - scale * _rho(n - 1, k)
    elif kind == "loo_minus_one":
        pos[1:] = k * _t(n - 1, k - 1)
    elif kind == "rloo":
        pos[1:] = (n - c[1:]) / (n - 1)
        neg[:n] = -c[:n] / (n - 1)
    else:  # pragma: no cover - internal names only
        raise KeyError(kind)
    pos.flags.writeable = False
    neg.flags.writeable = False
    return pos, neg


@functools.lru_cache(maxsize=1024)
def _analytic_tables(n: int, k: int, baseline: str, group_sigma: bool) -> tuple[np.ndarray, np.ndarray]:
    """Chen et al. (arXiv 2508.10751) numerators, optionally divided by the group sigma, for c = 0..n.

    Numerators ((n/k) s_i - baseline) with s_i the PKPO sum-convention weight:
      mean baseline rho(n,c,k):   A_+ = t(n,c,k),          A_- = -(c/n) t(n-1,c,k-1)
      loo baseline rho(n-1,.,k):  A_+ = t(n-1,c-1,k),      A_- = -c/(n-k) t(n-1,c,k-1)
    (identities: t(n,c,k) = ((n-c)/n) t(n-1,c,k-1) and t(n-1,c,k) - t(n-1,c,k-1) = -c/(n-k) t(n-1,c,k-1)).
    Group sigma = sqrt(R(1-R)), R = rho(n,c,k). Ratios are formed in log space: t can underflow for
    large n, k while numerator/sigma stays O(sqrt(n)); where sigma = 0 the numerator is 0 too and
    the entry is 0.
    """
    c = np.arange(n + 1, dtype=np.float64)
    lt_n = np.asarray(_log_fail_ratio_table(n, k))
    lt_m1 = np.full(n + 1, -np.inf)
    lt_m1[:n] = _log_fail_ratio_table(n - 1, k - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if baseline == "mean":
            log_pos = lt_n.copy()
            log_neg = np.log(c / n) + lt_m1
        else:
            log_pos = np.full(n + 1, -np.inf)
            log_pos[1:] = _log_fail_ratio_table(n - 1, k)
            log_neg = np.log(c / (n - k)) + lt_m1
        if group_sigma:
            log_rho = np.log(-np.expm1(lt_n))
            log_sigma = 0.5 * (lt_n + log_rho)
            ok = np.isfinite(log_sigma)
            pos = np.where(ok, np.exp(log_pos - np.where(ok, log_sigma, 0.0)), 0.0)
            neg = np.where(ok, -np.exp(log_neg - np.where(ok, log_sigma, 0.0)), 0.0)
        else:
            pos, neg = np.exp(log_pos), -np.exp(log_neg)
    pos[0] = 0.0  # no correct sample when c = 0
    neg[n] = 0.0  # no wrong sample when c = n
    neg = np.where(neg == 0.0, 0.0, neg)  # drop the sign of -0.0
    pos.flags.writeable = False
    neg.flags.writeable = False
    return pos, neg


def _table_adv(b: _Batch, tables: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    pos, neg = (as_tensor64(t, b.device) for t in tables)
    return _gather(b, pos, neg)


# ---- continuous rewards: O(n log n) PKPO family on sorted rewards ----
def _sorted_kind(vals: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """Mean-convention advantages in sorted order for ascending ``vals`` (G, n), float64.

    With u_m = C(m-1,k-1)/C(n,k) (rank m = 1..n) and v_m = u_{m+1} (k-1)/m = C(m-1,k-2)/C(n,k):
      raw     s_(i) = u_i g_i + sum_{m>i} v_{m-1} g_m          (subsets where i is / is not the max)
      loo-1   s_(i) = u_i g_i - sum_{m<i} v_m g_m              (max_I - max_{I minus i}; only when i is the max)
      rho_-i        = n/(n-k) [sum_{m<i} u_m g_m + sum_{m>i} u_{m-1} g_m]   (max@k of the other n-1)
    Exclusive prefix/suffix sums (a cumsum minus the own term / from the row total) make every kind
    O(n) after the sort; their round-off is eps * max|g|, the same order as the sums themselves.
    """
    n = vals.shape[1]
    dev = vals.device
    if kind == "rloo":
        return (n * vals - vals.sum(1, keepdim=True)) / (n - 1)
    u = as_tensor64(_max_at_k_weights(n, k), dev)
    v = torch.zeros(n, dtype=torch.float64, device=dev)
    if n > 1:
        v[: n - 1] = u[1:] * (k - 1) / torch.arange(1, n, dtype=torch.float64, device=dev)
    own = u * vals
    if kind == "loo_minus_one":
        vg = v * vals
        return n * (own - (torch.cumsum(vg, dim=1) - vg))
    # raw weight s_(i), needed by raw and both LOO variants; h_m = v_{m-1} g_m
    v_shift = torch.cat([v.new_zeros(1), v[: n - 1]])
    h = v_shift * vals
    s = own + (h.sum(1, keepdim=True) - torch.cumsum(h, dim=1))
    if kind == "raw":
        return n * s
    u_shift = torch.cat([u.new_zeros(1), u[: n - 1]])
    hu = u_shift * vals
    rho_minus = (n / (n - k)) * ((torch.cumsum(own, dim=1) - own) + (hu.sum(1, keepdim=True) - torch.cumsum(hu, dim=1)))
    scale = k if kind == "loo_centred" else n * k / (n - 1)
    return n * s - scale * rho_minus


def _tie_average(vals: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Average ``a`` over runs of equal ``vals`` (sorted rows).

    Tied samples have identical advantages mathematically (the subset statistics do not see the tie
    order); averaging removes the round-off difference so permutation equivariance is exact.
    """
    same = vals[:, 1:] == vals[:, :-1]
    if not bool(same.any()):
        return a
    g_rows, n = vals.shape
    run = torch.cat([torch.zeros(g_rows, 1, dtype=torch.long, device=vals.device), (~same).long().cumsum(1)], 1)
    flat = (run + n * torch.arange(g_rows, device=vals.device)[:, None]).reshape(-1)
    sums = torch.zeros(g_rows * n, dtype=a.dtype, device=a.device).index_add_(0, flat, a.reshape(-1))
    cnts = torch.zeros(g_rows * n, dtype=a.dtype, device=a.device).index_add_(0, flat, torch.ones_like(a).reshape(-1))
    return (sums / cnts.clamp_min(1.0))[flat].reshape(g_rows, n)


def _continuous(b: _Batch, terms: list[tuple[str, int, float]]) -> torch.Tensor:
    """sum_w w * A^(kind, k) for continuous rewards with one sort per call."""
    # Tie order is irrelevant (tied samples are averaged below), so the faster unstable sort is fine.
    vals, idx = torch.sort(b.r, dim=1)
    acc = torch.zeros_like(vals)
    for kind, k, w in terms:
        acc = acc + w * _sorted_kind(vals, kind, k)
    acc = _tie_average(vals, acc)
    return torch.empty_like(acc).scatter_(1, idx, acc)


def _pkpo_family(b: _Batch, terms: list[tuple[str, int, float]]) -> torch.Tensor:
    if b.binary:
        pos = np.zeros(b.n + 1)
        neg = np.zeros(b.n + 1)
        for kind, k, w in terms:
            tp, tn = _binary_tables(kind, b.n, k)
            pos = pos + w * tp
            neg = neg + w * tn
        return _table_adv(b, (pos, neg))
    return _continuous(b, terms)


# ============================================================================================
# advantage functions: (batch, *, k, **params) -> (G, n) float64
# ============================================================================================
def _adv_grpo(b: _Batch, *, k: int, baseline: str, eps: float, ddof: int) -> torch.Tensor:
    return _centred(b, baseline) * _inv(_sigma(b, ddof), eps)[:, None]


def _adv_dr_grpo(b: _Batch, *, k: int) -> torch.Tensor:
    return b.r - b.total / b.n


def _adv_rloo(b: _Batch, *, k: int) -> torch.Tensor:
    return _centred(b, "loo")


def _adv_passk_grpo(b: _Batch, *, k: int, baseline: str, eps: float, ddof: int) -> torch.Tensor:
    scale = _alpha(b.group_p(), k) * _inv(_sigma(b, ddof), eps)
    return _centred(b, baseline) * scale[:, None]


def _adv_passk_alpha(b: _Batch, *, k: int, baseline: str) -> torch.Tensor:
    return _alpha(b.group_p(), k)[:, None] * _centred(b, baseline)


def _adv_log_passk(b: _Batch, *, k: int, baseline: str, p_floor: float) -> torch.Tensor:
    if isinstance(p_floor, bool) or not isinstance(p_floor, (int, float, np.integer, np.floating)) or not 0.0 < p_floor <= 1.0:
        raise ValueError(f"log_passk: p_floor must lie in (0, 1], got {p_floor!r}")
    return _w(b.group_p().clamp_min(p_floor), k)[:, None] * _centred(b, baseline)


def _adv_pkpo(b: _Batch, *, k: int) -> torch.Tensor:
    return _pkpo_family(b, [("raw", k, 1.0)])


def _adv_pkpo_loo(b: _Batch, *, k: int, variant: str) -> torch.Tensor:
    if variant not in ("centred", "paper"):
        raise ValueError(f"pkpo_loo: variant must be 'centred' or 'paper', got {variant!r}")
    return _pkpo_family(b, [("loo_" + variant, k, 1.0)])


def _adv_pkpo_loo_minus_one(b: _Batch, *, k: int) -> torch.Tensor:
    return _pkpo_family(b, [("loo_minus_one", k, 1.0)])


def _adv_passk_analytic(b: _Batch, *, k: int, baseline: str, eps: float) -> torch.Tensor:
    _require_binary(b, "passk_analytic")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    if baseline == "loo" and k > b.n - 1:
        raise ValueError(f"passk_analytic with baseline='loo' needs k <= n-1, got k={k}, n={b.n}")
    if b.p_hat is None:
        return _table_adv(b, _analytic_tables(b.n, k, baseline, True))
    num = _table_adv(b, _analytic_tables(b.n, k, baseline, False))
    big_p = -torch.expm1(k * torch.log1p(-b.p_hat))
    sigma = torch.sqrt((big_p * (1.0 - big_p)).clamp_min(0.0))
    return num * _inv(sigma, eps)[:, None]


def _multi_terms(n: int | None, k: int, weights: Mapping[int, float] | None, term: str) -> list[tuple[str, int, float]]:
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


def _adv_multi_k(b: _Batch, *, k: int, weights: Mapping[int, float] | None, term: str) -> torch.Tensor:
    return _pkpo_family(b, _multi_terms(b.n, k, weights, term))


# ============================================================================================
# objectives F(p) and F'(p) (torch float64 in, torch out; differentiable)
# ============================================================================================
def _f_identity(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return p.clone()


def _d_identity(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return torch.ones_like(p)


def _f_arcsin(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return 2.0 * torch.asin(torch.sqrt(p))


def _d_arcsin(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return 1.0 / torch.sqrt(p * (1.0 - p))


def _f_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return -torch.expm1(k * torch.log1p(-p))


def _d_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return _alpha(p, k)


def _f_log_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return _log_pass(p, k)


def _d_log_pass(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return _w(p, k)


def _f_passk_grpo(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
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


def _d_passk_grpo(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return _alpha(p, k) / torch.sqrt(p * (1.0 - p))


def _f_analytic(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    # asin(sqrt P) = atan2(sqrt P, sqrt(1-P)) with both P and 1-P = (1-p)^K formed without
    # cancellation, so F keeps full precision when P_K is within 1e-16 of 0 or 1.
    log_q = k * torch.log1p(-p)
    return (2.0 / k) * torch.atan2(torch.sqrt(-torch.expm1(log_q)), torch.exp(0.5 * log_q))


def _d_analytic(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    # (1-p)^(K-1) / sqrt(P (1-P)) with 1-P = (1-p)^K:  = (1-p)^(K/2-1) / sqrt(P), in log space.
    log_q_half = torch.special.xlog1py(torch.tensor(k / 2.0 - 1.0, dtype=p.dtype, device=p.device), -p)
    return torch.exp(log_q_half - 0.5 * _log_pass(p, k))


def _f_multi(p: torch.Tensor, *, k: int, weights: Mapping[int, float] | None = None, term: str = "loo_minus_one", **_: Any) -> torch.Tensor:
    out = torch.zeros_like(p)
    for _kind, kk, w in _multi_terms(None, k, weights, term):
        out = out + w * _f_pass(p, k=kk)
    return out


def _d_multi(p: torch.Tensor, *, k: int, weights: Mapping[int, float] | None = None, term: str = "loo_minus_one", **_: Any) -> torch.Tensor:
    out = torch.zeros_like(p)
    for _kind, kk, w in _multi_terms(None, k, weights, term):
        out = out + w * _alpha(p, kk)
    return out


# ============================================================================================
# registry
# ============================================================================================
_PAPER_GRPO = "Shao et al. 2024, DeepSeekMath (GRPO), arXiv 2402.03300"
_PAPER_DR = "Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO), arXiv 2503.20783"
_PAPER_RLOO = "Kool et al. 2019 'Buy 4 REINFORCE samples'; Ahmadian et al. 2024, arXiv 2402.14740"
_PAPER_PKPO = "Walder & Karkhanis 2025, Pass@K Policy Optimization, arXiv 2505.15201"
_PAPER_SEED = "passk-rl seed brief (shared/seed/pass-at-k-seed.md); cf. arXiv 2510.23049"
_PAPER_CHEN = "Chen et al. 2025, Pass@k Training for Adaptively Balancing Exploration and Exploitation, arXiv 2508.10751"

_PLUGIN_NOTE = (
    " Plug-in: with p_hat from the group the finite-n update is biased (gain_n(p) -> F'(p) as n grows); "
    "with p_hat = true p (and p_clip=0) it is exactly grad F for baseline='loo' and (1-1/n) grad F for "
    "baseline='mean'. An outside p_hat is clipped to the range an n-sample group can express "
    "(p_clip='group', default), which bounds every advantage by the group form's own maximum."
)


def _spec(**kw: Any) -> ShapingSpec:
    names = ("advantages", "objective", "derivative", "defaults", "check", "zero_on_constant", "p_range")
    spec_kw = {key: kw.pop(key) for key in names if key in kw}
    return ShapingSpec(info=ShapingInfo(**kw), **spec_kw)


def _check_multi(n: int, k: int, params: Mapping[str, Any]) -> None:
    _multi_terms(n, k, params.get("weights"), params.get("term", "loo_minus_one"))


_ENTRIES: tuple[ShapingSpec, ...] = (
    _spec(
        name="grpo", unbiased=False, continuous_ok=True, reward_domain="real", uses_k=False,
        uses_p_hat=True, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=False,
        objective_formula="2 asin(sqrt p)", advantage_formula="(r_i - b_i) / max(sigma, eps); sigma = group std, or sqrt(p_hat(1-p_hat)) when p_hat is given",
        paper=_PAPER_GRPO,
        doc="Group-normalised advantage. Population limit ascends 2 asin(sqrt p) (F' = 1/sqrt(p(1-p))), not p."
        + _PLUGIN_NOTE + " k is ignored. ddof=0 (default) makes group mode equal p_hat mode at p_hat = c/n; ddof=1 matches verl/TRL.",
        advantages=_adv_grpo, objective=_f_arcsin, derivative=_d_arcsin,
        defaults={"baseline": "mean", "eps": 1e-6, "ddof": 0, "p_clip": "group"}, p_range=_p_range_mean,
    ),
    _spec(
        name="dr_grpo", unbiased=False, continuous_ok=True, reward_domain="real", uses_k=False,
        uses_p_hat=False, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=False,
        objective_formula="p", advantage_formula="r_i - mean(r)", paper=_PAPER_DR,
        doc="Group-mean baseline, no std. Exact expected update (1 - 1/n) grad p: right direction, "
        "scaled by (n-1)/n because the baseline contains the sample itself. k and p_hat are ignored.",
        advantages=_adv_dr_grpo, objective=_f_identity, derivative=_d_identity,
    ),
    _spec(
        name="rloo", unbiased=True, continuous_ok=True, reward_domain="real", uses_k=False,
        uses_p_hat=False, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=True,
        objective_formula="p (E[r] for continuous rewards)", advantage_formula="r_i - mean_{j != i} r_j = (n r_i - sum r)/(n-1)",
        paper=_PAPER_RLOO,
        doc="REINFORCE leave-one-out. Unbiased for grad p (grad E[r]) for every n >= 2; equals "
        "pkpo_loo and multi_k at k = 1. k and p_hat are ignored.",
        advantages=_adv_rloo, objective=_f_identity, derivative=_d_identity,
    ),
    _spec(
        name="passk_grpo", unbiased=False, continuous_ok=True, reward_domain="unit", uses_k=True,
        uses_p_hat=True, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=False,
        objective_formula="int_0^p K(1-t)^(K-1)/sqrt(t(1-t)) dt = 2K int_0^asin(sqrt p) cos^(2K-2)",
        advantage_formula="alpha_K(p_hat) (r_i - b_i) / max(sigma, eps), alpha_K(p) = K (1-p)^(K-1)",
        paper=_PAPER_SEED,
        doc="The seed's Pass@K-GRPO pseudocode. Its population limit is NOT pass@K: the std division "
        "adds 1/sqrt(p(1-p)). K may exceed n." + _PLUGIN_NOTE,
        advantages=_adv_passk_grpo, objective=_f_passk_grpo, derivative=_d_passk_grpo,
        defaults={"baseline": "mean", "eps": 1e-6, "ddof": 0, "p_clip": "group"}, p_range=_p_range_mean,
    ),
    _spec(
        name="passk_alpha", unbiased=False, continuous_ok=True, reward_domain="unit", uses_k=True,
        uses_p_hat=True, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=False,
        objective_formula="1 - (1-p)^K", advantage_formula="alpha_K(p_hat) (r_i - b_i)", paper=_PAPER_SEED,
        doc="The seed's 'optimal shaping'. Population limit ascends pass@K; with p_hat from the group "
        "it is biased at finite n. K may exceed n." + _PLUGIN_NOTE,
        advantages=_adv_passk_alpha, objective=_f_pass, derivative=_d_pass,
        defaults={"baseline": "mean", "p_clip": "group"}, p_range=_p_range_mean,
    ),
    _spec(
        name="log_passk", unbiased=False, continuous_ok=True, reward_domain="unit", uses_k=True,
        uses_p_hat=True, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=False,
        objective_formula="log(1 - (1-p)^K)",
        advantage_formula="w_K(max(p_hat, p_floor)) (r_i - b_i), w_K = K(1-p)^(K-1)/(1-(1-p)^K)",
        paper=_PAPER_SEED,
        doc="The seed's surrogate-reward weight. It ascends log pass@K (same per-prompt maximiser as "
        "pass@K, different weighting across prompts), not pass@K. p_hat is floored at p_floor "
        "(default 1e-6) because w_K -> inf as p -> 0." + _PLUGIN_NOTE,
        advantages=_adv_log_passk, objective=_f_log_pass, derivative=_d_log_pass,
        defaults={"baseline": "mean", "p_floor": 1e-6, "p_clip": "group"}, p_range=_p_range_mean,
    ),
    _spec(
        name="pkpo", unbiased=True, continuous_ok=True, reward_domain="real", uses_k=True,
        uses_p_hat=False, baselined=False, min_k=1, needs_k_le_n=True, needs_k_le_n_minus_1=False,
        objective_formula="1 - (1-p)^k (max@k for continuous rewards)",
        advantage_formula="n s_i; binary: k (correct), k rho(n-1, c, k-1) (wrong)", paper=_PAPER_PKPO,
        doc="Raw unbiased PKPO weight, no baseline (wrong samples get positive weight). O(n log n) for "
        "continuous rewards. p_hat is ignored.",
        advantages=_adv_pkpo, objective=_f_pass, derivative=_d_pass,
    ),
    _spec(
        name="pkpo_loo", unbiased=True, continuous_ok=True, reward_domain="real", uses_k=True,
        uses_p_hat=False, baselined=True, min_k=1, needs_k_le_n=False, needs_k_le_n_minus_1=True,
        objective_formula="1 - (1-p)^k (max@k for continuous rewards)",
        advantage_formula="centred: n s_i - k rho_{-i}; paper: n s_i - n k/(n-1) rho_{-i} (rho_{-i}: max@k of the other n-1)",
        paper=_PAPER_PKPO,
        doc="PKPO weight minus a leave-one-out baseline (independent of sample i, so unbiased). "
        "variant='centred' (default) uses (k/n) rho_{-i}: advantages sum to 0 in every group, vanish on "
        "all-equal groups and equal RLOO at k = 1. variant='paper' uses the mean of the other samples' "
        "(n-1)-sample weights, (k/(n-1)) rho_{-i}, which reproduces the reference numbers but is not "
        "centred (all-correct groups get -k/(n-1) each). Needs k <= n-1.",
        advantages=_adv_pkpo_loo, objective=_f_pass, derivative=_d_pass,
        defaults={"variant": "centred"}, zero_on_constant=lambda opts: opts["variant"] == "centred",
    ),
    _spec(
        name="pkpo_loo_minus_one", unbiased=True, continuous_ok=True, reward_domain="real", uses_k=True,
        uses_p_hat=False, baselined=True, min_k=2, needs_k_le_n=True, needs_k_le_n_minus_1=False,
        objective_formula="1 - (1-p)^k (max@k for continuous rewards)",
        advantage_formula="n/C(n,k) sum_{I ∋ i} (max_I g - max_{I minus i} g); binary: k C(n-c,k-1)/C(n-1,k-1) (correct), 0 (wrong)",
        paper=_PAPER_PKPO + "; Tang et al. 2025, arXiv 2503.19595 (k = n)",
        doc="PKPO 'loo-1' weight: baseline is the same subset statistic without sample i, so unbiased. "
        "Works at k = n; needs k >= 2.",
        advantages=_adv_pkpo_loo_minus_one, objective=_f_pass, derivative=_d_pass,
    ),
    _spec(
        name="passk_analytic", unbiased=False, continuous_ok=False, reward_domain="binary", uses_k=True,
        uses_p_hat=True, baselined=True, min_k=1, needs_k_le_n=True, needs_k_le_n_minus_1=False,
        objective_formula="(2/K) asin(sqrt(P_K)), P_K = 1 - (1-p)^K",
        advantage_formula="((n/k) s_i - rho(n,c,k)) / sigma, sigma = sqrt(R(1-R)), R = rho(n,c,k) or P_K(p_hat)",
        paper=_PAPER_CHEN,
        doc="Chen et al. analytic group advantage (A_+ = (1-R)/sigma, A_- = (1-R-C(N_neg-1,k-1)/C(N-1,k-1))/sigma). "
        "0/1 rewards only. With p_hat = true p: exact grad F for baseline='loo' (k <= n-1), "
        "(1 - k/n) grad F for baseline='mean'. eps floors sigma only when p_hat is supplied (group-mode "
        "ratios are bounded and computed in log space).",
        advantages=_adv_passk_analytic, objective=_f_analytic, derivative=_d_analytic,
        defaults={"baseline": "mean", "eps": 1e-6, "p_clip": "group"}, p_range=_p_range_analytic,
    ),
    _spec(
        name="multi_k", unbiased=True, continuous_ok=True, reward_domain="real", uses_k=True, uses_k_weights=True,
        uses_p_hat=False, baselined=True, min_k=1, needs_k_le_n=True, needs_k_le_n_minus_1=False,
        objective_formula="sum_k w_k (1 - (1-p)^k)",
        advantage_formula="sum_k w_k A^(k); A^(1) = RLOO, A^(k>=2) = pkpo_loo_minus_one (term='loo': pkpo_loo centred)",
        paper=_PAPER_PKPO + "; seed scalarisation J = sum_k w_k pass@k",
        doc="Scalarised multi-k objective. Each term is an unbiased baselined pass@k shaping, so by "
        "linearity the sum is unbiased for grad sum_k w_k pass@k. weights=None means {k: 1}.",
        advantages=_adv_multi_k, objective=_f_multi, derivative=_d_multi,
        defaults={"weights": None, "term": "loo_minus_one"}, check=_check_multi,
    ),
)

REGISTRY: Mapping[str, ShapingSpec] = MappingProxyType({s.info.name: s for s in _ENTRIES})
SHAPINGS: tuple[str, ...] = tuple(REGISTRY)


# ============================================================================================
# public functions
# ============================================================================================
def _get(name: str) -> ShapingSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown shaping {name!r}; known shapings: {', '.join(SHAPINGS)}") from None


def info(name: str) -> ShapingInfo:
    """Metadata of shaping ``name`` (raises ValueError listing the known names)."""
    return _get(name).info


def _resolve(spec: ShapingSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(sorted(spec.defaults)) or "none"
        raise ValueError(f"shaping {spec.info.name!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    return {**spec.defaults, **params}


def _as_k(k: Any) -> int:
    if isinstance(k, bool):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a positive integer, got {k!r}") from None
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return k


def _prepare_rewards(rewards: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    is_torch = isinstance(rewards, torch.Tensor)
    t = rewards.detach() if is_torch else torch.as_tensor(np.asarray(rewards))
    if t.ndim != 2:
        raise ValueError(f"rewards must have shape (G, n), got {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"rewards must have n >= 1 samples per group, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError("rewards must be real")
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    r = t.to(torch.float64)
    # NaN and inf propagate into the row sums, so checking the (G,) sums is enough to detect them.
    if not bool(torch.isfinite(r.sum(1)).all()):
        finite = torch.isfinite(r)
        if bool(finite.all()):
            raise ValueError("rewards are too large: a group's sum overflows float64")
        g, i = (int(v) for v in torch.nonzero(~finite)[0])
        raise ValueError(f"rewards must be finite, got {r[g, i].item()} at group {g}, sample {i}")

    def restore(a: torch.Tensor) -> Any:
        a = a.to(out_dtype)
        return a if is_torch else a.cpu().numpy()

    return r, restore


def _prepare_p_hat(p_hat: Any, g_rows: int, device: torch.device) -> torch.Tensor | None:
    if p_hat is None:
        return None
    if isinstance(p_hat, torch.Tensor):
        p = p_hat.detach().to(device=device, dtype=torch.float64)
    else:
        p = torch.as_tensor(np.asarray(p_hat, dtype=np.float64), device=device)
    if p.shape != (g_rows,):
        raise ValueError(f"p_hat must have shape (G,) = ({g_rows},), got {tuple(p.shape)}")
    bad = ~torch.isfinite(p) | (p < 0) | (p > 1)
    if bool(bad.any()):
        g = int(torch.nonzero(bad)[0])
        raise ValueError(f"p_hat must lie in [0, 1], got {p[g].item()} for group {g}")
    return p


def shape(name: str, rewards: Any, *, k: int = 1, p_hat: Any = None, **params: Any) -> Any:
    """Per-sample advantages for one of ``SHAPINGS``.

    Args:
        name: registry name (``info(name).doc`` describes it; docs/shapings.md has the table).
        rewards: ``(G, n)`` float tensor (or numpy array): G groups x n samples, binary or continuous.
        k: target k (ignored by pass@1 shapings); the admissible range depends on the shaping.
        p_hat: optional ``(G,)`` success rates in [0, 1] for plug-in shapings (ignored by the others,
            but still validated).
        **params: shaping-specific options; ``REGISTRY[name].defaults`` lists them.

    Returns:
        ``(G, n)`` advantages, same container kind; floating input keeps its dtype, integer/bool input
        gives ``torch.get_default_dtype()``. Mean convention (the loss averages A_i log pi(y_i)).

    Raises:
        ValueError: unknown name or parameter, non-finite rewards, rewards outside the shaping's
            domain, bad p_hat, or a k the shaping cannot take (e.g. loo-1 at k = 1, k > n).
    """
    spec = _get(name)
    opts = _resolve(spec, params)
    k = _as_k(k)
    r, restore = _prepare_rewards(rewards)
    g_rows, n = r.shape
    if spec.check is not None:
        spec.check(n, k, opts)
    else:
        spec.info.check_k(n, k)
    ph = _prepare_p_hat(p_hat, g_rows, r.device)
    if "p_clip" in opts:
        ph = _clip_p_hat(spec, ph, n, k, opts.pop("p_clip"))
    if g_rows == 0:
        return restore(torch.zeros_like(r))
    binary = bool(r.eq(0).logical_or_(r.eq(1)).all())
    if spec.info.reward_domain == "unit" and not binary and bool(((r < 0) | (r > 1)).any()):
        bad = r[(r < 0) | (r > 1)][0].item()
        raise ValueError(f"shaping {name!r} needs rewards in [0, 1] (p_hat is a success rate), got {bad!r}")
    total = r.sum(1, keepdim=True)
    c = total[:, 0].round().long() if binary else None
    batch = _Batch(r=r, n=n, total=total, binary=binary, c=c, p_hat=ph)
    adv = spec.advantages(batch, k=k, **opts)
    zeroes = spec.zero_on_constant(opts) if spec.zero_on_constant is not None else spec.info.baselined
    if zeroes:
        const = (c == 0) | (c == n) if binary else r.amax(1) == r.amin(1)
        if adv.data_ptr() == r.data_ptr():  # never write into the caller's tensor
            adv = adv.clone()
        adv.masked_fill_(const[:, None], 0.0)
    return restore(adv)


def _objective_call(which: str, name: str, p: Any, k: int, params: Mapping[str, Any]) -> Any:
    spec = _get(name)
    opts = _resolve(spec, params)
    k = _as_k(k)
    if spec.info.uses_k and k < spec.info.min_k:
        raise ValueError(f"shaping {name!r} needs k >= {spec.info.min_k}, got k={k}")
    fn = spec.objective if which == "objective" else spec.derivative
    if isinstance(p, torch.Tensor):
        pt = p if p.is_floating_point() else p.to(torch.float64)
        kind = "torch"
    else:
        pt = torch.as_tensor(np.asarray(p, dtype=np.float64))
        kind = "float" if pt.ndim == 0 and not isinstance(p, np.ndarray) else "numpy"
    bad = ~torch.isfinite(pt.detach()) | (pt.detach() < 0) | (pt.detach() > 1)
    if bool(bad.any()):
        raise ValueError(f"{which}: p must lie in [0, 1], got {pt.detach()[bad].reshape(-1)[0].item()}")
    out = fn(pt, k=k, **opts)
    if kind == "torch":
        return out
    out = out.detach().numpy()
    return float(out) if kind == "float" else out


def objective(name: str, p: Any, *, k: int = 1, **params: Any) -> Any:
    """Population-limit objective F(p) that shaping ``name`` ascends, for 0/1 rewards.

    ``p`` may be a float (returns float), numpy array or torch tensor (returns a tensor and keeps the
    autograd graph, so ``torch.autograd.grad(objective(name, p(theta)), theta)`` gives grad F).
    Shaping parameters are accepted (``multi_k`` needs ``weights``); those that do not change F are
    ignored. See ``ShapingInfo.objective_formula``.
    """
    return _objective_call("objective", name, p, k, params)


def objective_derivative(name: str, p: Any, *, k: int = 1, **params: Any) -> Any:
    """F'(p) of ``objective(name, ...)``: the large-n gain A_+ - A_- of the shaping (inf where F' is)."""
    return _objective_call("derivative", name, p, k, params)


def expected_gain(name: str, n: int, p: float, *, k: int = 1, oracle_p_hat: bool = False, **params: Any) -> float:
    """Exact gain_n(p) with E[(1/n) sum_i A_i grad log pi(y_i)] = gain_n(p) grad p for 0/1 rewards.

    gain_n(p) = sum_j Bin(j; n-1, p) [A_+(j+1) - A_-(j)], evaluated with the shipped ``shape`` on the
    n+1 possible groups. ``oracle_p_hat=True`` passes p_hat = p (unclipped) to plug-in shapings. A shaping is
    unbiased for its objective iff expected_gain == objective_derivative for every p.
    Cost O(n^2); fine for n up to a few thousand.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"expected_gain: n must be a positive integer, got {n!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"expected_gain: p must lie in [0, 1], got {p!r}")
    n = int(n)
    counts = torch.arange(n + 1, dtype=torch.float64)
    rows = (torch.arange(n, dtype=torch.float64)[None, :] < counts[:, None]).to(torch.float64)
    ph = torch.full((n + 1,), float(p), dtype=torch.float64) if oracle_p_hat else None
    if oracle_p_hat and "p_clip" in _get(name).defaults:
        params = {"p_clip": 0.0, **params}  # an oracle p is exact: nothing to guard against
    adv = shape(name, rows, k=k, p_hat=ph, **params)
    a_pos = adv[1:, 0]  # c = 1..n
    a_neg = adv[:n, n - 1]  # c = 0..n-1
    j = torch.arange(n, dtype=torch.float64)
    pt = torch.tensor(float(p), dtype=torch.float64)
    log_pmf = (
        torch.lgamma(torch.tensor(float(n), dtype=torch.float64)) - torch.lgamma(j + 1) - torch.lgamma(n - j)
        + torch.special.xlogy(j, pt) + torch.special.xlogy(n - 1 - j, 1 - pt)
    )
    return float((torch.exp(log_pmf) * (a_pos - a_neg)).sum())


def advantage_bound(name: str, n: int, *, k: int = 1, **params: Any) -> float:
    """Largest |advantage| the group form of ``name`` (no outside p_hat) gives any 0/1-reward group of n samples.

    Evaluated with ``shape`` on the n + 1 possible groups (c = 0..n correct). With the default ``p_clip="group"``
    a plug-in shaping fed an outside p_hat stays within this bound (up to the baseline's own spread), so a larger
    advantage means p_hat or the params are off. Cost O(n^2).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"advantage_bound: n must be a positive integer, got {n!r}")
    counts = torch.arange(int(n) + 1, dtype=torch.float64)
    rows = (torch.arange(int(n), dtype=torch.float64)[None, :] < counts[:, None]).to(torch.float64)
    return float(shape(name, rows, k=k, **params).abs().max())


def scale_violations(name: str, rewards: Any, advantages: Any, *, k: int = 1, ratio: float = 2.0,
                     **params: Any) -> np.ndarray:
    """Indices of groups whose advantages are non-finite or exceed ``ratio`` × what the group form can give.

    The reference is ``advantage_bound(name, n, k)`` for 0/1 rewards, else the largest |advantage| of the group
    form on this very batch. ``rewards``/``advantages`` are ``(G, n)``; returns a sorted int array (empty: fine).
    """
    if not (isinstance(ratio, (int, float)) and ratio >= 1.0):
        raise ValueError(f"scale_violations: ratio must be a number >= 1, got {ratio!r}")
    r = np.asarray(rewards, dtype=np.float64)
    a = np.asarray(advantages, dtype=np.float64)
    if r.ndim != 2 or a.shape != r.shape:
        raise ValueError(f"scale_violations: rewards {r.shape} and advantages {a.shape} must both be (G, n)")
    if r.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.all((r == 0) | (r == 1)):
        bound = advantage_bound(name, r.shape[1], k=k, **params)
    else:
        bound = float(np.abs(np.asarray(shape(name, r, k=k, **params))).max())
    worst = np.where(np.isfinite(a).all(axis=1), np.abs(a).max(axis=1), np.inf)
    # 1e-9: float round-off between the clipped p_hat form and the group form at the same count
    return np.flatnonzero(worst > ratio * bound + 1e-9)


def shape_masked(name: str, rewards: Any, keep: Any, *, k: int = 1, p_hat: Any = None, **params: Any) -> np.ndarray:
    """``shape`` where some samples carry no evidence (a verifier timeout or crash; optionally a truncated answer).

    ``keep`` (G, n) bool marks the samples that count. A group with every sample kept is shaped as usual; a group
    with some left out is shaped on its kept samples alone, as a group of n' < n (its baseline and its pass@k
    statistics then never see a reward that is not a verdict), with K moved into what the shaping accepts at n'
    (a group left with too few samples for any admissible K gets no advantage). Left-out samples get 0.
    Returns a float64 numpy array (G, n).
    """
    r = np.asarray(rewards, dtype=np.float64)
    m = np.asarray(keep, dtype=bool)
    if m.shape != r.shape:
        raise ValueError(f"shape_masked: keep {m.shape} and rewards {r.shape} must have the same shape")
    ph = None if p_hat is None else np.asarray(p_hat, dtype=np.float64)
    full = m.all(axis=1)
    out = np.zeros_like(r)
    if full.any():
        out[full] = np.asarray(shape(name, torch.tensor(r[full]), k=k, p_hat=None if ph is None else torch.tensor(ph[full]),
                                     **params), dtype=np.float64)
    spec = _get(name)
    for g in np.flatnonzero(~full):
        idx = np.flatnonzero(m[g])
        n_g = idx.size
        kk = k
        if spec.info.uses_k and not spec.info.uses_k_weights:
            hi = n_g - 1 if spec.info.needs_k_le_n_minus_1 else n_g
            kk = min(max(k, spec.info.min_k), hi)
        try:
            (spec.check or (lambda n_, k_, o: spec.info.check_k(n_, k_)))(n_g, kk, _resolve(spec, params))
            if n_g < 1 or kk < 1:
                raise ValueError("no samples")
        except ValueError:
            continue  # too few kept samples for this shaping: the group teaches nothing this step
        out[g, idx] = np.asarray(shape(name, torch.tensor(r[g:g + 1, idx]), k=kk,
                                       p_hat=None if ph is None else torch.tensor(ph[g:g + 1]), **params))[0]
    return out
