"""GSM8K: grade-school word problems with a numeric final answer (Cobbe et al. 2021, arXiv 2110.14168).

Layout (the hub's ``openai/gsm8k``, config ``main``): ``question`` (str), ``answer`` (str: worked solution ending
in ``#### <number>``). Local ``.jsonl``/``.json``/``.parquet``/``.arrow`` files or ``save_to_disk``
directories in that layout work the same (all read by ``datasets``, see ``passk_rl.tasks.loaders``).

Verification: the completion's final answer is the text after its last ``####`` or, failing that, its last
``\\boxed{}``; with ``extraction="flexible"`` also what follows "the answer is", and finally the last number.
No answer → ``wrong_format``. The answer is normalised (``$``, thousands separators, trailing unit words) and
compared with the reference by math-verify in a child process with a wall-clock limit (see
``passk_rl.verify.math_equiv``), so the check is the same in every thread and process.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

from passk_rl.tasks.base import Prompt, Status, Task, Verdict, register_task
from passk_rl.tasks.loaders import DatasetTask, FileSpec, Row
from passk_rl.verify.math_equiv import (
    LazyMathChecker,
    MathCheck,
    extract_answer_phrase,
    extract_hash_answer,
    gsm8k_gold_answer,
    last_boxed,
    last_number,
    normalize_numeric_answer,
)

GSM8K_TEMPLATE = "{question}\nLet's think step by step and output the final answer after \"####\"."
LAYOUT = "GSM8K layout: question (str), answer (str ending in '#### <number>')"
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


@register_task("gsm8k")
class GSM8KTask(DatasetTask, Task):
    """GSM8K from local files or the hub.

    Args:
        train_files, test_files: local ``.jsonl``/``.json``/``.parquet``/``.arrow`` paths, globs or
            ``save_to_disk`` directories (a string or a list).
        dataset, dataset_config: Hugging Face id used when no local files are given.
        prompt_template: format string with ``{question}``.
        system_prompt: optional system message (then prompts are chat messages).
        chat: apply the tokenizer's chat template (when it has one) to the prompt.
        extraction: ``strict`` (``####`` or ``\\boxed{}``) or ``flexible`` (also "the answer is", last number).
        check_timeout_s: wall-clock limit of one math-verify check.
        limit: keep only the first ``limit`` prompts of each split.
    """

    name = "gsm8k"
    continuous = False

    def __init__(
        self,
        train_files: FileSpec = None,
        test_files: FileSpec = None,
        dataset: Optional[str] = "openai/gsm8k",
        dataset_config: Optional[str] = "main",
        prompt_template: str = GSM8K_TEMPLATE,
        system_prompt: Optional[str] = None,
        chat: bool = True,
        extraction: str = "strict",
        check_timeout_s: float = 5.0,
        limit: Optional[int] = None,
    ):
        if extraction not in EXTRACTIONS:
            raise ValueError(f"task gsm8k: extraction must be one of {EXTRACTIONS}, got {extraction!r}")
        if "{question}" not in prompt_template:
            raise ValueError(f"task gsm8k: prompt_template must contain '{{question}}', got {prompt_template!r}")
        self._init_source(train_files=train_files, test_files=test_files, dataset=dataset,
                          dataset_config=dataset_config, limit=limit)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.chat = chat
        self.extraction = extraction
        self.checker = LazyMathChecker(timeout_s=check_timeout_s)

    def _row_to_prompt(self, row: Row, split: str) -> Prompt:
        question = row.get("question", str, layout=LAYOUT)
        answer = row.get("answer", (str, int, float), layout=LAYOUT)
        if isinstance(answer, str):
            gold = gsm8k_gold_answer(answer)
            if gold is None:
                raise row.error(f"field 'answer' has no '#### <final answer>' line ({LAYOUT})")
        else:  # some exports store the final number alone
            if isinstance(answer, float) and answer.is_integer():
                # datasets reads a JSON column of ints and floats as floats: 42 must stay "42", not "42.0"
                answer = int(answer)
            gold = normalize_numeric_answer(str(answer))
        if not question.strip():
            raise row.error("field 'question' is empty")
        text = self.prompt_template.format(question=question)
        return make_prompt(content_id("gsm8k", question), text, gold, chat=self.chat,
                           system_prompt=self.system_prompt,
                           meta={"source": row.source, "row": row.index, "split": split,
                                 "solution": answer if isinstance(answer, str) else ""})

    def extract(self, completion: str) -> Tuple[Optional[str], str]:
        """(final answer or None, how it was found)."""
        ans = extract_hash_answer(completion)
        if ans is not None:
            return ans, "####"
        ans = last_boxed(completion)
        if ans is not None:
            return ans, "boxed"
        if self.extraction == "flexible":
            ans = extract_answer_phrase(completion)
            if ans is not None:
                return ans, "answer-is"
            ans = last_number(completion)
            if ans is not None:
                return ans, "last-number"
        return None, ""

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        ans, how = self.extract(completion)
        if ans is None:
            looked = "'####' or \\boxed{}" + (", 'the answer is', a number" if self.extraction == "flexible" else "")
            return Verdict(0.0, Status.WRONG_FORMAT.value, f"no final answer found (looked for {looked})")
        return verdict_from_check(self.checker.check(str(prompt.answer), normalize_numeric_answer(ans)), how=how)

    # optional hooks used by the verifier worker
    def warmup(self) -> None:
        self.checker.warmup()

    def interrupt(self) -> None:
        self.checker.interrupt()

    def close(self) -> None:
        self.checker.close()
