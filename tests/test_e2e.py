"""End to end through the real parts: a Ray cluster this test starts, `ray job submit`, the launch entry point,
a vLLM CPU engine, the verifier pool (with a verifier that raises and one that hangs), DeepSpeed ZeRO-2 over
gloo with two ranks, and the central p̂ actor. The base model is the built-in one (committed in the package).
One submitted run feeds every test here (module fixture). The README's GRPO override and the resume tests launch
their runs in tests/test_faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PHASES = ("generate", "verify", "stats", "shape", "update", "sync", "log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A private Ray head with its dashboard (the job server), stopped by killing its own process group."""
    # every port free-picked: Ray's fixed defaults (dashboard agent 52365, client server 10001) collide with any
    # other Ray cluster on the machine, and the job agent then never comes up
    gcs, dash, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    tmp = tempfile.mkdtemp(prefix="/tmp/pkr")  # short: Ray's socket paths live under it
    # The job's `python` is looked up on the head's PATH: make it this interpreter.
    # Its own auth token: Ray 2.60 enables token auth when ~/.ray/auth_token exists, and the job CLI needs it.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
         "--ray-client-server-port", str(client), "--num-cpus", "4", "--temp-dir", tmp],
        stdout=open(Path(tmp) / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True, env=env)
            if r.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError("Ray head did not start:\n" + (Path(tmp) / "head.log").read_text()[-3000:])
            time.sleep(1)
        yield address, env
    finally:
        # The job is over and nothing here needs a graceful stop: Ray's own shutdown of the head (dashboard,
        # job agent, GCS) took ~34 s; a kill of every process of this cluster takes well under one.
        import psutil

        try:
            procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(cluster, overrides, timeout: float = 900) -> subprocess.CompletedProcess:
    address, env = cluster
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git", "**/__pycache__"]}),
           "--", "python", "-m", "passk_rl.launch", "--config", "configs/tiny_cpu.yaml", *overrides]
    for _ in range(30):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        # On a loaded machine the head's job agent can come up after the job API answers: nothing was submitted
        if r.returncode == 0 or "No available agent to submit job" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


def _tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def job_run(ray_cluster, tmp_path_factory):
    """One `ray job submit` run that several tests read: 3 steps of PKPO with a linear K schedule, a checkpoint after
    each step, held-out evaluation before and after, the post-sync probe every 2 steps, and a verifier that raises
    on 6 % and hangs on 4 % of samples (the `faulty` test task, registered through $PASSK_RL_TASK_MODULES, which
    the head and so the job inherit)."""
    runs = tmp_path_factory.mktemp("e2e") / "runs"
    faults = "{inner: arith, raise_frac: 0.06, hang_frac: 0.04, hang_s: 600, seed: 1}"
    proc = _submit(ray_cluster, [
        "run.name=e2e", "run.steps=3", f"run.output_dir={runs}", "run.checkpoint_interval=1", "sync.probe_interval=2",
        "data.prompts_per_step=8", "generator.n=8", "task.name=faulty", f"task.params={faults}",
        "verifier.timeout_s=2", "verifier.num_workers=2", "algorithm.shaping=pkpo_loo_minus_one",
        "schedule.kind=linear", "schedule.params={k_min: 2, k_max: 6, p_target: 0.4}",
        "eval.n=8", "eval.ks=[1,4]", "eval.num_prompts=16", "logging.pass_at_ks=[1,4,8]",
    ])
    run = runs / "e2e"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    return SimpleNamespace(proc=proc, out=proc.stdout + proc.stderr, run=run, records=records)


@pytest.mark.e2e
def test_job_submit_runs_every_step_and_logs_every_metric(job_run):
    out = job_run.out
    assert job_run.proc.returncode == 0, out[-6000:]
    assert "step 3/3" in out and "held-out pass@k, base → final" in out, out[-3000:]
    run, records = job_run.run, job_run.records
    assert [r["step"] for r in records] == [1, 2, 3]
    # the same records as TensorBoard events in the run directory, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward_mean")] == pytest.approx([r["reward_mean"] for r in records])
    assert {"k", "p_hat_global", "learner/grad_norm", "eval/pass@1", "eval/pass@4"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/pass@4")] == [0, 3] and "figures/pass_at_k" in acc.Tags()["images"]
    for r in records:
        for key in ("k", "p_hat_global", "reward_mean", "pass@1", "pass@4", "pass@8", "verifier_failures",
                    "verifier_status", "gen_tokens_per_s", "samples_per_s", "step_seconds"):
            assert key in r, key
        assert set(PHASES) <= set(r["phase_seconds"]) and all(v >= 0 for v in r["phase_seconds"].values())
        assert 2 <= r["k"] <= 6
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["gen_tokens_per_s"] > 0
    # the post-sync probe (sync.probe_interval=2) runs after the first sync and then every 2 steps, and there the
    # engine scores a completion as the learner does
    probes = {r["step"]: r["sync_probe_max_abs_diff"] for r in records}
    assert probes[1] is not None and probes[2] is not None and probes[3] is None, probes
    assert max(probes[1], probes[2]) < 1e-4, probes


@pytest.mark.e2e
def test_failing_verifiers_are_counted_and_left_out_of_p_hat(job_run):
    import torch

    assert job_run.proc.returncode == 0, job_run.out[-6000:]
    records = job_run.records
    for r in records:
        assert sum(r["verifier_status"].values()) == 8 * 8
        assert r["verifier_failures"] == r["verifier_status"]["timeout"] + r["verifier_status"]["error"]
    status = records[-1]["verifier_status_total"]
    assert status["error"] >= 1 and status["timeout"] >= 1, status  # counted, and the run went on
    verified = sum(r["verified_samples"] for r in records)
    assert verified == sum(status[s] for s in ("ok", "wrong_format"))
    # the central p̂ actor saw exactly the verified samples (timeouts and errors are not evidence)
    assert records[-1]["p_hat_samples"] == verified
    phat = torch.load(job_run.run / "checkpoints" / "step_000003" / "phat.pt", weights_only=False)
    assert phat["stats"]["total_samples"] == verified


@pytest.mark.e2e
def test_the_job_trains_exports_and_evaluates_the_model(job_run):
    assert job_run.proc.returncode == 0, job_run.out[-6000:]
    run = job_run.run
    # the learner changed the weights, and the exported model is the one the generators ran at the end
    from passk_rl.tasks.make_base import BUILTIN_DIR

    base, final = _tensors(BUILTIN_DIR), _tensors(run / "final_model")
    assert base.keys() == final.keys()
    assert max(float((base[k] - final[k]).abs().max()) for k in base) > 1e-6
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_000003" / "learner").is_dir()
    summary = json.loads((run / "summary.json").read_text())
    for which in ("base_eval", "final_eval"):
        ev = summary[which]
        assert ev["num_prompts"] == 16 and ev["n"] == 8 and sum(ev["verifier_status"].values()) == 16 * 8
        for k in ("1", "4"):
            c = ev["pass_at_k"][k]
            assert 0.0 <= c["lo"] <= c["mean"] <= c["hi"] <= 1.0
    # the base → final change is the paired difference of the two evaluations (same prompts, same sampling seeds)
    for k in ("1", "4"):
        d = summary["change"][k]
        assert d["mean"] == pytest.approx(summary["final_eval"]["pass_at_k"][k]["mean"]
                                          - summary["base_eval"]["pass_at_k"][k]["mean"], abs=1e-12)
        assert d["lo"] <= d["mean"] <= d["hi"]


@pytest.mark.e2e
def test_bad_config_fails_before_any_actor_starts(tmp_path):
    """The launch rejects a bad key with its name and exit code 2, without starting Ray."""
    env = dict(os.environ, RAY_ADDRESS="")
    r = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", "configs/tiny_cpu.yaml",
                        "learner.zero_stag=3", f"run.output_dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2
    assert "learner.zero_stag" in r.stderr
    assert not (tmp_path / "tiny-cpu").exists()
