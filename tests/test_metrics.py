"""The run's trackers (passk_rl.metrics.Trackers): metrics.jsonl and TensorBoard event files, read back with
TensorBoard's own reader; the step-record flattening; resume purging later events."""

from __future__ import annotations

import json

import numpy as np
import pytest

from passk_rl.metrics import Trackers, flatten_scalars


def _accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def _record(step, k=8):
    return {"step": step, "k": k, "k_weights": None, "p_hat_global": 0.1 * step, "reward_mean": 0.2 + 0.01 * step,
            "pass@8": 0.5, "update_skipped": False, "verifier_status": {"ok": 10, "error": 0},
            "learner": {"grad_norm": 2.0 + step, "loss": -0.1}, "phase_seconds": {"generate": 1.5}, "note": "text"}


def test_flatten_keeps_numbers_and_booleans_and_drops_the_rest():
    flat = flatten_scalars({k: v for k, v in _record(3).items() if k != "step"})
    assert flat["learner/grad_norm"] == 5.0 and flat["phase_seconds/generate"] == 1.5
    assert flat["update_skipped"] == 0.0 and flat["verifier_status/ok"] == 10.0
    assert "k_weights" not in flat and "note" not in flat
    assert "x" not in flatten_scalars({"x": float("nan")})


def test_tensorboard_event_files_read_back(tmp_path):
    from passk_rl.plots import plot_pass_at_k

    tr = Trackers(tmp_path, ["jsonl", "tensorboard"], run_name="t", config={})
    for step in (1, 2, 3):
        tr.log_step(_record(step), p_hat=np.linspace(0, 1, 16) * step / 3)
    ev = {"pass_at_k": {"1": {"mean": 0.2, "lo": 0.1, "hi": 0.3}, "8": {"mean": 0.6, "lo": 0.5, "hi": 0.7}}}
    tr.log_eval(ev, step=3)
    png = plot_pass_at_k({"final": ev}, tmp_path / "pass_at_k.png")
    tr.log_image("figures/pass_at_k", png, step=3)
    tr.close()
    acc = _accumulator(tmp_path)
    tags = acc.Tags()
    assert {"k", "p_hat_global", "reward_mean", "learner/grad_norm", "eval/pass@8"} <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("learner/grad_norm")] == [3.0, 4.0, 5.0]
    assert [e.step for e in acc.Scalars("p_hat_global")] == [1, 2, 3]
    assert acc.Scalars("eval/pass@8")[0].value == pytest.approx(0.6)
    assert "p_hat/per_prompt" in tags["histograms"] and "figures/pass_at_k" in tags["images"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_resume_purges_the_interrupted_runs_later_events(tmp_path):
    tr = Trackers(tmp_path, ["jsonl", "tensorboard"], run_name="t", config={})
    for step in (1, 2, 3):
        tr.log_step(_record(step))
    tr.close()
    again = Trackers(tmp_path, ["jsonl", "tensorboard"], run_name="t", config={}, resume=True)
    again.resumed(1)  # the checkpoint was at step 1: steps 2 and 3 are redone
    for step in (2, 3):
        again.log_step(_record(step, k=4))
    again.close()
    ks = {e.step: e.value for e in _accumulator(tmp_path).Scalars("k")}
    assert ks == {1: 8.0, 2: 4.0, 3: 4.0}


def test_unknown_tracker_is_an_error():
    with pytest.raises(ValueError, match="unknown tracker 'csv'"):
        Trackers("/tmp/none", ["jsonl", "csv"], run_name="t", config={})
