"""The central p̂ actor's plain class (and once through Ray): ordering, masking, schedules, state."""

from __future__ import annotations

import numpy as np
import pytest

from actors.phat import PHatService, actor_name, create_phat_actor

LINEAR = dict(estimator="ema", estimator_params={}, schedule="linear",
              schedule_params={"k_min": 2, "k_max": 12, "p_target": 0.5}, n=16)


def _rewards(rng, p, g=4, n=16):
    return (rng.random((g, n)) < p).astype(np.float64)


def test_p_hat_and_k_do_not_depend_on_the_current_rewards():
    rng = np.random.default_rng(0)
    a, b = PHatService(**LINEAR), PHatService(**LINEAR)
    ids = ["p0", "p1", "p2", "p3"]
    for step in range(1, 4):
        r = _rewards(rng, 0.3)
        a.observe(ids, r, step=step)
        b.observe(ids, r, step=step)
    da = a.observe(ids, np.zeros((4, 16)), step=4)
    db = b.observe(ids, np.ones((4, 16)), step=4)
    assert da.p_hat == db.p_hat and da.p_global == db.p_global and da.k == db.k
    # ... but they are folded in afterwards
    assert a.global_value() < b.global_value()


def test_first_step_k_comes_from_the_batch_not_the_prior():
    lo, hi = PHatService(**LINEAR), PHatService(**LINEAR)
    d_lo = lo.observe(["a", "b"], np.zeros((2, 16)), step=1)
    d_hi = hi.observe(["a", "b"], np.ones((2, 16)), step=1)
    assert d_lo.k == 2 and d_hi.k == 12  # linear schedule at p=0 and p≥p_target
    assert d_lo.p_hat == [0.5, 0.5]  # per-prompt values before any data: the prior


def test_k_follows_the_global_success_rate():
    svc = PHatService(**LINEAR)
    rng = np.random.default_rng(1)
    ks = []
    for step, p in enumerate([0.05] * 5 + [0.45] * 15, start=1):
        ks.append(svc.observe([f"q{step % 7}" for _ in range(4)], _rewards(rng, p), step=step).k)
    assert ks[4] < ks[-1] and all(2 <= k <= 12 for k in ks)


def test_unverified_samples_are_not_counted():
    svc = PHatService(**LINEAR)
    r = np.ones((2, 16))
    verified = np.ones((2, 16), dtype=bool)
    verified[0, :5] = False
    d = svc.observe(["a", "b"], r, step=1, verified=verified)
    assert d.total_samples == 32 - 5 == svc.total_samples()
    with pytest.raises(ValueError, match="mask shape"):
        svc.observe(["a", "b"], r, step=2, verified=np.ones((2, 15), dtype=bool))
    with pytest.raises(ValueError, match=r"\(G, n\)"):
        svc.observe(["a"], r, step=2)


def test_state_round_trip_and_mismatch():
    rng = np.random.default_rng(2)
    a = PHatService(**LINEAR)
    for step in range(1, 6):
        a.observe(["x", "y", "z"], _rewards(rng, 0.2, g=3), step=step)
    b = PHatService(**LINEAR)
    b.load_state_dict(a.state_dict())
    r = _rewards(rng, 0.2, g=3)
    da, db = a.observe(["x", "y", "w"], r, step=6), b.observe(["x", "y", "w"], r, step=6)
    assert da == db
    other = PHatService(**{**LINEAR, "estimator": "global_counts"})
    with pytest.raises(ValueError, match="estimator"):
        other.load_state_dict(a.state_dict())


def test_multi_k_weights_are_handed_out():
    svc = PHatService(estimator="global_counts", estimator_params={}, schedule="multi_k",
                      schedule_params={"weights": {1: 0.5, 8: 0.5}}, n=16, shaping="multi_k")
    d = svc.observe(["a"], np.zeros((1, 16)), step=1)
    assert d.k_weights == {1: 0.5, 8: 0.5}


def test_named_actor_is_one_per_run():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        h = create_phat_actor("t-phat", **LINEAR)
        same = ray.get_actor(actor_name("t-phat"))
        ray.get(h.observe.remote(["a"], np.ones((1, 16)), step=1))
        assert ray.get(same.total_samples.remote()) == 16
        with pytest.raises(ValueError):
            create_phat_actor("t-phat", **LINEAR)
    finally:
        ray.shutdown()


def test_the_actor_returns_the_k_the_shaping_uses_and_records_that_one():
    """One K decider: the schedule asks for K = 16 at n = 16, pkpo_loo (needs K ≤ n − 1) gets 15 — and 15 is what the
    decision, the history and the checkpointed state say; a K-free shaping gets None."""
    svc = PHatService(estimator="ema", schedule="fixed", schedule_params={"k": 16}, n=16, shaping="pkpo_loo")
    d = svc.observe(["a"], np.ones((1, 16)), step=1)
    assert (d.k, d.k_requested) == (15, 16)
    assert svc.state_dict()["history"][-1]["k"] == 15
    low = PHatService(estimator="ema", schedule="linear", schedule_params={"k_min": 1, "k_max": 4}, n=16,
                      shaping="pkpo_loo_minus_one")
    assert low.observe(["a"], np.zeros((1, 16)), step=1).k == 2  # loo-1 needs K ≥ 2
    free = PHatService(estimator="ema", schedule="fixed", schedule_params={"k": 4}, n=16, shaping="grpo")
    d = free.observe(["a"], np.ones((1, 16)), step=1)
    assert d.k is None and d.k_weights is None and free.history[-1]["k"] is None


def test_multi_k_shaping_and_schedule_must_come_together():
    with pytest.raises(ValueError, match="'multi_k'.*needs"):
        PHatService(estimator="ema", schedule="fixed", schedule_params={"k": 4}, n=16, shaping="multi_k")
    with pytest.raises(ValueError, match="cannot take"):
        PHatService(estimator="ema", schedule="multi_k", schedule_params={"weights": {1: 1, 8: 1}}, n=16,
                    shaping="pkpo_loo_minus_one")
    svc = PHatService(estimator="ema", schedule="multi_k", schedule_params={"weights": {1: 0.5, 8: 0.5}}, n=16,
                      shaping="multi_k")
    d = svc.observe(["a"], np.zeros((1, 16)), step=1)
    assert d.k == 8 and d.k_weights == {1: 0.5, 8: 0.5}
    # a K-free shaping ignores any schedule, the multi-K one included (`run.sh algorithm.shaping=grpo` on a multi-K
    # default)
    free = PHatService(estimator="ema", schedule="multi_k", schedule_params={"weights": {1: 0.5, 8: 0.5}}, n=16,
                       shaping="grpo")
    d = free.observe(["a"], np.zeros((1, 16)), step=1)
    assert d.k is None and d.k_weights is None


def test_per_prompt_k_comes_from_each_prompts_own_history():
    """schedule 'per_prompt': each prompt's K is read from its own p̂ before this step's rewards (so it does not depend
    on the group it weights), moved into the shaping's range, and handed back per row; K is their largest."""
    svc = PHatService(estimator="ema", estimator_params={"decay": 0.5}, schedule="per_prompt",
                      schedule_params={"k_min": 1, "k_max": 8}, n=16, shaping="pkpo_loo")
    hard = np.zeros((1, 16))
    hard[0, 0] = 1.0  # 1/16
    easy = np.ones((1, 16))
    easy[0, :3] = 0.0  # 13/16
    first = svc.observe(["hard", "easy"], np.vstack([hard, easy]), step=0)
    assert first.k_rows == [2, 2] and first.k == 2  # no history: both use the batch mean (7/16 -> K* = 2)
    dec = svc.observe(["hard", "easy"], np.vstack([easy, hard]), step=1)  # this step's rewards are not used
    assert dec.p_hat[0] < 0.2 < 0.7 < dec.p_hat[1]
    assert dec.k_rows[0] == 8 and dec.k_rows[1] == 1 and dec.k == 8
    assert svc.history[-1]["k_mean"] == 4.5
    with pytest.raises(ValueError, match="needs K >= 2"):
        PHatService(estimator="ema", schedule="per_prompt", n=16, shaping="pkpo_loo_minus_one")


def test_the_trainer_shapes_each_group_with_its_own_k_from_the_decision():
    """Trainer.shaping_args hands the decision's k_rows to shape_masked as a per-row K, and the step's guard
    accepts them (plain Trainer and PHatService: no actor needed)."""
    from pathlib import Path

    import torch

    from passk_rl import shaping
    from passk_rl.config import load_config
    from passk_rl.tasks import Prompt
    from passk_rl.trainer import Trainer

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs/tiny_cpu.yaml", ["run.output_dir=/tmp/passk_rl_phat_test", "generator.n=16",
                                                       "algorithm.shaping=pkpo_loo", "schedule.kind=per_prompt",
                                                       "schedule.params={k_min: 1, k_max: 8}"])
    tr = Trainer(cfg)
    svc = PHatService(estimator="ema", schedule="per_prompt", schedule_params={"k_min": 1, "k_max": 8}, n=16,
                      shaping="pkpo_loo")
    rng = np.random.default_rng(0)
    p = np.array([0.02, 0.1, 0.5, 0.9])
    ids = [f"q{i}" for i in range(4)]
    for step in range(3):
        r = (rng.random((4, 16)) < p[:, None]).astype(np.float64)
        dec = svc.observe(ids, r, step=step)
    k_arg, params, p_hat = tr.shaping_args(dec)
    assert list(k_arg) == dec.k_rows and len(set(dec.k_rows)) > 1
    keep = np.ones_like(r, dtype=bool)
    adv = shaping.shape_masked("pkpo_loo", r, keep, k=k_arg, **params)
    for i in range(4):
        alone = shaping.shape("pkpo_loo", torch.tensor(r[i:i + 1]), k=dec.k_rows[i]).numpy()
        np.testing.assert_allclose(adv[i:i + 1], alone, atol=1e-12)
    prompts = [Prompt(id=i, text="t", answer=None) for i in ids]
    assert tr.check_advantages(0, prompts, r, adv, k_arg, params) is False
