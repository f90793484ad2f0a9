"""Evaluation tooling: pass@k curves with CIs, plots, run comparison with its verdict, the CLI's argument checks,
and evaluations through the real generator (vLLM CPU engine) and verifier pools."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from passk_rl import evaluate as ev
from passk_rl.plots import plot_pareto, plot_pass_at_k, plot_run

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rho(n: int, c: int, k: int) -> float:
    """pass@k of one problem from exact integer binomials (independent of the estimator module)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _is_png(path) -> bool:
    p = Path(path)
    return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------ curve_dict
def test_curve_equals_estimator_on_known_counts():
    assert _rho(8, 2, 4) == pytest.approx(0.785714, abs=1e-6)
    d = ev.curve_dict(8, [2, 2, 2], [1, 4, 8])["pass_at_k"]
    assert d["4"]["mean"] == pytest.approx(0.785714, abs=1e-6)
    assert d["1"]["mean"] == pytest.approx(0.25)
    assert d["8"]["mean"] == pytest.approx(1.0)
    counts = [0, 2, 8, 5, 1]
    d = ev.curve_dict(8, counts, [1, 2, 4, 8])["pass_at_k"]
    for k in (1, 2, 4, 8):
        assert d[str(k)]["mean"] == pytest.approx(np.mean([_rho(8, c, k) for c in counts]), abs=1e-12)


def test_cis_contain_the_mean_and_shrink_with_more_problems():
    rng = np.random.default_rng(0)
    n, ks = 32, [1, 4, 16, 32]
    p = rng.beta(0.7, 2.0, size=2000)
    counts = rng.binomial(n, p)
    small = ev.curve_dict(n, counts[:25], ks, n_boot=2000)["pass_at_k"]
    large = ev.curve_dict(n, counts, ks, n_boot=2000)["pass_at_k"]
    for k in ks:
        for d in (small, large):
            v = d[str(k)]
            assert v["lo"] <= v["mean"] <= v["hi"]
            assert 0.0 <= v["lo"] and v["hi"] <= 1.0
        w_small = small[str(k)]["hi"] - small[str(k)]["lo"]
        w_large = large[str(k)]["hi"] - large[str(k)]["lo"]
        assert w_large < 0.5 * w_small  # 80x the problems: ~9x narrower in theory


def test_parse_and_check_ks():
    assert ev.parse_ks("4, 1,2,4") == [1, 2, 4]
    with pytest.raises(ValueError, match="'x' is not an integer"):
        ev.parse_ks("1,x")
    with pytest.raises(ValueError, match="k=0"):
        ev.parse_ks([0, 1])
    with pytest.raises(ValueError, match="k=16 exceeds n=8"):
        ev.check_ks(8, [1, 16])


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_rejects_k_above_n_and_missing_model_before_starting(tmp_path, capsys):
    import ray

    rc = ev.main(["--model", "builtin:arith-base", "--n", "8", "--k", "1,4,16", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "k=16 exceeds n=8" in capsys.readouterr().err
    missing = tmp_path / "no_such_model"
    rc = ev.main(["--model", str(missing), "--n", "8", "--k", "1,4", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_resolve_model_kinds(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert ev.resolve_model(str(hf)) == (str(hf.resolve()), None)
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {seed: 0}\n")
    with pytest.raises(FileNotFoundError, match="final_model"):
        ev.resolve_model(str(run))
    (run / "final_model" / "config.json").write_text("{}")
    assert ev.resolve_model(str(run)) == (str((run / "final_model").resolve()), str(run.resolve()))
    with pytest.raises(FileNotFoundError, match="neither an HF model directory"):
        ev.resolve_model(str(tmp_path))
    refs = ev.resolve_models([str(hf), str(hf)])
    assert [r.label for r in refs] == ["hf", "hf-2"]
    with pytest.raises(ValueError, match="one label per model"):
        ev.resolve_models([str(hf)], ["a", "b"])


# ----------------------------------------------------------------------------------------------- plots
def test_plots_are_written(tmp_path):
    a = ev.curve_dict(16, [1, 3, 0, 16, 5], [1, 2, 4, 8, 16])
    b = ev.curve_dict(16, [4, 6, 0, 16, 9], [1, 2, 4, 8, 16])
    p = plot_pass_at_k({"a": a, "b": b}, tmp_path / "sub" / "curves.png", title="t")
    assert _is_png(p)
    pts = {lab: tuple((c["pass_at_k"][k]["mean"], c["pass_at_k"][k]["lo"], c["pass_at_k"][k]["hi"]) for k in ("1", "16"))
           for lab, c in (("a", a), ("b", b))}
    assert _is_png(plot_pareto(pts, tmp_path / "pareto.png", k=16))
    with pytest.raises(ValueError):
        plot_pass_at_k({}, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------- compare
N, P = 64, 200
IDS = [f"p{i}" for i in range(P)]


def _eval_from_counts(counts, step):
    d = ev.curve_dict(N, counts, [1, 2, 4, 8, 16, 32, 64], n_boot=500)
    d.update(n=N, num_prompts=len(counts), counts=[int(c) for c in counts], prompt_ids=IDS, step=step)
    return d


def _write_run(root: Path, name: str, shaping: str, k: int, seed: int, counts, base_counts, *, with_counts=True):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"run": {"name": name, "seed": seed, "steps": 3}, "algorithm": {"shaping": shaping},
           "schedule": {"kind": "fixed", "params": {"k": k}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    base, final = _eval_from_counts(base_counts, 0), _eval_from_counts(counts, 3)
    if not with_counts:
        for e in (base, final):
            del e["counts"], e["prompt_ids"]
    (d / "summary.json").write_text(json.dumps({"run": name, "base_eval": base, "final_eval": final}))
    rows = [{"step": s, "k": k, "k_requested": k, "p_hat_global": 0.1 * s, "reward_mean": 0.2 + 0.01 * s,
             "pass@1": 0.2, "pass@4": 0.4} for s in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval").mkdir()
    (d / "eval" / "step_000000.json").write_text(json.dumps(base))
    (d / "eval" / "step_000003.json").write_text(json.dumps(final))
    return d


def _synthetic_runs(root: Path, *, with_counts=True):
    """Constructed so the winners are known: "sharp" (rloo, K=1) solves half the problems always and the rest never
    (pass@k = 0.5 for all k); "broad16" (pkpo K=16) solves each problem with c = 4 of 64 (pass@1 = 0.0625,
    pass@16 ≈ 0.69); "weak4" (pkpo K=4) has c = 1 (pass@4 = 0.0625)."""
    rng = np.random.default_rng(1)
    half = np.where(np.arange(P) % 2 == 0, N, 0)
    base = rng.binomial(N, 0.05, size=P)
    jitter = half.copy()
    jitter[1] = 2  # seed 1 differs a little from seed 0
    return [
        _write_run(root, "sharp-s0", "rloo", 1, 0, half, base, with_counts=with_counts),
        _write_run(root, "sharp-s1", "rloo", 1, 1, jitter, base, with_counts=with_counts),
        _write_run(root, "broad16-s0", "pkpo_loo_minus_one", 16, 0, np.full(P, 4), base, with_counts=with_counts),
        _write_run(root, "weak4-s0", "pkpo_loo_minus_one", 4, 0, np.full(P, 1), base, with_counts=with_counts),
    ]


def test_compare_tables_plots_and_verdict(tmp_path):
    runs = _synthetic_runs(tmp_path / "runs")
    res = ev.compare(runs, tmp_path / "cmp", ks=[1, 4, 16, 64], verdict_ks=[1, 4, 16], n_boot=500)
    for key in ("pass_at_k_plot", "pareto_plot"):
        assert _is_png(res["paths"][key])
    table = Path(res["paths"]["table"]).read_text()
    assert table == res["table"]
    for label in ("rloo", "pkpo_loo_minus_one K=16", "pkpo_loo_minus_one K=4", "base model", "sharp-s1"):
        assert label in table
    assert json.loads(Path(res["paths"]["json"]).read_text())["order"] == res["order"]
    assert res["paired"]

    # Pooling over seeds: the method's mean is the mean of its runs' means.
    m = res["methods"]["rloo"]
    assert m["seeds"] == [0, 1] and m["target_k"] == 1
    runs_means = [r["pass_at_k"]["4"]["mean"] for r in res["runs"] if r["method"] == "rloo"]
    assert m["pass_at_k"]["4"]["mean"] == pytest.approx(np.mean(runs_means), abs=1e-12)
    assert m["pass_at_k"]["16"]["lo"] <= m["pass_at_k"]["16"]["mean"] <= m["pass_at_k"]["16"]["hi"]
    expected16 = _rho(N, 4, 16)
    assert res["methods"]["pkpo_loo_minus_one K=16"]["pass_at_k"]["16"]["mean"] == pytest.approx(expected16)

    v = {x["k"]: x for x in res["verdicts"]}
    assert v[1]["best"] == "rloo" and v[1]["best_is_matched"] and v[1]["outcome"] == "supported"
    assert v[16]["best"] == "pkpo_loo_minus_one K=16" and v[16]["outcome"] == "supported"
    assert v[16]["gap"]["lo"] > 0
    # At k=4 the K=4 method is far behind a K=1 method: the hypothesis is contradicted there.
    assert v[4]["best"] == "rloo" and not v[4]["best_is_matched"]
    assert v[4]["top_matched"] == "pkpo_loo_minus_one K=4" and v[4]["outcome"] == "contradicted"
    assert v[4]["gap"]["hi"] < 0
    # Per-seed winners only over seeds every method ran (seed 1 has rloo alone).
    assert v[1]["per_seed_winner"] == {"0": "rloo"}
    assert v[16]["per_seed_winner"] == {"0": "pkpo_loo_minus_one K=16"}
    assert "contradicted" in table and "supported" in table


def test_compare_without_counts_falls_back_to_ci_overlap(tmp_path):
    runs = _synthetic_runs(tmp_path / "runs", with_counts=False)
    res = ev.compare(runs, tmp_path / "cmp", ks=[1, 4, 16], verdict_ks=[1, 4, 16], n_boot=200)
    assert not res["paired"]
    v = {x["k"]: x for x in res["verdicts"]}
    assert v[1]["best"] == "rloo" and v[1]["outcome"] == "supported" and v[1]["gap"] is None
    assert v[4]["outcome"] == "contradicted" and v[16]["outcome"] == "supported"


def test_verdict_is_inconclusive_within_noise(tmp_path):
    rng = np.random.default_rng(3)
    c = rng.binomial(N, 0.2, size=P)
    c2 = np.clip(c + rng.integers(-2, 3, size=P), 0, N)  # the same model up to small per-problem noise
    base = rng.binomial(N, 0.05, size=P)
    # Whichever is ahead on the numbers gets the K=4 label, so the best method is the matched one.
    hi, lo = (c2, c) if ev._per_problem({"n": N, "counts": c2}, 4).mean() > ev._per_problem({"n": N, "counts": c}, 4).mean() else (c, c2)
    runs = [_write_run(tmp_path, "a", "pkpo_loo_minus_one", 4, 0, hi, base),
            _write_run(tmp_path, "b", "rloo", 1, 0, lo, base)]
    res = ev.compare(runs, tmp_path / "cmp", ks=[4], verdict_ks=[4], n_boot=500)
    (v,) = res["verdicts"]
    assert v["best"] == "pkpo_loo_minus_one K=4" and v["best_is_matched"]
    assert v["outcome"] == "inconclusive" and v["gap"]["lo"] < 0 < v["gap"]["hi"]


def test_compare_rejects_duplicate_method_and_seed(tmp_path):
    base = np.zeros(P, dtype=int)
    runs = [_write_run(tmp_path, "a", "rloo", 1, 0, base, base), _write_run(tmp_path, "b", "rloo", 1, 0, base, base)]
    with pytest.raises(ValueError, match="both method 'rloo' with seed 0"):
        ev.compare(runs, tmp_path / "cmp")
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        ev.compare([tmp_path / "missing"], tmp_path / "cmp")


def test_plot_run_writes_both_figures(tmp_path):
    (run,) = _synthetic_runs(tmp_path / "runs")[:1]
    paths = plot_run(run)
    assert sorted(p.name for p in paths) == ["pass_at_k.png", "training.png"]
    assert all(_is_png(p) for p in paths)


# ------------------------------------------------------------------------ real generator and verifier pools
@pytest.fixture(scope="module")
def ray_local():
    import ray

    # A private local cluster (4 logical CPUs, no dashboard); retried if the raylet is slow to register.
    assert ev.init_local_ray(4), "a Ray cluster was already initialised in this process"
    yield ray
    ray.shutdown()


@pytest.mark.e2e
def test_real_pools_counts_match_verdicts(ray_local, tmp_path):
    from passk_rl.tasks import make_task

    n, num_prompts = 8, 8
    res = ev.evaluate_models(["builtin:arith-base"], labels=["base"], task="arith", split="test",
                             num_prompts=num_prompts, n=n, ks=[1, 2, 4, 8], seed=0, out_dir=tmp_path,
                             keep_samples=True, n_boot=200)["base"]
    assert ray_local.is_initialized()  # the caller's cluster was reused, not shut down
    saved = json.loads((tmp_path / "base.json").read_text())
    assert saved["counts"] == res["counts"] and _is_png(tmp_path / "pass_at_k.png")

    counts, samples = res["counts"], res["samples"]
    assert len(counts) == num_prompts and len(samples) == num_prompts
    assert all(0 <= c <= n for c in counts) and all(len(g) == n for g in samples)
    rewards = np.array([[s["reward"] for s in g] for g in samples])
    assert sum(counts) == int((rewards >= 1.0).sum())
    assert counts == [int((row >= 1.0).sum()) for row in rewards]
    assert sum(res["verifier_status"].values()) == n * num_prompts
    # Binary rewards: pass@1 is the mean reward; every other k follows from the counts.
    assert res["pass_at_k"]["1"]["mean"] == pytest.approx(res["reward_mean"], abs=1e-12)
    assert res["pass_at_k"]["1"]["mean"] == pytest.approx(rewards.mean(), abs=1e-12)
    for k in (2, 4, 8):
        assert res["pass_at_k"][str(k)]["mean"] == pytest.approx(np.mean([_rho(n, c, k) for c in counts]), abs=1e-12)
    # The pool's verdicts agree with the task's own verifier run here, in the test process.
    task = make_task("arith")
    prompts = task.prompts("test")[:num_prompts]
    assert res["prompt_ids"] == [p.id for p in prompts]
    local = [[task.verify(p, s["text"]).reward for s in g] for p, g in zip(prompts, samples)]
    assert np.array_equal(np.array(local), rewards)


@pytest.mark.e2e
def test_one_engine_with_weights_swapped_in_place_samples_like_fresh_engines(ray_local, tmp_path):
    """evaluate_models loads each next model into the running engine (the validated reload of a training sync)
    instead of starting a new engine: the samples must be exactly those of a fresh engine on that model, and
    loading the first model back must give its samples again."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from passk_rl.tasks.make_base import BUILTIN_DIR

    other = tmp_path / "perturbed"
    shutil.copytree(BUILTIN_DIR, other)
    sd = load_file(str(other / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    kw = dict(task="arith", split="test", num_prompts=12, n=8, ks=[1, 8], seed=3, n_boot=50, plot=False)
    shared = ev.evaluate_models(["builtin:arith-base", str(other), "builtin:arith-base"],
                                labels=["base", "perturbed", "base-again"], out_dir=tmp_path / "shared", **kw)
    fresh = ev.evaluate_models([str(other)], labels=["perturbed"], out_dir=tmp_path / "fresh", share_engine=False,
                               **kw)
    assert shared["perturbed"]["counts"] == fresh["perturbed"]["counts"]
    assert shared["base-again"]["counts"] == shared["base"]["counts"]
    assert shared["perturbed"]["counts"] != shared["base"]["counts"]  # the swap really changed the weights
