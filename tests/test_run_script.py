"""``bash scripts/run.sh`` as a user runs it (its own Ray cluster with a token, ``ray job submit``): Ctrl-C stops
the job the way ``ray job stop`` does — the step finishes, a checkpoint is written, the script says where it
stopped and how to continue, and exits with the job's own code (5) — the stop command it prints works as printed,
and ``run.resume=true`` continues at the next step. The job log holds the run's own lines, no WARNINGs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_faults import SMALL, _records, _wait_for_step

ROOT = Path(__file__).resolve().parent.parent


def _script(tmp_path: Path, log: str, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.Popen(["bash", "scripts/run.sh", f"run.output_dir={tmp_path}", "run.name=cc", *SMALL,
                             *overrides], cwd=ROOT, env=env, stdout=open(tmp_path / log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _abort(proc: subprocess.Popen) -> None:
    """After a failed assertion: the script's own stop (it stops the job, then the Ray cluster it started, which
    runs in a session of its own and would outlive a SIGKILL of the script)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        _finish(proc, timeout=600)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.e2e
def test_ctrl_c_stops_at_a_step_boundary_the_printed_stop_command_works_and_resume_continues(tmp_path):
    from passk_rl import checkpoint

    run_dir = tmp_path / "cc"
    t0 = time.time()
    proc = _script(tmp_path, "first.log", "run.steps=1000")  # far more than it runs: it stops first
    try:
        _wait_for_step(run_dir, 2, proc)
    except BaseException:
        _abort(proc)
        raise
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends (to the script; the job is not in its process group)
    rc = _finish(proc)
    out = (tmp_path / "first.log").read_text()
    last = _records(run_dir)[-1]["step"]
    assert rc == 5, out[-4000:]
    assert f"[run] stopped at step {last}; continue with `bash scripts/run.sh" in out and "run.resume=true`" in out
    assert "the job failed" not in out
    ck, _ = checkpoint.usable(run_dir / "checkpoints")
    assert ck is not None and checkpoint.step_of(ck) == last  # nothing trained after the checkpoint
    assert not re.search(r"\bWARNING\b", out), [x for x in out.splitlines() if "WARNING" in x][:5]
    assert re.search(rf"step {last}/1000 .* ETA \d+:\d\d:\d\d", out)
    print(f"Ctrl-C run: stopped at step {last}, {time.time() - t0:.0f}s")

    t1 = time.time()
    proc = _script(tmp_path, "second.log", f"run.steps={last + 1000}", "run.resume=true")
    try:
        _wait_for_step(run_dir, last + 1, proc)
        out = (tmp_path / "second.log").read_text()
        stop = re.search(r"^\[run\]   (RAY_AUTH_MODE=token \S+ \S*ray job stop .*)$", out, re.M)
        assert stop, out[-3000:]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        r = subprocess.run(["bash", "-c", stop.group(1)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
    except BaseException:
        _abort(proc)
        raise
    rc = _finish(proc)
    out = (tmp_path / "second.log").read_text()
    steps = [x["step"] for x in _records(run_dir)]
    assert rc == 5 and f"[run] stopped at step {steps[-1]};" in out, out[-4000:]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= last + 1  # continued at the next step
    assert f"resumed from {ck}" in out
    print(f"resumed run stopped by the printed command at step {steps[-1]}, {time.time() - t1:.0f}s")
