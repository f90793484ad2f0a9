"""Exact-enumeration oracles for passk_rl.shaping.

1. Subset oracles: PKPO weights (raw, LOO both variants, LOO-1) computed literally from their
   definitions as sums over all k-subsets, for every 0/1 pattern and for continuous rewards with ties.
2. Exact expected update: a softmax policy over M <= 4 answers; all M^n sample sequences (n <= 6) are
   enumerated, giving E[(1/n) sum_i A_i grad log pi(y_i)] exactly. Unbiased shapings must equal
   grad F of their declared objective (autograd through ``objective``) to 1e-9 for every n >= k.
3. The same enumeration checks ``expected_gain`` (the binomial formula), which then measures the
   finite-n bias of plug-in shapings at n far beyond enumeration.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from passk_rl import shaping
from passk_rl.shaping import expected_gain, objective, objective_derivative, shape

TOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a shared machine; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
UNBIASED = ("rloo", "pkpo", "pkpo_loo", "pkpo_loo_minus_one", "multi_k")
PLUGINS = ("grpo", "passk_grpo", "passk_alpha", "log_passk", "passk_analytic", "rs_grpo")


# ---------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------
def subset_weights(g: list[float], k: int) -> dict[str, np.ndarray]:
    """Sum-convention PKPO weights straight from the subset definitions (slow, exact)."""
    n = len(g)
    subsets = list(itertools.combinations(range(n), k))
    s = np.zeros(n)
    loo1 = np.zeros(n)
    for idx in subsets:
        mx = max(g[j] for j in idx)
        for i in idx:
            s[i] += mx
            if k >= 2:
                loo1[i] += mx - max(g[j] for j in idx if j != i)
    s /= len(subsets)
    loo1 /= len(subsets)
    out = {"raw": s, "loo_minus_one": loo1}
    if k <= n - 1:
        # rho_{-i}: max@k of the other n-1 samples; the paper's baseline is the mean over j != i of the
        # (n-1)-sample weights s_j^{(-i)}, whose sum is k rho_{-i}.
        rho_minus = np.zeros(n)
        paper_base = np.zeros(n)
        for i in range(n):
            rest = [g[j] for j in range(n) if j != i]
            subs = list(itertools.combinations(range(n - 1), k))
            rho_minus[i] = np.mean([max(rest[j] for j in c) for c in subs])
            w_rest = np.zeros(n - 1)
            for c in subs:
                mx = max(rest[j] for j in c)
                for j in c:
                    w_rest[j] += mx
            paper_base[i] = (w_rest / len(subs)).mean()
        out["loo_centred"] = s - (k / n) * rho_minus
        out["loo_paper"] = s - paper_base
    return out


def enumerate_sequences(m: int, n: int) -> torch.Tensor:
    """All m^n answer sequences as a (m^n, n) int64 tensor."""
    grids = np.indices((m,) * n).reshape(n, -1).T
    return torch.from_numpy(np.ascontiguousarray(grids)).long()


def exact_update(name: str, theta: torch.Tensor, g: torch.Tensor, n: int, *, k: int, p_hat: float | None = None,
                 **params) -> torch.Tensor:
    """E[(1/n) sum_i A_i grad_theta log pi(y_i)] for pi = softmax(theta), rewards g[y] (exact)."""
    m = theta.numel()
    pi = torch.softmax(theta.detach(), 0)
    seqs = enumerate_sequences(m, n)
    prob = pi[seqs].prod(1)
    rewards = g[seqs]
    ph = None if p_hat is None else torch.full((seqs.shape[0],), p_hat, dtype=torch.float64)
    adv = shape(name, rewards, k=k, p_hat=ph, **params)
    onehot = torch.nn.functional.one_hot(seqs, m).to(torch.float64)  # (S, n, M)
    first = torch.einsum("s,si,sim->m", prob, adv, onehot)
    second = (prob * adv.sum(1)).sum() * pi
    return (first - second) / n


def grad_binary_objective(name: str, theta: torch.Tensor, correct: torch.Tensor, *, k: int, **params) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_(True)
    p = torch.softmax(th, 0)[correct].sum()
    (grad,) = torch.autograd.grad(objective(name, p, k=k, **params), th)
    return grad


def max_at_k_population(pi: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """E[max of k i.i.d. rewards] = sum_v v (P(g <= v)^k - P(g < v)^k), differentiable in pi."""
    out = torch.zeros((), dtype=torch.float64)
    for v in torch.unique(g):
        le = pi[g <= v].sum()
        lt = pi[g < v].sum()
        out = out + v * (le**k - lt**k)
    return out


def grad_continuous_objective(theta: torch.Tensor, g: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_(True)
    pi = torch.softmax(th, 0)
    f = sum(w * max_at_k_population(pi, g, kk) for kk, w in weights.items())
    (grad,) = torch.autograd.grad(f, th)
    return grad


def grad_p(theta: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    pi = torch.softmax(theta.detach(), 0)
    e = torch.zeros_like(pi)
    e[correct] = 1.0
    return pi * e - pi * pi[correct].sum()  # sum_{a in S} pi_a (e_a - pi)


def policy(seed: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and a random correct set (neither empty nor everything) with p in [0.15, 0.6],
    where pass@k gradients up to k = 6 are far from zero."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        theta = 0.7 * torch.randn(m, generator=gen, dtype=torch.float64)
        n_correct = int(torch.randint(1, m, (1,), generator=gen))
        correct = torch.randperm(m, generator=gen)[:n_correct]
        if 0.15 <= float(torch.softmax(theta, 0)[correct].sum()) <= 0.6:
            return theta, correct


def admissible_ks(name: str, n: int, **params) -> list[int]:
    ks = []
    for k in range(1, n + 1):
        try:
            shaping.info(name).check_k(n, k) if name != "multi_k" else shaping._check_multi(n, k, params)
        except ValueError:
            continue
        ks.append(k)
    return ks


# ---------------------------------------------------------------------------------------------
# 1. subset oracles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_pkpo_family_equals_subset_definitions_on_every_binary_pattern(n):
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)
    for k in range(1, n + 1):
        oracle = [subset_weights(row.tolist(), k) for row in patterns]
        cases = [("pkpo", {}, "raw")]
        if k >= 2:
            cases.append(("pkpo_loo_minus_one", {}, "loo_minus_one"))
        if k <= n - 1:
            cases += [("pkpo_loo", {}, "loo_centred"), ("pkpo_loo", {"variant": "paper"}, "loo_paper")]
        for name, params, key in cases:
            got = shape(name, patterns, k=k, **params) / n
            want = torch.tensor(np.stack([o[key] for o in oracle]))
            assert torch.allclose(got, want, atol=1e-12, rtol=0), (name, params, n, k)


@pytest.mark.parametrize("seed", range(6))
def test_pkpo_family_equals_subset_definitions_on_continuous_rewards_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    # few distinct levels -> many ties, plus negative values (the estimators need no sign)
    g = rng.choice([-0.7, 0.0, 0.25, 0.5, 1.3], size=n).tolist()
    r = torch.tensor([g], dtype=torch.float64)
    for k in range(1, n + 1):
        o = subset_weights(g, k)
        assert torch.allclose(shape("pkpo", r, k=k)[0] / n, torch.tensor(o["raw"]), atol=1e-12, rtol=0)
        if k >= 2:
            assert torch.allclose(shape("pkpo_loo_minus_one", r, k=k)[0] / n, torch.tensor(o["loo_minus_one"]), atol=1e-12, rtol=0)
        if k <= n - 1:
            assert torch.allclose(shape("pkpo_loo", r, k=k)[0] / n, torch.tensor(o["loo_centred"]), atol=1e-12, rtol=0)
            got = shape("pkpo_loo", r, k=k, variant="paper")[0] / n
            assert torch.allclose(got, torch.tensor(o["loo_paper"]), atol=1e-12, rtol=0)


def test_chen_analytic_matches_its_published_count_formula():
    """A_pos = (1-R)/sigma, A_neg = (1 - R - C(N_neg-1,k-1)/C(N-1,k-1))/sigma, R = 1 - C(N_neg,k)/C(N,k)."""
    for n in range(2, 11):
        for k in range(1, n + 1):
            rows, want = [], []
            for c in range(1, n):  # c = 0 and c = n are all-equal groups (zero)
                big_r = 1 - math.comb(n - c, k) / math.comb(n, k)
                sigma = math.sqrt(big_r * (1 - big_r))
                neg_num = 1 - big_r - math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)
                a_pos = (1 - big_r) / sigma if sigma > 0 else 0.0
                a_neg = neg_num / sigma if sigma > 0 else 0.0
                rows.append([1.0] * c + [0.0] * (n - c))
                want.append([a_pos] * c + [a_neg] * (n - c))
            got = shape("passk_analytic", torch.tensor(rows, dtype=torch.float64), k=k, eps=0.0)
            assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=1e-10), (n, k)


# ---------------------------------------------------------------------------------------------
# 2. exact expected update == grad F for every unbiased shaping
# ---------------------------------------------------------------------------------------------
UNBIASED_CASES = [
    ("rloo", {}),
    ("pkpo", {}),
    ("pkpo_loo", {}),
    ("pkpo_loo", {"variant": "paper"}),
    ("pkpo_loo_minus_one", {}),
    ("multi_k", {}),
    ("multi_k", {"term": "loo"}),
]


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("name,params", UNBIASED_CASES, ids=[f"{a}{b or ''}" for a, b in UNBIASED_CASES])
def test_unbiased_shapings_give_exact_gradient_of_declared_objective_binary(name, params, m):
    theta, correct = policy(100 * m + len(name), m)
    g = torch.zeros(m, dtype=torch.float64)
    g[correct] = 1.0
    tried, largest = 0, 0.0
    for n in range(1, 7):
        for k in admissible_ks(name, n, **params):
            upd = exact_update(name, theta, g, n, k=k, **params)
            want = grad_binary_objective(name, theta, correct, k=k, **params)
            assert torch.allclose(upd, want, atol=TOL, rtol=0), (name, params, m, n, k, upd, want)
            tried += 1
            largest = max(largest, float(want.abs().max()))
    assert tried >= 5 and largest > 0.05  # real, non-trivial gradients were compared


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_multi_k_weighted_sum_is_exact_for_declared_objective(n):
    theta, correct = policy(7 + n, 3)
    g = torch.zeros(3, dtype=torch.float64)
    g[correct] = 1.0
    for term in ("loo_minus_one", "loo"):
        top = n if term == "loo_minus_one" else n - 1
        weights = {1: 0.5, top: 1.5} if top > 1 else {1: 2.0}
        if top >= 3:
            weights[2] = -0.25  # negative weights are fine: linearity
        upd = exact_update("multi_k", theta, g, n, k=max(weights), weights=weights, term=term)
        want = grad_binary_objective("multi_k", theta, correct, k=1, weights=weights)
        assert torch.allclose(upd, want, atol=TOL, rtol=0), (n, term, weights)


@pytest.mark.parametrize("name,params", [c for c in UNBIASED_CASES if c[0] != "multi_k"] + [("multi_k", {"weights": None})])
def test_unbiased_shapings_are_exact_for_max_at_k_with_continuous_rewards(name, params):
    theta = torch.tensor([0.3, -0.8, 1.1, 0.0], dtype=torch.float64)
    g = torch.tensor([0.2, 0.9, 0.2, -0.4], dtype=torch.float64)  # a tie and a negative reward
    for n in range(1, 6):
        for k in admissible_ks(name, n, **{kk: v for kk, v in params.items() if v is not None}):
            if name == "rloo":
                k_obj = {1: 1.0}
            else:
                k_obj = {k: 1.0}
            upd = exact_update(name, theta, g, n, k=k, **{kk: v for kk, v in params.items() if v is not None})
            want = grad_continuous_objective(theta, g, k_obj)
            assert torch.allclose(upd, want, atol=TOL, rtol=0), (name, n, k)


def test_dr_grpo_is_exactly_the_pass1_gradient_scaled_by_n_minus_1_over_n():
    theta, correct = policy(3, 4)
    g = torch.zeros(4, dtype=torch.float64)
    g[correct] = 1.0
    for n in range(1, 7):
        upd = exact_update("dr_grpo", theta, g, n, k=1)
        assert torch.allclose(upd, (n - 1) / n * grad_p(theta, correct), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# 3. expected_gain (binomial formula) == enumeration, for every shaping; plug-in bias
# ---------------------------------------------------------------------------------------------
def _k_for(name: str, n: int) -> list[int]:
    if not shaping.info(name).uses_k:
        return [1]
    ks = admissible_ks(name, n)
    if not shaping.info(name).needs_k_le_n and not shaping.info(name).needs_k_le_n_minus_1:
        ks = ks + [n + 3]  # plug-ins take K > n
    return ks


@pytest.mark.parametrize("name", shaping.SHAPINGS)
def test_expected_gain_matches_enumeration_for_every_shaping(name):
    theta, correct = policy(11, 3)
    g = torch.zeros(3, dtype=torch.float64)
    g[correct] = 1.0
    p = float(torch.softmax(theta, 0)[correct].sum())
    for n in range(1, 6):
        for k in _k_for(name, n):
            try:
                shaping.info(name).check_k(n, k) if name != "multi_k" else shaping._check_multi(n, k, {})
            except ValueError:
                continue
            upd = exact_update(name, theta, g, n, k=k)
            gain = expected_gain(name, n, p, k=k)
            assert torch.allclose(upd, gain * grad_p(theta, correct), atol=TOL, rtol=0), (name, n, k)


@pytest.mark.parametrize("name", PLUGINS)
def test_plugin_with_true_p_hat_is_exact(name):
    """p_hat = true p makes the scale a constant: exact grad F with baseline='loo', and exactly
    (1 - 1/n) grad F (passk_analytic: (1 - k/n)) with the group-mean baseline. p_clip=0: the default clip to
    the group's range [1/n, 1 - 1/n] trades this exactness for bounded advantages (test_shaping.py)."""
    theta, correct = policy(5, 3)
    g = torch.zeros(3, dtype=torch.float64)
    g[correct] = 1.0
    p = float(torch.softmax(theta, 0)[correct].sum())
    for n in range(2, 7):
        for k in [1] if not shaping.info(name).uses_k else range(1, n + 1):
            want = grad_binary_objective(name, theta, correct, k=k)
            if name != "passk_analytic" or k <= n - 1:
                upd = exact_update(name, theta, g, n, k=k, p_hat=p, baseline="loo", p_clip=0)
                assert torch.allclose(upd, want, atol=TOL, rtol=0), (name, n, k)
            upd = exact_update(name, theta, g, n, k=k, p_hat=p, p_clip=0)
            factor = 1 - k / n if name == "passk_analytic" else 1 - 1 / n
            assert torch.allclose(upd, factor * want, atol=TOL, rtol=0), (name, n, k)


@pytest.mark.parametrize("name", PLUGINS)
def test_plugin_with_group_p_hat_is_biased_at_small_n(name):
    theta, correct = policy(5, 4)
    g = torch.zeros(4, dtype=torch.float64)
    g[correct] = 1.0
    k = 1 if name == "grpo" else 4
    upd = exact_update(name, theta, g, 6, k=k)
    want = grad_binary_objective(name, theta, correct, k=k)
    rel = float((upd - want).norm() / want.norm())
    assert rel > 0.05, rel  # the finite-n coupling bias is real, not round-off


@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.6])
def test_plugin_bias_shrinks_as_n_grows(name, p):
    """Relative bias |gain_n(p)/F'(p) - 1| decreases along n = 32, 128, 512 and is below 2% at 512
    (passk_analytic's own (1 - k/n) factor included)."""
    k = 1 if name == "grpo" else 4
    fprime = objective_derivative(name, p, k=k)
    bias = [abs(expected_gain(name, n, p, k=k) / fprime - 1.0) for n in (32, 128, 512)]
    assert bias[0] > bias[1] > bias[2], bias
    assert bias[2] < 0.02, bias


# ---------------------------------------------------------------------------------------------
# 4. the methods of issue 20: W-REINFORCE, RS-GRPO, and a per-prompt K
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_w_reinforce_is_exactly_the_gradient_of_one_plus_lambda_times_p(lam, m):
    """A_i = lam r_i - (1 - r_i) depends on its own reward only: E[update] = (1 + lam) grad p at every n."""
    theta, correct = policy(40 + m, m)
    g = torch.zeros(m, dtype=torch.float64)
    g[correct] = 1.0
    for n in range(1, 7):
        upd = exact_update("w_reinforce", theta, g, n, k=1, lam=lam)
        want = grad_binary_objective("w_reinforce", theta, correct, k=1, lam=lam)
        assert torch.allclose(upd, want, atol=TOL, rtol=0), (lam, n)
        assert torch.allclose(want, (1 + lam) * grad_p(theta, correct), atol=TOL, rtol=0)


def test_w_reinforce_continuous_rewards_ascend_one_plus_lambda_times_mean_reward():
    theta = torch.tensor([0.3, -0.8, 1.1, 0.0], dtype=torch.float64)
    g = torch.tensor([0.2, 0.9, 0.2, 0.0], dtype=torch.float64)
    for n in range(1, 5):
        upd = exact_update("w_reinforce", theta, g, n, k=1, lam=0.3)
        want = 1.3 * grad_continuous_objective(theta, g, {1: 1.0})
        assert torch.allclose(upd, want, atol=TOL, rtol=0), n


@pytest.mark.parametrize("beta", [0.5, 2.0, 6.0])
def test_rs_grpo_with_true_p_hat_is_exactly_the_exponential_utility_gradient(beta):
    """With p̂ = true p the denominator 1 + p(e^beta - 1) is E[exp(beta r)], a constant given the group, so with the
    leave-one-out baseline the update is exactly grad (1/beta) log(1 + p(e^beta - 1)) at every n (the mean baseline:
    (1 - 1/n) times it). test_plugin_with_true_p_hat_is_exact covers beta = 2; this covers the beta range."""
    theta, correct = policy(21, 3)
    g = torch.zeros(3, dtype=torch.float64)
    g[correct] = 1.0
    p = float(torch.softmax(theta, 0)[correct].sum())
    for n in range(2, 7):
        want = grad_binary_objective("rs_grpo", theta, correct, k=1, beta=beta)
        upd = exact_update("rs_grpo", theta, g, n, k=1, p_hat=p, beta=beta, baseline="loo", p_clip=0)
        assert torch.allclose(upd, want, atol=TOL, rtol=0), (beta, n)
        upd = exact_update("rs_grpo", theta, g, n, k=1, p_hat=p, beta=beta, p_clip=0)
        assert torch.allclose(upd, (1 - 1 / n) * want, atol=TOL, rtol=0), (beta, n)
    # F itself: the log-mean-exp of the reward, interpolating between p (beta -> 0) and max (beta -> inf)
    assert objective("rs_grpo", 0.3, beta=1e-6) == pytest.approx(0.3, rel=1e-5)
    assert objective("rs_grpo", 0.3, beta=beta) == pytest.approx(math.log(0.7 + 0.3 * math.exp(beta)) / beta, rel=1e-12)
    # the default group form is the paper's (1/beta)(exp(beta r_i)/mean_j exp(beta r_j) - 1)
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [0.2, 0.9, 0.0, 0.5, 1.0]], dtype=torch.float64)
    e = torch.exp(beta * r)
    assert torch.allclose(shape("rs_grpo", r, beta=beta), (e / e.mean(1, keepdim=True) - 1) / beta, atol=1e-12)


@pytest.mark.parametrize("beta", [2.0, 6.0])
def test_rs_grpo_group_form_is_biased_at_small_n_and_converges_to_its_declared_objective(beta):
    """The paper's form divides by the group mean of exp(beta r), which contains the sample itself: biased at small n
    (enumeration), and the bias falls along n = 32, 128, 512 towards F'(p)."""
    theta, correct = policy(5, 4)
    g = torch.zeros(4, dtype=torch.float64)
    g[correct] = 1.0
    upd = exact_update("rs_grpo", theta, g, 6, k=1, beta=beta)
    want = grad_binary_objective("rs_grpo", theta, correct, k=1, beta=beta)
    assert float((upd - want).norm() / want.norm()) > 0.05
    for p in (0.1, 0.3, 0.6):
        d = objective_derivative("rs_grpo", p, beta=beta)
        bias = [abs(expected_gain("rs_grpo", n, p, beta=beta) / d - 1.0) for n in (32, 128, 512)]
        assert bias[0] > bias[1] > bias[2] and bias[2] < 0.02, (p, bias)


def test_per_row_k_shapes_each_row_as_it_would_be_alone():
    gen = torch.Generator().manual_seed(4)
    r = torch.randint(0, 2, (12, 8), generator=gen).to(torch.float64)
    ks = torch.tensor([1, 2, 3, 7, 1, 5, 2, 7, 4, 1, 6, 3])
    ph = torch.rand(12, generator=gen, dtype=torch.float64)
    for name in ("pkpo_loo", "pkpo", "passk_alpha", "passk_grpo", "log_passk", "rloo", "grpo", "passk_analytic"):
        if name == "pkpo_loo":
            kk = ks
        else:
            kk = ks.clamp(min=shaping.info(name).min_k)
        out = shape(name, r, k=kk, p_hat=ph if shaping.info(name).uses_p_hat else None)
        for i in range(12):
            alone = shape(name, r[i:i + 1], k=int(kk[i]) if shaping.info(name).uses_k else 1,
                          p_hat=ph[i:i + 1] if shaping.info(name).uses_p_hat else None)
            assert torch.equal(out[i:i + 1], alone), (name, i)
    with pytest.raises(ValueError, match="per-row k"):
        shape("pkpo_loo", r, k=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="weights"):
        shape("multi_k", r, k=ks)
    with pytest.raises(ValueError, match="k <= n-1"):
        shape("pkpo_loo", r, k=ks.clamp(max=8) + 1)


def test_per_prompt_k_with_true_p_is_exactly_the_gradient_of_the_envelope_objective():
    """K_i = K*(p̂_i) is frozen before the group is drawn; with pkpo_loo (K = 1 is RLOO) the update of a prompt is
    exactly alpha_{K_i}(p) grad p. With p̂ = p that is grad F(p), F = int max_K alpha_K (PerPromptK.objective):
    checked by enumeration on three prompts whose p puts them in different K* regions."""
    from passk_rl.schedule import PerPromptK

    sched = PerPromptK(k_min=1, k_max=5)
    n = 6
    for seed, target in ((1, 0.08), (2, 0.3), (3, 0.7)):
        gen = torch.Generator().manual_seed(seed)
        theta = torch.randn(3, generator=gen, dtype=torch.float64)
        correct = torch.tensor([0])
        theta[0] = theta[1:].logsumexp(0) + math.log(target / (1 - target))  # p = target exactly
        p = float(torch.softmax(theta, 0)[correct].sum())
        assert p == pytest.approx(target)
        k_i = int(sched.k_star([p])[0])
        g = torch.zeros(3, dtype=torch.float64)
        g[correct] = 1.0
        upd = exact_update("pkpo_loo", theta, g, n, k=k_i)
        fprime = float(sched.derivative(p))
        assert torch.allclose(upd, fprime * grad_p(theta, correct), atol=TOL, rtol=0), (p, k_i)
        eps = 1e-6  # F' is the derivative of the stated F (central difference)
        assert (sched.objective(p + eps) - sched.objective(p - eps)) / (2 * eps) == pytest.approx(fprime, rel=1e-6)
    assert [int(x) for x in sched.k_star([0.08, 0.3, 0.7])] == [5, 3, 1]
