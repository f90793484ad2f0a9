"""Verifiable tasks. Importing this package registers every task module in ``TASKS``.

Tasks that live outside the package (a test fixture, a user's own task) register by naming their modules in the
environment variable ``PASSK_RL_TASK_MODULES`` (comma-separated, e.g. ``tests.faulty_task``): they are imported
with the package, and again by ``make_task`` in processes whose variable was set later. The variable is inherited
by every process a run starts (Ray workers, launched jobs), so a task registered this way is known to the
verifier pool too. A module that cannot be imported is an error naming the variable.
"""

from passk_rl.tasks.base import (
    STATUSES,
    TASK_MODULES_ENV,
    TASKS,
    Prompt,
    Status,
    Task,
    Verdict,
    load_task_modules,
    make_task,
    register_task,
)

import importlib as _importlib

# The package's own task modules; each registers itself on import.
for _mod in ("arith", "gsm8k", "math", "code", "bench_text"):
    _importlib.import_module(f"passk_rl.tasks.{_mod}")
load_task_modules()

__all__ = ["STATUSES", "TASKS", "TASK_MODULES_ENV", "Prompt", "Status", "Task", "Verdict", "load_task_modules",
           "make_task", "register_task"]
