"""MATH: competition mathematics with LaTeX answers (Hendrycks et al. 2021, arXiv 2103.03874).

Layouts accepted (local ``.jsonl``/``.json``/``.parquet``/``.arrow``, a ``save_to_disk`` directory, or a hub id):
- MATH: ``problem`` (str), ``solution`` (str whose last ``\\boxed{}`` is the answer), ``level`` ("Level 3"),
  ``type`` ("Algebra");
- MATH-500 style: the same plus ``answer`` (str), ``subject`` instead of ``type``, ``unique_id``.

Verification: the completion's answer is its last ``\\boxed{}`` (``extraction="strict"``; none → ``wrong_format``);
with ``extraction="flexible"`` a completion without a box is searched by math-verify for any final answer.
Equivalence is math-verify's (fractions, radicals, sets, intervals, matrices, ``\\text{}`` units, percent,
degrees), run in a child process with a wall-clock limit (see ``passk_rl.verify.math_equiv``).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from passk_rl.tasks.answers import AnswerTask, content_id, verdict_from_check
from passk_rl.tasks.base import Prompt, Status, Verdict, register_task
from passk_rl.tasks.loaders import FileSpec, Row
from passk_rl.verify.math_equiv import last_boxed

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
LAYOUT = "MATH layout: problem (str), solution (str with \\boxed{answer}), level ('Level N'), type (str)"


def parse_level(row: Row) -> Optional[int]:
    """``"Level 3"`` / ``3`` / ``"3"`` → 3; ``"Level ?"`` or absent → None; anything else → DataError."""
    v = row.data.get("level")
    if v is None:
        return None
    if isinstance(v, bool):
        raise row.error(f"field 'level' should be 'Level N' or an int, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(?:level\s*)?(\d+|\?)\s*", v, re.IGNORECASE)
        if m:
            return None if m.group(1) == "?" else int(m.group(1))
    raise row.error(f"field 'level' should be 'Level N' or an int, got {type(v).__name__} {v!r}")


@register_task("math")
class MATHTask(AnswerTask):
    """MATH (or MATH-500) from local files or the hub. Args as ``AnswerTask``'s (prompt_template has
    ``{problem}``; extraction ``strict``: the last ``\\boxed{}``, or ``flexible``), plus levels (keep only these
    difficulty levels, e.g. ``[1, 2, 3]``; None keeps all) and types (keep only these subjects, the ``type`` or
    ``subject`` field; None keeps all)."""

    name = "math"
    template_field = "problem"

    def __init__(
        self,
        train_files: FileSpec = None,
        test_files: FileSpec = None,
        dataset: Optional[str] = "DigitalLearningGmbH/MATH-lighteval",
        dataset_config: Optional[str] = "default",
        prompt_template: str = MATH_TEMPLATE,
        system_prompt: Optional[str] = None,
        chat: bool = True,
        levels: Optional[Sequence[int]] = None,
        types: Optional[Sequence[str]] = None,
        extraction: str = "strict",
        check_timeout_s: float = 5.0,
        limit: Optional[int] = None,
    ):
        super().__init__(train_files=train_files, test_files=test_files, dataset=dataset,
                         dataset_config=dataset_config, prompt_template=prompt_template, system_prompt=system_prompt,
                         chat=chat, extraction=extraction, check_timeout_s=check_timeout_s, limit=limit)
        self.levels = None if levels is None else {int(x) for x in levels}
        self.types = None if types is None else {str(t).lower() for t in types}

    def _row_to_prompt(self, row: Row, split: str) -> Optional[Prompt]:
        problem = row.get("problem", str, layout=LAYOUT)
        if not problem.strip():
            raise row.error("field 'problem' is empty")
        answer = row.get("answer", (str, int, float), layout=LAYOUT, required=False)
        solution = row.get("solution", str, layout=LAYOUT, required=answer is None)
        if answer is None:
            answer = last_boxed(solution)
            if answer is None:
                raise row.error(f"field 'solution' has no \\boxed{{...}} answer and there is no 'answer' field "
                                f"({LAYOUT})")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)  # datasets reads a JSON column of ints and floats as floats: keep "42", not "42.0"
        answer = str(answer).strip()
        if not answer:
            raise row.error("the reference answer is empty")
        level = parse_level(row)
        subject = row.get("type", str, layout=LAYOUT, required=False) or row.get(
            "subject", str, layout=LAYOUT, required=False)
        if self.levels is not None and level not in self.levels:
            return None
        if self.types is not None and (subject or "").lower() not in self.types:
            return None
        pid = row.data.get("unique_id")
        pid = f"math-{pid}" if isinstance(pid, str) and pid else content_id("math", problem)
        return self.make_prompt(pid, problem, answer, meta={"source": row.source, "row": row.index, "split": split,
                                                            "level": level, "type": subject,
                                                            "solution": solution or ""})

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        pred = last_boxed(completion)
        if pred is not None:
            return verdict_from_check(self.checker.check(str(prompt.answer), pred), how="boxed")
        if self.extraction == "strict":
            return Verdict(0.0, Status.WRONG_FORMAT.value, "no \\boxed{} answer in the completion")
        return verdict_from_check(self.checker.check(str(prompt.answer), completion, pred_mode="any"), how="any")
