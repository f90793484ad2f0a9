"""Confidence intervals for the lab.

Every stochastic number the lab reports is a mean over independent replicates (seeds or Monte-Carlo groups)
with a two-sided 95 % Student-t interval: mean ± t_{0.975, m−1} · sd / sqrt(m). Exact (enumerated) numbers
carry no interval and are labelled "exact" in the report.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
from scipy import stats


def t_quantile(q: float, df: float) -> float:
    """Quantile of Student-t with ``df`` degrees of freedom; ``df`` = inf gives the normal quantile.

    scipy returns nan for out-of-range arguments; raising here keeps a bad call from becoming a nan interval.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df}")
    return float(stats.t.ppf(q, df))


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
