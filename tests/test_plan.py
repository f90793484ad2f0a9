"""The 910B plans resolve and fit; an oversized plan is rejected with the numbers (no actor starts)."""

import glob
import subprocess
import sys

import pytest

from passk_rl.config import load_config
from passk_rl.plan import make_plan, model_spec

NPU_CONFIGS = sorted(glob.glob("configs/*910b*.yaml"))


# The README's 910B plans: (generator devices, learner devices) out of 20.
SPLITS = {"configs/qwen2.5-7b_910b_x20.yaml": (12, 8), "configs/qwen3-4b_910b_x20.yaml": (12, 8)}


def test_the_910b_configs_are_the_planned_ones():
    assert NPU_CONFIGS == sorted(SPLITS)


@pytest.mark.parametrize("path", sorted(SPLITS))
def test_910b_plans_split_20_devices_and_fit_by_the_zero_arithmetic(path):
    """The learner's per-rank weights, gradients and Adam states follow ZeRO-k over W ranks (recomputed here from
    the parameter count), and the verdict follows the totals: a budget just below a learner rank's does not fit (the
    engines' KV cache takes whatever memory is left, so the learner is what can run out)."""
    cfg = load_config(path)
    plan = make_plan(cfg)
    assert (plan.generator_devices, plan.learner_devices) == SPLITS[path]
    P, W, GIB = model_spec(cfg).params_b * 1e9, cfg.learner.world_size, 1024**3
    rank = next(d for d in plan.per_device if d.role.startswith("learner"))
    learner = rank.items_gib
    assert learner["weights (bf16)"] == pytest.approx(2 * P / (W if cfg.learner.zero_stage == 3 else 1) / GIB)
    assert learner["gradients (bf16)"] == pytest.approx(2 * P / W / GIB)
    assert learner["optimizer (fp32 master+Adam)"] == pytest.approx(12 * P / W / GIB)
    assert plan.fits and max(dp.total_gib for dp in plan.per_device) <= plan.memory_gib == 64, plan.render()
    assert not make_plan(load_config(path, [f"cluster.device_memory_gib={rank.total_gib * 0.99}"])).fits


def test_zero_stage_shrinks_learner_memory():
    base = load_config(NPU_CONFIGS[0])
    totals = []
    for z in (2, 3):
        cfg = load_config(NPU_CONFIGS[0], [f"learner.zero_stage={z}"])
        totals.append(make_plan(cfg).per_device[0].total_gib)
    assert totals[0] > totals[1]
    assert base.learner.world_size > 1


def test_oversized_plan_rejected():
    cfg = load_config(NPU_CONFIGS[0], ["learner.world_size=1", "learner.zero_stage=2"])
    plan = make_plan(cfg)
    assert not plan.fits
    assert "exceeds" in plan.render()
    cfg = load_config(NPU_CONFIGS[0], ["generator.num_engines=10"])
    assert not make_plan(cfg).fits


def test_dry_run_cli_prints_plan_and_exit_code():
    ok = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", NPU_CONFIGS[0], "--dry-run"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "plan: FITS" in ok.stdout and "optimizer" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", NPU_CONFIGS[0], "--dry-run",
                          "learner.world_size=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3 and "DOES NOT FIT" in bad.stdout
    err = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", NPU_CONFIGS[0], "learner.bogus=1"],
                         capture_output=True, text=True, timeout=120)
    assert err.returncode == 2 and "learner.bogus" in err.stderr
