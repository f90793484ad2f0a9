"""The proof machinery: the declared objective F(p) of each shaping, its derivative, and the exact finite-n gain
``expected_gain`` that the tests compare with F' (docs/shapings.md §1). Used by the tests and the lab, not by the
training loop."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from passk_rl.shaping.api import as_k, shape
from passk_rl.shaping.registry import get, resolve

__all__ = ["objective", "objective_derivative", "expected_gain"]


def _objective_call(which: str, name: str, p: Any, k: int, params: Mapping[str, Any]) -> Any:
    spec = get(name)
    opts = resolve(spec, params)
    k = as_k(k)
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
    if oracle_p_hat and "p_clip" in get(name).defaults:
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