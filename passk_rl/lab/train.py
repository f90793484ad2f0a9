"""Policy-gradient training on a simulated :class:`~passk_rl.lab.env.Population`.

Two modes:
  - "stochastic": sample n answers per prompt, shape the binary rewards with the math core, take the
    policy-gradient step (what a real trainer does, minus PPO clipping: one update per batch, on-policy).
  - "exact": replace the sampled update by its exact expectation E[g_x] = D_x ∇p_x (lab.exact.drift), i.e. the
    same shaping at the same finite n but with no sampling noise. Isolates bias from variance.
Metrics are exact: pass@k = mean_x 1 − (1 − p_x)^k on the training prompts and, for a shared policy, on
held-out prompts drawn from the same distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np

from passk_rl.lab import core
from passk_rl.lab.env import Population, pass_at_k_exact
from passk_rl.lab.exact import advantage_table, drift

EVAL_KS = (1, 4, 16, 64)


@dataclasses.dataclass(frozen=True)
class Method:
    """One training recipe.

    shaping/k/params: passed to ``passk_rl.shaping.shape`` (params e.g. {"weights": {1: .5, 64: .5}}).
    p_hat: where the shaping's p̂ comes from — "group" (None: the shaping uses the current group), "oracle"
    (the true p_x: an independent, noiseless p̂) or "stats" (``passk_rl.stats`` estimator ``stats``, read
    *before* it sees the current group, so it is independent of it).
    schedule: optional ``passk_rl.schedule`` name; when set, K (or multi-K weights) comes from it each step,
    driven by the global p̂ of the ``stats`` estimator (a per-prompt schedule: each prompt's own p̂, read before
    its group is folded in, as the central p̂ actor does).
    ref_coef / ref_kind: a reference-policy term added to the update, coef × the ascent direction of −D(π_ref, π)
    with π_ref the initial policy, computed exactly per prompt: "forward" = KL(π_ref ‖ π) (DPH-RL's mass-covering
    penalty, arXiv 2509.07430; logit gradient π − π_ref), "reverse" = KL(π ‖ π_ref) (GRPO's k3 penalty in
    expectation; logit gradient π ⊙ (log π/π_ref − KL)). Lab only: the real loss lives in the learner.
    """

    label: str
    shaping: str
    k: int = 1
    params: tuple = ()
    p_hat: str = "group"
    stats: str = ""
    stats_params: tuple = ()
    schedule: str = ""
    schedule_params: tuple = ()
    ref_coef: float = 0.0
    ref_kind: str = "forward"

    def __post_init__(self):
        if self.ref_kind not in ("forward", "reverse") or not self.ref_coef >= 0:
            raise ValueError(f"Method {self.label}: ref_kind must be forward|reverse and ref_coef >= 0, got "
                             f"{self.ref_kind!r}, {self.ref_coef!r}")
        if self.p_hat not in ("group", "oracle", "stats"):
            raise ValueError(f"Method {self.label}: p_hat must be group|oracle|stats, got {self.p_hat!r}")
        if (self.p_hat == "stats" or self.schedule) and not self.stats:
            raise ValueError(f"Method {self.label}: p_hat='stats' or a schedule needs a stats estimator name")


def _kw(t: tuple) -> dict:
    """Hashable ((key, value), ...) → dict; a tuple of pairs under "weights" becomes {k: w}."""
    out = {k: v for k, v in t}
    if isinstance(out.get("weights"), tuple):
        out["weights"] = {int(a): float(b) for a, b in out["weights"]}
    return out


class Adam:
    """Adam for gradient *ascent* on a flat parameter vector."""

    def __init__(self, size: int, *, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m, self.v, self.t = np.zeros(size), np.zeros(size), 0

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad ** 2
        mh = self.m / (1 - self.b1 ** self.t)
        vh = self.v / (1 - self.b2 ** self.t)
        return params + self.lr * mh / (np.sqrt(vh) + self.eps)


class SGD:
    def __init__(self, size: int, *, lr: float):
        self.lr = lr

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        return params + self.lr * grad


def make_optimizer(name: str, size: int, *, lr: float):
    if name == "adam":
        return Adam(size, lr=lr)
    if name == "sgd":
        return SGD(size, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose adam or sgd")


def ref_term(pi: np.ndarray, pi0: np.ndarray, kind: str) -> np.ndarray:
    """Per-prompt logit direction (P, M) that lowers the divergence from the reference policy pi0."""
    if kind == "forward":  # -d/dz KL(pi0 || softmax z) = pi0 - pi
        return pi0 - pi
    log_ratio = np.log(np.maximum(pi, 1e-300)) - np.log(np.maximum(pi0, 1e-300))
    kl = (pi * log_ratio).sum(axis=1, keepdims=True)
    return -pi * (log_ratio - kl)  # -d/dz KL(softmax z || pi0)


def train(pop: Population, method: Method, *, steps: int, n: int, lr: float, seed: int, mode: str = "stochastic",
          optimizer: str = "adam", eval_every: int = 10, ks: Sequence[int] = EVAL_KS,
          test_pop: Optional[Population] = None, stop_at: Optional[Dict] = None) -> Dict:
    """Train one policy; returns the metric history.

    stop_at: optional {"k": K, "thresholds": [τ...]}: record per prompt the first step at which its exact
    pass@K ≥ τ, for every τ (``first_hit`` (T, P) in the result, −1 = never), and stop once every prompt passed
    every threshold. Used by the sample-complexity experiment (tabular policy: prompts are independent).
    History: {"step": [...], "train": {k: [...]}, "test": {k: [...]}, "k_used": [...], "p_global": [...]}.
    """
    if mode not in ("stochastic", "exact"):
        raise ValueError(f"mode must be stochastic or exact, got {mode!r}")
    if mode == "exact" and (method.p_hat == "stats" or method.schedule):
        raise ValueError(f"Method {method.label}: exact mode needs p_hat group|oracle and no schedule")
    rng = np.random.default_rng(seed)
    params = pop.init_params()
    pi0 = pop.probs(params)
    opt = make_optimizer(optimizer, params.size, lr=lr)
    P = pop.cfg.n_prompts
    ids = [f"x{i}" for i in range(P)]  # passk_rl.stats keys prompts by string id
    stats = core.make_stats(method.stats, **_kw(method.stats_params)) if method.stats else None
    sched = core.make_schedule(method.schedule, **_kw(method.schedule_params)) if method.schedule else None
    shape_cache: Dict = {}
    table_cache: Dict = {}
    hist: Dict = {"step": [], "train": {int(k): [] for k in ks}, "test": {int(k): [] for k in ks},
                  "k_used": [], "p_global": []}
    taus = np.asarray(stop_at["thresholds"], dtype=np.float64) if stop_at else np.zeros(0)
    first_hit = np.full((taus.size, P), -1, dtype=np.int64)

    def record(step: int, pi: np.ndarray, p: np.ndarray, k_used, p_glob) -> None:
        hist["step"].append(step)
        for k, v in pass_at_k_exact(p, ks).items():
            hist["train"][k].append(v)
        if test_pop is not None:
            for k, v in pass_at_k_exact(test_pop.success(test_pop.probs(params)), ks).items():
                hist["test"][k].append(v)
        hist["k_used"].append(k_used)
        hist["p_global"].append(p_glob)

    k_now, p_glob = method.k, float("nan")
    for step in range(steps + 1):
        pi = pop.probs(params)
        p = pop.success(pi)
        if stop_at is not None:
            K = int(stop_at["k"])
            vals = -np.expm1(K * np.log1p(-np.minimum(p, 1 - 1e-16)))
            hit = vals[None, :] >= taus[:, None]
            first_hit[(first_hit < 0) & hit] = step
            if np.all(first_hit >= 0):
                record(step, pi, p, k_now, p_glob)
                break
        if step == steps:
            record(step, pi, p, k_now, p_glob)
            break
        answers = rewards = None
        warmed = False
        if mode == "stochastic":
            answers, rewards = pop.sample(pi, n, rng)
            if stats is not None and stats.total_samples == 0:
                # an estimator that has seen nothing returns its arbitrary default; warm it on the first batch
                stats.update(ids, rewards)
                warmed = True
        shaping, k, extra = method.shaping, method.k, _kw(method.params)
        k_rows = None
        if sched is not None:
            p_glob = float(stats.global_value())
            if getattr(sched, "per_prompt", False):
                dec = sched.next_rows(core.to_numpy(stats.value(ids)).tolist(), p_global=p_glob, step=step, n=n)
                k_rows, k = np.asarray(dec.k_rows, dtype=np.int64), int(dec.k)
            else:
                k, weights = core.decision(sched.next(p_glob, step=step, n=n))
                if weights is not None:
                    shaping, extra = "multi_k", {**extra, "weights": weights}
        k_now = float(k_rows.mean()) if k_rows is not None else k
        if step % eval_every == 0:
            record(step, pi, p, k_now, p_glob)
        if shaping == "pkpo_loo_minus_one" and k == 1:
            shaping = core.pkpo_name(1)  # the k=1 member of the PKPO family is RLOO
        if method.p_hat == "oracle" and core.uses_p_hat(shaping):
            extra = {"p_clip": 0.0, **extra}  # the true p needs no guard against estimates near 0 or 1
        key = (shaping, k, tuple(sorted((a, str(b)) for a, b in extra.items())))
        if k_rows is not None:  # one K per prompt: not cacheable, and cheap to build
            fn = core.shape_fn(shaping, k=k_rows, params=extra)
        else:
            if key not in shape_cache:
                shape_cache[key] = core.shape_fn(shaping, k=k, params=extra)
            fn = shape_cache[key]
        if mode == "exact":
            if method.p_hat == "oracle":
                Ap, Am = advantage_table(fn, n, p_hat=p)
            else:
                if key not in table_cache:
                    table_cache[key] = advantage_table(fn, n)
                Ap, Am = table_cache[key]
            G = pop.logit_grad_expected(pi, p, drift(Ap, Am, p, n))
        else:
            if method.p_hat == "oracle":
                ph = p
            elif method.p_hat == "stats":
                ph = core.to_numpy(stats.value(ids))  # read before this group is folded in
            else:
                ph = None
            adv = fn(rewards, ph)
            if stats is not None and not warmed:
                stats.update(ids, rewards)
            G = pop.logit_grad_from_samples(pi, answers, adv)
        if method.ref_coef > 0:
            G = G + method.ref_coef * ref_term(pi, pi0, method.ref_kind)
        params = opt.step(params, pop.param_grad(G))
        if not np.all(np.isfinite(params)):
            raise FloatingPointError(f"{method.label}: parameters became non-finite at step {step}")
    hist["first_hit"] = first_hit.tolist()
    hist["final"] = {"train": {k: v[-1] for k, v in hist["train"].items()},
                     "test": {k: v[-1] for k, v in hist["test"].items() if v}}
    return hist
