"""Fault injection on the real pipeline (a local Ray cluster per run, vLLM CPU engine, DeepSpeed ZeRO-2 over gloo,
the verifier pool): each test breaks one part of a running training job and checks what the system promises in
docs/reliability.md — that the run goes on, or stops with a message that says what happened while its newest
complete checkpoint stays usable, and that nothing is lost or silently scored.

The engine kill runs in CI; the longer ones are marked slow (`bash scripts/test.sh -m slow`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.prompts_per_step=8", "generator.n=8", "eval.enabled=false", "logging.ray_metrics=false",
         "algorithm.shaping=pkpo_loo_minus_one", "schedule.kind=fixed", "schedule.params={k: 4}"]


def _launch(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS="")
    log = open(tmp_path / f"{name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "passk_rl.launch", "--config", "configs/tiny_cpu.yaml",
                             f"run.name={name}", f"run.output_dir={tmp_path}", *SMALL, *overrides],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _run(tmp_path: Path, name: str, *overrides: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    proc = _launch(tmp_path, name, *overrides)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / f"{name}.log").read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _records(run_dir: Path) -> List[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in _records(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before step {step}")
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout}s")


def _actor_pids(root_pid: int, actor: str) -> List[int]:
    """Worker processes of ``actor`` (Ray titles them ``ray::<ActorClass>``) below ``root_pid`` only: the launch
    starts its own local cluster, so this never touches another run on the machine."""
    out = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if any(f"ray::{actor}" in part for part in p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def _finish(proc: subprocess.Popen, timeout: float = 1200) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ engine death
@pytest.mark.e2e
def test_kill_9_of_the_generator_engine_is_survived(tmp_path):
    """kill -9 of the vLLM engine's actor process after step 2: the pool starts a new engine, loads the current
    weights, re-issues the lost requests; every step completes, the restart is counted, and the new engine holds
    the learner's weights (the post-sync probe still agrees to 1e-4)."""
    _engine_kill_is_survived(tmp_path)


@pytest.mark.slow
@pytest.mark.e2e
def test_kill_9_of_the_generator_engine_is_survived_with_the_file_transport(tmp_path):
    """The same with weights through a safetensors file: the new engine reads the last published file. (With the
    default, collective, transport the replaced engine is not in the old group: the group is re-formed and every
    engine re-sent the current weights before the lost requests are re-issued.)"""
    _engine_kill_is_survived(tmp_path, "sync.transport=shm_safetensors")


def _engine_kill_is_survived(tmp_path, *extra):
    proc = _launch(tmp_path, "kill", "run.steps=5", *extra)
    run_dir = tmp_path / "kill"
    _wait_for_step(run_dir, 2, proc)
    pids = _actor_pids(proc.pid, "GeneratorActor")
    assert len(pids) == 1, pids
    t_kill = time.time()
    os.kill(pids[0], signal.SIGKILL)
    rc = _finish(proc)
    out = (tmp_path / "kill.log").read_text()
    assert rc == 0, out[-5000:]
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["engine_restarts"] >= 1 and records[1]["engine_restarts"] == 0
    assert "engine 0 died" in out
    for r in records:  # no step lost a sample: every one was generated, verified and shaped
        assert sum(r["verifier_status"].values()) == 8 * 8
        assert r["sync_probe_max_abs_diff"] < 1e-4
    recovered = next(r for r in records if r["engine_restarts"] >= 1)
    print(f"engine killed {time.time() - t_kill:.0f}s before the end; step {recovered['step']} took "
          f"{recovered['step_seconds']:.1f}s (generate {recovered['phase_seconds']['generate']:.1f}s) "
          f"against {records[0]['step_seconds']:.1f}s for step 1")
    assert (run_dir / "final_model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ verifier health
@pytest.mark.slow
@pytest.mark.e2e
def test_a_mostly_failing_verifier_stops_the_run_naming_the_statuses(tmp_path):
    faults = "{inner: arith, raise_frac: 0.7, hang_frac: 0.0, seed: 2}"
    r = _run(tmp_path, "sick", "run.steps=6", "task.name=faulty", f"task.params={faults}",
             "verifier.health_window=2", "verifier.max_unverified_frac=0.5")
    assert r.returncode == 4, r.stdout[-4000:]
    assert "got no verdict" in r.stdout and "error:" in r.stdout and "verifier.max_unverified_frac=0.5" in r.stdout
    assert [x["step"] for x in _records(tmp_path / "sick")] == [1]  # stopped once the window (2 steps) was full


# ------------------------------------------------------------------------------------------ preemption
@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_checkpoints_at_the_step_boundary_and_resume_continues(tmp_path):
    proc = _launch(tmp_path, "pre", "run.steps=40")
    run_dir = tmp_path / "pre"
    _wait_for_step(run_dir, 2, proc)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, timeout=300)
    out = (tmp_path / "pre.log").read_text()
    assert rc == 5 and "preempted" in out and "continue with run.resume=true" in out, out[-3000:]
    last = _records(run_dir)[-1]["step"]
    from passk_rl import checkpoint

    ck, _ = checkpoint.usable(run_dir / "checkpoints")
    assert ck is not None and checkpoint.step_of(ck) == last  # nothing trained after the checkpoint
    print(f"SIGTERM → exit in {time.time() - t0:.1f}s, checkpoint at step {last}")
    r = _run(tmp_path, "pre", f"run.steps={last + 2}", "run.resume=true")
    assert r.returncode == 0, r.stdout[-4000:]
    assert [x["step"] for x in _records(run_dir)] == list(range(1, last + 3))


# ------------------------------------------------------------------------------------------ exact resume
@pytest.mark.slow
@pytest.mark.e2e
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Steps 3-4 of a run interrupted after step 2 and resumed equal those of the same run never interrupted: the
    same K, p̂, rewards and sampled tokens (digest), verifier totals, and the loss to float tolerance."""
    a = _run(tmp_path, "whole", "run.steps=4")
    assert a.returncode == 0, a.stdout[-3000:]
    b = _run(tmp_path, "cut", "run.steps=2")
    assert b.returncode == 0, b.stdout[-3000:]
    c = _run(tmp_path, "cut", "run.steps=4", "run.resume=true")
    assert c.returncode == 0 and "resumed from" in c.stdout, c.stdout[-3000:]
    whole, cut = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for x, y in zip(whole, cut):
        for key in ("k", "p_hat_global", "reward_mean", "samples_digest", "verifier_status_total", "p_hat_samples"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
        assert y["learner"]["loss"] == pytest.approx(x["learner"]["loss"], rel=1e-5, abs=1e-7)
        assert y["learner"]["grad_norm"] == pytest.approx(x["learner"]["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------------------ learner death
@pytest.mark.slow
@pytest.mark.e2e
def test_a_dead_learner_rank_stops_the_run_and_its_checkpoint_resumes(tmp_path):
    proc = _launch(tmp_path, "lr", "run.steps=30", "run.checkpoint_interval=1", "run.keep_checkpoints=2")
    run_dir = tmp_path / "lr"
    _wait_for_step(run_dir, 2, proc)
    pids = _actor_pids(proc.pid, "LearnerActor")
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    rc = _finish(proc, timeout=600)
    out = (tmp_path / "lr.log").read_text()
    assert rc == 4 and "an actor died" in out and "continue with run.resume=true" in out, out[-3000:]
    from passk_rl import checkpoint

    ck, skipped = checkpoint.usable(run_dir / "checkpoints")
    assert ck is not None and not skipped
    step = checkpoint.step_of(ck)
    r = _run(tmp_path, "lr", f"run.steps={step + 1}", "run.resume=true", "run.checkpoint_interval=1")
    assert r.returncode == 0 and f"resumed from {ck}" in r.stdout, r.stdout[-3000:]
    assert [x["step"] for x in _records(run_dir)] == list(range(1, step + 2))


# ------------------------------------------------------------------------------------------ full disk
@pytest.mark.slow
@pytest.mark.e2e
def test_a_full_disk_at_checkpoint_time_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    filler: Optional[Path] = None
    try:
        # checkpoints on the small disk, everything else (metrics, logs) elsewhere: only the checkpoint hits it
        proc = _launch(tmp_path, "full", "run.steps=30", "run.checkpoint_interval=1", "run.keep_checkpoints=1",
                       f"run.checkpoint_dir={disk}")
        ck_root = disk / "full"
        from passk_rl import checkpoint

        deadline = time.time() + 900
        while checkpoint.usable(ck_root, log=lambda m: None)[0] is None:
            assert time.time() < deadline and proc.poll() is None, "no first checkpoint"
            time.sleep(0.5)
        filler = disk / "filler"
        with open(filler, "wb") as fh:  # take the rest of the disk: the next checkpoint cannot fit
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
        rc = _finish(proc, timeout=600)
        out = (tmp_path / "full.log").read_text()
        assert rc == 4 and "could not be written" in out and "is intact" in out, out[-3000:]
        ck, skipped = checkpoint.usable(ck_root)
        assert ck is not None and not skipped  # the previous checkpoint still verifies
        assert not any(p.name.endswith(".tmp") for p in ck_root.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
