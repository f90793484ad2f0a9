"""Guards on advantages: the largest |A| a shaping's group form gives at n (``advantage_bound``), the groups of a
batch that exceed a multiple of it (``scale_violations``, the trainer's per-step check), and ``shape_masked`` for
groups where some samples carry no verdict."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from passk_rl.shaping.api import k_rows, shape
from passk_rl.shaping.registry import get, resolve

__all__ = ["advantage_bound", "scale_violations", "shape_masked"]


def advantage_bound(name: str, n: int, *, k: int = 1, **params: Any) -> float:
    """Largest |advantage| the group form of ``name`` (no outside p_hat) gives any 0/1-reward group of n samples.

    Evaluated with ``shape`` on the n + 1 possible groups (c = 0..n correct). With the default ``p_clip="group"``
    a plug-in shaping fed an outside p_hat stays within this bound (up to the baseline's own spread), so a larger
    advantage means p_hat or the params are off. Cost O(n^2).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"advantage_bound: n must be a positive integer, got {n!r}")
    if isinstance(k, (list, tuple, np.ndarray, torch.Tensor)) and np.ndim(k) == 1:
        # a per-row K: the largest bound over the Ks present
        ks = k_rows(k, len(k))
        if get(name).info.uses_k and ks.size:
            return max(advantage_bound(name, n, k=int(kk), **params) for kk in sorted(set(ks.tolist())))
        k = 1
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
    rows = k_rows(k, r.shape[0])
    if rows is not None and get(name).info.uses_k:  # each row against the bound of its own K
        bound = np.zeros(r.shape[0])
        for kk in sorted(set(rows.tolist())):
            sel = rows == kk
            bound[sel] = _bound(name, r[sel], kk, params)
    else:
        bound = _bound(name, r, 1 if rows is not None else k, params)
    worst = np.where(np.isfinite(a).all(axis=1), np.abs(a).max(axis=1), np.inf)
    # 1e-9: float round-off between the clipped p_hat form and the group form at the same count
    return np.flatnonzero(worst > ratio * bound + 1e-9)


def _bound(name: str, r: np.ndarray, k: Any, params: Any) -> float:
    if np.all((r == 0) | (r == 1)):
        return advantage_bound(name, r.shape[1], k=k, **params)
    return float(np.abs(np.asarray(shape(name, r, k=k, **params))).max())


def shape_masked(name: str, rewards: Any, keep: Any, *, k: Any = 1, p_hat: Any = None, **params: Any) -> np.ndarray:
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
    rows = k_rows(k, r.shape[0])  # a per-row K: each group keeps its own
    full = m.all(axis=1)
    out = np.zeros_like(r)
    if full.any():
        out[full] = np.asarray(shape(name, torch.tensor(r[full]), k=k if rows is None else rows[full],
                                     p_hat=None if ph is None else torch.tensor(ph[full]), **params), dtype=np.float64)
    spec = get(name)
    for g in np.flatnonzero(~full):
        idx = np.flatnonzero(m[g])
        n_g = idx.size
        kk = k if rows is None else int(rows[g])
        if spec.info.uses_k and not spec.info.uses_k_weights:
            hi = n_g - 1 if spec.info.needs_k_le_n_minus_1 else n_g
            kk = min(max(kk, spec.info.min_k), hi)
        try:
            (spec.check or (lambda n_, k_, o: spec.info.check_k(n_, k_)))(n_g, kk, resolve(spec, params))
            if n_g < 1 or kk < 1:
                raise ValueError("no samples")
        except ValueError:
            continue  # too few kept samples for this shaping: the group teaches nothing this step
        out[g, idx] = np.asarray(shape(name, torch.tensor(r[g:g + 1, idx]), k=kk,
                                       p_hat=None if ph is None else torch.tensor(ph[g:g + 1]), **params))[0]
    return out