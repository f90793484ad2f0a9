"""Success-rate (p_hat) estimators shared by the central p_hat actor and the plug-in shapings.

Protocol (every class in ``STATS``):
    update(prompt_ids: Sequence[str], rewards: (G, n) tensor/array, *, mask=None) -> None
    value(prompt_ids: Sequence[str]) -> (G,) float64 tensor in [0, 1]
    global_value() -> float
    total_samples: int            samples folded in so far (masked-out samples excluded)
    total_reward: float           their summed reward (= successes for 0/1 rewards)
    state_dict() -> dict          plain Python (JSON-serialisable) state
    load_state_dict(state) -> None

Rewards are success indicators or scores in [0, 1]; NaN/inf or values outside [0, 1] raise. ``mask``
(G, n) bool marks the samples to count (e.g. verifier timeouts excluded), so ``total_samples`` equals
the number of verified samples. A prompt never seen falls back to the global estimate, and that to
``default`` before any sample has been seen.

Which p_hat removes the finite-n coupling bias of plug-in shapings: any value computed *before* the
current group is folded in (the p_hat actor reads ``value`` before ``update``), or ``LeaveOneOut``,
whose ``value`` excludes each prompt's most recent group by construction.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "PHatStat",
    "GroupMean",
    "EMA",
    "GlobalCounts",
    "BetaPosterior",
    "LeaveOneOut",
    "STATS",
    "make_stats",
    "loo_group_means",
]

_STATE_VERSION = 1


def _check_prob(x: Any, name: str, *, open_low: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    x = float(x)
    if not math.isfinite(x) or x < 0.0 or x > 1.0 or (open_low and x == 0.0):
        raise ValueError(f"{name} must lie in {'(0, 1]' if open_low else '[0, 1]'}, got {x!r}")
    return x


def _rows(prompt_ids: Sequence[str], rewards: Any, mask: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Validate one update; return ids, per-row reward sums and per-row sample counts (float64, int64)."""
    if isinstance(prompt_ids, str):
        raise ValueError("prompt_ids must be a sequence of strings, not a single string")
    ids = list(prompt_ids)
    for i, pid in enumerate(ids):
        if not isinstance(pid, str):
            raise ValueError(f"prompt_ids[{i}] must be a str, got {type(pid).__name__} {pid!r}")
    r = rewards.detach().cpu().numpy() if isinstance(rewards, torch.Tensor) else np.asarray(rewards)
    r = r.astype(np.float64)
    if r.ndim != 2 or r.shape[0] != len(ids):
        raise ValueError(f"rewards must have shape (G, n) with G = len(prompt_ids) = {len(ids)}, got {r.shape}")
    if mask is None:
        m = np.ones(r.shape, dtype=bool)
    else:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.shape != r.shape or m.dtype != np.bool_:
            raise ValueError(f"mask must be a bool array of shape {r.shape}, got {m.dtype} {m.shape}")
    bad = m & ~(np.isfinite(r) & (r >= 0.0) & (r <= 1.0))
    if bad.any():
        g, i = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"rewards must be finite and in [0, 1], got {r[g, i]!r} for prompt {ids[g]!r} (row {g}, sample {i})"
        )
    sums = np.where(m, r, 0.0).sum(axis=1)
    counts = m.sum(axis=1).astype(np.int64)
    return ids, sums, counts


class PHatStat:
    """Base class: global counts, protocol plumbing, state-dict envelope. Subclasses set ``name``."""

    name: str = ""

    def __init__(self, *, default: float = 0.5) -> None:
        self.default = _check_prob(default, "default")
        self._samples = 0
        self._reward = 0.0

    # ---- protocol ----
    @property
    def total_samples(self) -> int:
        return self._samples

    @property
    def total_reward(self) -> float:
        return self._reward

    def update(self, prompt_ids: Sequence[str], rewards: Any, *, mask: Any = None) -> None:
        ids, sums, counts = _rows(prompt_ids, rewards, mask)
        self._samples += int(counts.sum())
        self._reward += float(sums.sum())
        self._update(ids, sums, counts)

    def value(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        if isinstance(prompt_ids, str):
            raise ValueError("prompt_ids must be a sequence of strings, not a single string")
        return torch.tensor([self._value(pid) for pid in prompt_ids], dtype=torch.float64)

    def global_value(self) -> float:
        return self._reward / self._samples if self._samples else self.default

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "version": _STATE_VERSION,
            "params": self._params(),
            "total_samples": self._samples,
            "total_reward": self._reward,
            "state": self._state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("kind") != self.name:
            got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state_dict is for p_hat estimator {got!r}, this is {self.name!r}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported {self.name} state version {state.get('version')!r}")
        if dict(state.get("params", {})) != self._params():
            raise ValueError(f"{self.name} state has params {state.get('params')!r}, this estimator has {self._params()!r}")
        self._samples = int(state["total_samples"])
        self._reward = float(state["total_reward"])
        self._load(state["state"])

    # ---- subclass hooks ----
    def _params(self) -> dict[str, Any]:
        return {"default": self.default}

    def _update(self, ids: list[str], sums: np.ndarray, counts: np.ndarray) -> None:
        raise NotImplementedError

    def _value(self, pid: str) -> float:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


class GroupMean(PHatStat):
    """p_hat = mean reward of the prompt's most recent group (GRPO-style; seed option 1)."""

    name = "group_mean"

    def __init__(self, *, default: float = 0.5) -> None:
        super().__init__(default=default)
        self._last: dict[str, float] = {}

    def _update(self, ids, sums, counts):
        for pid, s, m in zip(ids, sums, counts):
            if m:
                self._last[pid] = float(s / m)

    def _value(self, pid):
        return self._last.get(pid, self.global_value())

    def _state(self):
        return {"last": dict(self._last)}

    def _load(self, state):
        self._last = {str(k): float(v) for k, v in state["last"].items()}


class EMA(PHatStat):
    """Per-prompt exponential moving average p <- decay * p + (1 - decay) * group mean (seed option 2).

    A prompt's first group initialises its average (no pull towards an arbitrary start value); the
    global value is the same recursion over whole-update means. ``decay`` in [0, 1).
    """

    name = "ema"

    def __init__(self, *, decay: float = 0.9, default: float = 0.5) -> None:
        super().__init__(default=default)
        decay = _check_prob(decay, "decay")
        if decay >= 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay = decay
        self._ema: dict[str, float] = {}
        self._global: float | None = None

    def _params(self):
        return {"decay": self.decay, "default": self.default}

    def _update(self, ids, sums, counts):
        for pid, s, m in zip(ids, sums, counts):
            if not m:
                continue
            x = float(s / m)
            old = self._ema.get(pid)
            self._ema[pid] = x if old is None else self.decay * old + (1.0 - self.decay) * x
        m_all = int(counts.sum())
        if m_all:
            x = float(sums.sum() / m_all)
            self._global = x if self._global is None else self.decay * self._global + (1.0 - self.decay) * x

    def _value(self, pid):
        return self._ema.get(pid, self.global_value())

    def global_value(self) -> float:
        return self.default if self._global is None else self._global

    def _state(self):
        return {"ema": dict(self._ema), "global": self._global}

    def _load(self, state):
        self._ema = {str(k): float(v) for k, v in state["ema"].items()}
        self._global = None if state["global"] is None else float(state["global"])


class GlobalCounts(PHatStat):
    """One p_hat for every prompt: successes / samples over everything seen (seed option 3)."""

    name = "global_counts"

    def _update(self, ids, sums, counts):
        pass  # the base class keeps the global counts

    def _value(self, pid):
        return self.global_value()

    def _state(self):
        return {}

    def _load(self, state):
        pass


class BetaPosterior(PHatStat):
    """Per-prompt Beta(prior_a + successes, prior_b + failures); value = posterior mean.

    Fractional rewards in [0, 1] add r to the successes and 1 - r to the failures. ``decay`` in (0, 1]
    discounts a prompt's old evidence (not the prior) before each of its updates, so the posterior
    can follow a changing policy; 1 keeps all evidence. Unseen prompts get the prior mean.
    """

    name = "beta"

    def __init__(self, *, prior_a: float = 1.0, prior_b: float = 1.0, decay: float = 1.0, default: float = 0.5) -> None:
        super().__init__(default=default)
        for nm, v in (("prior_a", prior_a), ("prior_b", prior_b)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{nm} must be a finite number > 0, got {v!r}")
        self.prior_a, self.prior_b = float(prior_a), float(prior_b)
        self.decay = _check_prob(decay, "decay", open_low=True)
        self._ev: dict[str, tuple[float, float]] = {}  # prompt -> (successes, failures)

    def _params(self):
        return {"prior_a": self.prior_a, "prior_b": self.prior_b, "decay": self.decay, "default": self.default}

    def _update(self, ids, sums, counts):
        for pid, s, m in zip(ids, sums, counts):
            if not m:
                continue
            a, b = self._ev.get(pid, (0.0, 0.0))
            self._ev[pid] = (self.decay * a + float(s), self.decay * b + float(m - s))

    def _value(self, pid):
        a, b = self._ev.get(pid, (0.0, 0.0))
        return (self.prior_a + a) / (self.prior_a + self.prior_b + a + b)

    def posterior(self, prompt_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Beta parameters (alpha, beta), each (G,) float64."""
        ev = [self._ev.get(pid, (0.0, 0.0)) for pid in prompt_ids]
        a = torch.tensor([self.prior_a + e[0] for e in ev], dtype=torch.float64)
        b = torch.tensor([self.prior_b + e[1] for e in ev], dtype=torch.float64)
        return a, b

    def _state(self):
        return {"evidence": {k: list(v) for k, v in self._ev.items()}}

    def _load(self, state):
        self._ev = {str(k): (float(v[0]), float(v[1])) for k, v in state["evidence"].items()}


class LeaveOneOut(PHatStat):
    """Per-prompt mean over all samples seen *except the prompt's most recent group* (jackknife-style).

    After ``update(ids, rewards)``, ``value(ids)`` for those prompts is independent of that group, so a
    plug-in shaping fed with it has a constant scale given the group, and its expected update is the
    true gradient times that scale (no finite-n coupling bias). Prompts with no other samples fall back
    to the global mean excluding the most recent update, then to ``default``. For the within-group
    per-sample version use :func:`loo_group_means`.
    """

    name = "loo"

    def __init__(self, *, default: float = 0.5) -> None:
        super().__init__(default=default)
        self._tot: dict[str, tuple[float, int]] = {}  # prompt -> (reward sum, samples), all groups
        self._last: dict[str, tuple[float, int]] = {}  # prompt -> most recent group's (sum, samples)
        self._last_update = (0.0, 0)  # most recent update call's (sum, samples)

    def _update(self, ids, sums, counts):
        seen: dict[str, tuple[float, int]] = {}
        for pid, s, m in zip(ids, sums, counts):
            if not m:
                continue
            ts, tm = self._tot.get(pid, (0.0, 0))
            self._tot[pid] = (ts + float(s), tm + int(m))
            ls, lm = seen.get(pid, (0.0, 0))  # a prompt repeated within one update forms one group
            seen[pid] = (ls + float(s), lm + int(m))
        self._last.update(seen)
        self._last_update = (float(sums.sum()), int(counts.sum()))

    def _global_excluding_last(self) -> float:
        s = self._reward - self._last_update[0]
        m = self._samples - self._last_update[1]
        return s / m if m > 0 else self.default

    def _value(self, pid):
        ts, tm = self._tot.get(pid, (0.0, 0))
        ls, lm = self._last.get(pid, (0.0, 0))
        return (ts - ls) / (tm - lm) if tm - lm > 0 else self._global_excluding_last()

    def _state(self):
        return {
            "totals": {k: list(v) for k, v in self._tot.items()},
            "last": {k: list(v) for k, v in self._last.items()},
            "last_update": list(self._last_update),
        }

    def _load(self, state):
        self._tot = {str(k): (float(v[0]), int(v[1])) for k, v in state["totals"].items()}
        self._last = {str(k): (float(v[0]), int(v[1])) for k, v in state["last"].items()}
        self._last_update = (float(state["last_update"][0]), int(state["last_update"][1]))


STATS: Mapping[str, type[PHatStat]] = {
    cls.name: cls for cls in (GroupMean, EMA, GlobalCounts, BetaPosterior, LeaveOneOut)
}


def make_stats(name: str, **params: Any) -> PHatStat:
    """Build the p_hat estimator ``name`` from ``STATS``; unknown names or parameters raise ValueError."""
    try:
        cls = STATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown p_hat estimator {name!r}; known: {', '.join(STATS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"p_hat estimator {name!r}: bad parameters {sorted(params)} ({e})") from None


# ---- within-group leave-one-out helpers ----
def loo_group_means(rewards: Any) -> torch.Tensor:
    """Per-sample leave-one-out means (G, n): p_hat_{-i} = (sum_j r_j - r_i)/(n-1), float64. Needs n >= 2."""
    r = torch.as_tensor(rewards.detach().cpu().numpy() if isinstance(rewards, torch.Tensor) else np.asarray(rewards), dtype=torch.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"loo_group_means needs rewards of shape (G, n) with n >= 2, got {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("loo_group_means: rewards must be finite")
    return (r.sum(1, keepdim=True) - r) / (r.shape[1] - 1)
