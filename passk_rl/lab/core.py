"""The lab's only door into the math core (passk_rl.shaping / stats / schedule), used unchanged.

Kept in one place so that an API change in the core is a one-file change here.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from passk_rl.lab.exact import ShapeFn


def shaping_module():
    from passk_rl import shaping

    return shaping


def shape_fn(name: str, *, k: Any, params: Optional[Dict[str, Any]] = None) -> ShapeFn:
    """numpy wrapper around ``passk_rl.shaping.shape(name, rewards, k=k, p_hat=…, **params)`` in float64; ``k`` may be
    a per-row (G,) array (the per-prompt K schedule)."""
    shaping = shaping_module()
    if name not in shaping.SHAPINGS:
        raise ValueError(f"unknown shaping {name!r}; the math core has {sorted(shaping.SHAPINGS)}")
    params = dict(params or {})

    def fn(rewards: np.ndarray, p_hat: Optional[np.ndarray]) -> np.ndarray:
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
        ph = None if p_hat is None else torch.as_tensor(np.asarray(p_hat, dtype=np.float64))
        out = shaping.shape(name, r, k=k, p_hat=ph, **params)
        return out.detach().cpu().numpy().astype(np.float64)

    return fn


def objective(name: str, p: np.ndarray, *, k: int, params: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """Population-limit F(p) the shaping ascends (``passk_rl.shaping.objective``), as numpy."""
    out = shaping_module().objective(name, np.asarray(p, dtype=np.float64), k=k, **dict(params or {}))
    return np.asarray(out, dtype=np.float64)


def objective_slope(name: str, p: np.ndarray, *, k: int, params: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """F'(p) of the declared objective (``passk_rl.shaping.objective_derivative``), as numpy."""
    out = shaping_module().objective_derivative(name, np.asarray(p, dtype=np.float64), k=k, **dict(params or {}))
    return np.asarray(out, dtype=np.float64)


def info(name: str) -> Any:
    return shaping_module().info(name)


def is_unbiased(name: str) -> bool:
    """The core's own claim that the shaping is unbiased for its objective at finite n."""
    meta = info(name)
    for attr in ("unbiased", "is_unbiased"):
        if hasattr(meta, attr):
            return bool(getattr(meta, attr))
        if isinstance(meta, dict) and attr in meta:
            return bool(meta[attr])
    return False


def make_stats(name: str, **params) -> Any:
    from passk_rl import stats

    return stats.make_stats(name, **params)


def make_schedule(name: str, **params) -> Any:
    from passk_rl import schedule

    return schedule.make_schedule(name, **params)


def decision(dec: Any) -> Tuple[int, Optional[Dict[int, float]]]:
    """(k, weights or None) from a schedule's KDecision."""
    weights = getattr(dec, "weights", None)
    if weights is None:
        weights = getattr(dec, "k_weights", None)
    if weights is not None and len(weights) <= 1:
        weights = None
    return int(dec.k), ({int(a): float(b) for a, b in weights.items()} if weights else None)


def uses_p_hat(name: str) -> bool:
    """Whether the shaping reads p̂ (so an external, group-independent p̂ changes it)."""
    meta = info(name)
    for attr in ("uses_p_hat", "needs_p_hat", "p_hat"):
        if hasattr(meta, attr):
            return bool(getattr(meta, attr))
        if isinstance(meta, dict) and attr in meta:
            return bool(meta[attr])
    return False


def default_params(name: str, k: int) -> Dict[str, Any]:
    """Extra parameters a shaping needs to be run in a sweep (multi_k: equal weights on 1 and K)."""
    if name == "multi_k":
        return {"weights": {1: 0.5, int(k): 0.5}} if k > 1 else {"weights": {1: 1.0}}
    return {}


def pkpo_name(k: int) -> str:
    """The unbiased PKPO estimator with the loo−1 baseline; at k = 1 its family member is RLOO (the core's
    pkpo_loo_minus_one needs k ≥ 2)."""
    return "rloo" if k == 1 else "pkpo_loo_minus_one"


def to_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)
