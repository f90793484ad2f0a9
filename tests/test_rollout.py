"""One-step off-policy training on real parts (algorithm.max_staleness=1): batch t + 1 is sampled by the vLLM
engine while the DeepSpeed learner trains on batch t; the learner corrects with truncated importance weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.e2e
def test_staleness_one_overlaps_and_records_what_it_corrected(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="")
    r = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", "configs/tiny_cpu.yaml", "run.name=async",
                        f"run.output_dir={tmp_path}", "run.steps=4", "data.prompts_per_step=16", "generator.n=8",
                        "eval.enabled=false", "logging.ray_metrics=false", "algorithm.max_staleness=1",
                        "learner.off_policy=tis", "algorithm.shaping=pkpo_loo_minus_one", "schedule.kind=fixed",
                        "schedule.params={k: 4}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    # step 1 has nothing to overlap with; every later batch was sampled one update behind the learner
    assert [x["staleness"] for x in rows] == [0, 1, 1, 1]
    for x in rows[1:]:
        L = x["learner"]
        assert 0.5 < L["is_weight_mean"] < 2.0 and 0.0 < L["is_ess"] <= 1.0 + 1e-9
        # prefetched: the driver did not wait for sampling, the rollout thread did the work
        assert x["phase_seconds"]["generate"] < x["rollout_generate_s"]
        assert sum(x["verifier_status"].values()) == 16 * 8
    assert all(x["sync_probe_max_abs_diff"] < 1e-4 for x in rows)


def test_the_staleness_bound_is_the_configs_in_the_constructor_too():
    """One place per bound: RolloutStage built without a config refuses what the config loader refuses, naming the
    config key (passk_rl.config.BOUNDS / the field's choices, checked by check_field)."""
    from passk_rl.config import ConfigError, check_field, load_config
    from passk_rl.rollout import RolloutStage

    with pytest.raises(ConfigError, match=r"algorithm.max_staleness: 2 is not allowed; allowed values: \[0, 1\]"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["algorithm.max_staleness=2"])
    with pytest.raises(ConfigError, match=r"algorithm.max_staleness: 2 is not allowed; allowed values: \[0, 1\]"):
        RolloutStage(gen=None, verifier=None, task=None, tokenizer=None, draw=list, order_state=tuple, n=4,
                     temperature=1.0, top_p=1.0, max_tokens=8, seed=0, max_staleness=2)
    with pytest.raises(ConfigError, match=r"learner.is_cap: invalid value 1.0"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["learner.is_cap=1.0"])
    with pytest.raises(ConfigError, match=r"learner.is_cap: invalid value 1.0"):
        check_field("learner.is_cap", 1.0)
    check_field("learner.is_cap", 1.5)
    with pytest.raises(ConfigError, match="no config key 'learner.nope'"):
        check_field("learner.nope", 1)
