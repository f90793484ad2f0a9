"""Verifiable tasks. Importing this package registers every task module in ``TASKS``."""

from passk_rl.tasks.base import STATUSES, TASKS, Prompt, Status, Task, Verdict, make_task, register_task

# Task modules register themselves on import; add each new module here.
import importlib as _importlib

for _mod in ("arith", "gsm8k", "math", "code", "faulty", "bench_text"):
    try:
        _importlib.import_module(f"passk_rl.tasks.{_mod}")
    except ModuleNotFoundError as _e:  # a module not written yet; any other import error is real
        if _e.name != f"passk_rl.tasks.{_mod}":
            raise

__all__ = ["STATUSES", "TASKS", "Prompt", "Status", "Task", "Verdict", "make_task", "register_task"]
