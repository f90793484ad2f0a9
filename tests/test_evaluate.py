"""The evaluation pipeline (passk_rl.evaluation: pass@k curves with intervals, paired differences over problems and
training seeds), the model resolver, plots, the CLI's argument checks, and evaluations through the real generator
(vLLM CPU engine) and verifier pools."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from passk_rl import evaluate as ev
from passk_rl import evaluation
from passk_rl.models.resolve import ResolvedModel, resolve_model
from passk_rl.plots import plot_pareto, plot_pass_at_k, plot_run

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rho(n: int, c: int, k: int) -> float:
    """pass@k of one problem from exact integer binomials (independent of the estimator module)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _is_png(path) -> bool:
    p = Path(path)
    return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


def _rec(n, counts, ids=None):
    return {"n": n, "counts": [int(c) for c in counts], "prompt_ids": ids or [f"p{i}" for i in range(len(counts))]}


def _curve(n, counts, ks, **kw):
    return {"pass_at_k": evaluation.curve([_rec(n, counts)], ks, **kw)}


# ------------------------------------------------------------------------------------------ pipeline
def test_curve_equals_estimator_on_known_counts():
    assert _rho(8, 2, 4) == pytest.approx(0.785714, abs=1e-6)
    d = _curve(8, [2, 2, 2], [1, 4, 8])["pass_at_k"]
    assert d["4"]["mean"] == pytest.approx(0.785714, abs=1e-6)
    assert d["1"]["mean"] == pytest.approx(0.25)
    assert d["8"]["mean"] == pytest.approx(1.0)
    counts = [0, 2, 8, 5, 1]
    d = _curve(8, counts, [1, 2, 4, 8])["pass_at_k"]
    for k in (1, 2, 4, 8):
        assert d[str(k)]["mean"] == pytest.approx(np.mean([_rho(8, c, k) for c in counts]), abs=1e-12)
    with pytest.raises(ValueError, match="pass@16 cannot be estimated from n=8"):
        evaluation.curve([_rec(8, counts)], [16])


def test_cis_contain_the_mean_and_shrink_with_more_problems():
    rng = np.random.default_rng(0)
    n, ks = 32, [1, 4, 16, 32]
    p = rng.beta(0.7, 2.0, size=2000)
    counts = rng.binomial(n, p)
    small = _curve(n, counts[:25], ks, n_boot=2000)["pass_at_k"]
    large = _curve(n, counts, ks, n_boot=2000)["pass_at_k"]
    for k in ks:
        for d in (small, large):
            v = d[str(k)]
            assert v["lo"] <= v["mean"] <= v["hi"]
            assert 0.0 <= v["lo"] and v["hi"] <= 1.0
        w_small = small[str(k)]["hi"] - small[str(k)]["lo"]
        w_large = large[str(k)]["hi"] - large[str(k)]["lo"]
        assert w_large < 0.5 * w_small  # 80x the problems: ~9x narrower in theory


def test_paired_differences_over_problems_and_seeds():
    """One pipeline for the trainer's base → final change, the CLI's change against the first model and the
    experiment's method differences: paired over problems (and seeds), pooled over seeds by their mean."""
    rng = np.random.default_rng(2)
    n, p = 16, 300
    base = rng.binomial(n, 0.2, size=p)
    seeds = [np.clip(base + rng.integers(0, 4, size=p), 0, n) for _ in range(3)]
    rb, rs = _rec(n, base), [_rec(n, c) for c in seeds]
    # the same model against itself: exactly zero, with a zero-width interval
    same = evaluation.change(_curve(n, base, [1, 4]) | rb, _curve(n, base, [1, 4]) | rb)
    assert set(same) == {"1", "4"} and all(v == {"mean": 0.0, "lo": 0.0, "hi": 0.0} for v in same.values())
    # every seed against one base: the mean of the per-seed mean differences, an interval around it, t beside it
    d = evaluation.difference(rs, [rb], 4, n_boot=500)
    want = np.mean([np.mean([_rho(n, a, 4) - _rho(n, b, 4) for a, b in zip(c, base)]) for c in seeds])
    assert d.mean == pytest.approx(want, abs=1e-12) and d.seeds == 3 and d.problems == p
    assert d.lo <= d.mean <= d.hi and d.t_lo <= d.mean <= d.t_hi and d.lo > 0  # every seed improved every problem
    # pairing: the change's interval is narrower than either model's own interval over problems
    one = evaluation.difference(rs[:1], [rb], 4, n_boot=500)
    own = evaluation.interval(rs[:1], 4, n_boot=500)
    assert one.hi - one.lo < 0.8 * (own.hi - own.lo)
    # pooling over seeds: a method's mean is the mean of its seeds' means
    pooled = evaluation.interval(rs, 1, n_boot=200)
    assert pooled.mean == pytest.approx(np.mean([np.mean(c) / n for c in seeds]), abs=1e-12)
    assert len(pooled.per_seed) == 3 and "t_lo" in evaluation.as_dict(pooled)
    with pytest.raises(ValueError, match="same problems"):
        evaluation.difference([_rec(n, base[:-1])], [rb], 1)
    with pytest.raises(ValueError, match="3 records after but 2 before"):
        evaluation.difference(rs, rs[:2], 1)


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


def test_resolve_model_kinds(tmp_path, monkeypatch):
    from passk_rl.tasks.make_base import BUILTIN_DIR

    assert resolve_model("builtin:arith-base").path == str(BUILTIN_DIR)
    with pytest.raises(ValueError, match="model.path: unknown built-in model 'builtin:nope'.*builtin:arith-base"):
        resolve_model("builtin:nope", key="model.path")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model(str(hf)) == ResolvedModel(str(hf.resolve()))
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {seed: 0}\n")
    with pytest.raises(FileNotFoundError, match="final_model"):
        resolve_model(str(run))
    (run / "final_model" / "config.json").write_text("{}")
    got = resolve_model(str(run))
    assert (got.path, got.run_dir) == (str((run / "final_model").resolve()), str(run.resolve()))
    with pytest.raises(FileNotFoundError, match="neither an HF model directory"):
        resolve_model(str(tmp_path))
    # a name that is not on disk: a hub id only where the caller allows the hub and the hub is reachable
    with pytest.raises(FileNotFoundError, match="--model: 'org/model': no such directory"):
        resolve_model("org/model", key="--model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("org/model", hub=True).path == "org/model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot be fetched offline"):
        resolve_model("org/model", hub=True)
    refs = ev.resolve_models([str(hf), str(hf)])
    assert [r.label for r in refs] == ["hf", "hf-2"]
    with pytest.raises(ValueError, match="one label per model"):
        ev.resolve_models([str(hf)], ["a", "b"])


# ----------------------------------------------------------------------------------------------- plots
def test_plots_are_written(tmp_path):
    a = _curve(16, [1, 3, 0, 16, 5], [1, 2, 4, 8, 16])
    b = _curve(16, [4, 6, 0, 16, 9], [1, 2, 4, 8, 16])
    p = plot_pass_at_k({"a": a, "b": b}, tmp_path / "sub" / "curves.png", title="t")
    assert _is_png(p)
    pts = {lab: tuple((c["pass_at_k"][k]["mean"], c["pass_at_k"][k]["lo"], c["pass_at_k"][k]["hi"]) for k in ("1", "16"))
           for lab, c in (("a", a), ("b", b))}
    assert _is_png(plot_pareto(pts, tmp_path / "pareto.png", k=16))
    with pytest.raises(ValueError):
        plot_pass_at_k({}, tmp_path / "x.png")


def test_plot_run_writes_both_figures(tmp_path):
    n, p, k = 64, 200, 4
    rng = np.random.default_rng(1)
    d = tmp_path / "run"
    (d / "eval").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "run", "seed": 0, "steps": 3},
                                                   "algorithm": {"shaping": "pkpo_loo_minus_one"},
                                                   "schedule": {"kind": "fixed", "params": {"k": k}}}))
    evals = {}
    for step, q in ((0, 0.05), (3, 0.1)):
        rec = _rec(n, rng.binomial(n, q, size=p))
        evals[step] = {"pass_at_k": evaluation.curve([rec], [1, 2, 4, 8, 16, 32, 64], n_boot=200), **rec,
                       "num_prompts": p, "step": step}
        (d / "eval" / f"step_{step:06d}.json").write_text(json.dumps(evals[step]))
    (d / "summary.json").write_text(json.dumps({"run": "run", "base_eval": evals[0], "final_eval": evals[3]}))
    rows = [{"step": s, "k": k, "k_requested": k, "p_hat_global": 0.1 * s, "reward_mean": 0.2 + 0.01 * s,
             "pass@1": 0.2, "pass@4": 0.4} for s in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    paths = plot_run(d)
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


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """A copy of the built-in model with noise on every weight (another model of the same architecture)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from passk_rl.tasks.make_base import BUILTIN_DIR

    other = tmp_path_factory.mktemp("models") / "perturbed"
    shutil.copytree(BUILTIN_DIR, other)
    sd = load_file(str(other / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    return other


N_EVAL, PROMPTS_EVAL = 8, 12


@pytest.fixture(scope="module")
def shared_engine(ray_local, perturbed, tmp_path_factory):
    """One evaluate_models call on one engine: the base, the perturbed model loaded in place, the base again."""
    out = tmp_path_factory.mktemp("shared")
    res = ev.evaluate_models(["builtin:arith-base", str(perturbed), "builtin:arith-base"],
                             labels=["base", "perturbed", "base-again"], task="arith", split="test",
                             num_prompts=PROMPTS_EVAL, n=N_EVAL, ks=[1, 2, 4, 8], seed=3, n_boot=200,
                             keep_samples=True, out_dir=out)
    return res, out


@pytest.mark.e2e
def test_real_pools_counts_match_verdicts(ray_local, shared_engine):
    from passk_rl.tasks import make_task

    results, out = shared_engine
    res, n = results["base"], N_EVAL
    assert ray_local.is_initialized()  # the caller's cluster was reused, not shut down
    saved = json.loads((out / "base.json").read_text())
    assert saved["counts"] == res["counts"] and _is_png(out / "pass_at_k.png")

    counts, samples = res["counts"], res["samples"]
    assert len(counts) == PROMPTS_EVAL and len(samples) == PROMPTS_EVAL
    assert all(0 <= c <= n for c in counts) and all(len(g) == n for g in samples)
    rewards = np.array([[s["reward"] for s in g] for g in samples])
    assert sum(counts) == int((rewards >= 1.0).sum())
    assert counts == [int((row >= 1.0).sum()) for row in rewards]
    assert sum(res["verifier_status"].values()) == n * PROMPTS_EVAL
    # Binary rewards: pass@1 is the mean reward; every other k follows from the counts.
    assert res["pass_at_k"]["1"]["mean"] == pytest.approx(res["reward_mean"], abs=1e-12)
    assert res["pass_at_k"]["1"]["mean"] == pytest.approx(rewards.mean(), abs=1e-12)
    for k in (2, 4, 8):
        assert res["pass_at_k"][str(k)]["mean"] == pytest.approx(np.mean([_rho(n, c, k) for c in counts]), abs=1e-12)
    # The pool's verdicts agree with the task's own verifier run here, in the test process.
    task = make_task("arith")
    prompts = task.prompts("test")[:PROMPTS_EVAL]
    assert res["prompt_ids"] == [p.id for p in prompts]
    local = [[task.verify(p, s["text"]).reward for s in g] for p, g in zip(prompts, samples)]
    assert np.array_equal(np.array(local), rewards)
    # summary.json: every model's paired change against the first one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["change_vs"] == "base" and set(summary["change"]) == {"perturbed", "base-again"}
    assert all(v["mean"] == v["lo"] == v["hi"] == 0.0 for v in summary["change"]["base-again"].values())
    for k, v in summary["change"]["perturbed"].items():
        want = results["perturbed"]["pass_at_k"][k]["mean"] - res["pass_at_k"][k]["mean"]
        assert v["mean"] == pytest.approx(want, abs=1e-12) and v["lo"] <= v["mean"] <= v["hi"]


@pytest.mark.e2e
def test_one_engine_with_weights_swapped_in_place_samples_like_fresh_engines(ray_local, shared_engine, perturbed,
                                                                              tmp_path):
    """evaluate_models loads each next model into the running engine (the validated reload of a training sync)
    instead of starting a new engine: the samples must be exactly those of a fresh engine on that model, and
    loading the first model back must give its samples again."""
    shared, _ = shared_engine
    fresh = ev.evaluate_models([str(perturbed)], labels=["perturbed"], task="arith", split="test",
                               num_prompts=PROMPTS_EVAL, n=N_EVAL, ks=[1, 8], seed=3, n_boot=50, plot=False,
                               out_dir=tmp_path / "fresh", share_engine=False)
    assert shared["perturbed"]["counts"] == fresh["perturbed"]["counts"]
    assert shared["base-again"]["counts"] == shared["base"]["counts"]
    assert shared["perturbed"]["counts"] != shared["base"]["counts"]  # the swap really changed the weights
