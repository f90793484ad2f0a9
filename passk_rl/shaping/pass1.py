"""Pass@1-style shapings (k ignored): GRPO, Dr. GRPO, RLOO, RS-GRPO and W-REINFORCE, each registered next to its
advantage function with its declared objective F(p) for 0/1 rewards."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from passk_rl.shaping.kernels import Batch, centred, inv, p_range_mean, sigma_of
from passk_rl.shaping.registry import register

PAPER_GRPO = "Shao et al. 2024, DeepSeekMath (GRPO), arXiv 2402.03300"
PAPER_DR = "Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO), arXiv 2503.20783"
PAPER_RLOO = "Kool et al. 2019 'Buy 4 REINFORCE samples'; Ahmadian et al. 2024, arXiv 2402.14740"
PAPER_RS = "Jiang et al. 2025, Risk-Sensitive RL for Alleviating Exploration Dilemmas in LLMs (RS-GRPO), arXiv 2509.24261"
PAPER_WR = "Zhu et al. 2025, The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning, arXiv 2506.01347"

PLUGIN_NOTE = (
    " Plug-in: with p_hat from the group the finite-n update is biased (gain_n(p) -> F'(p) as n grows); "
    "with p_hat = true p (and p_clip=0) it is exactly grad F for baseline='loo' and (1-1/n) grad F for "
    "baseline='mean'. An outside p_hat is clipped to the range an n-sample group can express "
    "(p_clip='group', default), which bounds every advantage by the group form's own maximum."
)


# ---- objectives shared with the pass@K module ----
def f_identity(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return p.clone()


def d_identity(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return torch.ones_like(p)


def f_arcsin(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return 2.0 * torch.asin(torch.sqrt(p))


def d_arcsin(p: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    return 1.0 / torch.sqrt(p * (1.0 - p))


@register(
    "grpo", objective=f_arcsin, derivative=d_arcsin, uses_p_hat=True,
    defaults={"baseline": "mean", "eps": 1e-6, "ddof": 0, "p_clip": "group"}, p_range=p_range_mean,
    objective_formula="2 asin(sqrt p)",
    advantage_formula="(r_i - b_i) / max(sigma, eps); sigma = group std, or sqrt(p_hat(1-p_hat)) when p_hat is given",
    paper=PAPER_GRPO,
    doc="Group-normalised advantage. Population limit ascends 2 asin(sqrt p) (F' = 1/sqrt(p(1-p))), not p."
    + PLUGIN_NOTE + " k is ignored. ddof=0 (default) makes group mode equal p_hat mode at p_hat = c/n; ddof=1 matches verl/TRL.",
)
def adv_grpo(b: Batch, *, k: int, baseline: str, eps: float, ddof: int) -> torch.Tensor:
    return centred(b, baseline) * inv(sigma_of(b, ddof), eps)[:, None]


@register(
    "dr_grpo", objective=f_identity, derivative=d_identity,
    objective_formula="p", advantage_formula="r_i - mean(r)", paper=PAPER_DR,
    doc="Group-mean baseline, no std. Exact expected update (1 - 1/n) grad p: right direction, "
    "scaled by (n-1)/n because the baseline contains the sample itself. k and p_hat are ignored.",
)
def adv_dr_grpo(b: Batch, *, k: int) -> torch.Tensor:
    return b.r - b.total / b.n


@register(
    "rloo", objective=f_identity, derivative=d_identity, unbiased=True, needs_k_le_n_minus_1=True,
    objective_formula="p (E[r] for continuous rewards)",
    advantage_formula="r_i - mean_{j != i} r_j = (n r_i - sum r)/(n-1)", paper=PAPER_RLOO,
    doc="REINFORCE leave-one-out. Unbiased for grad p (grad E[r]) for every n >= 2; equals "
    "pkpo_loo and multi_k at k = 1. k and p_hat are ignored.",
)
def adv_rloo(b: Batch, *, k: int) -> torch.Tensor:
    return centred(b, "loo")


# ---- RS-GRPO: exponential utility J_beta = (1/beta) log E[exp(beta r)] ----
def _beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) or not (
        math.isfinite(float(beta)) and 0.0 < float(beta) <= 50.0
    ):
        raise ValueError(f"rs_grpo: beta must be a number in (0, 50], got {beta!r}")
    return float(beta)


def f_rs(p: torch.Tensor, *, k: int, beta: float = 2.0, **_: Any) -> torch.Tensor:
    # (1/beta) log(1 + p (e^beta - 1)) = (1/beta) log E[e^{beta r}] for r ~ Bernoulli(p)
    beta = _beta(beta)
    return torch.log1p(p * math.expm1(beta)) / beta


def d_rs(p: torch.Tensor, *, k: int, beta: float = 2.0, **_: Any) -> torch.Tensor:
    beta = _beta(beta)
    return math.expm1(beta) / (beta * (1.0 + p * math.expm1(beta)))


@register(
    "rs_grpo", objective=f_rs, derivative=d_rs, uses_p_hat=True,
    defaults={"beta": 2.0, "baseline": "mean", "p_clip": "group"}, p_range=p_range_mean,
    objective_formula="(1/beta) log(1 + p (e^beta - 1))  [= (1/beta) log E exp(beta r)]",
    advantage_formula="(exp(beta r_i) - b_i) / (beta m); b_i = mean_j exp(beta r_j) (paper) or the mean over j != i; "
    "m = mean_j exp(beta r_j), or 1 + p_hat (e^beta - 1) when p_hat is given",
    paper=PAPER_RS,
    doc="Risk-seeking exponential-utility advantage; with the default baseline='mean' and no p_hat it is the paper's "
    "(1/beta)(exp(beta r_i) / mean_j exp(beta r_j) - 1). For 0/1 rewards the population limit ascends "
    "F(p) = (1/beta) log(1 + p(e^beta - 1)), F'(p) = (e^beta - 1)/(beta (1 + p(e^beta - 1))): a pass@1 gradient "
    "weighted up to (e^beta - 1)/beta on hard prompts (beta -> 0: p; large beta: ~ (1/beta) log p for p >> e^-beta). "
    "The group mean of exp(beta r) contains the sample itself, so at finite n the update is biased (expected_gain "
    "differs from F'). With p_hat = true p (p_clip=0) the denominator is E[exp(beta r)] and the update is exactly "
    "grad F for baseline='loo' and (1 - 1/n) grad F for 'mean'. k is ignored; p_hat assumes 0/1 rewards; "
    "beta in (0, 50].",
)
def adv_rs_grpo(b: Batch, *, k: int, beta: float, baseline: str) -> torch.Tensor:
    beta = _beta(beta)
    # Everything is divided by exp(beta max_j r_j) so large beta r cannot overflow; an all-equal group has z = 1
    # exactly, hence a numerator of exactly 0.
    top = b.r.amax(1, keepdim=True)
    z = torch.exp(beta * (b.r - top))
    z_total = z.sum(1, keepdim=True)
    zb = Batch(r=z, n=b.n, total=z_total, binary=False, c=None, p_hat=None)
    num = centred(zb, baseline)
    if b.p_hat is not None:
        m = torch.exp(torch.log1p(b.p_hat * math.expm1(beta))[:, None] - beta * top)
    else:
        m = z_total / b.n
    return num / (beta * m)


# ---- W-REINFORCE: positive-sample term down-weighted by lambda ----
def _lam(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)) or not (
        math.isfinite(float(lam)) and float(lam) >= 0.0
    ):
        raise ValueError(f"w_reinforce: lam must be a finite number >= 0, got {lam!r}")
    return float(lam)


def f_wr(p: torch.Tensor, *, k: int, lam: float = 0.1, **_: Any) -> torch.Tensor:
    return (1.0 + _lam(lam)) * p


def d_wr(p: torch.Tensor, *, k: int, lam: float = 0.1, **_: Any) -> torch.Tensor:
    return torch.full_like(p, 1.0 + _lam(lam))


@register(
    "w_reinforce", objective=f_wr, derivative=d_wr, unbiased=True, baselined=False, reward_domain="unit",
    defaults={"lam": 0.1},
    objective_formula="(1 + lam) p", advantage_formula="lam r_i - (1 - r_i)  (0/1: lam if correct, -1 if wrong)",
    paper=PAPER_WR,
    doc="W-REINFORCE: lam x positive-sample reinforcement + negative-sample reinforcement (rewards +-1 in the paper, "
    "default lam = 0.1). A_i depends on its own reward only, so E[A grad log pi] = (lam + 1) grad p exactly at every "
    "n: in expectation it is pass@1 REINFORCE scaled by 1 + lam. What lam changes is the sampled update: it equals "
    "(1 + lam) r_i - 1, i.e. REINFORCE with a constant baseline of 1/(1 + lam) > p, which pushes sampled answers "
    "down and moves mass to unsampled ones. Not baselined (all-wrong groups get -1 each). k and p_hat are ignored.",
)
def adv_w_reinforce(b: Batch, *, k: int, lam: float) -> torch.Tensor:
    lam = _lam(lam)
    return (1.0 + lam) * b.r - 1.0
