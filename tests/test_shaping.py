"""passk_rl.shaping: registry, reference numbers, invariances, edge cases, numerics, properties.

The exact-gradient proofs live in tests/test_shaping_exact.py.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passk_rl import shaping
from passk_rl.estimators import pass_at_k
from passk_rl.shaping import (SHAPINGS, advantage_bound, expected_gain, info, objective, objective_derivative,
                              scale_violations, shape)

REQUIRED = {"grpo", "dr_grpo", "rloo", "passk_grpo", "passk_alpha", "log_passk", "pkpo", "pkpo_loo",
            "pkpo_loo_minus_one", "passk_analytic", "multi_k", "rs_grpo", "w_reinforce"}
UNBIASED = {"rloo", "pkpo", "pkpo_loo", "pkpo_loo_minus_one", "multi_k", "w_reinforce"}
SHIFT_INVARIANT = ("grpo", "dr_grpo", "rloo", "pkpo_loo", "pkpo_loo_minus_one", "multi_k")
HOMOGENEOUS = ("dr_grpo", "rloo", "pkpo", "pkpo_loo", "pkpo_loo_minus_one", "multi_k")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def admissible(name: str, n: int, k: int, **params) -> bool:
    """Independent statement of which (n, k) each shaping takes (mirrors the docs table)."""
    if name in ("dr_grpo", "w_reinforce"):
        return True
    if name == "rloo":
        return n >= 2
    if name in ("grpo", "passk_grpo", "passk_alpha", "log_passk", "rs_grpo"):
        return params.get("baseline", "mean") == "mean" or n >= 2
    if name == "pkpo":
        return k <= n
    if name == "pkpo_loo":
        return k <= n - 1
    if name == "pkpo_loo_minus_one":
        return 2 <= k <= n
    if name == "passk_analytic":
        return k <= n - (params.get("baseline", "mean") == "loo")
    if name == "multi_k":
        ks = list(params.get("weights") or {k: 1.0})
        if params.get("term", "loo_minus_one") == "loo":
            return all(kk <= n - 1 for kk in ks)
        return all(kk <= n and (kk > 1 or n >= 2) for kk in ks)
    raise AssertionError(name)


def rand_rewards(g: int, n: int, *, binary: bool, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if binary:
        return torch.randint(0, 2, (g, n), generator=gen).to(dtype)
    levels = torch.tensor([0.0, 0.2, 0.2, 0.5, 0.9, 1.0], dtype=dtype)  # ties on purpose
    return levels[torch.randint(0, len(levels), (g, n), generator=gen)]


# ------------------------------------------------------------------------------------------
# registry and metadata
# ------------------------------------------------------------------------------------------
def test_registry_names_and_metadata():
    assert set(SHAPINGS) == REQUIRED
    assert set(shaping.REGISTRY) == REQUIRED
    for name in SHAPINGS:
        meta = info(name)
        assert dataclasses.is_dataclass(meta) and meta.name == name
        assert meta.unbiased == (name in UNBIASED)
        assert meta.continuous_ok == (meta.reward_domain != "binary")
        assert meta.paper and meta.doc and meta.objective_formula and meta.advantage_formula
    assert info("pkpo_loo").needs_k_le_n_minus_1 and info("pkpo_loo_minus_one").min_k == 2
    assert not info("pkpo").baselined and info("pkpo_loo").baselined


def test_unknown_names_and_parameters_are_rejected_with_the_known_names():
    r = torch.zeros(1, 4)
    for call in (lambda: shape("nope", r), lambda: objective("nope", 0.5), lambda: info("nope")):
        with pytest.raises(ValueError) as e:
            call()
        assert "pkpo_loo_minus_one" in str(e.value) and "grpo" in str(e.value)
    with pytest.raises(ValueError, match="temperature"):
        shape("grpo", r, temperature=2.0)
    with pytest.raises(ValueError, match="allowed: none"):
        shape("pkpo", r, k=2, baseline="loo")


# ------------------------------------------------------------------------------------------
# numbers from the reference (shared/reference/pass-at-k-math.md)
# ------------------------------------------------------------------------------------------
def group(n: int, c: int) -> torch.Tensor:
    return torch.tensor([[1.0] * c + [0.0] * (n - c)], dtype=torch.float64)


def test_reference_pkpo_binary_weights_n8_c2_k4():
    s = shape("pkpo", group(8, 2), k=4)[0] / 8  # sum convention
    assert s[0].item() == pytest.approx(0.5, abs=1e-12)
    assert s[-1].item() == pytest.approx(0.357143, abs=5e-7)
    # closed form: wrong samples get (k/n) rho(n-1, c, k-1)
    assert s[-1].item() == pytest.approx(0.5 * pass_at_k(7, 2, 3), abs=1e-14)


def test_reference_loo_numbers_are_the_paper_variant():
    s = shape("pkpo_loo", group(8, 2), k=4, variant="paper")[0] / 8
    assert s[0].item() == pytest.approx(0.173469, abs=5e-7)
    assert s[-1].item() == pytest.approx(-0.132653, abs=5e-7)
    # the default centred variant uses baseline (k/n) rho_{-i}: 3/14 and -1/14 here, summing to zero
    c = shape("pkpo_loo", group(8, 2), k=4)[0] / 8
    assert c[0].item() == pytest.approx(3 / 14, abs=1e-14)
    assert c[-1].item() == pytest.approx(-1 / 14, abs=1e-14)
    assert abs(c.sum().item()) < 1e-14 and abs(s.sum().item()) > 0.4


def test_reference_loo_minus_one_numbers():
    s = shape("pkpo_loo_minus_one", group(8, 2), k=4)[0] / 8
    assert s[0].item() == pytest.approx(0.285714, abs=5e-7) and s[-1].item() == 0.0
    g = torch.tensor([[0.1, 0.3, 0.5, 0.7, 0.9]], dtype=torch.float64)
    s = shape("pkpo_loo_minus_one", g, k=2)[0] / 5
    assert torch.allclose(s, torch.tensor([0.0, 0.02, 0.06, 0.12, 0.20], dtype=torch.float64), atol=1e-14)


def test_reference_loo_minus_one_at_k_equals_n_rewards_only_the_best():
    g = torch.tensor([[0.4, 0.9, 0.1, 0.65]], dtype=torch.float64)
    a = shape("pkpo_loo_minus_one", g, k=4)[0]
    assert torch.allclose(a, torch.tensor([0.0, 4 * (0.9 - 0.65), 0.0, 0.0], dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("n,k", [(8, 4), (6, 1), (10, 10), (16, 5)])
def test_reference_chen_identity(n, k):
    """A_i = ((n/k) s_i - rho(n,c,k)) / sigma with s_i the PKPO sum-convention weight."""
    r = torch.tensor([[1.0] * c + [0.0] * (n - c) for c in range(1, n)], dtype=torch.float64)
    rho = pass_at_k(torch.full((n - 1,), n), r.sum(1), k)[:, None]
    sigma = torch.sqrt(rho * (1 - rho))
    s = shape("pkpo", r, k=k) / n
    want = torch.where(sigma > 0, ((n / k) * s - rho) / torch.where(sigma > 0, sigma, 1), 0.0)
    assert torch.allclose(shape("passk_analytic", r, k=k), want, atol=1e-12)


def test_reference_population_table():
    """F'(p) = A_+ - A_- (large n) and F(p) from the reference's table."""
    p = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    k = 5
    big_p = 1 - (1 - p) ** k
    table = {
        "rloo": (torch.ones_like(p), p),
        "dr_grpo": (torch.ones_like(p), p),
        "grpo": (1 / torch.sqrt(p * (1 - p)), 2 * torch.asin(torch.sqrt(p))),
        "passk_alpha": (k * (1 - p) ** (k - 1), big_p),
        "passk_grpo": (k * (1 - p) ** (k - 1) / torch.sqrt(p * (1 - p)), None),
        "passk_analytic": ((1 - p) ** (k - 1) / torch.sqrt(big_p * (1 - big_p)), (2 / k) * torch.asin(torch.sqrt(big_p))),
        "log_passk": (k * (1 - p) ** (k - 1) / big_p, torch.log(big_p)),
    }
    for name, (dF, F) in table.items():
        assert torch.allclose(objective_derivative(name, p, k=k), dF, rtol=1e-12), name
        if F is not None:
            assert torch.allclose(objective(name, p, k=k), F, rtol=1e-12), name


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_reference_finite_n_factor_claim_n6_k4(p):
    """'plug-in p_hat: factors of ~0.5x-1.5x at n=6, K=4' holds for moderate p (it grows without bound
    as p -> 1: see the next test)."""
    for name in ("passk_alpha", "log_passk", "passk_grpo"):
        ratio = expected_gain(name, 6, p, k=4) / objective_derivative(name, p, k=4)
        assert 0.25 < ratio < 1.5, (name, p, ratio)


def test_plugin_bias_factor_is_unbounded_near_p_one():
    ratio = expected_gain("passk_alpha", 6, 0.9, k=4) / objective_derivative("passk_alpha", 0.9, k=4)
    assert ratio > 10  # 17.5x: alpha_K(p_hat) is huge when the group happens to contain failures


# ------------------------------------------------------------------------------------------
# objective / derivative consistency
# ------------------------------------------------------------------------------------------
def _params(name, k):
    return {"weights": {1: 0.3, k: 0.7}} if name == "multi_k" else {}


@pytest.mark.parametrize("name", SHAPINGS)
@pytest.mark.parametrize("k", [1, 3, 16])
def test_derivative_is_the_derivative_of_the_objective(name, k):
    if k < info(name).min_k:
        return
    p = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    fd = (objective(name, p + h, k=k, **_params(name, k)) - objective(name, p - h, k=k, **_params(name, k))) / (2 * h)
    d = objective_derivative(name, p, k=k, **_params(name, k))
    assert torch.allclose(fd, d, rtol=1e-6, atol=1e-8), name
    pt = p.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(name, pt, k=k, **_params(name, k)).sum(), pt)
    assert torch.allclose(g, d, rtol=1e-10), name


@pytest.mark.parametrize("name", SHAPINGS)
def test_large_n_gain_converges_to_declared_derivative(name):
    """The declared F is what the shaping ascends: gain_n(p) -> F'(p) (exactly equal if unbiased)."""
    k = 1 if not info(name).uses_k else 4
    for p in (0.15, 0.4, 0.7):
        d = objective_derivative(name, p, k=k)
        g = expected_gain(name, 512, p, k=k)
        tol = 1e-10 if name in UNBIASED else 0.03  # plug-in bias is O(1/n): ~2% for log_passk at p=0.7
        assert g == pytest.approx(d, rel=tol), (name, p)


def test_objective_kinds_and_edges():
    assert isinstance(objective("passk_alpha", 0.3, k=4), float)
    assert objective("passk_alpha", 0.3, k=4) == pytest.approx(1 - 0.7**4)
    assert isinstance(objective("grpo", np.array([0.1, 0.2])), np.ndarray)
    assert isinstance(objective("grpo", torch.tensor([0.1])), torch.Tensor)
    assert objective("passk_grpo", 0.37, k=1) == pytest.approx(objective("grpo", 0.37), rel=1e-14)
    assert objective("multi_k", 0.2, k=1, weights={1: 1.0, 4: 2.0}) == pytest.approx(0.2 + 2 * (1 - 0.8**4))
    assert objective("log_passk", 0.0, k=3) == -math.inf
    for name in SHAPINGS:
        f = objective(name, torch.tensor([0.0, 1.0], dtype=torch.float64), k=2, **_params(name, 2))
        assert not torch.isnan(f).any(), name
    with pytest.raises(ValueError, match="p must lie"):
        objective("grpo", 1.5)
    with pytest.raises(ValueError, match="k >= 2"):
        objective("pkpo_loo_minus_one", 0.5, k=1)
    # K = 1024 stays finite and accurate (the Wallis recursion for passk_grpo included)
    assert math.isfinite(objective("passk_grpo", 0.999, k=1024))
    assert objective("passk_alpha", 1e-4, k=1024) == pytest.approx(-math.expm1(1024 * math.log1p(-1e-4)), rel=1e-13)


# ------------------------------------------------------------------------------------------
# invariances
# ------------------------------------------------------------------------------------------
def _k_and_params(name: str, n: int) -> tuple[int, dict]:
    k = {"pkpo_loo": n - 1, "rloo": 1, "grpo": 1, "dr_grpo": 1}.get(name, min(n, 3))
    return k, ({"weights": {1: 0.5, 2: 1.0, k: 0.25}} if name == "multi_k" else {})


@pytest.mark.parametrize("name", SHAPINGS)
@pytest.mark.parametrize("binary", [True, False])
def test_permutation_equivariance(name, binary):
    if name == "passk_analytic" and not binary:
        return
    r = rand_rewards(64, 7, binary=binary, seed=3)
    perm = torch.argsort(torch.rand(64, 7, generator=torch.Generator().manual_seed(1)), dim=1)
    k, params = _k_and_params(name, 7)
    a = shape(name, r, k=k, **params)
    b = shape(name, torch.gather(r, 1, perm), k=k, **params)
    assert torch.allclose(torch.gather(a, 1, perm), b, atol=1e-12, rtol=0), name
    if not binary:  # tied samples get identical advantages
        same = r[:, :, None] == r[:, None, :]
        diff = (a[:, :, None] - a[:, None, :]).abs()
        assert diff[same].max() == 0.0 or diff[same].max() < 1e-13


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_shift_invariance(name):
    r = rand_rewards(32, 6, binary=False, seed=4)
    k, params = _k_and_params(name, 6)
    extra = {"eps": 0.0} if name == "grpo" else {}
    a = shape(name, r, k=k, **params, **extra)
    assert torch.allclose(shape(name, r + 3.25, k=k, **params, **extra), a, atol=1e-11), name


def test_raw_pkpo_and_paper_loo_are_not_shift_invariant_in_the_predicted_way():
    r = rand_rewards(16, 6, binary=False, seed=5)
    b = 0.75
    assert torch.allclose(shape("pkpo", r + b, k=3), shape("pkpo", r, k=3) + 3 * b, atol=1e-12)
    shifted = shape("pkpo_loo", r + b, k=3, variant="paper")
    assert torch.allclose(shifted, shape("pkpo_loo", r, k=3, variant="paper") - 3 * b / 5, atol=1e-12)


@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_positive_homogeneity_and_binary_path_equals_sorted_path(name):
    """A(a r) = a A(r); with r binary and a = 0.5 the left side runs the O(n log n) sorted path and the
    right side the closed-form count tables, so the two implementations are checked against each other."""
    for n in (2, 5, 9):
        r = rand_rewards(200, n, binary=True, seed=n)
        k, params = _k_and_params(name, n)
        lhs = shape(name, 0.5 * r, k=k, **params)
        rhs = 0.5 * shape(name, r, k=k, **params)
        assert torch.allclose(lhs, rhs, atol=1e-12), (name, n)


def test_grpo_is_scale_invariant():
    r = rand_rewards(8, 5, binary=False, seed=6)
    assert torch.allclose(shape("grpo", 7.0 * r, eps=0.0), shape("grpo", r, eps=0.0), atol=1e-12)


def test_centred_loo_advantages_sum_to_zero_and_equal_rloo_at_k1():
    r = rand_rewards(50, 8, binary=False, seed=7)
    for k in (1, 3, 7):
        assert shape("pkpo_loo", r, k=k).sum(1).abs().max() < 1e-12
    assert torch.allclose(shape("pkpo_loo", r, k=1), shape("rloo", r), atol=1e-13)
    assert torch.allclose(shape("multi_k", r, k=1), shape("rloo", r), atol=1e-13)


def test_p_hat_equal_to_group_mean_reproduces_group_mode():
    r = rand_rewards(40, 6, binary=True, seed=8)
    p = r.mean(1)
    for name in ("grpo", "passk_grpo", "passk_alpha", "log_passk"):
        assert torch.allclose(shape(name, r, k=4, p_hat=p), shape(name, r, k=4), atol=1e-12), name


def test_non_plugin_shapings_ignore_p_hat_but_validate_it():
    r = rand_rewards(3, 5, binary=True, seed=9)
    assert torch.equal(shape("pkpo_loo_minus_one", r, k=3, p_hat=torch.rand(3)), shape("pkpo_loo_minus_one", r, k=3))
    with pytest.raises(ValueError, match="p_hat"):
        shape("pkpo", r, k=2, p_hat=torch.rand(4))


# ------------------------------------------------------------------------------------------
# degenerate groups and edge cases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHAPINGS)
def test_all_equal_groups_get_zero_from_every_baselined_shaping(name):
    n = 6
    const = torch.tensor([[0.0] * n, [1.0] * n, [0.37] * n, [0.1] * n], dtype=torch.float64)
    if name == "passk_analytic":
        const = const[:2]
    k, params = _k_and_params(name, n)
    for p_hat in (None, torch.full((const.shape[0],), 0.3, dtype=torch.float64)):
        out = shape(name, const, k=k, p_hat=p_hat, **params)
        if name == "pkpo":
            assert torch.allclose(out, k * const)  # raw weight: k * g for a constant group
        elif name == "w_reinforce":  # no baseline: lam on correct, -1 on wrong, whatever the group
            assert torch.allclose(out, 1.1 * const - 1.0)
        else:
            assert torch.equal(out, torch.zeros_like(out)), (name, out)


def test_n_equals_one():
    r = torch.tensor([[0.0], [1.0], [0.4]])
    for name in ("grpo", "dr_grpo", "passk_alpha", "log_passk", "passk_grpo"):
        assert torch.equal(shape(name, r, k=3), torch.zeros_like(r)), name
    assert torch.equal(shape("pkpo", r, k=1), r)
    assert torch.equal(shape("passk_analytic", r[:2], k=1), torch.zeros_like(r[:2]))
    for name, k in (("rloo", 1), ("pkpo_loo", 1), ("pkpo_loo_minus_one", 2), ("multi_k", 1)):
        with pytest.raises(ValueError):
            shape(name, r, k=k)


@pytest.mark.parametrize("n", [2, 5, 9])
def test_k_equals_n_and_extreme_counts(n):
    rows = torch.tensor([[1.0] * c + [0.0] * (n - c) for c in range(n + 1)], dtype=torch.float64)
    raw = shape("pkpo", rows, k=n)
    # k = n: a wrong sample is weighted k rho(n-1, c, n-1) = n * [c >= 1]
    for c in range(n + 1):
        assert torch.allclose(raw[c], torch.full((n,), float(n) if c > 0 else 0.0, dtype=torch.float64))
    loo1 = shape("pkpo_loo_minus_one", rows, k=n) if n >= 2 else None
    # k = n: only a unique correct sample gets the whole credit n, everything else 0
    want = torch.zeros(n + 1, n, dtype=torch.float64)
    want[1, 0] = float(n)
    assert torch.allclose(loo1, want)
    analytic = shape("passk_analytic", rows, k=n)
    assert torch.isfinite(analytic).all()


def test_continuous_ties_at_the_top():
    g = torch.tensor([[0.8, 0.3, 0.8, 0.1]], dtype=torch.float64)
    a = shape("pkpo_loo_minus_one", g, k=2)[0]
    # tied maxima: removing one leaves the other, so only subsets {0.8, lower} count
    assert a[0] == a[2] and a[0].item() == pytest.approx(4 * ((0.8 - 0.3) + (0.8 - 0.1)) / 6, abs=1e-14)
    assert a[1].item() == pytest.approx(4 * (0.3 - 0.1) / 6, abs=1e-14) and a[3] == 0


# ------------------------------------------------------------------------------------------
# input handling and errors
# ------------------------------------------------------------------------------------------
def test_dtypes_and_containers():
    r64 = rand_rewards(4, 5, binary=True)
    assert shape("pkpo_loo", r64, k=2).dtype == torch.float64
    assert shape("pkpo_loo", r64.float(), k=2).dtype == torch.float32
    out = shape("grpo", r64.numpy().astype(np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (4, 5)
    assert shape("rloo", r64.long()).dtype == torch.get_default_dtype()
    assert shape("rloo", r64.bool()).dtype == torch.get_default_dtype()
    ints = torch.tensor([[0, 3, 1, 3]])  # integer rewards are cast to float64 before any arithmetic
    assert torch.allclose(shape("pkpo", ints, k=2).double(), shape("pkpo", ints.double(), k=2), atol=1e-6)
    assert shape("multi_k", r64, weights={"1": 0.5, 2: 0.5}, k=2).shape == (4, 5)  # keys after a JSON trip
    empty = shape("pkpo_loo_minus_one", torch.zeros(0, 4), k=2)
    assert empty.shape == (0, 4)
    assert torch.allclose(shape("pkpo_loo", r64.float(), k=2).double(), shape("pkpo_loo", r64, k=2), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    r = rand_rewards(2, 4, binary=True)
    bad = r.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"nan at group 1, sample 2"):
        shape("rloo", bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        shape("pkpo", bad, k=2)
    with pytest.raises(ValueError, match=r"shape \(G, n\)"):
        shape("grpo", torch.zeros(4))
    with pytest.raises(ValueError, match="k >= 2"):
        shape("pkpo_loo_minus_one", r, k=1)
    with pytest.raises(ValueError, match="k <= n"):
        shape("pkpo", r, k=5)
    with pytest.raises(ValueError, match="k <= n-1"):
        shape("pkpo_loo", r, k=4)
    with pytest.raises(ValueError, match="k <= n-1"):
        shape("passk_analytic", r, k=4, baseline="loo")
    with pytest.raises(ValueError, match="positive integer"):
        shape("pkpo", r, k=0)
    with pytest.raises(ValueError, match="positive integer"):
        shape("pkpo", r, k=2.5)
    with pytest.raises(ValueError, match="0/1 rewards"):
        shape("passk_analytic", r * 0.5, k=2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        shape("passk_alpha", r * 2.0, k=2)
    with pytest.raises(ValueError, match=r"p_hat must lie in \[0, 1\]"):
        shape("passk_alpha", r, k=2, p_hat=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"p_hat must lie"):
        shape("passk_alpha", r, k=2, p_hat=torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="baseline"):
        shape("passk_alpha", r, k=2, baseline="median")
    with pytest.raises(ValueError, match="variant"):
        shape("pkpo_loo", r, k=2, variant="other")
    with pytest.raises(ValueError, match="weight keys"):
        shape("multi_k", r, weights={0: 1.0})
    with pytest.raises(ValueError, match="finite"):
        shape("multi_k", r, weights={2: float("nan")})
    with pytest.raises(ValueError, match="k <= n"):
        shape("multi_k", r, weights={1: 1.0, 5: 1.0})
    with pytest.raises(ValueError, match="k=max"):
        shape("multi_k", r, k=3, weights={1: 1.0, 2: 1.0})
    with pytest.raises(ValueError, match="ddof"):
        shape("grpo", r, ddof=2)


# ------------------------------------------------------------------------------------------
# numerics at the extremes
# ------------------------------------------------------------------------------------------
P_EXTREMES = [0.0, 1e-300, 1e-12, 0.3, 1 - 1e-12, 1.0]


@pytest.mark.parametrize("n", [1, 2, 64, 1024])
def test_no_nan_or_inf_for_large_k_n_and_extreme_p_hat(n):
    g = len(P_EXTREMES) * 2
    gen = torch.Generator().manual_seed(n)
    r = torch.randint(0, 2, (g, n), generator=gen).to(torch.float64)
    r[0] = 0.0
    r[1] = 1.0
    if n > 1:
        r[2, 1:] = 0.0  # a single success
        r[2, 0] = 1.0
        r[3, :-1] = 1.0  # a single failure
        r[3, -1] = 0.0
    p_hat = torch.tensor(P_EXTREMES * 2, dtype=torch.float64)
    for name in SHAPINGS:
        for k in (1, 2, 64, 1024):
            for params in ({}, {"baseline": "loo"}) if "baseline" in shaping.REGISTRY[name].defaults else ({},):
                if not admissible(name, n, k, **params):
                    continue
                for ph in (None, p_hat):
                    for dtype in (torch.float64, torch.float32):
                        out = shape(name, r.to(dtype), k=k, p_hat=ph, **params)
                        assert torch.isfinite(out).all(), (name, n, k, params, ph is not None, dtype)


def test_alpha_in_log_space_has_no_nan_where_the_seed_snippet_does():
    p = torch.tensor([1.0], dtype=torch.float64)
    naive = torch.exp(math.log(1) + (1 - 1) * torch.log1p(-p))  # the seed's snippet at K = 1, p = 1
    assert torch.isnan(naive).all()
    assert objective_derivative("passk_alpha", p, k=1).item() == 1.0
    assert objective_derivative("log_passk", p, k=1).item() == 1.0
    assert objective_derivative("passk_alpha", p, k=1024).item() == 0.0
    r = torch.tensor([[1.0, 0.0, 0.0]])
    assert torch.allclose(shape("passk_alpha", r, k=1, p_hat=torch.ones(1)), r - 1 / 3)


def test_large_n_continuous_pkpo_matches_binary_tables():
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (4, 1024), generator=gen).to(torch.float64)
    for k in (2, 64, 1023):
        for name in ("pkpo", "pkpo_loo", "pkpo_loo_minus_one"):
            a_bin = shape(name, r, k=k)
            a_sorted = shape(name, 0.25 * r, k=k) * 4  # the sorted O(n log n) path
            scale = a_bin.abs().max().clamp_min(1.0)
            assert ((a_bin - a_sorted).abs().max() / scale) < 1e-9, (name, k)


# ------------------------------------------------------------------------------------------
# hypothesis properties
# ------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_shapes_dtypes_finiteness_and_errors(data):
    name = data.draw(st.sampled_from(SHAPINGS))
    g = data.draw(st.integers(0, 4))
    n = data.draw(st.integers(1, 10))
    k = data.draw(st.integers(1, 2 * n + 3))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    domain = info(name).reward_domain
    binary = domain == "binary" or data.draw(st.booleans())
    if binary:
        vals = st.sampled_from([0.0, 1.0])
    elif domain == "unit":
        vals = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))
    else:
        vals = st.one_of(st.sampled_from([-1.0, 0.0, 2.0]), st.floats(-5.0, 5.0))
    rows = data.draw(st.lists(st.lists(vals, min_size=n, max_size=n), min_size=g, max_size=g))
    r = torch.tensor(rows, dtype=dtype).reshape(g, n)
    p_hat = None
    if info(name).uses_p_hat and data.draw(st.booleans()):
        p_hat = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=g, max_size=g)), dtype=torch.float64)
    params = {}
    if name == "multi_k" and data.draw(st.booleans()):
        params["weights"] = {1: 1.0, k: 0.5}
        k = max(params["weights"])
    if not admissible(name, n, k, **params):
        with pytest.raises(ValueError):
            shape(name, r, k=k, p_hat=p_hat, **params)
        return
    out = shape(name, r, k=k, p_hat=p_hat, **params)
    assert out.shape == r.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    if info(name).baselined and g:
        const = (r == r[:, :1]).all(1)
        assert torch.equal(out[const], torch.zeros_like(out[const]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 40), p=st.floats(0.0, 1.0))
def test_property_unbiased_shapings_have_exact_gain(n, k, p):
    """gain_n(p) = F'(p) for every unbiased shaping at random (n, k, p), far beyond enumeration."""
    for name in ("pkpo", "pkpo_loo", "pkpo_loo_minus_one", "multi_k"):
        if not admissible(name, n, k):
            continue
        d = objective_derivative(name, p, k=k)
        assert expected_gain(name, n, p, k=k) == pytest.approx(d, rel=1e-9, abs=1e-9), (name, n, k, p)


# ------------------------------------------------------------------ outside p_hat: clip and scale guard
@pytest.mark.parametrize("name,k,explodes", [("grpo", 1, True), ("passk_grpo", 8, True), ("passk_alpha", 8, False),
                                              ("log_passk", 8, True), ("passk_analytic", 4, True),
                                              ("passk_analytic", 8, True), ("rs_grpo", 1, False)])
def test_outside_p_hat_near_0_or_1_stays_within_the_group_forms_bound(name, k, explodes):
    """A central p̂ near 0 once gave one success an advantage of ~1e4 (grpo, n = 16): the default clip to
    [1/n, 1 - 1/n] keeps every advantage within the largest the group form itself gives at this n."""
    n = 16
    r = rand_rewards(200, n, binary=True, seed=3)
    extremes = torch.tensor([0.0, 1e-12, 1e-6, 0.02, 0.5, 0.98, 1 - 1e-12, 1.0], dtype=torch.float64)
    p_hat = extremes[torch.arange(200) % len(extremes)]
    bound = advantage_bound(name, n, k=k)
    out = shape(name, r, k=k, p_hat=p_hat)
    assert float(out.abs().max()) <= bound + 1e-9
    assert scale_violations(name, r, out, k=k).size == 0
    # the group form reaches the bound at some count, so the bound is tight, not a loose constant
    counts = torch.arange(n + 1, dtype=torch.float64)
    rows = (torch.arange(n, dtype=torch.float64)[None, :] < counts[:, None]).to(torch.float64)
    assert float(shape(name, rows, k=k).abs().max()) == pytest.approx(bound)
    # without the clip the same batch explodes (alpha_K <= K stays bounded), and the guard names exactly the
    # groups that did
    raw = shape(name, r, k=k, p_hat=p_hat, p_clip=0)
    bad = scale_violations(name, r, raw, k=k)
    assert (bad.size > 0) == explodes
    worst = raw.abs().amax(1)
    assert set(bad.tolist()) == set(torch.nonzero(worst > 2 * bound + 1e-9)[:, 0].tolist())


def test_grpo_with_a_near_zero_p_hat_was_unbounded_and_is_now_one_groups_worth():
    r = torch.zeros(1, 16, dtype=torch.float64)
    r[0, 0] = 1.0
    p_hat = torch.tensor([1e-6], dtype=torch.float64)
    assert float(shape("grpo", r, p_hat=p_hat, p_clip=0)[0, 0]) > 900  # the issue-11 blow-up
    assert float(shape("grpo", r, p_hat=p_hat)[0, 0]) == pytest.approx(float(shape("grpo", r)[0, 0]))


def test_p_clip_accepts_group_or_a_margin_and_rejects_the_rest():
    r = rand_rewards(4, 8, binary=True, seed=1)
    ph = torch.full((4,), 1e-9, dtype=torch.float64)
    a = shape("grpo", r, p_hat=ph, p_clip=0.25)
    b = shape("grpo", r, p_hat=torch.full((4,), 0.25, dtype=torch.float64), p_clip=0)
    assert torch.allclose(a, b)
    for bad in ("nope", -0.1, 0.5, True):
        with pytest.raises(ValueError, match="p_clip"):
            shape("grpo", r, p_hat=ph, p_clip=bad)
    with pytest.raises(ValueError, match="p_clip"):  # checked even when no p_hat is given
        shape("grpo", r, p_clip="nope")


def test_passk_analytic_outside_p_hat_is_clipped_to_the_groups_pk_range():
    """P_K(p̂) is clipped to [k/n, 1 - 1/C(n,k)] (the group statistic's non-degenerate range): finite and
    bounded, though not by the group form's own maximum, because Chen's σ belongs to the group."""
    n, k = 16, 8
    r = rand_rewards(100, n, binary=True, seed=5)
    p_hat = torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0] * 20, dtype=torch.float64)
    out = shape("passk_analytic", r, k=k, p_hat=p_hat)
    raw = shape("passk_analytic", r, k=k, p_hat=p_hat, p_clip=0)
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) < 200 < float(raw.abs().max())


@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_passk_analytic_explicit_p_hat_keeps_the_group_forms_bound(baseline):
    """Issue 20 item 5: shape("passk_analytic", r, k=4, p_hat≈1) on a 16-sample group with one success gave |A| = 32
    against the group form's bound of 1.73. shape() itself now floors sigma(P_K(p̂)) so every caller gets the bound,
    for every count and every p̂; p_clip=0 (the exactness tests) still gives the unclipped form."""
    n, k = 16, 4
    bound = advantage_bound("passk_analytic", n, k=k, baseline=baseline)
    one = torch.zeros(1, n, dtype=torch.float64)
    one[0, 0] = 1.0
    near_one = torch.tensor([1 - 1e-9], dtype=torch.float64)
    assert float(shape("passk_analytic", one, k=k, p_hat=near_one, baseline=baseline, p_clip=0).abs().max()) > 10 * bound
    assert float(shape("passk_analytic", one, k=k, p_hat=near_one, baseline=baseline).abs().max()) <= bound + 1e-12
    counts = torch.arange(n + 1, dtype=torch.float64)
    rows = (torch.arange(n, dtype=torch.float64)[None, :] < counts[:, None]).to(torch.float64)
    for p in (0.0, 1e-12, 0.01, 0.2, 0.5, 0.9, 1 - 1e-12, 1.0):
        out = shape("passk_analytic", rows, k=k, p_hat=torch.full((n + 1,), p, dtype=torch.float64), baseline=baseline)
        assert float(out.abs().max()) <= bound + 1e-12, p
        # the floor only rescales: signs and the ordering within a group are the group numerators'
        raw = shape("passk_analytic", rows, k=k, p_hat=torch.full((n + 1,), 0.3, dtype=torch.float64),
                    baseline=baseline, p_clip=0)
        assert torch.equal(torch.sign(out), torch.sign(raw))
