"""Simulated prompt population with a softmax policy over a finite answer set.

Each prompt x has M answers, a fixed set of correct ones (mask m_x), and logits

    logits_x = B_x + θ_x                      (policy="tabular": one free logit per prompt and answer)
    logits_x = B_x + Σ_j w_j Φ_j(x, ·)         (policy="shared":  one parameter vector w shared by all prompts)

B_x are base logits that fix the initial success rate p_x = Σ_{a∈C_x} π_x(a) drawn from a difficulty
distribution. Shared features make prompts interact like they do in a real model:
  - Φ_0 = B_x / std(B): a *temperature* direction. Sharpening (w_0 > 0) helps prompts whose correct answer is
    already the mode and hurts prompts whose mode is wrong — the mechanism behind "RLVR raises pass@1 but
    lowers pass@k at large k" (Yue et al., arXiv 2504.13837).
  - Φ_1..d−1: Gaussian noise plus z_x · m_x(a) · u with a fixed unit vector u and a per-prompt transfer
    z_x ~ N(skill_mean, skill_sd): a generalising "skill" direction that raises the correct answers of most
    prompts but lowers them where z_x < 0, so prompts compete and no policy solves every prompt.

Everything is numpy float64. Exact pass@k per prompt is 1 − (1 − p_x)^k.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np

DIFFICULTIES = ("mixed", "hard", "uniform")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Population of prompts.

    difficulty: "mixed" = 45 % hard (log10 p ~ U[−3.5, −1.5]), 35 % medium (log10 p ~ U[−1.5, −0.5]),
    20 % easy (p ~ U[0.4, 0.9]); "hard" = all log10 p ~ U[−3, −1]; "uniform" = p ~ U[0.01, 0.99].
    policy: "shared" (features, see module docstring) or "tabular". n_features = d (incl. the temperature
    feature); feature_scale scales Φ_1..d−1; skill_mean / skill_sd: distribution of the per-prompt transfer z_x;
    wrong_zipf: exponent of the wrong-answer probability profile.
    """

    n_prompts: int = 128
    n_answers: int = 32
    n_correct: int = 2
    difficulty: str = "mixed"
    policy: str = "shared"
    n_features: int = 16
    feature_scale: float = 1.0
    skill_mean: float = 0.5
    skill_sd: float = 1.0
    wrong_zipf: float = 1.0

    def __post_init__(self):
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"EnvConfig.difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.policy not in ("shared", "tabular"):
            raise ValueError(f"EnvConfig.policy must be 'shared' or 'tabular', got {self.policy!r}")
        if not 1 <= self.n_correct < self.n_answers:
            raise ValueError(f"EnvConfig: need 1 <= n_correct < n_answers, got {self.n_correct}, {self.n_answers}")
        if self.n_prompts < 1 or (self.policy == "shared" and self.n_features < 2):
            raise ValueError("EnvConfig: need n_prompts >= 1 and (shared) n_features >= 2")


def draw_initial_p(difficulty: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Initial success rates (size,) from a named difficulty distribution (see :class:`EnvConfig`)."""
    if difficulty == "mixed":
        u = rng.random(size)
        hard = 10.0 ** rng.uniform(-3.5, -1.5, size)
        med = 10.0 ** rng.uniform(-1.5, -0.5, size)
        easy = rng.uniform(0.4, 0.9, size)
        return np.where(u < 0.45, hard, np.where(u < 0.80, med, easy))
    if difficulty == "hard":
        return 10.0 ** rng.uniform(-3.0, -1.0, size)
    if difficulty == "uniform":
        return rng.uniform(0.01, 0.99, size)
    raise ValueError(f"unknown difficulty {difficulty!r}; choose from {DIFFICULTIES}")


def base_logits_for(p0: np.ndarray, *, n_answers: int, n_correct: int, wrong_zipf: float,
                    rng: np.random.Generator) -> tuple:
    """Base logits (P, M) and correct mask (P, M) with Σ_{correct} π = p0 exactly.

    Correct mass is split by a Dirichlet(2); wrong mass follows a Zipf(wrong_zipf) profile in random order, so a
    hard prompt has a confident wrong mode. Correct answers sit at random positions.
    """
    P, M = p0.size, n_answers
    probs = np.empty((P, M))
    mask = np.zeros((P, M), dtype=bool)
    zipf = 1.0 / np.arange(1, M - n_correct + 1) ** wrong_zipf
    zipf /= zipf.sum()
    for x in range(P):
        perm = rng.permutation(M)
        corr, wrong = perm[:n_correct], perm[n_correct:]
        mask[x, corr] = True
        probs[x, corr] = p0[x] * rng.dirichlet(np.full(n_correct, 2.0))
        probs[x, wrong] = (1.0 - p0[x]) * zipf[rng.permutation(M - n_correct)]
    return np.log(probs), mask


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Population:
    """A prompt population plus its trainable policy parameters (see module docstring).

    ``params`` is a flat float64 vector: θ (P·M) for tabular, w (d) for shared. All methods take the parameter
    vector explicitly so a caller can hold several policies over one population.
    """

    def __init__(self, cfg: EnvConfig, *, seed: int, features_from: Optional["Population"] = None,
                 p0: Optional[np.ndarray] = None):
        """``p0`` (n_prompts,) overrides the difficulty distribution with given initial success rates."""
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        if p0 is None:
            self.p0 = draw_initial_p(cfg.difficulty, cfg.n_prompts, rng)
        else:
            self.p0 = np.asarray(p0, dtype=np.float64).ravel()
            if self.p0.size != cfg.n_prompts or np.any((self.p0 <= 0) | (self.p0 >= 1)):
                raise ValueError(f"Population: p0 needs {cfg.n_prompts} values in (0, 1)")
        self.base, self.mask = base_logits_for(self.p0, n_answers=cfg.n_answers, n_correct=cfg.n_correct,
                                               wrong_zipf=cfg.wrong_zipf, rng=rng)
        self.maskf = self.mask.astype(np.float64)
        P, M = self.base.shape
        if cfg.policy == "shared":
            d = cfg.n_features
            # u is shared with the population we generalise from (train → held-out prompts).
            self.u = features_from.u if features_from is not None else _unit(rng.normal(size=d - 1))
            phi = np.empty((P, M, d))
            b = self.base - self.base.mean(axis=1, keepdims=True)
            phi[:, :, 0] = b / b.std()
            noise = rng.normal(size=(P, M, d - 1)) / np.sqrt(d - 1)
            z = rng.normal(cfg.skill_mean, cfg.skill_sd, size=P)
            phi[:, :, 1:] = cfg.feature_scale * (noise + (z[:, None, None] * self.maskf[:, :, None]) * self.u)
            self.phi = phi
            self.n_params = d
        else:
            self.phi = None
            self.n_params = P * M

    # -- policy -------------------------------------------------------------------------------------------
    def init_params(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def logits(self, params: np.ndarray) -> np.ndarray:
        if self.phi is None:
            return self.base + params.reshape(self.base.shape)
        return self.base + self.phi @ params

    def probs(self, params: np.ndarray) -> np.ndarray:
        return softmax(self.logits(params))

    def success(self, pi: np.ndarray) -> np.ndarray:
        """p_x = Σ_{a correct} π_x(a), shape (P,)."""
        return np.clip((pi * self.maskf).sum(axis=1), 0.0, 1.0)

    # -- sampling and gradients --------------------------------------------------------------------------
    def sample(self, pi: np.ndarray, n: int, rng: np.random.Generator) -> tuple:
        """n i.i.d. answers per prompt: (answers (P, n) int, rewards (P, n) float 0/1)."""
        P, M = pi.shape
        cdf = np.cumsum(pi, axis=1)
        cdf[:, -1] = 1.0 + 1e-12
        off = np.arange(P)[:, None]
        u = rng.random((P, n))
        flat = np.searchsorted((cdf + 2.0 * off).ravel(), (u + 2.0 * off).ravel(), side="right")
        answers = flat.reshape(P, n) - off * M
        np.clip(answers, 0, M - 1, out=answers)
        rewards = np.take_along_axis(self.maskf, answers, axis=1)
        return answers, rewards

    def logit_grad_from_samples(self, pi: np.ndarray, answers: np.ndarray, adv: np.ndarray) -> np.ndarray:
        """G_x = (1/n) Σ_i A_i ∇_logits log π_x(y_i) = (1/n) Σ_i A_i e_{y_i} − mean(A) π_x, shape (P, M)."""
        P, M = pi.shape
        n = answers.shape[1]
        idx = (np.arange(P)[:, None] * M + answers).ravel()
        G = np.bincount(idx, weights=(adv / n).ravel(), minlength=P * M).reshape(P, M)
        return G - adv.mean(axis=1, keepdims=True) * pi

    def logit_grad_expected(self, pi: np.ndarray, p: np.ndarray, drift: np.ndarray) -> np.ndarray:
        """E[G_x] = D_x ∇_logits p_x = D_x π_x ⊙ (m_x − p_x) (see lab.exact.drift)."""
        return drift[:, None] * pi * (self.maskf - p[:, None])

    def param_grad(self, G: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
        """Chain rule from logit gradients (P, M) to the parameter vector, averaging over prompts."""
        if weights is not None:
            G = G * weights[:, None]
        P = G.shape[0]
        if self.phi is None:
            return G.ravel() / P
        return np.einsum("pmd,pm->d", self.phi, G) / P


def pass_at_k_exact(p: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
    """Population-mean exact pass@k = mean_x 1 − (1 − p_x)^k for each k."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return {int(k): float(np.mean(-np.expm1(k * np.log1p(-np.minimum(p, 1 - 1e-16))))) for k in ks}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)
