"""Advantage shapings for RL with verifiable rewards, each declaring the objective F(p) it ascends.

Public API
----------
``shape(name, rewards, *, k=1, p_hat=None, **params) -> advantages``  ``(G, n)`` in, ``(G, n)`` out; k may be (G,)
``objective(name, p, *, k=1, **params)``             population-limit F(p) for 0/1 rewards
``objective_derivative(name, p, *, k=1, **params)``  F'(p)
``expected_gain(name, n, p, *, k=1, oracle_p_hat=False, **params)``  exact finite-n gain (below)
``advantage_bound(name, n, *, k=1, **params)``        largest |A| the group form gives at n (0/1 rewards)
``scale_violations(name, rewards, advantages, *, k, ratio)``  groups whose |A| exceed ratio x that bound
``shape_masked(name, rewards, keep, *, k, p_hat, **params)``  groups shaped on their kept samples only
``info(name) -> ShapingInfo``, ``SHAPINGS`` (names), ``REGISTRY`` (name -> ShapingSpec)

Layout (one job per module): ``registry`` (metadata, the ``register`` decorator), ``kernels`` (numerics shared by
the shapings), ``pass1`` and ``passk`` (the production advantages, each registered next to its function with its
declared F), ``api`` (``shape``), ``theory`` (objective, derivative, expected_gain: the proof machinery used by
tests and the lab), ``guards`` (advantage_bound, scale_violations, shape_masked).

Conventions
-----------
``rewards`` is ``(G, n)``: G prompts (groups) x n samples. The policy loss **averages**
A_i * log pi(y_i) over the n samples of a group, so a shaping is *unbiased for F* when

    E[(1/n) * sum_i A_i * grad log pi(y_i)] = grad F(p)      exactly, for every admissible n.

PKPO (Walder & Karkhanis 2025, arXiv 2505.15201) states its weights s_i in the *sum* convention;
here A_i = n * s_i.

Why the expected update of a 0/1-reward shaping is a multiple of grad p: if A_i depends only on the
own reward r_i and the group count c, conditioning on y_1 gives

    E[(1/n) sum_i A_i grad log pi(y_i)] = gain_n(p) * grad p,
    gain_n(p) = E_{C ~ Bin(n-1, p)}[A_+(C + 1) - A_-(C)],

because sum_{y correct} pi(y) grad log pi(y) = grad p and the wrong answers contribute -grad p.
``expected_gain`` evaluates gain_n(p) with the shipped code; a shaping is unbiased for F iff
gain_n(p) = F'(p) for all p. The tests check this identity by brute-force enumeration of all M^n
sample sequences of a softmax policy.

Plug-in shapings (grpo, dr_grpo, passk_grpo, passk_alpha, log_passk, passk_analytic, rs_grpo) scale by a
function of p_hat taken from the same group, which couples the scale with the sample and biases the
update at finite n (it converges to F'(p) as n -> inf). Passing ``p_hat`` from elsewhere (a central
estimator) removes that coupling: with ``baseline="loo"`` and p_hat equal to the true p the update
is exactly grad F; with the default ``baseline="mean"`` it is exactly (1 - 1/n) * grad F
(passk_analytic: (1 - k/n) * grad F), since the group mean includes the sample itself.

Numerics: everything is computed in float64 and cast back to the input dtype. alpha_K, w_K and
binomial ratios are evaluated in log space; for K <= 1024, n <= 1024 and p_hat anywhere in [0, 1]
no output is NaN or inf. Groups whose rewards are all equal get exactly zero advantages from every
baselined shaping (all but raw ``pkpo`` and ``w_reinforce``).
"""
from __future__ import annotations

from passk_rl.shaping import pass1, passk  # noqa: F401  (importing them registers the shapings, in this order)
from passk_rl.shaping.api import shape
from passk_rl.shaping.guards import advantage_bound, scale_violations, shape_masked
from passk_rl.shaping.passk import check_multi as _check_multi  # noqa: F401  (tests validate multi_k's (n, k))
from passk_rl.shaping.registry import REGISTRY, ShapingInfo, ShapingSpec, info
from passk_rl.shaping.theory import expected_gain, objective, objective_derivative

SHAPINGS: tuple[str, ...] = tuple(REGISTRY)

__all__ = [
    "shape",
    "objective",
    "objective_derivative",
    "expected_gain",
    "advantage_bound",
    "scale_violations",
    "shape_masked",
    "info",
    "ShapingInfo",
    "ShapingSpec",
    "SHAPINGS",
    "REGISTRY",
]
