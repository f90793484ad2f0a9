"""Numerical kernels shared by the shapings: the validated batch, alpha_K / w_K in log space, group baselines and
sigma, the per-count binary tables (PKPO family, Chen's analytic form) and the O(n log n) continuous PKPO sums.

Everything is float64; callers cast back. Binomial ratios are cumulative log1p sums (``estimators``), never
differences of lgamma values.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from passk_rl.estimators import _log_fail_ratio_table, _max_at_k_weights, as_tensor64


@dataclass(frozen=True)
class Batch:
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


def log_alpha(p: torch.Tensor, k: int) -> torch.Tensor:
    """log alpha_K(p) = log K + (K-1) log(1-p); xlog1py keeps K = 1, p = 1 at 0 (not 0*-inf = nan)."""
    return math.log(k) + torch.special.xlog1py(torch.tensor(float(k - 1), dtype=p.dtype, device=p.device), -p)


def log_pass(p: torch.Tensor, k: int) -> torch.Tensor:
    """log(1 - (1-p)^K) via log(-expm1(K log1p(-p))); -inf at p = 0."""
    return torch.log(-torch.expm1(k * torch.log1p(-p)))


def alpha_k(p: torch.Tensor, k: int) -> torch.Tensor:
    """alpha_K(p) = K (1-p)^(K-1) = d/dp pass@K, in [0, K]."""
    return torch.exp(log_alpha(p, k))


def w_k(p: torch.Tensor, k: int) -> torch.Tensor:
    """w_K(p) = K (1-p)^(K-1) / (1 - (1-p)^K) = d/dp log pass@K; +inf at p = 0 (callers floor p)."""
    return torch.exp(log_alpha(p, k) - log_pass(p, k))


def inv(den: torch.Tensor, floor: float) -> torch.Tensor:
    """1 / max(den, floor) per group, and 0 where that is 1/0 (in group mode the numerator is 0 there).

    Inverting the (G,) vector and multiplying once keeps the (G, n) work to a single pass."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float, np.integer, np.floating)) or not (
        math.isfinite(floor) and floor >= 0
    ):
        raise ValueError(f"eps must be a finite number >= 0, got {floor!r}")
    den = den.clamp_min(floor) if floor > 0 else den
    ok = den > 0
    return torch.where(ok, 1.0 / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))


def centred(b: Batch, baseline: str) -> torch.Tensor:
    """r_i - b_i with b_i the group mean ("mean") or the mean of the other n-1 rewards ("loo")."""
    if baseline == "mean":
        return b.r - b.total / b.n
    if baseline == "loo":
        if b.n < 2:
            raise ValueError(f"baseline='loo' needs n >= 2 samples per group, got n={b.n}")
        return (b.n * b.r - b.total) / (b.n - 1)
    raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")


def sigma_of(b: Batch, ddof: int) -> torch.Tensor:
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


def gather(b: Batch, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Binary rewards: A = pos[c] for correct samples, neg[c] for wrong ones. pos/neg are (n+1,)."""
    assert b.c is not None
    return torch.where(b.r > 0.5, pos[b.c][:, None], neg[b.c][:, None])


def require_binary(b: Batch, name: str) -> None:
    if not b.binary:
        bad = b.r[(b.r != 0) & (b.r != 1)][0].item()
        raise ValueError(f"shaping {name!r} needs 0/1 rewards, got {bad!r}")


def p_range_mean(n: int, k: int) -> tuple[float, float]:
    """[1/n, 1 - 1/n]: the group mean of n 0/1 rewards is never strictly inside (0, 1/n) or (1 - 1/n, 1), so a
    p_hat there yields a scale (1/sigma, alpha_K, w_K) no group of this size can produce."""
    return (1.0 / n, 1.0 - 1.0 / n) if n >= 2 else (0.0, 1.0)


def p_range_analytic(n: int, k: int) -> tuple[float, float]:
    """p whose P_K = 1-(1-p)^K spans the group statistic R = rho(n, c, k) over its non-degenerate values:
    R(c=1) = k/n and R(c=n-k) = 1 - 1/C(n, k) (larger c give R = 1 exactly)."""
    if n < 2 or k >= n:
        return (0.0, 1.0)  # k = n: R is 0 or 1, the group form vanishes identically; nothing to match
    lo = -math.expm1(math.log1p(-k / n) / k)  # P_K(lo) = k/n
    log_c = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    hi = -math.expm1(-log_c / k)  # 1 - (1 - hi)^k = 1 - 1/C(n, k)
    return (lo, max(lo, hi))


# ---- binary tables: mean-convention advantages as functions of the count c (index 0..n) ----
def fail_ratio(n: int, k: int) -> np.ndarray:
    """C(n-c, k)/C(n, k) for c = 0..n (the probability that a k-subset has no correct sample)."""
    return np.exp(_log_fail_ratio_table(n, k))


def rho_table(n: int, k: int) -> np.ndarray:
    """Unbiased pass@k rho(n, c, k) for c = 0..n, via -expm1 for full relative precision."""
    return 0.0 - np.expm1(_log_fail_ratio_table(n, k))


@functools.lru_cache(maxsize=1024)
def binary_tables(kind: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A_+[c], A_-[c]) for c = 0..n, mean convention; entries that cannot occur are 0.

    Derivations (t(m, c, j) = C(m-c, j)/C(m, j), rho = 1 - t; sum-convention weights times n):
      raw PKPO      A_+ = k,                    A_- = k rho(n-1, c, k-1)
      LOO centred   A_+ = k t(n-1, c-1, k),     A_- = -k c t(n-1, c, k-1) / (n-k)
      LOO paper     A_+ = k - nk/(n-1) rho(n-1, c-1, k),
                    A_- = k rho(n-1, c, k-1) - nk/(n-1) rho(n-1, c, k)
      LOO-1         A_+ = k t(n-1, c-1, k-1),   A_- = 0
      RLOO          A_+ = (n-c)/(n-1),          A_- = -c/(n-1)
    The centred LOO A_- uses t(m,c,k) - t(m,c,k-1) = -c/(m-k+1) t(m,c,k-1), which avoids the
    cancellation of subtracting two pass@k values.
    """
    pos = np.zeros(n + 1)
    neg = np.zeros(n + 1)
    c = np.arange(n + 1, dtype=np.float64)
    if kind == "raw":
        pos[1:] = k
        neg[:n] = k * rho_table(n - 1, k - 1)
    elif kind == "loo_centred":
        pos[1:] = k * fail_ratio(n - 1, k)
        neg[:n] = -k * c[:n] * fail_ratio(n - 1, k - 1) / (n - k)
    elif kind == "loo_paper":
        scale = n * k / (n - 1)
        pos[1:] = k - scale * rho_table(n - 1, k)
        neg[:n] = k * rho_table(n - 1, k - 1) - scale * rho_table(n - 1, k)
    elif kind == "loo_minus_one":
        pos[1:] = k * fail_ratio(n - 1, k - 1)
    elif kind == "rloo":
        pos[1:] = (n - c[1:]) / (n - 1)
        neg[:n] = -c[:n] / (n - 1)
    else:  # pragma: no cover - internal names only
        raise KeyError(kind)
    pos.flags.writeable = False
    neg.flags.writeable = False
    return pos, neg


@functools.lru_cache(maxsize=1024)
def analytic_tables(n: int, k: int, baseline: str, group_sigma: bool) -> tuple[np.ndarray, np.ndarray]:
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


def table_adv(b: Batch, tables: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    pos, neg = (as_tensor64(t, b.device) for t in tables)
    return gather(b, pos, neg)


# ---- continuous rewards: O(n log n) PKPO family on sorted rewards ----
def sorted_kind(vals: torch.Tensor, kind: str, k: int) -> torch.Tensor:
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


def tie_average(vals: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
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


def continuous(b: Batch, terms: list[tuple[str, int, float]]) -> torch.Tensor:
    """sum_w w * A^(kind, k) for continuous rewards with one sort per call."""
    # Tie order is irrelevant (tied samples are averaged below), so the faster unstable sort is fine.
    vals, idx = torch.sort(b.r, dim=1)
    acc = torch.zeros_like(vals)
    for kind, k, w in terms:
        acc = acc + w * sorted_kind(vals, kind, k)
    acc = tie_average(vals, acc)
    return torch.empty_like(acc).scatter_(1, idx, acc)


def pkpo_family(b: Batch, terms: list[tuple[str, int, float]]) -> torch.Tensor:
    if b.binary:
        pos = np.zeros(b.n + 1)
        neg = np.zeros(b.n + 1)
        for kind, k, w in terms:
            tp, tn = binary_tables(kind, b.n, k)
            pos = pos + w * tp
            neg = neg + w * tn
        return table_adv(b, (pos, neg))
    return continuous(b, terms)
