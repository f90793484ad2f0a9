"""passk_rl.experiment: the strict experiment file, run planning and reuse, the seed × problem statistics, the
computed verdict and report (on evaluation records made here), the CLI's dry run, and (slow) a whole small
experiment on the real pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from passk_rl import experiment as ex
from passk_rl.estimators import pass_at_k, seed_prompt_interval

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "configs" / "experiments" / "passk_vs_grpo.yaml"


def _write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _small(tmp_path: Path, **extra) -> dict:
    spec = {
        "name": "t", "base_config": "configs/experiments/arith_base.yaml", "runs_dir": str(tmp_path / "runs"),
        "out": str(tmp_path / "out"), "k": 4, "seeds": [0, 1],
        "common": {"run.steps": 2, "eval.enabled": False, "algorithm.p_hat_source": "group",
                   "schedule.kind": "fixed", "data.prompts_per_step": 8, "generator.n": 8,
                   "logging.ray_metrics": False, "logging.pass_at_ks": [1, 4]},
        "tune": {"seed": 0, "lrs": [3.0e-4, 1.0e-3], "split": "val", "num_prompts": 8, "n": 8, "eval_seed": 1},
        "eval": {"split": "test", "num_prompts": 8, "n": 8, "ks": [1, 2, 4, 8], "seed": 0},
        "baselines": ["grpo"], "candidates": ["pkpo_k4"], "finalists": {"baselines": 1, "candidates": 1},
        "methods": [
            {"name": "grpo", "lr": "tune", "overrides": {"algorithm.shaping": "grpo", "schedule.params": {"k": 1}}},
            {"name": "pkpo_k4", "lr": "grpo",
             "overrides": {"algorithm.shaping": "pkpo_loo_minus_one", "schedule.params": {"k": 4}}},
        ],
    }
    spec.update(extra)
    return spec


# ------------------------------------------------------------------------------------------ the file
def test_the_shipped_experiment_resolves_every_run():
    spec = ex.load_experiment(MAIN)
    planner = ex.Planner(spec)
    runs = planner.check_all()
    names = {r.name for r in runs}
    assert "grpo-lr0.0003-s0" in names and "pkpo_k8-lr0.001-s4" in names
    assert planner.trains_for("grpo") == 1 and planner.trains_for("pkpo_k8") == 8
    assert planner.trains_for("pkpo_k8_anneal") == 8
    r = planner.run("pkpo_k16", 3e-4, 2)
    assert (r.cfg.algorithm.shaping, r.cfg.schedule.params["k"], r.cfg.learner.lr, r.cfg.run.seed) == (
        "pkpo_loo_minus_one", 16, 3e-4, 2)
    assert r.cfg.task.train_split == "train" and spec.tune.split == "val" and spec.eval.split == "test"


@pytest.mark.parametrize("patch,match", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"tune": {"lrz": [1]}}, r"tune: unknown key 'lrz'"),
    ({"baselines": ["nope"]}, "baselines: unknown method 'nope'"),
    ({"eval": {"ks": [1, 2], "n": 8}}, "must contain 1 and k=4"),
    ({"common": {"learner.zero_stag": 3}}, "learner.zero_stag"),
    ({"common": {"eval.enabled": True}}, "eval.enabled"),
])
def test_bad_experiment_files_are_errors_naming_the_key(tmp_path, patch, match):
    spec = _small(tmp_path)
    for key, value in patch.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    with pytest.raises(ex.ExperimentError, match=match):
        ex.Planner(ex.load_experiment(_write(tmp_path, spec))).check_all()


def test_method_errors_name_the_method(tmp_path):
    spec = _small(tmp_path)
    spec["methods"][1]["lr"] = "pkpo_k4"
    with pytest.raises(ex.ExperimentError, match="'pkpo_k4'"):
        ex.load_experiment(_write(tmp_path, spec))
    spec = _small(tmp_path)
    spec["methods"].append({"name": "x", "lr": "pkpo_k4", "overrides": {}})
    with pytest.raises(ex.ExperimentError, match="borrows the lr of 'pkpo_k4'"):
        ex.load_experiment(_write(tmp_path, spec))
    spec = _small(tmp_path)
    spec["methods"][1]["overrides"]["schedule.params"] = {"k": 1}  # loo-1 needs K >= 2
    with pytest.raises(ex.ExperimentError, match="method 'pkpo_k4'.*k >= 2"):
        ex.Planner(ex.load_experiment(_write(tmp_path, spec))).check_all()


def test_a_finished_run_is_reused_only_with_the_same_config(tmp_path):
    from passk_rl.config import dump_yaml

    planner = ex.Planner(ex.load_experiment(_write(tmp_path, _small(tmp_path))))
    run = planner.run("grpo", 3e-4, 0)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(dump_yaml(run.cfg))
    assert ex._same_config(run.run_dir / "config.yaml", run.cfg)
    # a key added to the config tree later (absent from an old config.yaml) takes its default: still the same run
    old = yaml.safe_load(dump_yaml(run.cfg))
    del old["guard"]
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert ex._same_config(run.run_dir / "config.yaml", run.cfg)
    assert not ex._same_config(run.run_dir / "config.yaml", planner.run("grpo", 1e-3, 0).cfg)
    runner = ex.Runner(planner.spec, planner)
    assert runner.state(run) == "train"  # not finished: no final model yet
    (run.model_dir).mkdir()
    (run.model_dir / "config.json").write_text("{}")
    (run.run_dir / "summary.json").write_text("{}")
    assert runner.state(run) == "done"
    (run.run_dir / "config.yaml").write_text(dump_yaml(planner.run("grpo", 1e-3, 0).cfg))
    with pytest.raises(ex.ExperimentError, match="another config"):
        runner.state(run)


def test_candidates_that_keep_pass1_rank_first(tmp_path):
    """With pass1_slack, the pass@K method picked is the best at validation pass@K among those within the slack
    of the best baseline's validation pass@1; without, simply the best at pass@K."""
    spec = ex.load_experiment(_write(tmp_path, _small(tmp_path, candidates=["pkpo_k4", "grpo"], baselines=["grpo"])))
    val = {("grpo", 1): 0.30, ("grpo", 4): 0.50, ("pkpo_k4", 1): 0.20, ("pkpo_k4", 4): 0.70}
    at = lambda m, k: val[(m, k)]  # noqa: E731
    assert ex.rank_on_validation(spec, at)[1] == ["pkpo_k4", "grpo"]
    spec.pass1_slack = 0.02
    assert ex.rank_on_validation(spec, at) == (["grpo"], ["grpo", "pkpo_k4"])
    spec.pass1_slack = 0.2
    assert ex.rank_on_validation(spec, at)[1] == ["pkpo_k4", "grpo"]


# ------------------------------------------------------------------------------------------ statistics
def test_seed_prompt_interval_widens_with_seed_variation_and_reduces_to_problems_with_one_seed():
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 0.3, size=256)
    calm = np.stack([base + rng.normal(0, 0.05, 256) + 0.1 for _ in range(5)])
    wild = np.stack([base + rng.normal(0, 0.05, 256) + 0.1 + shift for shift in (-0.3, 0.25, -0.2, 0.3, 0.0)])
    a, b = seed_prompt_interval(calm), seed_prompt_interval(wild)
    assert a.lo <= a.mean <= a.hi and b.lo <= b.mean <= b.hi
    assert (b.hi - b.lo) > 2 * (a.hi - a.lo) and (b.t_hi - b.t_lo) > 2 * (a.t_hi - a.t_lo)
    one = seed_prompt_interval(calm[:1])
    assert np.isnan(one.t_lo) and one.seeds == 1 and one.lo < one.mean < one.hi
    with pytest.raises(ValueError, match="seeds, problems"):
        seed_prompt_interval(np.zeros(5))


def test_seed_prompt_interval_covers_the_truth_at_about_the_nominal_rate():
    """Methods whose true mean differs by 0.05 with seed effects (sd 0.03) and problem noise: over 200 simulated
    experiments with 5 seeds, the t interval covers the truth ~95 % of the time (the bootstrap, narrower with
    few seeds, is checked not to be grossly off)."""
    rng = np.random.default_rng(1)
    t_hits = b_hits = 0
    trials = 200
    difficulty = rng.normal(0, 0.2, 128)
    for _ in range(trials):
        x = 0.05 + rng.normal(0, 0.03, (5, 1)) + difficulty[None] * 0 + rng.normal(0, 0.1, (5, 128))
        iv = seed_prompt_interval(x, n_boot=400, seed=int(rng.integers(1 << 30)))
        t_hits += iv.t_lo <= 0.05 <= iv.t_hi
        b_hits += iv.lo <= 0.05 <= iv.hi
    assert 0.88 <= t_hits / trials <= 0.99
    assert 0.75 <= b_hits / trials <= 0.99


def _fake_eval(ids, counts, n):
    return {"prompt_ids": ids, "counts": [int(c) for c in counts], "n": n,
            "pass_at_k": {str(k): {"mean": float(np.mean(pass_at_k(n, np.asarray(counts), k)))} for k in (1, 2, 4, 8)}}


def test_analysis_and_report_from_evaluation_records(tmp_path):
    """A candidate that is better at pass@4 and equal at pass@1, by construction of its per-problem counts: the
    analysis finds the pair on validation, the difference matches the one computed here, the verdict says yes,
    and the report, its figures and summary.json (the issue's shape) are written."""
    spec = ex.load_experiment(_write(tmp_path, _small(tmp_path)))
    planner = ex.Planner(spec)
    n, p = 8, 40
    ids = [f"q{j}" for j in range(p)]
    rng = np.random.default_rng(0)
    chosen = {"grpo": 3e-4, "pkpo_k4": 3e-4}
    seeds = {"grpo": [0, 1], "pkpo_k4": [0, 1]}
    test, val = {}, {}
    base_counts = rng.integers(0, 3, p)
    test["base"] = _fake_eval(ids, base_counts, n)
    per = {}
    for s in (0, 1):
        # baseline: concentrated (some problems always, others never); candidate: the same total, spread out
        conc = np.where(np.arange(p) % 2 == 0, 6, 0)
        spread = np.full(p, 3)
        for m, c in (("grpo", conc), ("pkpo_k4", spread)):
            r = planner.run(m, 3e-4, s)
            test[r.name] = _fake_eval(ids, c, n)
            per[(m, s)] = c
    for m in ("grpo", "pkpo_k4"):
        for lr in (3e-4, 1e-3):
            val[planner.run(m, lr, 0).name] = _fake_eval(ids, per[(m, 0)] if lr == 3e-4 else per[(m, 0)] // 2, n)
    oc = ex.Outcome(chosen_lr=chosen, val=val, finalists=["grpo", "pkpo_k4"], seeds=seeds, test=test)
    a = ex.analyse(spec, planner, oc)
    assert (a["best_pass1_baseline"], a["best_passk_method"]) == ("grpo", "pkpo_k4")
    want = float(np.mean(pass_at_k(n, per[("pkpo_k4", 0)], 4) - pass_at_k(n, per[("grpo", 0)], 4)))
    assert a["comparison"][4]["mean"] == pytest.approx(want) and want > 0.2
    assert a["comparison"][1]["mean"] == pytest.approx(0.0, abs=1e-12)
    v = ex.verdict(a)
    assert v["pass_at_k_ahead"] and v["pass1_within"] and v["ok"]
    path = ex.write_report(spec, planner, oc, a, ["exp.yaml"])
    text = path.read_text()
    assert "all three: yes" in text and "| pass@4 |" in text
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["k"] == 4 and summary["seeds"] == [0, 1]
    assert summary["best_passk_method"] == "pkpo_k4" and summary["best_pass1_baseline"] == "grpo"
    assert len(summary["diff_at_k"]) == 3 and summary["diff_at_k"][1] <= summary["diff_at_k"][0] <= summary["diff_at_k"][2]
    assert set(summary["methods"]["grpo"]) >= {"pass@1", "pass@4", "pass@8"}
    for png in ("pass_at_k.png", "pareto.png", "training.png"):
        assert (path.parent / png).stat().st_size > 1000


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="")
    p = _write(tmp_path, _small(tmp_path))
    r = subprocess.run([sys.executable, "-m", "passk_rl.experiment", str(p), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "grpo-lr0.0003-s0" in r.stdout and "python -m passk_rl.launch" in r.stdout
    assert not (tmp_path / "runs").exists()
    bad = subprocess.run([sys.executable, "-m", "passk_rl.experiment", str(p), "--dry-run", "--set",
                          "generator.n=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "experiment error" in bad.stderr


# ------------------------------------------------------------------------------------------ real pipeline
@pytest.mark.slow
@pytest.mark.e2e
def test_a_small_experiment_end_to_end_and_resumed(tmp_path):
    """Two methods, a two-rate grid, two seeds, two steps each, through the real launch; then a second invocation
    reuses every run and evaluation (nothing retrained) and writes the same summary."""
    env = dict(os.environ, RAY_ADDRESS="")
    p = _write(tmp_path, _small(tmp_path))
    cmd = [sys.executable, "-m", "passk_rl.experiment", str(p)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["best_pass1_baseline"] == "grpo" and summary["best_passk_method"] == "pkpo_k4"
    assert set(summary["methods"]) == {"grpo", "pkpo_k4"}
    runs = sorted(d.name for d in (tmp_path / "runs").iterdir() if (d / "final_model").is_dir())
    assert len(runs) == 2 + 2 + 1  # grpo: 2 rates at seed 0 + seed 1; pkpo_k4: both seeds at grpo's rate
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert again.returncode == 0 and "0 to train" in again.stdout and "0 to evaluate" in again.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["diff_at_k"] == summary["diff_at_k"]
