"""Several Ray nodes on this one machine (ray.cluster_utils.Cluster): engines pinned to one node and learner ranks
to another by custom resources, weights streamed between them over the collective transport (no file anywhere),
checkpoints in a directory given by run.checkpoint_dir, and a resume from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"gen_node": 10}})
    c.add_node(num_cpus=3, resources={"learn_node": 10})
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.mark.slow
@pytest.mark.e2e
def test_engines_and_learner_on_different_nodes_without_a_shared_directory(cluster, tmp_path):
    common = [f"cluster.address={cluster.address}", "cluster.generator_resources={gen_node: 0.01}",
              "cluster.learner_resources={learn_node: 0.01}", "sync.transport=collective",
              f"run.output_dir={tmp_path}", "run.name=mn", f"run.checkpoint_dir={tmp_path / 'ckpt'}",
              "data.prompts_per_step=8", "generator.n=8", "eval.enabled=false", "logging.ray_metrics=false",
              "algorithm.shaping=pkpo_loo_minus_one", "schedule.kind=fixed", "schedule.params={k: 4}",
              "sync.root=/dev/shm/passk_rl_mn_test"]
    env = dict(os.environ, RAY_ADDRESS="")
    for extra in (["run.steps=2"], ["run.steps=3", "run.resume=true"]):
        r = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", "configs/tiny_cpu.yaml", *common,
                            *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    run = tmp_path / "mn"
    where = json.loads((run / "placement.json").read_text())
    assert len(set(where["generators"])) == 1 and len(set(where["learner"])) == 1
    assert set(where["generators"]).isdisjoint(where["learner"]), where
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3] and "resumed from" in r.stdout
    assert all(x["sync_probe_max_abs_diff"] < 1e-4 for x in rows)  # the engines hold the learner's weights
    assert not Path("/dev/shm/passk_rl_mn_test").exists()  # nothing went through a file
    assert (tmp_path / "ckpt" / "mn" / "latest").is_file() and not (run / "checkpoints").exists()
