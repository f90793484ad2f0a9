"""Confidence intervals for the lab (numpy only; scipy is not installed here).

Every stochastic number the lab reports is a mean over independent replicates (seeds or Monte-Carlo groups)
with a two-sided 95 % Student-t interval: mean ± t_{0.975, m−1} · sd / sqrt(m). Exact (enumerated) numbers
carry no interval and are labelled "exact" in the report.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Sequence

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t CDF with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(q: float, df: float) -> float:
    """Quantile of Student-t (bisection on :func:`t_cdf`); ``df`` = inf gives the normal quantile."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df}")
    if math.isinf(df):
        df = 1e7
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(x: Sequence[float], *, level: float = 0.95) -> Dict[str, float]:
    """Mean and two-sided t interval of independent replicates ``x`` (1-D).

    Returns {mean, lo, hi, half, sd, m}. With one replicate the half-width is inf (no interval can be given).
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    m = a.size
    if m == 0:
        raise ValueError("mean_ci: no replicates")
    mu = float(a.mean())
    if m == 1:
        return {"mean": mu, "lo": -math.inf, "hi": math.inf, "half": math.inf, "sd": 0.0, "m": 1}
    sd = float(a.std(ddof=1))
    half = t_quantile(0.5 + level / 2.0, m - 1) * sd / math.sqrt(m)
    return {"mean": mu, "lo": mu - half, "hi": mu + half, "half": half, "sd": sd, "m": m}


def excludes_zero(ci: Dict[str, float]) -> bool:
    """True when the interval lies strictly on one side of 0."""
    return ci["lo"] > 0.0 or ci["hi"] < 0.0


def fmt_ci(ci: Dict[str, float], digits: int = 3) -> str:
    """'mean ± half' for tables (half-width of the 95 % interval)."""
    if math.isinf(ci["half"]):
        return f"{ci['mean']:.{digits}f} (1 seed)"
    return f"{ci['mean']:.{digits}f} ± {ci['half']:.{digits}f}"
