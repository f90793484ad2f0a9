"""K schedules: which K (or which {k: weight} mix) to shape with at each training step.

Protocol (every class in ``SCHEDULES``):
    next(p_global: float, *, step: int, n: int) -> KDecision     K never exceeds n - max_k_offset
    per_prompt: bool              True: call next_rows(p_rows, p_global=, step=, n=) instead, which also fills
                                  KDecision.k_rows (one K per prompt, from that prompt's own p̂)
    max_k: int                    the largest K the schedule can ask for (before the cap by n)
    state_dict() -> dict / load_state_dict(state)                plain-Python state, as in stats

``max_k_offset`` (default 0) lowers the cap to n - max_k_offset for shapings that need k <= n - 1
(pkpo_loo, passk_analytic with baseline='loo').
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "KDecision",
    "KSchedule",
    "FixedK",
    "LinearK",
    "AnnealK",
    "MultiKWeights",
    "TwoStageK",
    "PerPromptK",
    "SCHEDULES",
    "make_schedule",
    "per_prompt_problem",
]

_STATE_VERSION = 1


@dataclass(frozen=True)
class KDecision:
    """K to shape with; ``weights`` ({k: w}, k ascending, max key == k) for multi-K schedules; ``k_rows`` (one K per
    prompt of the batch, max == k) for per-prompt schedules."""

    k: int
    weights: dict[int, float] | None = None
    k_rows: tuple[int, ...] | None = None


def _pos_int(x: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


def _finite(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


class KSchedule:
    """Base class: argument checks, the n cap, and the state-dict envelope. Subclasses set ``name``."""

    name: str = ""
    per_prompt: bool = False

    def __init__(self, *, max_k_offset: int = 0) -> None:
        self.max_k_offset = _pos_int(max_k_offset, "max_k_offset", minimum=0)
        self._last: dict[str, Any] | None = None

    @property
    def max_k(self) -> int:
        raise NotImplementedError

    def next(self, p_global: float, *, step: int, n: int) -> KDecision:
        p = _finite(p_global, "p_global")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p_global must lie in [0, 1], got {p_global!r}")
        step = _pos_int(step, "step", minimum=0)
        n = _pos_int(n, "n")
        cap = n - self.max_k_offset
        if cap < 1:
            raise ValueError(f"n={n} leaves no admissible K with max_k_offset={self.max_k_offset}")
        dec = self._decide(p, step, cap)
        self._last = {"step": step, "p_global": p, "n": n, "k": dec.k,
                      "weights": None if dec.weights is None else [[k, w] for k, w in dec.weights.items()]}
        return dec

    @property
    def last(self) -> dict[str, Any] | None:
        """The most recent decision with its inputs (for logging and resume), or None."""
        return None if self._last is None else dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "version": _STATE_VERSION, "params": self._params(),
                "state": {"last": self.last, **self._extra_state()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("kind") != self.name:
            got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state_dict is for K schedule {got!r}, this is {self.name!r}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported {self.name} state version {state.get('version')!r}")
        if _canon(state.get("params")) != _canon(self._params()):
            raise ValueError(f"{self.name} state has params {state.get('params')!r}, this schedule has {self._params()!r}")
        inner = state["state"]
        self._last = None if inner.get("last") is None else dict(inner["last"])
        self._load_extra(inner)

    # ---- subclass hooks ----
    def _decide(self, p: float, step: int, cap: int) -> KDecision:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {"max_k_offset": self.max_k_offset}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, inner: Mapping[str, Any]) -> None:
        pass


def _canon(x: Any) -> Any:
    """JSON round-trip normal form (tuples -> lists, int keys -> str) for comparing params."""
    if isinstance(x, Mapping):
        return {str(k): _canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    return x


class FixedK(KSchedule):
    """K = min(k, n - max_k_offset) at every step."""

    name = "fixed"

    def __init__(self, *, k: int = 1, max_k_offset: int = 0) -> None:
        super().__init__(max_k_offset=max_k_offset)
        self.k = _pos_int(k, "k")

    @property
    def max_k(self) -> int:
        return self.k

    def _decide(self, p, step, cap):
        return KDecision(k=min(self.k, cap))

    def _params(self):
        return {"k": self.k, "max_k_offset": self.max_k_offset}


class LinearK(KSchedule):
    """The seed's schedule K_t = K_min + (K_max - K_min) * p_t / p_target, clamped to [K_min, K_max].

    The real value is floored to an integer (K only changes once the target is really reached), then
    capped by n. ``monotone=True`` never lowers K below the largest K decided so far (a ratchet against
    oscillation when p_t is noisy); that floor is the schedule's state.
    """

    name = "linear"

    def __init__(self, *, k_min: int = 1, k_max: int = 8, p_target: float = 0.5, monotone: bool = False,
                 max_k_offset: int = 0) -> None:
        super().__init__(max_k_offset=max_k_offset)
        self.k_min = _pos_int(k_min, "k_min")
        self.k_max = _pos_int(k_max, "k_max")
        if self.k_max < self.k_min:
            raise ValueError(f"k_max must be >= k_min, got k_min={k_min}, k_max={k_max}")
        self.p_target = _finite(p_target, "p_target")
        if not 0.0 < self.p_target <= 1.0:
            raise ValueError(f"p_target must lie in (0, 1], got {p_target!r}")
        if not isinstance(monotone, bool):
            raise ValueError(f"monotone must be a bool, got {monotone!r}")
        self.monotone = monotone
        self._floor = self.k_min

    @property
    def max_k(self) -> int:
        return self.k_max

    def raw_k(self, p: float) -> int:
        """Integer K before the n cap and the ratchet."""
        k = self.k_min + (self.k_max - self.k_min) * (p / self.p_target)
        return int(min(self.k_max, max(self.k_min, math.floor(k + 1e-12))))

    def _decide(self, p, step, cap):
        k = self.raw_k(p)
        if self.monotone:
            k = max(k, self._floor)
            self._floor = k
        return KDecision(k=min(k, cap))

    def _params(self):
        return {"k_min": self.k_min, "k_max": self.k_max, "p_target": self.p_target,
                "monotone": self.monotone, "max_k_offset": self.max_k_offset}

    def _extra_state(self):
        return {"floor": self._floor}

    def _load_extra(self, inner):
        self._floor = int(inner.get("floor", self.k_min))


def _step_milestones(milestones: Any, what: str) -> list[tuple[int, Any]]:
    """{step: value} or [[step, value], ...] -> sorted [(step, value)] starting at step 0."""
    items = list(milestones.items()) if isinstance(milestones, Mapping) else list(milestones or [])
    out = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{what}: each milestone must be a (step, value) pair, got {item!r}")
        step = item[0]
        if isinstance(step, str) and step.strip().isdigit():
            step = int(step)
        out.append((_pos_int(step, f"{what} step", minimum=0), item[1]))
    if not out:
        raise ValueError(f"{what}: need at least one milestone")
    out.sort(key=lambda t: t[0])
    steps = [s for s, _ in out]
    if len(set(steps)) != len(steps):
        raise ValueError(f"{what}: duplicate milestone steps {steps}")
    if steps[0] != 0:
        raise ValueError(f"{what}: the first milestone must be at step 0, got {steps[0]}")
    return out


class AnnealK(KSchedule):
    """Piecewise-constant K by training step, e.g. {0: 8, 800: 1} (PKPO's k_opt annealing 8 -> 1)."""

    name = "anneal"

    def __init__(self, *, milestones: Any = None, max_k_offset: int = 0) -> None:
        super().__init__(max_k_offset=max_k_offset)
        self.milestones = [(s, _pos_int(k, f"anneal K at step {s}")) for s, k in _step_milestones(milestones, "anneal")]

    @property
    def max_k(self) -> int:
        return max(k for _, k in self.milestones)

    def _decide(self, p, step, cap):
        k = [k for s, k in self.milestones if s <= step][-1]
        return KDecision(k=min(k, cap))

    def _params(self):
        return {"milestones": [[s, k] for s, k in self.milestones], "max_k_offset": self.max_k_offset}


def _weights(w: Any, what: str) -> dict[int, float]:
    if isinstance(w, Mapping):
        items = list(w.items())
    elif isinstance(w, (list, tuple)):
        items = [tuple(x) for x in w]
    else:
        raise ValueError(f"{what}: weights must be a {{k: w}} mapping, got {w!r}")
    out: dict[int, float] = {}
    for k, v in items:
        if isinstance(k, str) and k.strip().isdigit():
            k = int(k)
        k = _pos_int(k, f"{what}: weight key")
        v = _finite(v, f"{what}: weight for k={k}")
        if v < 0:
            raise ValueError(f"{what}: weights must be >= 0, got {v} for k={k}")
        out[k] = out.get(k, 0.0) + v
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"{what}: need at least one positive weight, got {w!r}")
    return dict(sorted(out.items()))


class MultiKWeights(KSchedule):
    """Weights {k: w} for the multi_k shaping (J = sum_k w_k pass@k), fixed or interpolated over steps.

    Either ``weights`` (constant) or ``milestones`` [(step, {k: w}), ...] (first at step 0); between
    milestones each w_k is linear in the step, after the last it stays. ks above the cap n -
    max_k_offset are merged into the cap (their weight moves to k = cap); zero weights are dropped.
    ``normalize=True`` rescales the weights to sum to 1. KDecision.k is the largest k kept.
    """

    name = "multi_k"

    def __init__(self, *, weights: Any = None, milestones: Any = None, normalize: bool = False,
                 max_k_offset: int = 0) -> None:
        super().__init__(max_k_offset=max_k_offset)
        if (weights is None) == (milestones is None):
            raise ValueError("multi_k schedule: pass exactly one of weights={k: w} or milestones=[(step, {k: w}), ...]")
        if milestones is None:
            milestones = [(0, weights)]
        self.milestones = [(s, _weights(w, f"multi_k milestone at step {s}")) for s, w in _step_milestones(milestones, "multi_k")]
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        self.normalize = normalize

    @property
    def max_k(self) -> int:
        return max(max(w) for _, w in self.milestones)

    def weights_at(self, step: int) -> dict[int, float]:
        """Interpolated weights at ``step`` before the n cap."""
        ms = self.milestones
        if step >= ms[-1][0]:
            return dict(ms[-1][1])
        j = max(i for i, (s, _) in enumerate(ms) if s <= step)
        (s0, w0), (s1, w1) = ms[j], ms[j + 1]
        t = (step - s0) / (s1 - s0)
        keys = sorted(set(w0) | set(w1))
        return {k: (1.0 - t) * w0.get(k, 0.0) + t * w1.get(k, 0.0) for k in keys}

    def _decide(self, p, step, cap):
        merged: dict[int, float] = {}
        for k, w in self.weights_at(step).items():
            if w > 0:
                kk = min(k, cap)
                merged[kk] = merged.get(kk, 0.0) + w
        if self.normalize:
            total = sum(merged.values())
            merged = {k: w / total for k, w in merged.items()}
        merged = dict(sorted(merged.items()))
        return KDecision(k=max(merged), weights=merged)

    def _params(self):
        return {"milestones": [[s, [[k, v] for k, v in w.items()]] for s, w in self.milestones],
                "normalize": self.normalize, "max_k_offset": self.max_k_offset}


class TwoStageK(KSchedule):
    """Chen et al.'s pass@k -> pass@1 training (arXiv 2508.10751): K = ``k`` before ``switch_step``, K = 1 from it on.

    Their Enigmata result (P@1/P@k): pass@1 only 12.9/21.3, pass@k only 17.9/29.8, pass@k then pass@1 30.8/40.6.
    The split is stated as a step (the run's budget is config, so ``switch_step = fraction × run.steps`` is written
    out in the experiment file). The objective is piecewise: pass@k's until the switch, pass@1's after.
    """

    name = "two_stage"

    def __init__(self, *, k: int = 8, switch_step: int = 0, max_k_offset: int = 0) -> None:
        super().__init__(max_k_offset=max_k_offset)
        self.k = _pos_int(k, "two_stage k")
        self.switch_step = _pos_int(switch_step, "two_stage switch_step", minimum=0)

    @property
    def max_k(self) -> int:
        return self.k

    def _decide(self, p, step, cap):
        return KDecision(k=min(self.k if step < self.switch_step else 1, cap))

    def _params(self):
        return {"k": self.k, "switch_step": self.switch_step, "max_k_offset": self.max_k_offset}


class PerPromptK(KSchedule):
    """One K per prompt, from that prompt's own p̂ (the central actor's history, read before this step's rewards).

    Rule: K_i = argmax_{K in [k_min, k_max]} d pass@K/dp at p̂_i = argmax_K K (1 - p̂_i)^(K-1). Since
    alpha_K(p) >= alpha_{K+1}(p) iff p >= 1/(K+1), the argmax is K*(p) = ceil(1/p) - 1 clipped to [k_min, k_max]
    (ties to the smaller K; p = 0 gives k_max): a prompt solved half the time or more gets K = 1 (sharpen: pass@1),
    one solved 1 time in 10 gets K = 9 (explore), capped at k_max. It is the K whose pass@K gradient is steepest at
    the prompt's current success rate; arXiv 2511.16231's factor k(1-p)^(k-1) is exactly what it maximises.

    Objective: K_i is a function of the history only, so with an unbiased pass@K shaping (pkpo_loo: K = 1 is RLOO)
    the step's expected update is exactly grad sum_i pass@{K_i}(p_i) with the K_i frozen. When p̂_i = p_i it equals
    grad sum_i F(p_i) with F(p) = int_0^p max_K alpha_K(t) dt (``objective``): the upper envelope of the pass@K
    gradients, = p - 1/2 + F(1/2) on [1/2, 1] (pass@1), ~ (1/e) log p for 1/k_max << p << 1/2 (hard prompts weigh
    like 1/(e p), i.e. log-likelihood-like), and pass@{k_max} below 1/k_max.
    """

    name = "per_prompt"
    per_prompt = True

    def __init__(self, *, k_min: int = 1, k_max: int = 8, max_k_offset: int = 0) -> None:
        super().__init__(max_k_offset=max_k_offset)
        self.k_min = _pos_int(k_min, "per_prompt k_min")
        self.k_max = _pos_int(k_max, "per_prompt k_max")
        if self.k_max < self.k_min:
            raise ValueError(f"per_prompt: k_max must be >= k_min, got k_min={k_min}, k_max={k_max}")

    @property
    def max_k(self) -> int:
        return self.k_max

    def k_star(self, p: Any) -> np.ndarray:
        """K*(p) = clip(ceil(1/p) - 1, k_min, k_max) elementwise (int64); p = 0 gives k_max."""
        p = np.asarray(p, dtype=np.float64)
        if np.any(~np.isfinite(p) | (p < 0) | (p > 1)):
            raise ValueError(f"per_prompt: p̂ must lie in [0, 1], got {p!r}")
        with np.errstate(divide="ignore", over="ignore"):  # p below ~1e-308: 1/p = inf, clipped to k_max
            raw = np.where(p > 0, np.ceil(1.0 / np.where(p > 0, p, 1.0) - 1e-12) - 1, self.k_max)
        return np.clip(raw, self.k_min, self.k_max).astype(np.int64)

    def objective(self, p: Any) -> np.ndarray:
        """F(p) = int_0^p alpha_{K*(t)}(t) dt, summed over the segments where K* is constant (float64)."""
        p = np.asarray(p, dtype=np.float64)
        # K* = K on [1/(K+1), 1/K] for k_min < K < k_max; k_max on [0, 1/k_max]; k_min on [1/(k_min+1), 1]
        edges = [0.0] + [1.0 / (kk + 1) for kk in range(self.k_max - 1, self.k_min - 1, -1)] + [1.0]
        ks = list(range(self.k_max, self.k_min - 1, -1))
        out = np.zeros_like(p)
        for kk, lo, hi in zip(ks, edges[:-1], edges[1:]):
            a, b = np.clip(p, lo, hi), lo
            out = out + (1 - (1 - a) ** kk) - (1 - (1 - b) ** kk)
        return out

    def derivative(self, p: Any) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        k = self.k_star(p)
        return k * (1 - p) ** (k - 1)

    def _decide(self, p, step, cap):  # one K for everyone (a caller that has no per-prompt p̂)
        return KDecision(k=int(min(self.k_star(p), cap)))

    def next_rows(self, p_rows: Sequence[float], *, p_global: float, step: int, n: int) -> KDecision:
        """K_i = K*(p̂_i) capped by n - max_k_offset for every prompt; KDecision.k = max K_i (p_global if no rows)."""
        glob = self.next(p_global, step=step, n=n)
        rows = np.minimum(self.k_star(list(p_rows)), n - self.max_k_offset)
        k_rows = tuple(int(x) for x in rows)
        dec = KDecision(k=max(k_rows) if k_rows else glob.k, k_rows=k_rows)
        self._last = {**(self._last or {}), "k": dec.k, "k_rows_mean": float(np.mean(rows)) if k_rows else None}
        return dec

    def _params(self):
        return {"k_min": self.k_min, "k_max": self.k_max, "max_k_offset": self.max_k_offset}


SCHEDULES: Mapping[str, type[KSchedule]] = {
    cls.name: cls for cls in (FixedK, LinearK, AnnealK, MultiKWeights, TwoStageK, PerPromptK)}


def per_prompt_problem(shaping_name: str, sched: KSchedule, n: int) -> str | None:
    """Why a per-prompt K schedule cannot serve this shaping at n (None: it can, or ``sched`` is not per-prompt).

    Clamping its K = 1 rows up to a shaping's min_k would silently drop the 'sharpen solved prompts' half of the
    rule, and a shaping that ignores K or takes K weights would drop the rule altogether."""
    if not sched.per_prompt:
        return None
    from passk_rl import shaping  # the shaping registry is math-core too; imported here to keep this module light

    info = shaping.info(shaping_name)
    if not info.uses_k or info.uses_k_weights:
        return (f"schedule 'per_prompt' gives one K per prompt; shaping {shaping_name!r} "
                f"{'takes K weights' if info.uses_k_weights else 'ignores K'} (use pkpo_loo, pkpo or passk_alpha)")
    if info.min_k > sched.k_min:
        return (f"schedule 'per_prompt' has k_min={sched.k_min} but shaping {shaping_name!r} needs K >= {info.min_k}; "
                f"use pkpo_loo (K = 1 is RLOO) or raise k_min")
    hi = n - 1 if info.needs_k_le_n_minus_1 else n
    if sched.k_max > hi:
        return f"schedule 'per_prompt' has k_max={sched.k_max} but shaping {shaping_name!r} takes K <= {hi} at n={n}"
    return None


def make_schedule(name: str, **params: Any) -> KSchedule:
    """Build the K schedule ``name`` from ``SCHEDULES``; unknown names or parameters raise ValueError."""
    try:
        cls = SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown K schedule {name!r}; known: {', '.join(SCHEDULES)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"K schedule {name!r}: bad parameters {sorted(params)} ({e})") from None
