"""Atomic, verifiable checkpoints (passk_rl.checkpoint) and the run-directory policy (trainer.prepare_run_dir),
on real files: interrupted saves, corrupted and truncated files, a dangling `latest`, rotation."""

from __future__ import annotations

import json
import os

import pytest

from passk_rl import checkpoint as ck
from passk_rl.config import load_config
from passk_rl.trainer import RunDirError, prepare_run_dir


def _save(root, step, payload=b"x" * 1000, keep=2):
    tmp = ck.staging_dir(root, step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "model.bin").write_bytes(payload + str(step).encode())
    (tmp / "driver.json").write_text(json.dumps({"step": step}))
    return ck.commit(root, tmp, step, keep=keep)


def test_commit_points_latest_and_rotates(tmp_path):
    for step in (1, 2, 3):
        path = _save(tmp_path, step)
    assert path.name == "step_000003" and ck.latest_name(tmp_path) == "step_000003"
    assert [p.name for p in ck.complete(tmp_path)] == ["step_000003", "step_000002"]  # keep=2
    got, skipped = ck.usable(tmp_path)
    assert got == path and skipped == [] and ck.step_of(got) == 3
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.is_dir())


def test_an_interrupted_save_is_never_loaded(tmp_path):
    _save(tmp_path, 1)
    tmp = ck.staging_dir(tmp_path, 2)  # a crash after writing part of step 2
    (tmp / "driver.json").write_text("{")
    half = tmp_path / "step_000003"  # or a directory that got its name without being sealed
    half.mkdir()
    (half / "driver.json").write_text("{}")
    got, _ = ck.usable(tmp_path)
    assert got.name == "step_000001"
    assert ck.verify(half) == "no COMPLETE marker (an interrupted save)"
    # the next save of step 2 starts from a clean staging directory
    assert _save(tmp_path, 2).name == "step_000002" and ck.usable(tmp_path)[0].name == "step_000002"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    f = newest / "learner" / "model.bin"
    if damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[10] ^= 1
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:
        f.unlink()
    logs = []
    got, skipped = ck.usable(tmp_path, log=logs.append)
    assert got.name == "step_000001"
    want = {"flip": "sha256", "truncate": "bytes", "delete": "missing"}[damage]
    assert len(skipped) == 1 and "step_000002" in skipped[0] and want in skipped[0] and logs


def test_a_dangling_latest_pointer_falls_back_to_the_newest_complete(tmp_path):
    _save(tmp_path, 4)
    ck.write_atomic(tmp_path / ck.LATEST, "step_000009\n")
    assert ck.usable(tmp_path)[0].name == "step_000004"


def test_large_files_are_checked_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "HASH_LIMIT", 10)
    path = _save(tmp_path, 1)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    assert manifest["learner/model.bin"][1] is None and manifest["driver.json"][1] is None


# ------------------------------------------------------------------------------------------ run directory
CFG = "configs/tiny_cpu.yaml"


def _cfg(tmp_path, *extra):
    return load_config(CFG, [f"run.output_dir={tmp_path}", "run.name=r", *extra])


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    d = prepare_run_dir(_cfg(tmp_path))
    assert d == (tmp_path / "r").resolve() and not d.exists()  # nothing there yet: fine
    d.mkdir()
    (d / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="already holds a run.*run.resume=true.*run.overwrite=true"):
        prepare_run_dir(_cfg(tmp_path))
    assert prepare_run_dir(_cfg(tmp_path, "run.resume=true")) == d and (d / "metrics.jsonl").exists()
    assert prepare_run_dir(_cfg(tmp_path, "run.overwrite=true")) == d and not d.exists()


def test_relative_output_inside_a_ray_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    with pytest.raises(RunDirError, match="relative inside a Ray job"):
        prepare_run_dir(load_config(os.path.join(os.path.dirname(__file__), "..", CFG), ["run.output_dir=runs"]))
    default = load_config(os.path.join(os.path.dirname(__file__), "..", CFG), [])
    assert os.path.isabs(os.path.expanduser(default.run.output_dir))
