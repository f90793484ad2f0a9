"""The run's numeric guards (passk_rl.trainer.Trainer.check_advantages / check_update), on a plain Trainer: no
actor is needed to decide whether a step's numbers are sane. The end-to-end check that the README's GRPO override
trains (reward rises, no advantage beyond the group form's bound) is in tests/test_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passk_rl import shaping
from passk_rl.config import ConfigError, load_config
from passk_rl.tasks import Prompt
from passk_rl.trainer import Trainer, TrainingAborted

CFG = "configs/tiny_cpu.yaml"


def _prompts(g: int):
    return [Prompt(id=f"p{i}", text="t", answer=None) for i in range(g)]


def _trainer(*overrides: str) -> Trainer:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return Trainer(load_config(root / CFG, ["run.output_dir=/tmp/passk_rl_guard_test", *overrides]))


def _rewards(g: int = 6, n: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = (rng.random((g, n)) < rng.uniform(0.02, 0.6, size=(g, 1))).astype(np.float64)
    r[0] = 0.0
    r[0, 0] = 1.0  # one success: the group the GRPO blow-up came from
    return r


def test_grpo_with_the_central_p_hat_near_zero_passes_the_guard_since_the_clip():
    t = _trainer("algorithm.shaping=grpo", "algorithm.p_hat_source=estimator")
    r = _rewards()
    p_hat = torch.full((r.shape[0],), 1e-5, dtype=torch.float64)
    adv = shaping.shape("grpo", torch.tensor(r), p_hat=p_hat).numpy()
    assert t.check_advantages(1, _prompts(r.shape[0]), r, adv, 1, {}) is False
    raw = shaping.shape("grpo", torch.tensor(r), p_hat=p_hat, p_clip=0).numpy()  # the pre-fix computation
    assert t.check_advantages(7, _prompts(r.shape[0]), r, raw, 1, {}) is True  # the update is skipped
    assert (t.skipped_in_a_row, t.skipped_total) == (1, 1)


def test_bad_advantages_stop_the_run_after_the_limit_naming_the_prompts():
    t = _trainer("guard.max_bad_steps=2")
    r = _rewards()
    adv = shaping.shape("pkpo_loo_minus_one", torch.tensor(r), k=8).numpy()
    adv[3, 2] = np.nan
    assert t.check_advantages(2, _prompts(r.shape[0]), r, adv, 8, {}) is True
    with pytest.raises(TrainingAborted, match=r"2 bad steps in a row.*guard.max_advantage_ratio.*p3"):
        t.check_advantages(3, _prompts(r.shape[0]), r, adv, 8, {})


def test_skipped_updates_are_counted_and_stop_the_run_after_the_limit():
    t = _trainer("guard.max_bad_steps=2")
    adv = np.zeros((3, 4))
    adv[1, 0] = 5.0
    ok = {"grad_norm": 2.0, "loss": 0.1}
    assert t.check_update(1, _prompts(3), adv, {"grad_norm": float("inf"), "loss": 0.1}) is True
    assert t.skipped_in_a_row == 1 and t.skipped_total == 1
    assert t.check_update(2, _prompts(3), adv, ok) is False  # a good step resets the streak, not the total
    assert t.skipped_in_a_row == 0 and t.skipped_total == 1
    assert t.check_update(3, _prompts(3), adv, {"grad_norm": 1.0, "loss": float("nan")}) is True
    with pytest.raises(TrainingAborted, match="2 bad steps in a row.*not finite"):
        t.check_update(4, _prompts(3), adv, {"grad_norm": float("nan"), "loss": 0.0})


def test_an_exploding_gradient_norm_is_a_bad_step_naming_the_largest_advantages():
    t = _trainer("guard.max_grad_norm=100", "guard.max_bad_steps=2")
    adv = np.zeros((3, 4))
    adv[2, 1] = -40.0
    assert t.check_update(1, _prompts(3), adv, {"grad_norm": 99.0, "loss": 0.0}) is False
    assert t.check_update(2, _prompts(3), adv, {"grad_norm": 2.6e5, "loss": 0.0}) is False  # applied, clipped
    assert t.skipped_in_a_row == 1 and t.skipped_total == 0
    with pytest.raises(TrainingAborted, match=r"gradient norm 2\.6.*> guard.max_grad_norm=100.*p2 \(max \|A\| 40\)"):
        t.check_update(3, _prompts(3), adv, {"grad_norm": 2.6e5, "loss": 0.0})


def test_guard_keys_are_checked_and_analytic_with_the_estimator_is_a_config_error():
    for bad in ("guard.max_advantage_ratio=0.5", "guard.max_grad_norm=0", "guard.max_bad_steps=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(CFG, [bad])
    with pytest.raises(ConfigError, match="p_hat_source.*passk_analytic"):
        load_config(CFG, ["algorithm.shaping=passk_analytic", "algorithm.p_hat_source=estimator",
                          "schedule.kind=fixed", "schedule.params={k: 8}"])
    # the papers' definition (p̂ from the group) is the default; a source that does not exist is refused by name
    assert load_config(CFG, []).algorithm.p_hat_source == "group"
    with pytest.raises(ConfigError, match=r"algorithm.p_hat_source.*group.*estimator"):
        load_config(CFG, ["algorithm.p_hat_source=central"])
