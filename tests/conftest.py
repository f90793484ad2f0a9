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

# The modules that launch runs or start Ray / DeepSpeed / vLLM, costliest first (their fixtures take 20-200 s; the
# other modules take seconds). pytest-xdist's loadscope hands modules to the two workers in collection order
# (pytest.ini: --no-loadscope-reorder); its default order, by test count, put the one-test two-minute modules last,
# so one worker ran them while the other idled. Longest first keeps both busy to the end.
_COSTLIEST_FIRST = ("test_faults.py", "test_e2e.py", "test_learner.py", "test_collective_sync.py",
                    "test_sync_probe.py", "test_architectures.py", "test_generator.py", "test_evaluate.py",
                    "test_sampling_contract.py", "test_base_model.py", "test_weight_sync.py",
                    "test_verifier_pool.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
