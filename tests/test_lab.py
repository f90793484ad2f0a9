"""Tests of the exact policy-gradient lab (passk_rl.lab): enumeration, Monte-Carlo agreement, and a quick run."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from passk_rl.lab import core
from passk_rl.lab.budget import make_budget
from passk_rl.lab.ci import mean_ci, t_quantile
from passk_rl.lab.env import EnvConfig, Population, pass_at_k_exact
from passk_rl.lab.exact import advantage_table, geometry_terms, grad_moments, pass_k_slope, uniform_geometry
from passk_rl.lab.theory import Variant, exact_drift, find_variant, mc_drift
from passk_rl.lab.train import Method, train


def test_t_quantiles_match_tables():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert t_quantile(0.975, 29) == pytest.approx(2.0452, abs=1e-3)
    assert mean_ci([1.0, 2.0, 3.0, 4.0])["half"] == pytest.approx(3.1824 * 1.2910 / 2, rel=1e-3)


def test_rloo_drift_is_exactly_one_and_pkpo_matches_pass_at_k_gradient():
    p = np.array([1e-4, 0.03, 0.3, 0.7, 0.95])
    D = exact_drift(Variant("rloo", "rloo", "group"), n=8, k=1, p=p)
    np.testing.assert_allclose(D, 1.0, rtol=1e-12)
    for k in (2, 4, 8):
        D = exact_drift(Variant("pkpo", "pkpo_loo_minus_one", "group"), n=8, k=k, p=p)
        np.testing.assert_allclose(D, pass_k_slope(p, k), rtol=1e-9)


def test_enumerated_drift_matches_the_core_expected_gain():
    """Two independent implementations of gain_n(p) (lab's vectorised one and the core's) agree."""
    from passk_rl import shaping

    p = np.array([0.003, 0.2, 0.7])
    for name, k, src in (("passk_alpha", 4, "group"), ("passk_grpo", 4, "oracle"), ("grpo", 1, "group"),
                         ("passk_analytic", 4, "group"), ("log_passk", 16, "oracle")):
        D = exact_drift(Variant(name, name, src), n=16, k=k, p=p)
        ref = [shaping.expected_gain(name, 16, float(q), k=k, oracle_p_hat=(src == "oracle")) for q in p]
        np.testing.assert_allclose(D, ref, rtol=1e-9, atol=1e-12)


def test_unbiased_shaping_mc_bias_contains_zero_and_plugin_bias_does_not():
    """Sampled answers: PKPO's measured bias vs ∇pass@K has a CI containing 0; the seed's plug-in α_K at n=8
    does not (it is biased), and both MC means agree with the exact enumeration."""
    n, k, p = 8, 4, 0.2
    slope = float(pass_k_slope(np.array([p]), k)[0])
    unb = mc_drift(find_variant("pkpo_loo_minus_one"), n=n, k=k, p=p, groups=20000, seed=1)
    ci = mean_ci(unb - slope)
    assert ci["lo"] <= 0.0 <= ci["hi"], ci
    plug = mc_drift(find_variant("passk_alpha"), n=n, k=k, p=p, groups=20000, seed=2)
    ci2 = mean_ci(plug - slope)
    assert ci2["lo"] > 0.0 or ci2["hi"] < 0.0, ci2
    ex = float(exact_drift(find_variant("passk_alpha"), n=n, k=k, p=np.array([p]))[0])
    c3 = mean_ci(plug)
    assert c3["lo"] <= ex <= c3["hi"]


def test_exact_gradient_variance_matches_monte_carlo():
    n, p, M = 6, 0.3, 6
    pi, mask = uniform_geometry(p, n_answers=M, n_correct=2)
    fn = core.shape_fn("grpo", k=1)
    Ap, Am = advantage_table(fn, n)
    ex = grad_moments(Ap, Am, geometry_terms(pi, mask), n)
    rng = np.random.default_rng(0)
    ys = rng.choice(M, size=(40000, n), p=pi)
    A = fn(mask[ys].astype(float), None)
    g = (A[:, :, None] * (np.eye(M)[ys] - pi)).mean(axis=1)
    var_mc = ((g - g.mean(0)) ** 2).sum(1).mean()
    assert var_mc == pytest.approx(ex["var"], rel=0.03)
    np.testing.assert_allclose(g.mean(0), ex["drift"] * pi * (mask - p), atol=4e-3)


def test_population_sampling_frequencies_and_initial_success():
    cfg = EnvConfig(n_prompts=4, n_answers=5, n_correct=1, policy="tabular")
    pop = Population(cfg, seed=3, p0=np.array([0.1, 0.3, 0.5, 0.9]))
    pi = pop.probs(pop.init_params())
    np.testing.assert_allclose(pop.success(pi), [0.1, 0.3, 0.5, 0.9], rtol=1e-9)
    ans, rew = pop.sample(pi, 20000, np.random.default_rng(0))
    freq = np.stack([np.bincount(a, minlength=5) for a in ans]) / 20000
    np.testing.assert_allclose(freq, pi, atol=0.012)
    np.testing.assert_allclose(rew.mean(1), [0.1, 0.3, 0.5, 0.9], atol=0.012)
    assert pass_at_k_exact(np.array([0.5]), [1, 2])[2] == pytest.approx(0.75)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="difficulty"):
        EnvConfig(difficulty="nope")
    with pytest.raises(ValueError, match="p_hat"):
        Method("x", "grpo", p_hat="sometimes")
    with pytest.raises(ValueError, match="unknown shaping"):
        core.shape_fn("not_a_shaping", k=1)
    from passk_rl.lab.experiments import run

    with pytest.raises(ValueError, match="unknown experiment"):
        run("phase9", quick=True)


def test_exact_training_with_pass_at_k_shaping_raises_pass_at_k(tmp_path):
    """Exact-expectation training on a tabular population increases the targeted pass@K monotonically."""
    cfg = EnvConfig(n_prompts=16, n_answers=8, policy="tabular")
    pop = Population(cfg, seed=0)
    h = train(pop, Method("pkpo@4", "pkpo_loo_minus_one", k=4), steps=40, n=8, lr=0.05, seed=0, mode="exact",
              eval_every=5, ks=(4,))
    v = np.array(h["train"][4])
    assert v[-1] > v[0] + 0.05
    assert np.all(np.diff(v) > -1e-9)


def test_quick_bias_report_numbers(tmp_path):
    """A quick bias run writes report + json whose numbers show the unbiased/plug-in split."""
    from passk_rl.lab import theory

    b = dataclasses.replace(make_budget(True), seeds=2, mc_groups=8000, bias_ns=(8, 64), n_prompts=32)
    res = theory.exp_bias(str(tmp_path), b)
    mc = res["raw"]["mc"]
    assert mc["pkpo_loo_minus_one"]["bias_vs_declared"]["lo"] <= 0 <= mc["pkpo_loo_minus_one"]["bias_vs_declared"]["hi"]
    pl = mc["passk_alpha"]["bias_vs_declared"]
    assert pl["lo"] > 0 or pl["hi"] < 0
    assert all(v["exact_within_mc_ci"] for v in mc.values()) or sum(
        not v["exact_within_mc_ci"] for v in mc.values()) <= 1  # 95% intervals: allow one miss in 8
    assert any(f["claim"].startswith("'Optimal shaping'") for f in res["findings"])
    assert os.path.exists(tmp_path / "bias.png")


def test_shared_policy_shows_the_pass1_pass64_tradeoff():
    """Exact-expectation training on the shared-feature policy: targeting pass@1 wins pass@1 and targeting pass@64
    wins pass@64, on every environment seed (the trade-off Phase 2 measures)."""
    cfg = EnvConfig(n_prompts=48, n_answers=16, n_features=8)
    for s in range(2):
        pop = Population(cfg, seed=s)
        kw = dict(steps=60, n=64, lr=0.05, seed=0, mode="exact", eval_every=60, ks=(1, 64))
        a = train(pop, Method("rloo", "rloo"), **kw)["final"]["train"]
        b = train(pop, Method("pkpo@64", "pkpo_loo_minus_one", k=64), **kw)["final"]["train"]
        assert a[1] > b[1] + 0.1
        assert b[64] > a[64] + 0.1


def test_adaptive_schedule_is_driven_by_the_stats_estimator():
    """The seed's linear K(p̂) schedule gets the EMA estimator's global p̂ (warmed on the first batch, not its
    default) and K stays within [k_min, min(k_max, n)]."""
    from passk_rl import schedule

    cfg = EnvConfig(n_prompts=16, n_answers=8, policy="tabular")
    pop = Population(cfg, seed=0)
    m = Method("adaptive", "pkpo_loo_minus_one", stats="ema", schedule="linear",
               schedule_params=(("k_min", 1), ("k_max", 64), ("p_target", 0.5)))
    h = train(pop, m, steps=12, n=16, lr=0.05, seed=0, eval_every=1, ks=(1,))
    ks = [int(k) for k in h["k_used"][:-1]]
    assert all(1 <= k <= 16 for k in ks)
    ref = schedule.make_schedule("linear", k_min=1, k_max=64, p_target=0.5)
    for k, pg in zip(ks, h["p_global"][:-1]):
        assert k == ref.next(pg, step=0, n=16).k
    assert abs(h["p_global"][0] - 0.5) > 1e-6  # warmed estimate, not the estimator's default


def test_cli_complexity_quick_writes_report_and_json(tmp_path):
    """`python -m passk_rl.lab complexity --quick` end to end: report, plot and results.json; the samples needed for
    ε-optimal pass@K do not grow with K (Theorem 2's form predicts ×1.4e4 from K=1 to 64)."""
    import json

    import torch

    from passk_rl.lab.__main__ import main

    threads = torch.get_num_threads()  # the CLI pins torch to one thread; give the test process its setting back
    try:
        assert main(["complexity", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "report.md").read_text()
    assert "## Findings" in text and "complexity.png" in text
    res = json.loads((tmp_path / "results.json").read_text())["experiments"]["complexity"]["raw"]
    n1 = res["pkpo_loo_minus_one|K=1|p0=0.01|eps=0.05"]["ci"]["mean"]
    n64 = res["pkpo_loo_minus_one|K=64|p0=0.01|eps=0.05"]["ci"]["mean"]
    assert 0 < n64 < n1
    with pytest.raises(SystemExit):
        main(["phase9"])


# ------------------------------------------------------------------ issue 20: the keep-pass@1 phase and its parts
def test_reference_term_is_the_exact_kl_descent_direction_and_keeps_the_policy_near_its_start():
    """ref_term is −∂/∂logits of KL(π_ref‖π) (forward) and KL(π‖π_ref) (reverse), checked by finite differences; a
    run with the term ends closer to the initial policy than the same run without it."""
    from passk_rl.lab.env import softmax
    from passk_rl.lab.train import ref_term

    rng = np.random.default_rng(0)
    z, z0 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    pi, pi0 = softmax(z), softmax(z0)
    kls = {"forward": lambda q: (pi0 * (np.log(pi0) - np.log(q))).sum(1),
           "reverse": lambda q: (q * (np.log(q) - np.log(pi0))).sum(1)}
    for kind, kl in kls.items():
        fd = np.zeros_like(z)
        for j in range(5):
            e = np.zeros(5)
            e[j] = 1e-6
            fd[:, j] = (kl(softmax(z + e)) - kl(softmax(z - e))) / 2e-6
        np.testing.assert_allclose(ref_term(pi, pi0, kind), -fd, atol=1e-7)
    cfg = EnvConfig(n_prompts=16, n_answers=8, policy="tabular")
    pop = Population(cfg, seed=0)
    gained = {}
    for coef in (0.0, 0.5):
        h = train(pop, Method("rloo", "rloo", ref_coef=coef), steps=30, n=8, lr=0.05, seed=0, mode="exact",
                  eval_every=30, ks=(1,))
        gained[coef] = h["final"]["train"][1] - h["train"][1][0]
    assert gained[0.0] > 0.05
    assert 0 < gained[0.5] < gained[0.0]  # held back towards the start: less pass@1 gained than without the term
    with pytest.raises(ValueError, match="ref_kind"):
        Method("x", "rloo", ref_coef=0.1, ref_kind="sideways")


def test_per_prompt_k_in_the_lab_gives_each_prompt_the_k_of_its_own_p_hat():
    cfg = EnvConfig(n_prompts=24, n_answers=8, policy="tabular", difficulty="mixed")
    pop = Population(cfg, seed=1)
    m = Method("pp", "pkpo_loo", stats="ema", schedule="per_prompt", schedule_params=(("k_min", 1), ("k_max", 8)))
    h = train(pop, m, steps=10, n=16, lr=0.05, seed=0, eval_every=1, ks=(1, 8))
    ku = [float(k) for k in h["k_used"][:-1]]
    assert all(1.0 <= k <= 8.0 for k in ku)
    assert any(1.0 < k < 8.0 for k in ku)  # a mean over prompts with different Ks, not one global K
    assert h["final"]["train"][8] > h["train"][8][0]


def test_keep_verdicts_and_frontier_gap_on_synthetic_finals():
    from passk_rl.lab.keep import frontier_gap, frontier_position, verdicts

    seeds = 4
    off = np.array([0.0, 0.01, -0.01, 0.0])

    def pt(p1, p8, p32):
        return {1: p1 + off, 8: p8 + off, 32: p32 + off}

    fin = {"rloo": pt(0.5, 0.6, 0.7), "mix": pt(0.45, 0.65, 0.75), "pkpo@8": pt(0.35, 0.67, 0.8),
           "good": pt(0.49, 0.64, 0.79), "bad": pt(0.40, 0.61, 0.70)}
    init = {1: np.full(seeds, 0.2), 8: np.full(seeds, 0.5), 32: np.full(seeds, 0.72)}
    rows = {r["method"]: r for r in verdicts(fin, init, list(fin))}
    assert rows["good"]["all"] and rows["good"]["d8"]["mean"] == pytest.approx(0.04)
    assert not rows["mix"]["pass1_kept"] and rows["mix"]["pass8_ahead"]
    assert not rows["bad"]["pass32_kept"] and not rows["rloo"]["pass8_ahead"]
    front = ["rloo", "mix", "pkpo@8"]
    # frontier at pass@1 0.49: 0.7 + (0.01/0.05) * 0.05 = 0.71 -> good is 0.08 above, in every seed
    g = frontier_gap(fin, front, "good")
    assert g["mean"] == pytest.approx(0.08) and g["lo"] > 0
    assert frontier_position(fin, front, "good").startswith("outside")
    assert frontier_position(fin, front, "bad").startswith("inside")


def test_pareto_frontier_plot_and_gaps_on_synthetic_numbers(tmp_path):
    from passk_rl import plots

    def iv(x):
        return (x, x - 0.02, x + 0.02)

    points = {"rloo": (iv(0.30), iv(0.65)), "w75": (iv(0.26), iv(0.75)), "pkpo": (iv(0.19), iv(0.84)),
              "above": (iv(0.28), iv(0.78)), "below": (iv(0.22), iv(0.70)), "right": (iv(0.35), iv(0.60))}
    gaps = plots.frontier_gaps(points, ["pkpo", "rloo", "w75"])
    assert gaps["above"]["gap"] == pytest.approx(0.78 - 0.70) and gaps["above"]["side"] == "within"
    # below: between pkpo (0.19, 0.84) and w75 (0.26, 0.75) at 0.22 -> 0.84 - 0.09 * 3/7
    assert gaps["below"]["gap"] == pytest.approx(0.70 - (0.84 - 0.09 * 3 / 7))
    assert gaps["right"]["gap"] is None and gaps["right"]["side"] == "right"
    assert set(gaps) == {"above", "below", "right"}
    seeds = {"rloo": [(0.3, 0.65), (0.31, 0.66)], "w75": [(0.26, 0.75), (0.25, 0.76)],
             "pkpo": [(0.19, 0.84), (0.2, 0.83)], "above": [(0.28, 0.78), (0.27, 0.8)]}
    g2 = plots.frontier_gaps(points, ["rloo", "w75", "pkpo"], seeds)
    assert g2["above"]["seed_gaps"][0] == pytest.approx(0.78 - 0.70)
    # seed 1: x = 0.27 lies between w75 (0.25, 0.76) and rloo (0.31, 0.66) of that seed's own frontier
    assert g2["above"]["seed_gaps"][1] == pytest.approx(0.8 - (0.76 + (0.66 - 0.76) * (0.27 - 0.25) / (0.31 - 0.25)))
    assert g2["below"]["seed_gaps"] is None  # no per-seed points for it
    path = plots.plot_pareto_frontier(points, ["rloo", "w75", "pkpo"], tmp_path / "f.png", k=32, base=(0.15, 0.83),
                                      seed_points=seeds)
    assert path.is_file() and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="frontier"):
        plots.frontier_gaps(points, ["rloo"])
    with pytest.raises(ValueError, match="missing"):
        plots.frontier_gaps(points, ["rloo", "nope"])


def test_frontier_section_for_the_experiment_report(tmp_path):
    """The hook experiment.write_report calls: a figure and one row per non-frontier method, with a seed interval
    when the method shares the frontier's seeds."""
    from passk_rl import plots

    def row(label, seeds, p1, p32):
        def iv(xs):
            m = float(np.mean(xs))
            return {"mean": m, "lo": m - 0.02, "hi": m + 0.02, "per_seed": list(xs)}
        return {"label": label, "seeds": seeds, "k": {1: iv(p1), 32: iv(p32)}}

    s5 = [0, 1, 2, 3, 4]
    a = {"big_k": 32, "base": {1: {"mean": 0.15}, 32: {"mean": 0.83}},
         "methods": {"rloo": row("rloo", s5, [0.30, 0.31, 0.29, 0.30, 0.30], [0.65] * 5),
                     "pkpo_k8": row("pkpo_k8", s5, [0.19] * 5, [0.84] * 5),
                     "rs": row("rs", s5, [0.28, 0.29, 0.27, 0.28, 0.28], [0.79, 0.80, 0.78, 0.79, 0.80]),
                     "one": row("one", [0], [0.25], [0.60])}}
    lines = plots.frontier_section(a, ["rloo", "pkpo_k8"], tmp_path)
    assert (tmp_path / "pareto_frontier.png").is_file()
    text = "\n".join(lines)
    rs_line = next(line for line in lines if line.startswith("| rs |"))
    assert "outside" in rs_line and "[" in rs_line  # a seed interval, entirely above 0
    one_line = next(line for line in lines if line.startswith("| one |"))
    assert "inside" in one_line and "| — |" in one_line  # one seed: no interval
    assert "pareto_frontier.png" in text


def test_keep_pass1_experiment_file_resolves_every_run_and_names_its_frontier(tmp_path):
    from passk_rl.experiment import ExperimentError, Planner, load_experiment

    spec = load_experiment("configs/experiments/passk_keep_pass1.yaml")
    assert spec.frontier[0] == "rloo" and spec.frontier[-1] == "pkpo_k8"
    planner = Planner(spec)
    runs = planner.check_all()
    shapings = {r.cfg.algorithm.shaping for r in runs}
    assert {"rs_grpo", "w_reinforce", "pkpo_loo", "multi_k", "rloo"} <= shapings
    kinds = {r.cfg.schedule.kind for r in runs}
    assert {"two_stage", "per_prompt"} <= kinds
    assert {r.cfg.run.steps for r in runs} == {55, 150}
    import yaml

    raw = yaml.safe_load(open("configs/experiments/passk_keep_pass1.yaml"))
    raw["frontier"] = ["rloo", "nope"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ExperimentError, match="frontier: unknown method 'nope'"):
        load_experiment(bad)
