"""Exact expectations of shaped policy-gradient updates for binary rewards, by enumerating c ~ Binomial.

Setting: one prompt, n i.i.d. samples y_i ~ π, rewards r_i = 1[y_i correct], p = P(correct). A shaping is a
permutation-equivariant map r ∈ {0,1}^n → A ∈ R^n, so given c = Σ r_i every correct sample gets the same
advantage A₊(c) and every wrong one A₋(c). The update (mean convention) is g = (1/n) Σ_i A_i ∇log π(y_i).

Facts used (all exact, any softmax geometry):
  E[∇log π(y) | correct] = ∇p / p,   E[∇log π(y) | wrong] = −∇p / (1 − p)
  ⇒ E[g] = D(p) ∇p with the scalar *drift*
        D(p) = E_{c' ~ Bin(n−1, p)} [ A₊(c' + 1) − A₋(c') ],
  i.e. the expected gap between the advantage a correct and a wrong sample receive when the other n−1 samples
  are random. A shaping is unbiased for F(p) at this n iff D(p) = F'(p); it is unbiased for pass@K iff
  D(p) = K (1 − p)^(K−1). This costs one call of the shaping on an (n+1, n) table and an (n)-term sum.

The gradient covariance needs the within-set geometry: with u(a) = ∇_logits log π(a) = e_a − π,
  s± = E[‖u‖² | correct/wrong],  μ₊ = ∇p/p,  μ₋ = −∇p/(1−p),
  E[‖g‖² | c] = (1/n²)[c A₊² s₊ + (n−c) A₋² s₋ + c(c−1) A₊² ‖μ₊‖² + (n−c)(n−c−1) A₋² ‖μ₋‖²
                       + 2 c (n−c) A₊ A₋ μ₊·μ₋].
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np

# rewards (G, n) float 0/1 and optional p̂ (G,) → advantages (G, n)
ShapeFn = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]


def binom_pmf(n: int, p: np.ndarray) -> np.ndarray:
    """Binomial(n, p) pmf for every p: shape (len(p), n+1), stable for tiny p (log-space)."""
    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    c = np.arange(n + 1)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in c])
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = np.log(p)[:, None]
        lq = np.log1p(-p)[:, None]
        t1 = np.where(c[None, :] == 0, 0.0, c[None, :] * lp)
        t2 = np.where(c[None, :] == n, 0.0, (n - c)[None, :] * lq)
        out = np.exp(logc[None, :] + t1 + t2)
    return np.nan_to_num(out, nan=0.0)


def reward_table(n: int) -> np.ndarray:
    """(n+1, n) binary rewards, row c has c ones first then zeros."""
    return (np.arange(n)[None, :] < np.arange(n + 1)[:, None]).astype(np.float64)


def advantage_table(shape_fn: ShapeFn, n: int, p_hat: Optional[np.ndarray] = None) -> tuple:
    """A₊(c), A₋(c) for c = 0..n.

    Without ``p_hat``: two arrays of shape (n+1,). With ``p_hat`` (P,) (an estimate that does not depend on the
    current group): arrays of shape (P, n+1). Undefined entries (A₊(0), A₋(n)) are 0 and never weighted.
    Also checks permutation-equivariance (all correct samples of a row share one advantage), which the
    enumeration relies on.
    """
    R = reward_table(n)
    if p_hat is None:
        A = np.asarray(shape_fn(R, None), dtype=np.float64)
        Ap, Am = _split(A, R)
        return Ap, Am
    p_hat = np.asarray(p_hat, dtype=np.float64).ravel()
    P = p_hat.size
    A = np.asarray(shape_fn(np.tile(R, (P, 1)), np.repeat(p_hat, n + 1)), dtype=np.float64)
    Ap, Am = _split(A, np.tile(R, (P, 1)))
    return Ap.reshape(P, n + 1), Am.reshape(P, n + 1)


def _split(A: np.ndarray, R: np.ndarray) -> tuple:
    pos, neg = R > 0, R <= 0
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    Ap = np.where(pos, A, 0.0).sum(axis=1) / np.maximum(n_pos, 1)
    Am = np.where(neg, A, 0.0).sum(axis=1) / np.maximum(n_neg, 1)
    dev = np.where(pos, A - Ap[:, None], 0.0), np.where(neg, A - Am[:, None], 0.0)
    scale = 1e-9 * (1.0 + float(np.abs(A).max(initial=0.0)))
    if np.abs(dev[0]).max(initial=0.0) > scale or np.abs(dev[1]).max(initial=0.0) > scale:
        raise ValueError("shaping is not permutation-equivariant on binary rewards: samples with the same reward "
                         "got different advantages; exact enumeration does not apply")
    if not (np.all(np.isfinite(Ap)) and np.all(np.isfinite(Am))):
        raise ValueError("shaping returned non-finite advantages on the binary reward table")
    return Ap, Am


def drift(Ap: np.ndarray, Am: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """D(p) = E_{c'~Bin(n−1,p)}[A₊(c'+1) − A₋(c')] for every p (shape (P,)). Tables (n+1,) or (P, n+1)."""
    pmf = binom_pmf(n - 1, p)  # (P, n)
    gap = Ap[..., 1:] - Am[..., :-1]
    if gap.ndim == 1:
        return pmf @ gap
    return (pmf * gap).sum(axis=1)


def advantage_moments(Ap: np.ndarray, Am: np.ndarray, p: np.ndarray, n: int) -> Dict[str, np.ndarray]:
    """Mean and variance of a single sample's advantage A_i (over groups and over i), per p."""
    pmf = binom_pmf(n, p)
    c = np.arange(n + 1)
    m1 = pmf @ ((c * Ap + (n - c) * Am) / n) if Ap.ndim == 1 else (pmf * (c * Ap + (n - c) * Am) / n).sum(1)
    m2 = (pmf @ ((c * Ap ** 2 + (n - c) * Am ** 2) / n) if Ap.ndim == 1
          else (pmf * (c * Ap ** 2 + (n - c) * Am ** 2) / n).sum(1))
    return {"mean": m1, "var": np.maximum(m2 - m1 ** 2, 0.0)}


def uniform_geometry(p: float, *, n_answers: int, n_correct: int) -> tuple:
    """π (M,) and mask (M,) with mass p spread evenly over n_correct answers and 1−p over the rest."""
    pi = np.empty(n_answers)
    pi[:n_correct] = p / n_correct
    pi[n_correct:] = (1.0 - p) / (n_answers - n_correct)
    mask = np.zeros(n_answers, dtype=bool)
    mask[:n_correct] = True
    return pi, mask


def geometry_terms(pi: np.ndarray, mask: np.ndarray) -> Dict[str, float]:
    """s±, μ± inner products and ∇p for one prompt (logit coordinates)."""
    m = mask.astype(np.float64)
    p = float((pi * m).sum())
    sq = 1.0 - 2.0 * pi + float(pi @ pi)  # ‖e_a − π‖²
    grad_p = pi * (m - p)
    s_pos = float((pi * m * sq).sum() / p)
    s_neg = float((pi * (1 - m) * sq).sum() / (1 - p))
    g2 = float(grad_p @ grad_p)
    return {"p": p, "s_pos": s_pos, "s_neg": s_neg, "mu_pos2": g2 / p ** 2, "mu_neg2": g2 / (1 - p) ** 2,
            "mu_dot": -g2 / (p * (1 - p)), "grad_p2": g2}


def grad_moments(Ap: np.ndarray, Am: np.ndarray, geo: Dict[str, float], n: int) -> Dict[str, float]:
    """Exact E[g] (as drift · ∇p), trace-covariance Var[g] and relative variance Var/‖E g‖² for one prompt."""
    p = geo["p"]
    pmf = binom_pmf(n, np.array([p]))[0]
    c = np.arange(n + 1, dtype=np.float64)
    e2 = (c * Ap ** 2 * geo["s_pos"] + (n - c) * Am ** 2 * geo["s_neg"]
          + c * (c - 1) * Ap ** 2 * geo["mu_pos2"] + (n - c) * (n - c - 1) * Am ** 2 * geo["mu_neg2"]
          + 2 * c * (n - c) * Ap * Am * geo["mu_dot"]) / n ** 2
    D = float(drift(Ap, Am, np.array([p]), n)[0])
    mean2 = D ** 2 * geo["grad_p2"]
    var = max(float(pmf @ e2) - mean2, 0.0)
    return {"drift": D, "mean_norm2": mean2, "var": var, "rel_var": var / mean2 if mean2 > 0 else math.inf}


def pass_k_slope(p: np.ndarray, k: int) -> np.ndarray:
    """d pass@k / dp = k (1 − p)^(k−1)."""
    p = np.asarray(p, dtype=np.float64)
    return k * np.exp((k - 1) * np.log1p(-np.minimum(p, 1 - 1e-16)))
