"""configs/gsm8k_local.yaml and configs/math_local.yaml end to end (issue 19): ``python -m passk_rl.launch`` with
each config as written plus the overrides that make it fit this CPU and a test's time (a private local Ray
cluster, one vLLM CPU engine, 2 DeepSpeed ZeRO-2 ranks over gloo, the verifier pool running math-verify).

The data are files in the hub's layout, written by the test: GSM8K rows ``question``/``answer`` ending in
``#### N``, MATH rows ``problem``/``solution`` with ``\\boxed{}``, ``level``, ``type``. The model is the tiny random
Llama with the character tokenizer (it writes every printable ASCII character: digits, ``####``, ``\\boxed{}``).

Overrides beyond size: ``task.params.extraction=flexible``, because a random model never writes ``####`` or
``\\boxed{}`` and strict extraction would answer ``wrong_format`` for every sample without calling math-verify;
with flexible extraction the last number of most samples goes to math-verify, whose verdicts (status ``ok``,
reward 1 or 0) are what the test looks for in metrics.jsonl.

Both are ``slow`` (a Ray cluster, an engine and a learner each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N, PROMPTS_PER_STEP, STEPS = 8, 2, 2


def _write_gsm8k(d: Path) -> dict:
    rows = [{"question": f"Ann has {a} apples and gets {b} more. How many apples does she have?",
             "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in ((1, 2), (3, 4), (2, 5), (4, 4), (1, 7), (3, 3))]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    return {"task.params.train_files": [str(d / "train.jsonl")], "task.params.test_files": [str(d / "test.jsonl")]}


def _write_math(d: Path) -> dict:
    rows = [{"problem": f"Compute ${a}+{b}$.", "solution": f"${a}+{b}=\\boxed{{{a + b}}}$.",
             "level": f"Level {lv}", "type": "Prealgebra"}
            for (a, b), lv in zip(((1, 2), (3, 4), (2, 5), (4, 4), (1, 7), (3, 3), (2, 2)), (1, 2, 3, 1, 2, 3, 5))]
    # the Level 5 row is outside the config's levels [1, 2, 3]: the filter must drop it
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4] + rows[6:]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:6]))
    return {"task.params.train_files": [str(d / "train.jsonl")], "task.params.test_files": [str(d / "test.jsonl")]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from passk_rl.models.tiny import build_random_model

    return str(build_random_model(tmp_path_factory.mktemp("rt") / "model", seed=0))


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("task,config,writer", [("gsm8k", "configs/gsm8k_local.yaml", _write_gsm8k),
                                                ("math", "configs/math_local.yaml", _write_math)])
def test_real_task_config_runs_and_math_verify_verdicts_reach_metrics(task, config, writer, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = writer(data)
    overrides = {
        "run.output_dir": str(tmp_path / "runs"), "run.name": task, "run.steps": STEPS, "run.checkpoint_interval": 0,
        "cluster.device": "cpu", "cluster.num_devices": 0, "cluster.address": "local", "cluster.num_cpus": 4,
        "model.path": tiny_model, "model.dtype": "float32", "model.max_model_len": 512, "model.spec": None,
        **files, "task.params.extraction": "flexible",
        "generator.num_engines": 1, "generator.n": N, "generator.max_tokens": 24, "generator.kv_cache_gib": 0.03,
        "verifier.num_workers": 1, "learner.micro_batch_size": 8, "learner.gradient_checkpointing": False,
        "data.prompts_per_step": PROMPTS_PER_STEP, "schedule.params": {"k": 4},
        "eval.n": 4, "eval.ks": [1, 2, 4], "eval.num_prompts": 2, "logging.pass_at_ks": [1, 2, 4],
        "logging.trackers": ["jsonl"], "logging.ray_metrics": False,
    }
    args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", config, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    took = time.perf_counter() - t0
    assert r.returncode == 0, f"{config} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"

    run = tmp_path / "runs" / task
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [row for row in rows if "verifier_status" in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    for row in steps:
        status = row["verifier_status"]
        assert sum(status.values()) == PROMPTS_PER_STEP * N, status  # a verdict for every sample
        assert status.get("ok", 0) > 0, f"math-verify gave no verdict: {status}"
        assert set(status) <= {"ok", "wrong_format", "timeout", "error"}, status
    total = steps[-1]["verifier_status_total"]
    assert sum(total.values()) == STEPS * PROMPTS_PER_STEP * N
    evals = sorted((run / "eval").glob("step_*.json"))
    assert len(evals) == 2  # before and after training
    assert sum(json.loads(evals[-1].read_text())["verifier_status"].values()) == 2 * 4
    assert (run / "final_model" / "config.json").is_file()
    print(f"[real-task] {config}: {took:.0f}s; statuses {total}")
