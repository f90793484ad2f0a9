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

from typing import Optional, Tuple

from passk_rl.tasks.answers import AnswerTask, content_id, verdict_from_check
from passk_rl.tasks.base import Prompt, Status, Verdict, register_task
from passk_rl.tasks.loaders import FileSpec, Row
from passk_rl.verify.math_equiv import (
    extract_answer_phrase,
    extract_hash_answer,
    gsm8k_gold_answer,
    last_boxed,
    last_number,
    normalize_numeric_answer,
)

GSM8K_TEMPLATE = "{question}\nLet's think step by step and output the final answer after \"####\"."
LAYOUT = "GSM8K layout: question (str), answer (str ending in '#### <number>')"


@register_task("gsm8k")
class GSM8KTask(AnswerTask):
    """GSM8K from local files or the hub. Args as ``AnswerTask``'s; prompt_template has ``{question}``;
    extraction ``strict`` (``####`` or ``\\boxed{}``) or ``flexible`` (also "the answer is", last number)."""

    name = "gsm8k"
    template_field = "question"

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
        super().__init__(train_files=train_files, test_files=test_files, dataset=dataset,
                         dataset_config=dataset_config, prompt_template=prompt_template, system_prompt=system_prompt,
                         chat=chat, extraction=extraction, check_timeout_s=check_timeout_s, limit=limit)

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
        return self.make_prompt(content_id("gsm8k", question), question, gold,
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
