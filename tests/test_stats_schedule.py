"""passk_rl.stats (p_hat estimators) and passk_rl.schedule (K schedules)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passk_rl import schedule, shaping, stats
from passk_rl.schedule import SCHEDULES, KDecision, make_schedule
from passk_rl.stats import STATS, loo_group_means, make_stats


def batches(seed: int = 0, steps: int = 5):
    """A deterministic stream of (prompt_ids, rewards) with repeats and a continuous column."""
    rng = np.random.default_rng(seed)
    pool = [f"q{i}" for i in range(6)]
    for _ in range(steps):
        ids = list(rng.choice(pool, size=4, replace=False))
        r = (rng.random((4, 5)) < 0.4).astype(float)
        r[:, -1] = rng.random(4).round(2)  # a fractional reward in [0, 1]
        yield ids, torch.tensor(r)


# ---------------------------------------------------------------------------------------------
# protocol shared by every estimator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(STATS))
def test_protocol_counts_roundtrip_and_errors(name):
    est = make_stats(name)
    assert est.total_samples == 0 and est.global_value() == 0.5  # default before any data
    v = est.value(["never"])
    assert v.shape == (1,) and v.dtype == torch.float64
    seen, reward = 0, 0.0
    for ids, r in batches():
        mask = torch.ones_like(r, dtype=torch.bool)
        mask[0, :2] = False  # two unverified samples are not counted
        est.update(ids, r, mask=mask)
        seen += int(mask.sum())
        reward += float(r[mask].sum())
    assert est.total_samples == seen and est.total_reward == pytest.approx(reward)
    ids = [f"q{i}" for i in range(6)] + ["unseen"]
    vals = est.value(ids)
    assert vals.shape == (7,) and ((vals >= 0) & (vals <= 1)).all()
    # JSON round trip restores every answer
    state = json.loads(json.dumps(est.state_dict()))
    fresh = make_stats(name)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.value(ids), vals) and fresh.global_value() == est.global_value()
    assert fresh.total_samples == seen
    # bad inputs
    other = "ema" if name != "ema" else "beta"
    with pytest.raises(ValueError, match="state_dict is for"):
        fresh.load_state_dict(make_stats(other).state_dict())
    with pytest.raises(ValueError, match=r"nan.*'a'"):
        est.update(["a"], torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        est.update(["a"], np.array([[0.0, 1.5]]))
    with pytest.raises(ValueError, match="G = len"):
        est.update(["a", "b"], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="must be a str"):
        est.update([7], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="mask"):
        est.update(["a"], np.zeros((1, 2)), mask=np.ones((1, 3), dtype=bool))
    assert est.total_samples == seen  # failed updates change nothing


def test_masked_nan_is_ignored_and_counts_equal_verified_samples():
    est = make_stats("global_counts")
    r = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    est.update(["a", "b"], r, mask=mask)
    assert est.total_samples == 5 and est.global_value() == pytest.approx(3 / 5)


def test_registry_and_factory_errors():
    assert set(STATS) == {"group_mean", "ema", "global_counts", "beta", "loo"}
    with pytest.raises(ValueError, match="known: group_mean, ema"):
        make_stats("kalman")
    with pytest.raises(ValueError, match="bad parameters"):
        make_stats("ema", alpha=0.3)
    with pytest.raises(ValueError, match="decay"):
        make_stats("ema", decay=1.0)
    with pytest.raises(ValueError, match="prior_a"):
        make_stats("beta", prior_a=0.0)
    with pytest.raises(ValueError, match="params"):
        make_stats("ema", decay=0.5).load_state_dict(make_stats("ema", decay=0.9).state_dict())


# ---------------------------------------------------------------------------------------------
# each estimator's formula
# ---------------------------------------------------------------------------------------------
def test_group_mean_is_the_last_group_mean():
    est = make_stats("group_mean")
    est.update(["a", "b"], torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]]))
    est.update(["a"], torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(est.value(["a", "b"]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert est.value(["zz"]).item() == pytest.approx(5 / 12)  # unseen -> global mean


def test_ema_is_the_seed_recursion():
    est = make_stats("ema", decay=0.9)
    means = [0.2, 0.6, 1.0, 0.0]
    ref = None
    for m in means:
        r = torch.tensor([[1.0] * int(m * 5) + [0.0] * (5 - int(m * 5))])
        est.update(["a"], r)
        ref = m if ref is None else 0.9 * ref + 0.1 * m  # p_hat = 0.9 p_hat_old + 0.1 mean
    assert est.value(["a"]).item() == pytest.approx(ref, abs=1e-15)
    assert est.global_value() == pytest.approx(ref, abs=1e-15)


def test_global_counts_is_successes_over_samples():
    est = make_stats("global_counts")
    total, succ = 0, 0.0
    for ids, r in batches(1):
        est.update(ids, r)
        total += r.numel()
        succ += float(r.sum())
    assert est.global_value() == pytest.approx(succ / total)
    assert torch.allclose(est.value(["q0", "x"]), torch.full((2,), succ / total, dtype=torch.float64))


def test_beta_posterior_mean_prior_and_decay():
    est = make_stats("beta", prior_a=2.0, prior_b=3.0)
    assert est.value(["new"]).item() == pytest.approx(0.4)
    est.update(["a"], torch.tensor([[1.0, 1.0, 0.0, 0.5]]))
    assert est.value(["a"]).item() == pytest.approx((2 + 2.5) / (5 + 4))
    a, b = est.posterior(["a"])
    assert a.item() == pytest.approx(4.5) and b.item() == pytest.approx(4.5)
    dec = make_stats("beta", decay=0.5)
    dec.update(["a"], torch.ones(1, 4))
    dec.update(["a"], torch.zeros(1, 4))
    assert dec.value(["a"]).item() == pytest.approx((1 + 2) / (2 + 2 + 4))


def test_loo_value_excludes_the_most_recent_group():
    est = make_stats("loo")
    est.update(["a", "b"], torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    est.update(["a"], torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    # a: the last group (all ones) is left out -> the first group's 0.5
    assert est.value(["a"]).item() == pytest.approx(0.5)
    # b's only group is its most recent one -> global mean without the last update (3/8)
    assert est.value(["b"]).item() == pytest.approx(3 / 8)
    # independence: the most recent group's rewards do not enter its own p_hat
    other = make_stats("loo")
    other.update(["a", "b"], torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    other.update(["a"], torch.tensor([[0.0, 0.0, 0.0, 0.0]]))
    assert other.value(["a"]).item() == est.value(["a"]).item()


def test_loo_group_means_leave_each_sample_out():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(loo_group_means(r), torch.tensor([[2 / 3, 1.0, 2 / 3, 2 / 3]], dtype=torch.float64))
    with pytest.raises(ValueError, match="n >= 2"):
        loo_group_means(torch.ones(3, 1))


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def test_fixed_caps_at_n():
    s = make_schedule("fixed", k=8)
    assert s.max_k == 8
    assert s.next(0.3, step=0, n=16) == KDecision(k=8)
    assert s.next(0.3, step=1, n=4).k == 4
    assert make_schedule("fixed", k=8, max_k_offset=1).next(0.3, step=0, n=8).k == 7


def test_linear_is_the_seed_formula_floored_and_clamped():
    s = make_schedule("linear", k_min=1, k_max=16, p_target=0.5)
    table = {0.0: 1, 0.1: 4, 0.25: 8, 0.4: 13, 0.5: 16, 0.9: 16}
    for p, k in table.items():
        want = min(16, max(1, math.floor(1 + 15 * p / 0.5 + 1e-12)))
        assert want == k and s.next(p, step=0, n=64).k == k, p
    assert s.next(0.5, step=0, n=8).k == 8  # never above n
    ratchet = make_schedule("linear", k_min=1, k_max=16, p_target=0.5, monotone=True)
    ks = [ratchet.next(p, step=i, n=64).k for i, p in enumerate([0.25, 0.1, 0.4, 0.0])]
    assert ks == [8, 8, 13, 13]
    state = json.loads(json.dumps(ratchet.state_dict()))
    fresh = make_schedule("linear", k_min=1, k_max=16, p_target=0.5, monotone=True)
    fresh.load_state_dict(state)
    assert fresh.next(0.0, step=5, n=64).k == 13 and fresh.last["k"] == 13


def test_anneal_is_piecewise_constant():
    s = make_schedule("anneal", milestones={0: 8, 100: 4, 300: 1})
    assert [s.next(0.5, step=t, n=16).k for t in (0, 99, 100, 299, 300, 10_000)] == [8, 8, 4, 4, 1, 1]
    assert s.max_k == 8 and s.next(0.5, step=0, n=6).k == 6
    with pytest.raises(ValueError, match="step 0"):
        make_schedule("anneal", milestones={5: 8})


def test_multi_k_weights_interpolate_merge_and_feed_the_shaping():
    s = make_schedule("multi_k", milestones=[(0, {1: 0.0, 8: 1.0}), (100, {1: 1.0, 8: 0.0})])
    assert s.max_k == 8
    d0 = s.next(0.2, step=0, n=16)
    assert d0 == KDecision(k=8, weights={8: 1.0})
    d = s.next(0.2, step=25, n=16)
    assert d.k == 8 and d.weights == pytest.approx({1: 0.25, 8: 0.75})
    assert s.next(0.2, step=500, n=16) == KDecision(k=1, weights={1: 1.0})
    capped = s.next(0.2, step=25, n=4)  # k=8 > n merges into k=4
    assert capped.k == 4 and capped.weights == pytest.approx({1: 0.25, 4: 0.75})
    norm = make_schedule("multi_k", weights={1: 1.0, 4: 3.0}, normalize=True).next(0.1, step=0, n=8)
    assert norm.weights == pytest.approx({1: 0.25, 4: 0.75})
    # the decision is accepted as is by the multi_k shaping (k = max key)
    r = torch.randint(0, 2, (3, 16)).double()
    out = shaping.shape("multi_k", r, k=d.k, weights=d.weights)
    assert out.shape == r.shape and torch.isfinite(out).all()
    state = json.loads(json.dumps(s.state_dict()))
    fresh = make_schedule("multi_k", milestones=[(0, {1: 0.0, 8: 1.0}), (100, {1: 1.0, 8: 0.0})])
    fresh.load_state_dict(state)
    assert fresh.last == s.last


def test_schedule_errors():
    assert set(SCHEDULES) == {"fixed", "linear", "anneal", "multi_k", "two_stage", "per_prompt"}
    with pytest.raises(ValueError, match="known: fixed, linear"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="bad parameters"):
        make_schedule("fixed", kk=3)
    with pytest.raises(ValueError, match="k_max must be >= k_min"):
        make_schedule("linear", k_min=8, k_max=2)
    with pytest.raises(ValueError, match="p_target"):
        make_schedule("linear", p_target=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        make_schedule("multi_k")
    with pytest.raises(ValueError, match="positive weight"):
        make_schedule("multi_k", weights={2: 0.0})
    s = make_schedule("fixed", k=2)
    with pytest.raises(ValueError, match="p_global"):
        s.next(float("nan"), step=0, n=4)
    with pytest.raises(ValueError, match="n must be"):
        s.next(0.5, step=0, n=0)
    with pytest.raises(ValueError, match="step"):
        s.next(0.5, step=-1, n=4)
    with pytest.raises(ValueError, match="no admissible K"):
        make_schedule("fixed", k=2, max_k_offset=1).next(0.5, step=0, n=1)
    with pytest.raises(ValueError, match="state_dict is for"):
        s.load_state_dict(make_schedule("linear").state_dict())


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(list(SCHEDULES)),
    p=st.floats(0.0, 1.0),
    step=st.integers(0, 1000),
    n=st.integers(2, 64),
    kmax=st.integers(1, 2048),
    offset=st.integers(0, 1),
)
def test_property_k_never_exceeds_n(name, p, step, n, kmax, offset):
    params = {
        "fixed": {"k": kmax},
        "linear": {"k_min": 1, "k_max": kmax, "p_target": 0.5},
        "anneal": {"milestones": {0: kmax, 500: 1}},
        "multi_k": {"milestones": [(0, {1: 1.0, kmax: 1.0}), (700, {2: 1.0})]},
        "two_stage": {"k": kmax, "switch_step": 400},
        "per_prompt": {"k_min": 1, "k_max": kmax},
    }[name]
    dec = make_schedule(name, max_k_offset=offset, **params).next(p, step=step, n=n)
    assert 1 <= dec.k <= n - offset
    if dec.weights is not None:
        assert max(dec.weights) == dec.k and all(1 <= k <= n - offset for k in dec.weights)


# ---------------------------------------------------------------------------------------------
# two-stage (Chen et al.) and per-prompt K
# ---------------------------------------------------------------------------------------------
def test_two_stage_is_k_before_the_switch_and_one_after():
    sch = make_schedule("two_stage", k=8, switch_step=30)
    ks = [sch.next(0.4, step=t, n=16).k for t in range(60)]
    assert ks[:30] == [8] * 30 and ks[30:] == [1] * 30
    assert make_schedule("two_stage", k=8, switch_step=30).next(0.4, step=0, n=4).k == 4  # capped by n
    state = json.loads(json.dumps(sch.state_dict()))
    fresh = make_schedule("two_stage", k=8, switch_step=30)
    fresh.load_state_dict(state)
    assert fresh.last == sch.last
    with pytest.raises(ValueError, match="params"):
        make_schedule("two_stage", k=8, switch_step=31).load_state_dict(state)
    for bad in ({"k": 0}, {"switch_step": -1}, {"k": 2.5}, {"switch_fraction": 0.5}):
        with pytest.raises(ValueError):
            make_schedule("two_stage", **bad)


def test_per_prompt_k_is_the_steepest_pass_at_k_at_each_prompts_p_hat():
    sch = make_schedule("per_prompt", k_min=1, k_max=12)
    grid = np.concatenate([np.linspace(0, 1, 2001), 1 / np.arange(1, 15), 1 / np.arange(1, 15) + 1e-9])
    grid = grid[(grid >= 0) & (grid <= 1)]
    got = sch.k_star(grid)
    for p, k in zip(grid, got):
        alphas = [kk * (1 - p) ** (kk - 1) for kk in range(1, 13)]
        best = max(alphas)
        # the rule's K reaches the largest alpha_K (ties resolved to the smaller K)
        assert alphas[k - 1] >= best * (1 - 1e-9), (p, k)
        assert all(a < best * (1 - 1e-9) for a in alphas[: k - 1]) or p == 0, (p, k)
    assert list(sch.k_star([0.0, 0.05, 0.1, 0.3, 0.5, 0.9])) == [12, 12, 9, 3, 1, 1]
    # objective: F(0) = 0, F' is the envelope, pass@1 above p = 1/2 (slope 1)
    assert float(sch.objective(0.0)) == 0.0
    p = np.linspace(1e-3, 1 - 1e-3, 999)
    fd = (sch.objective(p + 1e-7) - sch.objective(p - 1e-7)) / 2e-7
    assert np.allclose(fd, sch.derivative(p), rtol=1e-5, atol=1e-6)
    assert np.allclose(sch.derivative(p[p > 0.5]), 1.0)
    # next_rows: one K per prompt, capped by n - max_k_offset; K = max of the rows
    dec = make_schedule("per_prompt", k_min=1, k_max=12, max_k_offset=1).next_rows([0.0, 0.3, 0.9], p_global=0.4,
                                                                                    step=3, n=8)
    assert dec.k_rows == (7, 3, 1) and dec.k == 7
    with pytest.raises(ValueError, match="k_max"):
        make_schedule("per_prompt", k_min=4, k_max=2)


def test_per_prompt_k_fits_only_shapings_that_take_its_ks():
    sch = make_schedule("per_prompt", k_min=1, k_max=8)
    assert schedule.per_prompt_problem("pkpo_loo", sch, 16) is None
    assert "needs K >= 2" in schedule.per_prompt_problem("pkpo_loo_minus_one", sch, 16)
    assert "ignores K" in schedule.per_prompt_problem("rloo", sch, 16)
    assert "K weights" in schedule.per_prompt_problem("multi_k", sch, 16)
    assert "K <= 7" in schedule.per_prompt_problem("pkpo_loo", sch, 8)
    assert schedule.per_prompt_problem("pkpo_loo", make_schedule("fixed", k=4), 8) is None


def test_config_loads_the_new_schedules_strictly():
    from passk_rl.config import ConfigError, config_from_dict

    ok = config_from_dict({"algorithm": {"shaping": "pkpo_loo"}, "generator": {"n": 16},
                           "schedule": {"kind": "per_prompt", "params": {"k_min": 1, "k_max": 8}}})
    assert ok.schedule.kind == "per_prompt"
    config_from_dict({"algorithm": {"shaping": "pkpo_loo_minus_one"}, "generator": {"n": 16},
                      "schedule": {"kind": "two_stage", "params": {"k": 8, "switch_step": 75}}})
    with pytest.raises(ConfigError, match="needs K >= 2"):
        config_from_dict({"algorithm": {"shaping": "pkpo_loo_minus_one"}, "generator": {"n": 16},
                          "schedule": {"kind": "per_prompt", "params": {"k_min": 1, "k_max": 8}}})
    with pytest.raises(ConfigError, match="two_stage"):
        config_from_dict({"schedule": {"kind": "two_stages"}})
    with pytest.raises(ConfigError, match="schedule.params"):
        config_from_dict({"schedule": {"kind": "two_stage", "params": {"k": 4, "split": 0.5}}})
    for name in ("rs_grpo", "w_reinforce"):
        assert config_from_dict({"algorithm": {"shaping": name}}).algorithm.shaping == name
    with pytest.raises(ConfigError, match="beta"):
        config_from_dict({"algorithm": {"shaping": "rs_grpo", "shaping_params": {"bta": 2.0}}})
