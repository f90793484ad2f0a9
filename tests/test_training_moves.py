"""One short real training run moves its target metric the right way.

The default run (configs/tiny_cpu.yaml) is the held-out demonstration; this test is the quick, low-noise check
that the loop ascends its objective: 64 fixed training prompts, pass@8-targeted shaping, and pass@8 of those
prompts measured before and after with the same sampling seeds (common random numbers), n = 64.
"""

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
def test_short_run_raises_pass_at_k_on_its_prompts(tmp_path):
    overrides = [
        "run.name=moves", "run.steps=10", f"run.output_dir={tmp_path}", "run.seed=3",
        "data.max_prompts=64", "data.prompts_per_step=64", "generator.n=16", "learner.lr=5e-4",
        "algorithm.shaping=pkpo_loo_minus_one", "schedule.kind=fixed", "schedule.params={k: 8}",
        "task.train_split=train", "task.eval_split=train", "eval.num_prompts=64", "eval.n=64", "eval.ks=[1,8]",
        "logging.ray_metrics=false",
    ]
    env = dict(os.environ, RAY_ADDRESS="")
    r = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", "configs/tiny_cpu.yaml", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    summary = json.loads((tmp_path / "moves" / "summary.json").read_text())
    base, final = summary["base_eval"], summary["final_eval"]
    assert base["prompt_ids"] == final["prompt_ids"]
    b8, f8 = base["pass_at_k"]["8"]["mean"], final["pass_at_k"]["8"]["mean"]
    print(f"pass@8 on the 64 training prompts: {b8:.3f} -> {f8:.3f}; pass@1 "
          f"{base['pass_at_k']['1']['mean']:.3f} -> {final['pass_at_k']['1']['mean']:.3f}")
    assert f8 > b8
    records = [json.loads(x) for x in (tmp_path / "moves" / "metrics.jsonl").read_text().splitlines()]
    assert all(rec["k"] == 8 for rec in records)
