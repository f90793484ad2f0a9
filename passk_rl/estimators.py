"""Unbiased pass@k and max@k estimators, and pass@k curves with bootstrap intervals.

References
----------
- Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374:
  unbiased pass@k  rho(n, c, k) = 1 - C(n-c, k) / C(n, k).
- Walder & Karkhanis 2025, "Pass@K Policy Optimization", arXiv 2505.15201: unbiased max@k for
  continuous rewards, the U-statistic  (1/C(n,k)) * sum_{i=k..n} C(i-1, k-1) * g_(i)  over sorted g.

Everything here is pure numpy/torch; nothing imports Ray, vLLM or DeepSpeed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["pass_at_k", "max_at_k", "pass_at_k_curve", "PassAtKCurve", "bootstrap_means", "percentile_interval"]

# Upper bound on the number of float64 cells materialised at once by the padded product in
# pass_at_k (32 MiB); larger inputs are processed in chunks.
_MAX_CELLS = 1 << 22


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _as_count_array(x: Any, name: str) -> np.ndarray:
    """Integer-valued input (int, float holding an integer, numpy, torch) -> int64 ndarray."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype == np.bool_:
        raise ValueError(f"{name} must hold integer counts, got a boolean array")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            first = float(arr[bad].ravel()[0])
            raise ValueError(f"{name} must hold whole numbers, got {first}")
    return arr.astype(np.int64)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_counts(n: np.ndarray, c: np.ndarray, k: np.ndarray, *, min_k: int) -> None:
    """Raise ValueError naming the first offending (n, c, k) triple."""
    nb, cb, kb = np.broadcast_arrays(n, c, k)
    checks = (
        (nb < 1, "n must be >= 1"),
        (cb < 0, "c must be >= 0"),
        (kb < min_k, f"k must be >= {min_k}"),
        (cb > nb, "c must be <= n"),
        (kb > nb, "k must be <= n"),
    )
    for bad, what in checks:
        if bad.any():
            where = _first(bad) if bad.ndim else ()
            at = f" at index {where}" if where else ""
            raise ValueError(
                f"pass_at_k: {what}; got n={int(nb[where])}, c={int(cb[where])}, k={int(kb[where])}{at}"
            )


# --------------------------------------------------------------------------------------------
# combinatorial kernels (float64, accurate to a few ulps per term)
# --------------------------------------------------------------------------------------------
def _log_fail_ratio(n: np.ndarray, c: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log[C(n-c, k) / C(n, k)] elementwise (broadcast), -inf where n - c < k.

    Product form: C(n-c,k)/C(n,k) = prod_{j<m} (1 - M/(n-j)) with m = min(c,k), M = max(c,k);
    summed as log1p terms, so a ratio close to 1 (small pass@k) keeps full relative precision,
    which a difference of lgamma values (error ~ eps * lgamma(n)) does not.
    """
    n, c, k = (a.ravel() for a in np.broadcast_arrays(n, c, k))
    out = np.zeros(n.shape, dtype=np.float64)
    impossible = (n - c) < k
    out[impossible] = -np.inf
    m = np.minimum(c, k)
    big = np.maximum(c, k).astype(np.float64)
    active = np.nonzero(~impossible & (m > 0))[0]
    if active.size:
        # Sort by term count so each chunk pads only to its own longest row.
        active = active[np.argsort(m[active], kind="stable")]
        rows = max(1, _MAX_CELLS // int(m[active[-1]]))
        for start in range(0, active.size, rows):
            idx = active[start : start + rows]
            t_max = int(m[idx].max())
            j = np.arange(t_max, dtype=np.float64)
            mask = j[None, :] < m[idx, None]
            denom = np.where(mask, n[idx, None] - j[None, :], np.inf)
            terms = np.where(mask, np.log1p(-big[idx, None] / denom), 0.0)
            out[idx] = terms.sum(axis=1)
    return out


@functools.lru_cache(maxsize=4096)
def _log_fail_ratio_table(n: int, k: int) -> np.ndarray:
    """log[C(n-c, k)/C(n, k)] for c = 0..n (length n+1), -inf where n - c < k. Read-only.

    Cumulative form: ratio(c+1)/ratio(c) = 1 - k/(n-c), so the table costs O(n) and the error of
    entry c is ~ c ulps. Memoised: pure function of (n, k).
    """
    if n < 0 or k < 0:
        raise ValueError(f"_log_fail_ratio_table: need n, k >= 0, got n={n}, k={k}")
    out = np.full(n + 1, -np.inf, dtype=np.float64)
    if k == 0:
        out[:] = 0.0
    elif k <= n:
        # Valid entries c = 0..n-k; the step from c to c+1 multiplies by (1 - k/(n-c)).
        j = np.arange(0, n - k, dtype=np.float64)
        out[0] = 0.0
        out[1 : n - k + 1] = np.cumsum(np.log1p(-k / (n - j)))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=4096)
def _max_at_k_weights(n: int, k: int) -> np.ndarray:
    """u_m = C(m-1, k-1) / C(n, k) for ranks m = 1..n (index m-1); zero for m < k. Read-only.

    Built from the top: u_n = k/n and u_{m-1} = u_m * (m-k)/(m-1), summed in log space so large
    n, k neither overflow the binomials nor lose precision.
    """
    if not 1 <= k <= n:
        raise ValueError(f"_max_at_k_weights: need 1 <= k <= n, got n={n}, k={k}")
    log_u = np.full(n, -np.inf, dtype=np.float64)
    # ranks m = k..n; log u_m = log(k/n) + sum_{j=m+1..n} log1p(-(k-1)/(j-1))
    j = np.arange(k + 1, n + 1, dtype=np.float64)
    steps = np.log1p(-(k - 1) / (j - 1))
    suffix = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])  # suffix[m-k] for m=k..n
    log_u[k - 1 :] = math.log(k / n) + suffix
    u = np.exp(log_u)
    u.flags.writeable = False
    return u


def as_tensor64(table: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Copy a (read-only, memoised) float64 table into a fresh torch tensor on ``device``."""
    return torch.from_numpy(np.array(table, dtype=np.float64)).to(device)


# --------------------------------------------------------------------------------------------
# public estimators
# --------------------------------------------------------------------------------------------
def pass_at_k(n: Any, c: Any, k: Any) -> Any:
    """Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374):  rho(n, c, k) = 1 - C(n-c, k)/C(n, k).

    Args:
        n: samples drawn per problem (>= 1).
        c: correct samples among them (0 <= c <= n).
        k: attempts (1 <= k <= n).
        Each may be a Python int, a numpy array or a torch tensor (floats holding whole numbers
        are accepted, e.g. ``rewards.sum(-1)``); they broadcast against each other.

    Returns:
        float when all inputs are Python/numpy scalars; a float64 numpy array for numpy input; a
        float64 torch tensor (on the device of the first tensor argument) when any input is a
        tensor. Shape is the broadcast shape.

    Numerics: product form in log space, ``1 - exp(sum log1p(-M/(n-j)))`` evaluated with expm1,
    so results keep full relative precision for k up to thousands and n up to many thousands.
    Degenerate cases: c = 0 -> 0; n - c < k -> exactly 1.

    Raises:
        ValueError: negative values, c > n, k > n, k < 1, or non-integral values (names them).
    """
    tensors = [x for x in (n, c, k) if isinstance(x, torch.Tensor)]
    na, ca, ka = (_as_count_array(x, name) for x, name in ((n, "n"), (c, "c"), (k, "k")))
    _check_counts(na, ca, ka, min_k=1)
    shape = np.broadcast_shapes(na.shape, ca.shape, ka.shape)
    # 0.0 - expm1 turns the -0.0 of c = 0 into +0.0.
    out = (0.0 - np.expm1(_log_fail_ratio(na, ca, ka))).reshape(shape)
    if tensors:
        return torch.from_numpy(out).to(tensors[0].device)
    if all(isinstance(x, (int, np.integer, float, np.floating)) for x in (n, c, k)):
        return float(out)
    return out


def max_at_k(rewards: Any, k: int) -> Any:
    """Unbiased max@k (Walder & Karkhanis 2025, arXiv 2505.15201, the U-statistic over k-subsets).

    With the n rewards of a row sorted ascending, g_(1) <= ... <= g_(n):
        max@k_hat = (1/C(n,k)) * sum_{i=k..n} C(i-1, k-1) * g_(i)
    i.e. the mean over all k-subsets of their maximum; for 0/1 rewards it equals ``pass_at_k``.

    Args:
        rewards: ``(..., n)`` tensor or array (typically ``(G, n)``); integer/bool input is cast
            to float64 first (integer division is a known pitfall of the paper's listing).
        k: 1 <= k <= n.

    Returns:
        ``(...)`` (i.e. ``(G,)``) of the same kind; floating input keeps its dtype.
        Cost O(n log n) per row (one sort); ties need no special care since the max of a subset
        does not depend on how ties are ordered.

    Raises:
        ValueError: k out of range, empty last dimension, or non-finite rewards.
    """
    is_np = not isinstance(rewards, torch.Tensor)
    r = torch.as_tensor(np.asarray(rewards)) if is_np else rewards
    if r.ndim < 1 or r.shape[-1] < 1:
        raise ValueError(f"max_at_k: rewards must have shape (..., n) with n >= 1, got {tuple(r.shape)}")
    out_dtype = r.dtype if r.is_floating_point() else torch.float64
    r64 = r.detach().to(torch.float64)
    if not torch.isfinite(r64).all():
        bad = tuple(int(i) for i in torch.nonzero(~torch.isfinite(r64))[0])
        raise ValueError(f"max_at_k: rewards must be finite, got {r64[bad].item()} at index {bad}")
    n = r.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n:
        raise ValueError(f"max_at_k: need an integer 1 <= k <= n; got k={k!r}, n={n}")
    u = as_tensor64(_max_at_k_weights(n, int(k)), r64.device)
    est = torch.sort(r64, dim=-1).values @ u
    out = est.to(out_dtype)
    return out.numpy() if is_np else out


@dataclass(frozen=True)
class PassAtKCurve:
    """Pass@k over a set of problems for many k, with a percentile bootstrap over problems.

    Arrays are numpy, aligned with ``ks``; ``per_problem`` has shape (P, len(ks)).
    """

    ks: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    per_problem: np.ndarray
    n_problems: int
    n_boot: int
    ci: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists of floats), without the per-problem matrix."""
        d = asdict(self)
        d.pop("per_problem")
        for key in ("ks", "mean", "lo", "hi"):
            d[key] = d[key].tolist()
        return d


def pass_at_k_curve(
    n: Any,
    c: Any,
    ks: Sequence[int],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> PassAtKCurve:
    """Mean unbiased pass@k over P problems for each k in ``ks``, with bootstrap CIs over problems.

    Args:
        n: ``(P,)`` samples per problem (a scalar broadcasts).
        c: ``(P,)`` correct samples per problem.
        ks: k values; each must satisfy k <= min(n).
        n_boot: bootstrap replicates (problems resampled with replacement); 0 gives lo = hi = mean.
        ci: central coverage of the percentile interval, in (0, 1).
        seed: seed of the numpy Generator used for resampling (results are reproducible).

    Returns:
        :class:`PassAtKCurve`. Bootstrap replicates are drawn as per-problem multiplicities
        (n_boot x P counts) and combined with one matrix product, so the cost is O(n_boot * P * K)
        flops but only O(n_boot * P) memory.
    """
    na = np.atleast_1d(_as_count_array(n, "n"))
    ca = np.atleast_1d(_as_count_array(c, "c"))
    na, ca = np.broadcast_arrays(na, ca)
    if na.ndim != 1 or na.size == 0:
        raise ValueError(f"pass_at_k_curve: n and c must be 1-D per-problem arrays, got shape {na.shape}")
    ks_arr = np.asarray(list(ks))
    if ks_arr.ndim != 1 or ks_arr.size == 0:
        raise ValueError("pass_at_k_curve: ks must be a non-empty sequence of integers")
    ks_arr = _as_count_array(ks_arr, "ks")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"pass_at_k_curve: ci must lie in (0, 1), got {ci}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"pass_at_k_curve: n_boot must be a non-negative integer, got {n_boot!r}")
    n_min = int(na.min())
    if (ks_arr > n_min).any():
        raise ValueError(
            f"pass_at_k_curve: k={int(ks_arr[ks_arr > n_min][0])} exceeds the smallest n={n_min} "
            f"(problem {int(np.argmin(na))}); pass@k needs k <= n for every problem"
        )
    per = pass_at_k(na[:, None], ca[:, None], ks_arr[None, :])  # (P, K)
    per = np.asarray(per, dtype=np.float64).reshape(na.size, ks_arr.size)
    mean, lo, hi = _bootstrap_mean(per, n_boot=n_boot, ci=ci, seed=seed)
    return PassAtKCurve(
        ks=ks_arr, mean=mean, lo=lo, hi=hi, per_problem=per,
        n_problems=int(na.size), n_boot=int(n_boot), ci=float(ci),
    )


def _multiplicities(rng: np.random.Generator, b: int, p: int) -> np.ndarray:
    """(b, p) counts of how often each of p items is drawn in b resamples of size p with replacement."""
    draws = rng.integers(0, p, size=(b, p)) + (np.arange(b) * p)[:, None]
    return np.bincount(draws.ravel(), minlength=b * p).reshape(b, p)


def bootstrap_means(per: Any, *, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the column means of ``per`` (P, K) (or (P,)) over its P rows: (n_boot, K) (or (n_boot,)).

    Replicate b resamples the P rows with replacement once and averages every column over that same resample,
    so replicates of column differences are the differences of replicates (paired). The resamples depend only on
    (P, n_boot, seed): two calls with the same seed on matrices of the same P resample the same rows, which is
    how separate calls stay paired. Drawn as per-row multiplicities in chunks, so memory is O(chunk * P)
    whatever n_boot is; the chunking does not change the draws (one numpy Generator stream, consumed in order).
    """
    a = np.asarray(per, dtype=np.float64)
    if a.ndim not in (1, 2) or a.shape[0] == 0:
        raise ValueError(f"bootstrap_means: per must be (P,) or (P, K) with P >= 1, got shape {a.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"bootstrap_means: n_boot must be a non-negative integer, got {n_boot!r}")
    p = a.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot,) + a.shape[1:], dtype=np.float64)
    rows = max(1, _MAX_CELLS // p)
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        out[start : start + b] = _multiplicities(rng, b, p) @ a / p
    return out


def percentile_interval(replicates: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the central ``ci`` percentile interval of bootstrap ``replicates`` along axis 0."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"percentile_interval: ci must lie in (0, 1), got {ci}")
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(replicates, [alpha, 1.0 - alpha], axis=0)
    return np.asarray(lo), np.asarray(hi)


def _bootstrap_mean(per: np.ndarray, *, n_boot: int, ci: float, seed: int):
    """Column means of ``per`` (P, K) and their percentile-bootstrap interval over the P rows."""
    mean = per.mean(axis=0)
    if n_boot == 0:
        return mean, mean.copy(), mean.copy()
    lo, hi = percentile_interval(bootstrap_means(per, n_boot=n_boot, seed=seed), ci)
    return mean, lo, hi


def pass_at_k_paired_diff(
    n: Any, c_before: Any, c_after: Any, ks: Sequence[int], *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> PassAtKCurve:
    """Mean over problems of pass@k(after) − pass@k(before) on the *same* problems, with a paired bootstrap.

    Resampling problems jointly keeps the per-problem pairing, so the interval reflects only how the change
    varies across problems — much narrower than comparing two independent intervals when problem difficulty
    dominates the spread. ``n`` (P,) or scalar; ``c_before``/``c_after`` (P,) correct counts out of n.
    """
    a = pass_at_k_curve(n, c_before, ks, n_boot=0)
    b = pass_at_k_curve(n, c_after, ks, n_boot=0)
    if a.n_problems != b.n_problems:
        raise ValueError(f"pass_at_k_paired_diff: {a.n_problems} problems before but {b.n_problems} after")
    per = b.per_problem - a.per_problem
    mean, lo, hi = _bootstrap_mean(per, n_boot=n_boot, ci=ci, seed=seed)
    return PassAtKCurve(ks=a.ks, mean=mean, lo=lo, hi=hi, per_problem=per, n_problems=a.n_problems,
                        n_boot=int(n_boot), ci=float(ci))


@dataclass(frozen=True)
class SeedPromptInterval:
    """A mean over training seeds and problems with two intervals (see :func:`seed_prompt_interval`)."""

    mean: float
    lo: float  # two-level bootstrap (seeds, then problems)
    hi: float
    t_lo: float  # Student-t over the per-seed means (nan with one seed)
    t_hi: float
    seeds: int
    problems: int
    per_seed: tuple  # per-seed means over problems

    def to_list(self) -> list[float]:
        return [float(self.mean), float(self.lo), float(self.hi)]


def seed_prompt_interval(values: Any, *, n_boot: int = 4000, ci: float = 0.95, seed: int = 0) -> SeedPromptInterval:
    """Mean of ``values`` (S seeds × P problems) with intervals that include seed-to-seed variation.

    ``values[s, j]`` is a per-problem quantity of the model trained with seed s (e.g. its unbiased pass@k on
    problem j, or a paired difference of two methods trained with the same seed). Two intervals:

    - two-level percentile bootstrap: each replicate draws S seeds with replacement, then P problems with
      replacement (the same problems for every drawn seed, since every model was evaluated on the same
      problems), and averages. It covers both the training-seed lottery and which problems were drawn. With S
      seeds only S^S seed draws exist, so for S < 5 it is narrow; read it beside the t interval.
    - Student-t over the S per-seed means (scipy's t quantile, S - 1 degrees of freedom): covers seed variation
      given these problems; nan when S = 1.

    With S = 1 the bootstrap reduces to the usual interval over problems.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"seed_prompt_interval: values must be (seeds, problems), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("seed_prompt_interval: values must be finite")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"seed_prompt_interval: ci must lie in (0, 1), got {ci}")
    s, p = x.shape
    per_seed = x.mean(axis=1)
    mean = float(per_seed.mean())
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _MAX_CELLS // max(p, s))
    alpha = (1.0 - ci) / 2.0
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        seed_w = _multiplicities(rng, b, s) / s
        prob_w = _multiplicities(rng, b, p) / p
        stats[start: start + b] = np.einsum("bs,sp,bp->b", seed_w, x, prob_w)
    lo, hi = percentile_interval(stats, ci) if n_boot else (mean, mean)
    t_lo = t_hi = float("nan")
    if s >= 2:
        from scipy import stats as sps

        half = float(sps.t.ppf(1.0 - alpha, s - 1)) * float(per_seed.std(ddof=1)) / np.sqrt(s)
        t_lo, t_hi = float(mean - half), float(mean + half)
    return SeedPromptInterval(mean=mean, lo=float(lo), hi=float(hi), t_lo=t_lo, t_hi=t_hi, seeds=s, problems=p,
                              per_seed=tuple(float(v) for v in per_seed))
