"""passk_rl.estimators: brute-force subset enumeration, published vectors, exactness, numerics, curves."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passk_rl.estimators import PassAtKCurve, max_at_k, pass_at_k, pass_at_k_curve


def exact_pass(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# ---------------------------------------------------------------------------------------------
# published vectors and brute force
# ---------------------------------------------------------------------------------------------
def test_published_vectors():
    assert pass_at_k(8, 2, 4) == pytest.approx(0.785714, abs=5e-7)
    assert pass_at_k(8, 2, 4) == pytest.approx(float(exact_pass(8, 2, 4)), rel=1e-15)
    g = np.array([[0.1, 0.3, 0.5, 0.7, 0.9]])
    assert max_at_k(g, 2)[0] == pytest.approx(0.7, abs=1e-15)


@pytest.mark.parametrize("seed", range(8))
def test_pass_and_max_at_k_equal_subset_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    binary = rng.integers(0, 2, size=n).astype(float)
    cont = rng.choice([0.0, 0.1, 0.1, 0.45, 0.8, 2.5, -1.0], size=n)  # ties and negatives
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        want_pass = np.mean([binary[list(s)].max() for s in subsets])
        want_max = np.mean([cont[list(s)].max() for s in subsets])
        assert pass_at_k(n, int(binary.sum()), k) == pytest.approx(want_pass, abs=1e-14)
        assert max_at_k(binary[None], k)[0] == pytest.approx(want_pass, abs=1e-14)
        assert max_at_k(cont[None], k)[0] == pytest.approx(want_max, abs=1e-13)


@pytest.mark.parametrize("n,k", [(5, 1), (6, 3), (7, 7), (12, 5)])
def test_pass_at_k_is_unbiased_over_the_binomial(n, k):
    for p in (0.0, 0.05, 0.37, 0.9, 1.0):
        c = np.arange(n + 1)
        pmf = np.array([math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in c])
        assert float((pmf * pass_at_k(np.full(n + 1, n), c, k)).sum()) == pytest.approx(1 - (1 - p) ** k, abs=1e-13)
    # the plug-in estimate 1 - (1 - c/n)^k is biased (here by > 1e-3)
    p = 0.3
    pmf = np.array([math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n + 1)])
    plug = (pmf * (1 - (1 - np.arange(n + 1) / n) ** k)).sum()
    if k > 1:
        assert abs(plug - (1 - (1 - p) ** k)) > 1e-3


def test_max_at_k_is_unbiased_over_all_samples():
    """E over all M^n sample tuples of max@k_hat equals E[max of k draws] exactly."""
    vals = np.array([0.2, 0.9, 0.2, -0.4])
    pi = np.array([0.1, 0.3, 0.4, 0.2])
    n = 5
    seqs = np.indices((4,) * n).reshape(n, -1).T
    prob = pi[seqs].prod(1)
    for k in range(1, n + 1):
        est = max_at_k(torch.from_numpy(vals[seqs]), k).numpy()
        levels = np.unique(vals)
        pop = sum(v * (pi[vals <= v].sum() ** k - pi[vals < v].sum() ** k) for v in levels)
        assert float((prob * est).sum()) == pytest.approx(pop, abs=1e-13)


# ---------------------------------------------------------------------------------------------
# kinds, broadcasting, errors
# ---------------------------------------------------------------------------------------------
def test_input_kinds_and_broadcasting():
    assert isinstance(pass_at_k(10, 3, 2), float)
    out = pass_at_k(np.array([[10], [20]]), np.array([0, 3, 10]), 2)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3) and out.dtype == np.float64
    assert out[0, 0] == 0.0 and out[0, 2] == 1.0
    t = pass_at_k(torch.tensor([8, 8]), torch.tensor([2.0, 8.0]), 4)  # float counts, e.g. rewards.sum(-1)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    assert torch.allclose(t, torch.tensor([float(exact_pass(8, 2, 4)), 1.0], dtype=torch.float64))
    assert isinstance(pass_at_k(torch.tensor(8), 2, 4), torch.Tensor)
    assert pass_at_k(np.int64(8), np.int64(2), 4) == pytest.approx(0.7857142857142857)


def test_bad_values_raise_naming_them():
    with pytest.raises(ValueError, match=r"k must be <= n; got n=3, c=1, k=5"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match=r"c must be >= 0.*c=-1"):
        pass_at_k(3, -1, 1)
    with pytest.raises(ValueError, match=r"n must be >= 1"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match=r"c must be <= n.*n=4, c=5.*index \(1,\)"):
        pass_at_k(4, np.array([1, 5]), 2)
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match=r"whole numbers, got 2.5"):
        pass_at_k(4, 2.5, 1)
    with pytest.raises(ValueError, match="k="):
        max_at_k(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="finite"):
        max_at_k(np.array([[0.1, np.nan]]), 1)


def test_max_at_k_dtypes_and_integer_inputs():
    r32 = torch.tensor([[0.1, 0.7, 0.3]], dtype=torch.float32)
    assert max_at_k(r32, 2).dtype == torch.float32
    ints = np.array([[1, 3, 2, 0]])  # integer rewards: no integer division anywhere
    assert max_at_k(ints, 2)[0] == pytest.approx((1 + 3 + 2 + 3 + 3 + 2) / 6)
    assert max_at_k(torch.tensor([[1, 0, 1, 1]]), 2).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# numerics: large n and k
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,c,k", [(5000, 1, 1), (5000, 1, 1024), (4096, 3, 1024), (4096, 2000, 1024), (3000, 7, 2999),
                                    (1024, 512, 512), (6000, 5999, 1)])
def test_pass_at_k_matches_exact_rational_arithmetic(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass(n, c, k)), rel=1e-13)


def test_pass_at_k_large_grid_is_finite_monotone_and_exact_at_the_edges():
    n = 4096
    c = np.arange(0, n + 1, 7)
    ks = np.array([1, 2, 16, 128, 1024])
    out = pass_at_k(n, c[:, None], ks[None, :])
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    assert (np.diff(out, axis=0) >= 0).all() and (np.diff(out, axis=1) >= 0).all()
    assert (out[c + 1024 > n, -1] == 1.0).all() and out[0].max() == 0.0


def test_max_at_k_large_n_weights_sum_to_one():
    n = 3000
    for k in (1, 64, 1024, 3000):
        assert max_at_k(np.ones((1, n)), k)[0] == pytest.approx(1.0, abs=1e-12)
        r = np.zeros((1, n))
        r[0, 0] = 1.0
        assert max_at_k(r, k)[0] == pytest.approx(k / n, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_property_pass_at_k_exact_and_bounded(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    v = pass_at_k(n, c, k)
    assert 0.0 <= v <= 1.0
    assert v == pytest.approx(float(exact_pass(n, c, k)), rel=1e-12, abs=1e-300)


# ---------------------------------------------------------------------------------------------
# curve with bootstrap
# ---------------------------------------------------------------------------------------------
def test_curve_mean_and_bootstrap_match_a_naive_loop():
    rng = np.random.default_rng(1)
    p_true = rng.beta(0.5, 1.5, size=60)
    n = np.full(60, 32)
    c = rng.binomial(32, p_true)
    ks = [1, 2, 4, 8, 16, 32]
    res = pass_at_k_curve(n, c, ks, n_boot=400, ci=0.9, seed=7)
    assert isinstance(res, PassAtKCurve)
    per = np.array([[pass_at_k(32, int(ci), k) for k in ks] for ci in c])
    assert np.allclose(res.per_problem, per, atol=1e-15) and np.allclose(res.mean, per.mean(0), atol=1e-15)
    # the naive bootstrap with the same generator stream
    draws = np.random.default_rng(7).integers(0, 60, size=(400, 60))
    boots = per[draws].mean(axis=1)
    lo, hi = np.quantile(boots, [0.05, 0.95], axis=0)
    assert np.allclose(res.lo, lo, atol=1e-12) and np.allclose(res.hi, hi, atol=1e-12)
    assert (res.lo <= res.mean).all() and (res.mean <= res.hi).all() and (res.hi - res.lo > 0).all()
    assert (np.diff(res.mean) >= 0).all()
    d = res.to_dict()
    assert d["ks"] == ks and len(d["lo"]) == len(ks) and "per_problem" not in d


def test_curve_reproducible_and_seed_dependent_and_large():
    rng = np.random.default_rng(2)
    n = rng.integers(1024, 3000, size=300)
    c = rng.binomial(n, 0.01)
    ks = [1, 8, 64, 256, 1024]
    a = pass_at_k_curve(n, c, ks, n_boot=200, seed=3)
    b = pass_at_k_curve(n, c, ks, n_boot=200, seed=3)
    other = pass_at_k_curve(n, c, ks, n_boot=200, seed=4)
    assert np.array_equal(a.lo, b.lo) and not np.array_equal(a.lo, other.lo)
    assert np.isfinite(a.mean).all()
    zero = pass_at_k_curve(n, c, ks, n_boot=0)
    assert np.array_equal(zero.lo, zero.mean) and np.array_equal(zero.hi, zero.mean)


def test_curve_errors():
    with pytest.raises(ValueError, match="k=9 exceeds the smallest n=8"):
        pass_at_k_curve([8, 16], [1, 2], [1, 9])
    with pytest.raises(ValueError, match="ci"):
        pass_at_k_curve([8], [1], [1], ci=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        pass_at_k_curve([8], [1], [1], n_boot=-1)
    with pytest.raises(ValueError, match="c must be <= n"):
        pass_at_k_curve([8], [9], [1])


def test_paired_diff_matches_difference_of_means_and_is_tighter():
    from passk_rl.estimators import pass_at_k_curve, pass_at_k_paired_diff

    rng = np.random.default_rng(5)
    p = rng.beta(0.5, 1.5, size=300)
    before = rng.binomial(32, p)
    after = rng.binomial(32, np.clip(p + 0.03, 0, 1))
    ks = [1, 8, 32]
    d = pass_at_k_paired_diff(32, before, after, ks, n_boot=500, seed=1)
    a, b = pass_at_k_curve(32, before, ks, n_boot=500, seed=1), pass_at_k_curve(32, after, ks, n_boot=500, seed=1)
    np.testing.assert_allclose(d.mean, b.mean - a.mean, atol=1e-12)
    assert np.all(d.lo <= d.mean) and np.all(d.mean <= d.hi)
    # pairing removes the spread of problem difficulty from the interval
    assert np.all(d.hi - d.lo < (a.hi - a.lo) + (b.hi - b.lo))
    same = pass_at_k_paired_diff(32, before, before, ks, n_boot=100)
    assert np.all(same.mean == 0) and np.all(same.lo == 0) and np.all(same.hi == 0)
    with pytest.raises(ValueError):
        pass_at_k_paired_diff(32, before, after[:-1], ks)


def test_bootstrap_means_is_the_naive_bootstrap_and_separate_calls_stay_paired():
    from passk_rl.estimators import bootstrap_means, percentile_interval

    rng = np.random.default_rng(9)
    # P large enough that the replicates are drawn in several chunks: the chunking must not change the draws
    p = 6000
    a, b = rng.random(p), rng.random(p)
    reps = bootstrap_means(np.stack([a, b], axis=1), n_boot=1500, seed=11)
    draws = np.random.default_rng(11).integers(0, p, size=(1500, p))
    np.testing.assert_allclose(reps, np.stack([a[draws].mean(1), b[draws].mean(1)], axis=1), atol=1e-12)
    # one column at a time with the same seed resamples the same problems: differences stay paired
    ra, rb = bootstrap_means(a, n_boot=1500, seed=11), bootstrap_means(b, n_boot=1500, seed=11)
    np.testing.assert_allclose(ra - rb, bootstrap_means(a - b, n_boot=1500, seed=11), atol=1e-12)
    assert bootstrap_means(a, n_boot=0, seed=0).shape == (0,)
    lo, hi = percentile_interval(ra, 0.9)
    assert (lo, hi) == tuple(np.quantile(ra, [0.05, 0.95]))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_means(a, n_boot=-1, seed=0)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_means(np.zeros((0, 3)), n_boot=10, seed=0)
    with pytest.raises(ValueError, match="ci"):
        percentile_interval(ra, 1.0)
