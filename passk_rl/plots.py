"""Figures for evaluations and runs (matplotlib, Agg backend: no display needed).

- ``plot_pass_at_k(curves, path)``: pass@k vs k (log2 x axis) for several models, 95 % bootstrap bands.
- ``plot_pareto(points, path, k=K)``: pass@1 vs pass@K per run/method, with error bars (the seed's phase 2 plot).
- ``plot_pareto_frontier(points, frontier, path, ...)``: pass@1 vs pass@K with the frontier that a family of runs
  (the multi_k mixing weights) traces, and ``frontier_gaps`` — where every other method lands relative to it.
- ``plot_run(run_dir)``: ``run_dir/pass_at_k.png`` (base, periodic and final held-out evaluations) and
  ``run_dir/training.png`` (reward, K, p̂ and batch pass@k vs step from ``metrics.jsonl``).

Every function returns the path(s) it wrote. Curves are the dicts written by ``passk_rl.evaluate``:
``{"pass_at_k": {k: {"mean", "lo", "hi"}}}`` with k as int or str.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import numpy as np

matplotlib.use("Agg")  # before pyplot: headless machines and Ray workers have no display
import matplotlib.pyplot as plt  # noqa: E402

Interval = Tuple[float, float, float]  # (mean, lo, hi)

__all__ = ["plot_pass_at_k", "plot_pareto", "plot_pareto_frontier", "frontier_gaps", "frontier_section", "plot_run", "plot_training_by_method", "curve_points", "read_jsonl"]


def curve_points(curve: Mapping[str, Any]) -> Tuple[List[int], List[float], List[float], List[float]]:
    """(ks, means, los, his) of one ``{"pass_at_k": {k: {mean, lo, hi}}}`` dict, sorted by k."""
    if "pass_at_k" not in curve:
        raise ValueError(f"curve has no 'pass_at_k' entry (keys: {sorted(curve)})")
    rows = sorted((int(k), v) for k, v in curve["pass_at_k"].items())
    if not rows:
        raise ValueError("curve has an empty 'pass_at_k' entry")
    ks = [k for k, _ in rows]
    mean = [float(v["mean"]) for _, v in rows]
    lo = [float(v.get("lo", v["mean"])) for _, v in rows]
    hi = [float(v.get("hi", v["mean"])) for _, v in rows]
    return ks, mean, lo, hi


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pass_at_k(curves: Mapping[str, Mapping[str, Any]], path: str | Path, title: Optional[str] = None) -> Path:
    """One figure: pass@k vs k for every label in ``curves``, log2 x axis, shaded 95 % CI bands."""
    if not curves:
        raise ValueError("plot_pass_at_k: no curves to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_ks: set = set()
    for label, curve in curves.items():
        ks, mean, lo, hi = curve_points(curve)
        all_ks.update(ks)
        (line,) = ax.plot(ks, mean, marker="o", ms=3.5, lw=1.6, label=str(label))
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    ticks = sorted(all_ks)
    if len(ticks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (unbiased estimate)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "held-out pass@k (bands: 95 % bootstrap CI over problems)", fontsize=10)
    return _save(fig, Path(path))


def plot_pareto(points: Mapping[str, Tuple[Interval, Interval]], path: str | Path, k: int,
                title: Optional[str] = None,
                seed_points: Optional[Mapping[str, Sequence[Tuple[float, float]]]] = None) -> Path:
    """pass@1 (x) vs pass@k (y) per label; ``points[label] = ((mean, lo, hi) at 1, (mean, lo, hi) at k)``.

    ``seed_points[label]``: optional (pass@1, pass@k) of each seed, drawn as small dots in the label's colour."""
    if not points:
        raise ValueError("plot_pareto: no points to plot")
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for label, (p1, pk) in points.items():
        (m1, lo1, hi1), (mk, lok, hik) = (tuple(map(float, p1)), tuple(map(float, pk)))
        bars = ax.errorbar([m1], [mk], xerr=[[max(m1 - lo1, 0.0)], [max(hi1 - m1, 0.0)]],
                           yerr=[[max(mk - lok, 0.0)], [max(hik - mk, 0.0)]], fmt="o", ms=5, capsize=3,
                           label=str(label))
        seeds = (seed_points or {}).get(label) or []
        if len(seeds) > 1:
            xs, ys = zip(*seeds)
            ax.scatter(xs, ys, s=10, alpha=0.55, color=bars[0].get_color(), lw=0)
    ax.set_xlabel("pass@1")
    ax.set_ylabel(f"pass@{k}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"pass@1 vs pass@{k} (error bars: 95 % CI over problems)", fontsize=10)
    return _save(fig, Path(path))


def frontier_gaps(points: Mapping[str, Tuple[Interval, Interval]], frontier: Sequence[str],
                  seed_points: Optional[Mapping[str, Sequence[Tuple[float, float]]]] = None) -> Dict[str, Dict[str, Any]]:
    """Where each non-frontier label lands relative to the frontier traced by ``frontier`` (labels in ``points``).

    The frontier is the piecewise-linear curve through the frontier labels' mean (x, y), sorted by x (for mixing
    weights w of pass@1 and pass@K, the curve the weights trace). For every other label: ``gap`` = its mean y minus
    the frontier's y at its mean x (> 0: outside, i.e. more pass@K at equal pass@1), None when its x lies outside the
    frontier's x range (``side`` then says "left"/"right"). With ``seed_points`` for the label and every frontier
    label, aligned by seed, ``seed_gaps`` holds the same gap per seed against that seed's own frontier (so an
    interval over seeds can be formed). Raises ValueError on fewer than two frontier labels or unknown labels."""
    missing = [f for f in frontier if f not in points]
    if len(frontier) < 2 or missing:
        raise ValueError(f"frontier_gaps: need >= 2 frontier labels present in points; missing {missing}, "
                         f"got {list(frontier)}")

    def curve(xy: Sequence[Tuple[float, float]]) -> Tuple[List[float], List[float]]:
        pts = sorted(xy)
        return [float(a) for a, _ in pts], [float(b) for _, b in pts]

    def gap_at(xs: List[float], ys: List[float], x: float, y: float) -> Tuple[Optional[float], str]:
        if x < xs[0] - 1e-12:
            return None, "left"
        if x > xs[-1] + 1e-12:
            return None, "right"
        for i in range(len(xs) - 1):
            if xs[i] <= x <= xs[i + 1]:
                t = 0.0 if xs[i + 1] == xs[i] else (x - xs[i]) / (xs[i + 1] - xs[i])
                yy = max(ys[i], ys[i + 1]) if xs[i + 1] == xs[i] else ys[i] + t * (ys[i + 1] - ys[i])
                return y - yy, "within"
        return y - ys[-1], "within"  # x == xs[-1] exactly after round-off

    fx, fy = curve([(float(points[f][0][0]), float(points[f][1][0])) for f in frontier])
    out: Dict[str, Dict[str, Any]] = {}
    for label, (p1, pk) in points.items():
        if label in frontier:
            continue
        gap, side = gap_at(fx, fy, float(p1[0]), float(pk[0]))
        row: Dict[str, Any] = {"gap": gap, "side": side, "seed_gaps": None}
        seeds = (seed_points or {}).get(label)
        if seeds and all((seed_points or {}).get(f) and len(seed_points[f]) == len(seeds) for f in frontier):
            per = []
            for s, (x, y) in enumerate(seeds):
                sx, sy = curve([seed_points[f][s] for f in frontier])
                per.append(gap_at(sx, sy, float(x), float(y))[0])
            row["seed_gaps"] = per if all(g is not None for g in per) else None
        out[label] = row
    return out


def plot_pareto_frontier(points: Mapping[str, Tuple[Interval, Interval]], frontier: Sequence[str], path: str | Path,
                         *, k: int, base: Optional[Tuple[float, float]] = None, title: Optional[str] = None,
                         seed_points: Optional[Mapping[str, Sequence[Tuple[float, float]]]] = None) -> Path:
    """pass@1 (x) vs pass@k (y): the frontier traced by the ``frontier`` labels (dashed line through their means,
    sorted by pass@1), every other label with its 95 % error bars, and ``base`` (the initial model) as a star with
    guide lines; ``points[label] = ((mean, lo, hi) at 1, (mean, lo, hi) at k)``, as in ``plot_pareto``."""
    gaps = frontier_gaps(points, frontier, seed_points)
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    # tab10, then tab20's light shades: more methods than ten colours, and no two share one
    colors = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])
    fr = sorted(frontier, key=lambda f: float(points[f][0][0]))
    ax.plot([float(points[f][0][0]) for f in fr], [float(points[f][1][0]) for f in fr], "k--", lw=1.0, zorder=1,
            label="frontier (" + " → ".join(fr) + ")")
    for i, (label, (p1, pk)) in enumerate(points.items()):
        (m1, lo1, hi1), (mk, lok, hik) = (tuple(map(float, p1)), tuple(map(float, pk)))
        on = label in frontier
        g = gaps.get(label)
        tag = "" if on or g is None else (f" ({g['gap']:+.3f})" if g["gap"] is not None else f" ({g['side']})")
        bars = ax.errorbar([m1], [mk], xerr=[[max(m1 - lo1, 0.0)], [max(hi1 - m1, 0.0)]],
                           yerr=[[max(mk - lok, 0.0)], [max(hik - mk, 0.0)]], fmt="o" if on else "s",
                           ms=4 if on else 5, capsize=2, label=str(label) + tag, color=colors[i % len(colors)])
        seeds = (seed_points or {}).get(label) or []
        if len(seeds) > 1:
            xs, ys = zip(*seeds)
            ax.scatter(xs, ys, s=8, alpha=0.45, color=bars[0].get_color(), lw=0)
    if base is not None:
        ax.scatter([base[0]], [base[1]], marker="*", s=90, color="grey", zorder=3, label="base")
        ax.axhline(base[1], color="grey", lw=0.6, ls=":")
        ax.axvline(base[0], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("pass@1")
    ax.set_ylabel(f"pass@{k}")
    ax.grid(True, alpha=0.3)
    # outside the axes: inside, it hid the frontier's middle
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    ax.set_title(title or f"pass@1 vs pass@{k}: frontier of the mixing weights; (±x) = pass@{k} gap to it",
                 fontsize=9)
    return _save(fig, Path(path))


def _signed(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:+.3f}"


def frontier_section(analysis: Mapping[str, Any], frontier: Sequence[str], out_dir: str | Path,
                     *, k: Optional[int] = None) -> List[str]:
    """The experiment report's frontier part: writes ``out_dir/pareto_frontier.png`` (pass@1 vs pass@k, k = the
    analysis' big K by default) and returns markdown lines: the figure and a table of each method's gap in pass@k
    to the frontier at its pass@1 (mean, and a t interval over seeds when it shares the frontier methods' seeds).

    ``analysis`` is ``passk_rl.experiment.analyse``'s dict (methods[name] = {label, seeds, k: {kk: {mean, lo, hi,
    per_seed}}}, base: {kk: {mean}}); ``frontier`` names its methods (the multi_k mixing weights, rloo, pkpo)."""
    import math

    from scipy import stats as sps

    k = int(k or analysis["big_k"])
    methods = analysis["methods"]
    label = {name: row["label"] for name, row in methods.items()}
    points = {label[n]: ((row["k"][1]["mean"], row["k"][1]["lo"], row["k"][1]["hi"]),
                         (row["k"][k]["mean"], row["k"][k]["lo"], row["k"][k]["hi"])) for n, row in methods.items()}
    seeds0 = list(methods[frontier[0]]["seeds"])
    seed_pts = {label[n]: list(zip(row["k"][1]["per_seed"], row["k"][k]["per_seed"]))
                for n, row in methods.items() if list(row["seeds"]) == seeds0}
    base = analysis.get("base") or {}
    base_xy = (float(base[1]["mean"]), float(base[k]["mean"])) if 1 in base and k in base else None
    front = [label[f] for f in frontier]
    plot_pareto_frontier(points, front, Path(out_dir) / "pareto_frontier.png", k=k, base=base_xy,
                         seed_points=seed_pts)
    gaps = frontier_gaps(points, front, seed_pts)
    lines = [f"## pass@1 vs pass@{k}: the frontier of {', '.join(front)}", "",
             f"![pass@1 vs pass@{k} frontier](pareto_frontier.png)", "",
             f"| method | pass@{k} − frontier at its pass@1 (mean) | over seeds (t, 95 %) | where |", "|---|---|---|---|"]
    for lab, g in gaps.items():
        per = g["seed_gaps"]
        iv = "—"
        where = g["side"] if g["gap"] is None else ("outside" if g["gap"] > 0 else "inside")
        if per and len(per) > 1:
            m, sd = sum(per) / len(per), float(np.std(per, ddof=1))
            half = float(sps.t.ppf(0.975, len(per) - 1)) * sd / math.sqrt(len(per))
            iv = f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"
            where = "outside" if m - half > 0 else "inside" if m + half < 0 else "on (interval contains 0)"
        lines.append(f"| {lab} | {_signed(g['gap'])} | {iv} | "
                     f"{where} |")
    return lines + [""]


def read_jsonl(path: str | Path) -> List[Dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed row raises ValueError naming the file and line."""
    out = []
    p = Path(path)
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {i} is not valid JSON: {e}") from None
    return out


def _run_curves(run_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Labelled held-out curves of a run: base, periodic evals from ``eval/``, final (in step order)."""
    summary: Dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    periodic: Dict[int, Dict[str, Any]] = {}
    for f in sorted((run_dir / "eval").glob("step_*.json")) if (run_dir / "eval").is_dir() else []:
        d = json.loads(f.read_text())
        if "pass_at_k" in d:
            periodic[int(d.get("step", int(f.stem.split("_")[1])))] = d
    curves: Dict[str, Dict[str, Any]] = {}
    base = summary.get("base_eval")
    final = summary.get("final_eval")
    base_step = int(base.get("step", 0)) if base else None
    final_step = int(final["step"]) if final and "step" in final else None
    if base is not None:
        curves["base (step 0)"] = base
    for step in sorted(periodic):
        if step in (base_step, final_step) or (base is not None and step == 0):
            continue  # the same evaluation as the base/final entry of summary.json
        if final is not None and final_step is None and step == max(periodic):
            continue
        curves[f"step {step}"] = periodic[step]
    if final is not None:
        curves[f"final (step {final_step})" if final_step is not None else "final"] = final
    return curves


def plot_run(run_dir: str | Path) -> List[Path]:
    """Write ``pass_at_k.png`` (held-out curves) and ``training.png`` (metrics.jsonl) into ``run_dir``.

    Either figure is skipped when its input is missing; a run directory with neither raises ValueError.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"plot_run: run directory {run_dir} does not exist")
    written: List[Path] = []
    curves = _run_curves(run_dir)
    if curves:
        written.append(plot_pass_at_k(curves, run_dir / "pass_at_k.png", title=f"{run_dir.name}: held-out pass@k"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = read_jsonl(metrics)
        if rows:
            written.append(_plot_training(rows, run_dir / "training.png", title=run_dir.name))
    if not written:
        raise ValueError(f"plot_run: {run_dir} has neither summary.json/eval/ nor a non-empty metrics.jsonl")
    return written


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _plot_training(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    ax = axes[0][0]
    ax.plot(*_series(rows, "reward_mean"), lw=1.5)
    ax.set_ylabel("mean reward (train batch)")
    ax = axes[0][1]
    ax.step(*_series(rows, "k"), where="post", lw=1.5, label="K used")
    xs, ys = _series(rows, "k_requested")
    if ys and ys != _series(rows, "k")[1]:
        ax.step(xs, ys, where="post", lw=1.0, ls="--", label="K asked by schedule")
    ax.set_ylabel("K")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(*_series(rows, "p_hat_global"), lw=1.5)
    ax.set_ylabel("global p̂")
    ax = axes[1][1]
    keys = sorted({k for r in rows for k in r if k.startswith("pass@")}, key=lambda s: int(s.split("@")[1]))
    for key in keys:
        ax.plot(*_series(rows, key), lw=1.3, label=key)
    ax.set_ylabel("batch pass@k (train prompts)")
    if keys:
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axes[0][1].yaxis.set_major_locator(MaxNLocator(integer=True))
    for a in axes[1]:
        a.set_xlabel("step")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in axes.ravel():
        a.grid(True, alpha=0.3)
    fig.suptitle(f"{title}: training metrics", fontsize=11)
    return _save(fig, path)


def plot_training_by_method(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: str | Path,
                            keys: Sequence[str] = ("reward_mean",)) -> Path:
    """One panel per key of ``metrics.jsonl``: the mean over seeds per step for each method (thin lines: the
    seeds). ``runs[label]`` is a list of per-seed row lists."""
    if not runs:
        raise ValueError("plot_training_by_method: nothing to plot")
    keys = list(dict.fromkeys(keys))
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, seeds in runs.items():
            series = [dict(zip(*_series(rows, key))) for rows in seeds if rows]
            if not series:
                continue
            steps = sorted(set().union(*series))
            mean = [sum(s[t] for s in series if t in s) / sum(1 for s in series if t in s) for t in steps]
            (line,) = ax.plot(steps, mean, lw=1.6, label=f"{label} ({len(series)})")
            if len(series) > 1:
                for s in series:
                    ax.plot(sorted(s), [s[t] for t in sorted(s)], lw=0.5, alpha=0.35, color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("training batches: mean over seeds (thin: each seed)", fontsize=10)
    return _save(fig, Path(path))
