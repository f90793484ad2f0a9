"""Test-session settings that must be in place before any test module imports its libraries."""

import os
import tempfile

# `datasets` caches every local file it reads; keep that out of the user's ~/.cache/huggingface. Set at import
# time: datasets reads the variable once, when it is first imported.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="passk_rl_test_datasets_"))

# The `faulty` task (a verifier that raises, hangs or crashes on purpose) is a test fixture, not a product task: it
# registers through passk_rl's task-module variable, which every process the tests start inherits (launched runs,
# Ray workers, the head of a Ray cluster whose jobs the tests submit). Set before passk_rl.tasks is imported.
_FIXTURE_TASKS = "tests.faulty_task"
_mods = [m for m in os.environ.get("PASSK_RL_TASK_MODULES", "").split(",") if m.strip()]
if _FIXTURE_TASKS not in _mods:
    os.environ["PASSK_RL_TASK_MODULES"] = ",".join([*_mods, _FIXTURE_TASKS])

# No reordering of modules here, on purpose. Handing the two xdist workers the run-launching modules first
# (2026-12-05) put two of them (each Ray + vLLM engines + two DeepSpeed ranks) on the 2 cores at once, and the suite
# took 1048 s and 960 s against 632 s in loadscope's own order, which runs the many small modules alongside them.
