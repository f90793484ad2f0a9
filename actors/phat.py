"""The central p̂ estimator: one named actor for the whole cluster.

``PHatService`` (plain class, testable without Ray) owns a ``passk_rl.stats`` estimator and a
``passk_rl.schedule`` K schedule. Each step the driver sends (prompt ids, rewards) and gets back the p̂ of each
prompt, the global p̂ and the K (or K weights) to shape with.

It is the one place that decides K: it knows the shaping's admissible range at this n (``passk_rl.shaping.info``)
and moves the schedule's K into it, so the K it returns, records in its history and checkpoints is the K the
update uses. A shaping that ignores K gets ``k=None`` (nothing to show); a multi-K shaping gets weights, and K is
their largest key; a per-prompt schedule (``schedule.kind: per_prompt``) gets one K per prompt in ``k_rows`` (from
that prompt's own p̂, before this step's rewards), and K is their largest.

Order matters: the p̂ and K handed back are computed *before* this step's rewards are folded in, so a plug-in
shaping that uses them (``algorithm.p_hat_source: estimator``) gets a p̂ that does not depend on the group it
weights — that removes the finite-n coupling bias of group-mean p̂ (see docs/shapings.md). The rewards are
then added to the statistics for the next step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from passk_rl import schedule as schedule_mod
from passk_rl import shaping as shaping_mod
from passk_rl import stats as stats_mod


@dataclasses.dataclass
class PHatDecision:
    step: int
    p_hat: List[float]  # per prompt, before this step's rewards
    p_global: float  # global p̂ before this step's rewards
    k: Optional[int]  # the K the shaping uses (None: the shaping ignores K)
    k_weights: Optional[Dict[int, float]]  # multi-K shapings: {k: w}; k is then max(k_weights)
    total_samples: int  # samples folded in so far, this step included
    k_requested: Optional[int] = None  # the schedule's own K before it was moved into the shaping's range
    k_rows: Optional[List[int]] = None  # per-prompt schedules: the K of each prompt (in the shaping's range)


def k_range(shaping_name: str, n: int) -> Optional[tuple]:
    """(lo, hi) of the K ``shaping_name`` accepts with n samples per prompt; None when it ignores K."""
    info = shaping_mod.info(shaping_name)
    if not info.uses_k:
        return None
    hi = n - 1 if info.needs_k_le_n_minus_1 else n
    return (int(info.min_k), int(hi))


class PHatService:
    def __init__(self, *, estimator: str, estimator_params: Optional[Dict[str, Any]] = None, schedule: str,
                 schedule_params: Optional[Dict[str, Any]] = None, n: int, shaping: str = "pkpo_loo_minus_one"):
        self.estimator_name = estimator
        self.schedule_name = schedule
        self.n = int(n)
        self.shaping = shaping
        info = shaping_mod.info(shaping)
        self.uses_weights = info.uses_k_weights
        self.k_range = k_range(shaping, self.n)
        if info.uses_k and self.uses_weights != (schedule == "multi_k"):
            # multi_k without weights silently becomes RLOO; weights for another K-shaping would be silently
            # dropped. A K-free shaping gets k None from every schedule.
            raise ValueError(f"shaping {shaping!r} {'needs' if self.uses_weights else 'cannot take'} the K weights "
                             f"of schedule 'multi_k' (schedule is {schedule!r})")
        self.stats = stats_mod.make_stats(estimator, **(estimator_params or {}))
        self.schedule = schedule_mod.make_schedule(schedule, **(schedule_params or {}))
        problem = schedule_mod.per_prompt_problem(shaping, self.schedule, self.n)
        if problem:
            raise ValueError(problem)
        self.history: List[Dict[str, Any]] = []

    def observe(self, prompt_ids: Sequence[str], rewards: Any, *, step: int, verified: Any = None) -> PHatDecision:
        """``verified`` (G, n) bool marks samples with a verdict; timeouts and verifier errors (False) are not
        evidence about the policy and are left out of the statistics."""
        r = torch.from_numpy(np.array(rewards, dtype=np.float64))  # a copy: Ray hands over read-only arrays
        if r.ndim != 2 or r.shape[0] != len(prompt_ids):
            raise ValueError(f"rewards must be (G, n) with G={len(prompt_ids)} prompts; got shape {tuple(r.shape)}")
        mask = None
        if verified is not None:
            mask = torch.from_numpy(np.array(verified, dtype=bool))  # a copy: Ray hands over read-only arrays
            if tuple(mask.shape) != tuple(r.shape):
                raise ValueError(f"verified mask shape {tuple(mask.shape)} != rewards shape {tuple(r.shape)}")
        p_hat = [float(x) for x in torch.as_tensor(self.stats.value(list(prompt_ids))).reshape(-1)]
        if int(self.stats.total_samples) == 0:
            # No history yet: the estimator's prior (0.5) would set the first K arbitrarily; one step's mean
            # over the whole batch is a far better global value, and K is a batch-level choice, so using it
            # does not couple any single group's weights to its own rewards the way a per-prompt p̂ would.
            p_global = float(r[mask].mean()) if mask is not None and bool(mask.any()) else float(r.mean())
        else:
            p_global = float(self.stats.global_value())
        if self.schedule.per_prompt:
            # Before any history every prompt's p̂ is the estimator's prior; the batch mean is the better guess.
            rows_p = p_hat if int(self.stats.total_samples) > 0 else [p_global] * len(p_hat)
            decision = self.schedule.next_rows(rows_p, p_global=p_global, step=step, n=int(r.shape[1]))
        else:
            decision = self.schedule.next(p_global, step=step, n=int(r.shape[1]))
        self.stats.update(list(prompt_ids), r, mask=mask)
        k, weights = self._admissible(decision)
        k_rows = None
        if decision.k_rows is not None and self.k_range is not None:
            k_rows = [self._clamp(x) for x in decision.k_rows]
            k = max(k_rows) if k_rows else k
        out = PHatDecision(step=step, p_hat=p_hat, p_global=p_global, k=k, k_weights=weights,
                           total_samples=int(self.stats.total_samples), k_requested=int(decision.k), k_rows=k_rows)
        self.history.append({"step": step, "p_global": p_global, "k": out.k, "k_weights": out.k_weights,
                             **({"k_mean": float(np.mean(k_rows))} if k_rows else {})})
        return out

    def _clamp(self, k: int) -> int:
        lo, hi = self.k_range
        return int(min(max(int(k), lo), hi))

    def _admissible(self, decision: Any):
        """(k, weights) the shaping will use: K clamped into the shaping's range; weights only for multi-K."""
        if self.uses_weights:
            weights = dict(decision.weights)
            return max(weights), weights
        if self.k_range is None:
            return None, None
        return self._clamp(decision.k), None

    def global_value(self) -> float:
        return float(self.stats.global_value())

    def total_samples(self) -> int:
        return int(self.stats.total_samples)

    def state_dict(self) -> Dict[str, Any]:
        return {"stats": self.stats.state_dict(), "schedule": self.schedule.state_dict(), "history": list(self.history),
                "estimator": self.estimator_name, "schedule_name": self.schedule_name, "shaping": self.shaping}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("estimator") != self.estimator_name or state.get("schedule_name") != self.schedule_name:
            raise ValueError(
                f"p̂ state is for estimator={state.get('estimator')!r}, schedule={state.get('schedule_name')!r}; "
                f"this run uses estimator={self.estimator_name!r}, schedule={self.schedule_name!r}"
            )
        self.stats.load_state_dict(state["stats"])
        self.schedule.load_state_dict(state["schedule"])
        self.history = list(state.get("history", []))


def actor_name(run_name: str) -> str:
    return f"passk_rl.phat.{run_name}"


def create_phat_actor(run_name: str, **kwargs: Any):
    """Start the named p̂ actor of ``run_name`` (one per run; a second start with the same name fails)."""
    import ray

    cls = ray.remote(num_cpus=0)(PHatService)
    return cls.options(name=actor_name(run_name)).remote(**kwargs)
