"""The task interface: a task yields prompts and verifies (prompt, completion) → reward + status.

Every verifiable task in passk-rl (the built-in synthetic task, GSM8K, MATH, code) implements ``Task``. The
verifier pool calls ``Task.verify`` inside its own worker processes; the trainer only ever sees ``Verdict``.

Statuses (``Status``):
- ``ok``: the completion was checked; reward is the score (0 for a wrong answer, 1 for a right one, or a
  fraction for continuous tasks such as code with several tests).
- ``wrong_format``: no answer could be extracted; reward 0.
- ``timeout``: the check ran out of time; reward 0, counted in metrics.
- ``error``: the verifier itself failed; reward 0, counted in metrics.
A non-``ok`` status is never a silent 0: the verifier pool counts every status and the run logs the counts.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Callable, Dict, List, Optional


class Status(str, Enum):
    OK = "ok"
    WRONG_FORMAT = "wrong_format"
    TIMEOUT = "timeout"
    ERROR = "error"


STATUSES = tuple(s.value for s in Status)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One problem.

    ``id`` is unique and stable across runs (the p̂ estimator keys per-prompt statistics on it).
    Exactly one of ``text`` / ``messages`` is the prompt; ``answer`` is the reference (a string for math,
    a dict with tests and entry point for code). ``meta`` holds anything else (source file, row, level).
    """

    id: str
    answer: Any
    text: Optional[str] = None
    messages: Optional[List[Dict[str, str]]] = None
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"prompt {self.id!r}: give exactly one of text or messages")


@dataclasses.dataclass(frozen=True)
class Verdict:
    reward: float
    status: str = Status.OK.value
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; known: {STATUSES}")


class Task(ABC):
    """A verifiable task. Subclasses set ``name`` and ``continuous`` (rewards in [0,1] rather than {0,1})."""

    name: str = "task"
    continuous: bool = False

    @abstractmethod
    def prompts(self, split: str) -> List[Prompt]:
        """The prompts of ``split`` ("train" or "test"); raises ValueError for an unknown split."""

    @abstractmethod
    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        """Score one completion. Must be safe to call from any process; may raise (the pool counts it)."""

    def format_prompt(self, prompt: Prompt, tokenizer: Any = None) -> str:
        """The string given to the generator: the chat template when the tokenizer has one, else the text."""
        if prompt.messages is not None:
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                return tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
            return "\n".join(m["content"] for m in prompt.messages) + "\n"
        assert prompt.text is not None
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) and prompt.meta.get("chat", False):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
            )
        return prompt.text


# name -> factory(**params) -> Task. Modules register themselves on import (see tasks/__init__.py).
TASKS: Dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = factory
        return factory

    return deco


TASK_MODULES_ENV = "PASSK_RL_TASK_MODULES"


def load_task_modules() -> List[str]:
    """Import the modules named in ``$PASSK_RL_TASK_MODULES`` (comma-separated) so their tasks register; returns
    their names. ImportError naming the variable when one cannot be imported."""
    names = [m.strip() for m in os.environ.get(TASK_MODULES_ENV, "").split(",") if m.strip()]
    for mod in names:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ImportError(f"{TASK_MODULES_ENV}: cannot import task module {mod!r}: {e}") from e
    return names


def make_task(name: str, **params: Any) -> Task:
    from passk_rl import tasks as _all  # noqa: F401  (imports every task module so they register)

    if name not in TASKS:
        load_task_modules()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)} (a task outside passk_rl/tasks "
                         f"registers by naming its module in ${TASK_MODULES_ENV})")
    return TASKS[name](**params)
