"""The post-sync probe on a real run (private Ray cluster, vLLM CPU engine, 2 DeepSpeed ranks): an engine that does
not compute the learner's model stops the run with a checkpoint. (That the probe runs after the first sync and
then every ``sync.probe_interval`` steps is asserted on the job-submit run of tests/test_e2e.py.)"""

from __future__ import annotations

import pytest

from tests.test_faults import _records, _run


@pytest.mark.e2e
def test_an_engine_that_computes_another_model_stops_the_run_at_the_probe(tmp_path):
    """The engine is told a different RMSNorm epsilon than the learner's model (vLLM's hf_overrides): the weights
    arrive intact, but the engine no longer samples from the policy being trained; the first probe says so."""
    r = _run(tmp_path, "wrong", "run.steps=3", "data.prompts_per_step=4", "generator.n=4",
             "generator.engine_kwargs={hf_overrides: {rms_norm_eps: 0.5}}")
    assert r.returncode == 4, r.stdout[-4000:]
    assert "after the weight sync, engine 0's logprobs differ from the learner's" in r.stdout, r.stdout[-4000:]
    assert "sync.probe_tolerance=0.001" in r.stdout
    from passk_rl import checkpoint

    ck, _ = checkpoint.usable(tmp_path / "wrong" / "checkpoints")
    assert ck is not None and checkpoint.step_of(ck) == 1
    assert [x["step"] for x in _records(tmp_path / "wrong")] == []  # the step is not logged as a good one
