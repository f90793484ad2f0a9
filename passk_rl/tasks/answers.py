"""The base of tasks whose completions end in one final answer checked by math-verify (GSM8K, MATH).

``AnswerTask`` holds what those tasks share: the data source (``DatasetTask``), the prompt template and chat
settings, the extraction mode, and the math-verify checker that runs in a child process with a wall-clock limit
(``passk_rl.verify.math_equiv``), with the verifier worker's hooks. A subclass names its template field
(``template_field``), turns a row into a prompt (``_row_to_prompt``) and extracts the answer (``verify``). The
prompt helpers here are shared with the code task.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional

from passk_rl.tasks.base import Prompt, Status, Task, Verdict
from passk_rl.tasks.loaders import DatasetTask, FileSpec
from passk_rl.verify.math_equiv import LazyMathChecker, MathCheck

EXTRACTIONS = ("strict", "flexible")


def prompt_messages(text: str, *, system_prompt: Optional[str]) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": text}]


def make_prompt(pid: str, text: str, answer: Any, *, chat: bool, system_prompt: Optional[str],
                meta: Dict[str, Any]) -> Prompt:
    """A text prompt (``meta["chat"]`` tells ``Task.format_prompt`` to apply the chat template when the tokenizer
    has one), or chat messages when a system prompt is given."""
    if chat and system_prompt:
        return Prompt(id=pid, answer=answer, messages=prompt_messages(text, system_prompt=system_prompt), meta=meta)
    return Prompt(id=pid, answer=answer, text=text, meta={**meta, "chat": bool(chat)})


def verdict_from_check(r: MathCheck, *, how: str) -> Verdict:
    if r.status == "ok":
        return Verdict(1.0 if r.equal else 0.0, Status.OK.value,
                       f"{how}: {r.pred!r} {'==' if r.equal else '!='} gold {r.gold!r}")
    return Verdict(0.0, r.status, f"{how}: {r.detail}")


def content_id(prefix: str, text: str) -> str:
    """A stable id from the prompt's content: survives reordering and moving the data files."""
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


class AnswerTask(DatasetTask, Task):
    """Args (every subclass): train_files, test_files (local files, globs or ``save_to_disk`` directories),
    dataset, dataset_config (hub id used when no local files are given), prompt_template (a format string with
    ``{<template_field>}``), system_prompt (then prompts are chat messages), chat (apply the tokenizer's chat
    template when it has one), extraction (``strict`` or ``flexible``), check_timeout_s (wall-clock limit of one
    math-verify check), limit (keep the first ``limit`` prompts of each split)."""

    continuous = False
    template_field = ""

    def __init__(self, *, train_files: FileSpec, test_files: FileSpec, dataset: Optional[str],
                 dataset_config: Optional[str], prompt_template: str, system_prompt: Optional[str], chat: bool,
                 extraction: str, check_timeout_s: float, limit: Optional[int]):
        if extraction not in EXTRACTIONS:
            raise ValueError(f"task {self.name}: extraction must be one of {EXTRACTIONS}, got {extraction!r}")
        placeholder = "{" + self.template_field + "}"
        if placeholder not in prompt_template:
            raise ValueError(f"task {self.name}: prompt_template must contain '{placeholder}', got "
                             f"{prompt_template!r}")
        self._init_source(train_files=train_files, test_files=test_files, dataset=dataset,
                          dataset_config=dataset_config, limit=limit)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.chat = chat
        self.extraction = extraction
        self.checker = LazyMathChecker(timeout_s=check_timeout_s)

    def make_prompt(self, pid: str, question: str, answer: Any, meta: Dict[str, Any]) -> Prompt:
        text = self.prompt_template.format(**{self.template_field: question})
        return make_prompt(pid, text, answer, chat=self.chat, system_prompt=self.system_prompt, meta=meta)

    # optional hooks used by the verifier worker
    def warmup(self) -> None:
        self.checker.warmup()

    def interrupt(self) -> None:
        self.checker.interrupt()

    def close(self) -> None:
        self.checker.close()
