"""The 910B plans resolve and fit; an oversized plan is rejected with the numbers (no actor starts)."""

import glob
import subprocess
import sys

import pytest

from passk_rl.config import config_from_dict, load_config
from passk_rl.plan import make_plan

NPU_CONFIGS = sorted(glob.glob("configs/*910b*.yaml"))


def test_there_are_910b_configs():
    assert len(NPU_CONFIGS) >= 2


@pytest.mark.parametrize("path", NPU_CONFIGS)
def test_910b_plans_fit_20_devices(path):
    cfg = load_config(path)
    plan = make_plan(cfg)
    assert plan.fits, plan.render()
    assert plan.generator_devices + plan.learner_devices <= 20
    for dp in plan.per_device:
        assert dp.total_gib <= 64


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
