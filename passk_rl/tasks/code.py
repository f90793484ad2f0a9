"""Code generation checked by running tests in a sandbox: HumanEval and MBPP layouts.

Layouts (detected per file from its first row, or forced with ``layout=``):
- HumanEval (Chen et al. 2021, arXiv 2107.03374): ``task_id``, ``prompt`` (signature + docstring),
  ``canonical_solution``, ``test`` (module code defining ``check(candidate)``), ``entry_point``.
- MBPP (Austin et al. 2021, arXiv 2108.07732): ``task_id``, ``text`` (description), ``code`` (reference),
  ``test_list`` (list of assert statements), optional ``test_setup_code`` and ``challenge_test_list``.

Tests are individual statements so the reward is continuous: HumanEval's ``check`` body is split into its
assert statements (a loop of asserts counts as one test; plain statements run before the next test; constant
``assert True`` lines are dropped because they pass for any program); MBPP's ``test_list`` entries are the tests.
Reward = fraction of tests passed (``reward="all"`` gives the binary pass/fail of the original benchmarks).

The program is built from the completion: the last fenced code block that defines the entry point (or the
last block, or the raw completion); a completion that defines the entry point is appended after the prompt
(whose imports and helpers it may use), otherwise it continues the prompt's function body.
Execution: ``passk_rl.verify.sandbox``: the program runs in an isolated child process that only answers calls;
the tests run in a separate judge process that compares the answers, so the program cannot forge a verdict.
"""

from __future__ import annotations

import ast
import re
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from passk_rl.tasks.base import Prompt, Task, Verdict, register_task
from passk_rl.tasks.answers import make_prompt
from passk_rl.tasks.loaders import DatasetTask, FileSpec, Row
from passk_rl.verify.sandbox import Sandbox, SandboxLimits

HUMANEVAL_LAYOUT = "HumanEval layout: task_id, prompt, canonical_solution, test, entry_point (all str)"
MBPP_LAYOUT = "MBPP layout: task_id, text (str), code (str), test_list (list of str)"
LAYOUTS = ("auto", "humaneval", "mbpp")
HUMANEVAL_TEMPLATE = "Complete the following Python function.\n```python\n{prompt}```"
MBPP_TEMPLATE = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}\n"

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def split_check_tests(test_src: str) -> Tuple[str, List[str]]:
    """HumanEval ``test`` source → (setup, tests).

    ``setup`` is the module code other than ``check`` (imports, METADATA, helpers). Each test is one assert
    statement of ``check``'s body (a compound statement containing asserts counts as one), preceded by the
    plain statements before it; the check's parameter is bound to ``candidate``. Constant asserts
    (``assert True``) are dropped. Without a ``check`` function the whole ``check(candidate)`` is one test.
    Raises SyntaxError for source that does not parse.
    """
    tree = ast.parse(test_src)
    check = None
    setup_nodes: List[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "check":
            check = node
        else:
            setup_nodes.append(node)
    if check is None or not check.args.args:
        return test_src, ["check(candidate)"]
    param = check.args.args[0].arg
    bind = "" if param == "candidate" else f"{param} = candidate\n"
    tests: List[str] = []
    pending: List[ast.stmt] = []
    body = list(check.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
            body[0].value.value, str):
        body = body[1:]  # docstring
    for stmt in body:
        if isinstance(stmt, ast.Return) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Constant):
            continue
        pending.append(stmt)
        if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            tests.append(bind + "\n".join(ast.unparse(s) for s in pending))
            pending = []
    if not tests:
        return test_src, ["check(candidate)"]
    return "\n".join(ast.unparse(s) for s in setup_nodes), tests


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(completion: str, entry_point: Optional[str]) -> str:
    """The code in ``completion``: the last fenced block defining ``entry_point``, else the last python (or
    unlabelled) fenced block, else the completion itself. An unclosed final fence (truncated output) counts."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return completion
    if entry_point:
        for _, body in reversed(blocks):
            if _defines(body, entry_point):
                return body
    for lang, body in reversed(blocks):
        if lang in ("", "python", "py", "python3"):
            return body
    return blocks[-1][1]


def build_program(prompt_code: str, completion: str, entry_point: Optional[str]) -> str:
    """Program to run: the prompt plus the completion's code (appended when it defines the entry point,
    otherwise as the continuation of the prompt's function body)."""
    code = extract_code(completion, entry_point)
    if not prompt_code:
        return code
    if entry_point and _defines(code, entry_point):
        return prompt_code.rstrip("\n") + "\n\n" + code
    return prompt_code + code


def _mbpp_entry_point(code: Optional[str], tests: Sequence[str]) -> Optional[str]:
    names: List[str] = []
    if code:
        try:
            names = [n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        except SyntaxError:
            names = []
    joined = "\n".join(tests)
    for n in names:
        if re.search(rf"\b{re.escape(n)}\s*\(", joined):
            return n
    m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?([A-Za-z_]\w*)\s*\(", joined)
    return m.group(1) if m else None


@register_task("code")
class CodeTask(DatasetTask, Task):
    """HumanEval / MBPP style code tasks with sandboxed test execution.

    Args:
        train_files, test_files, dataset, dataset_config, limit: as for ``gsm8k`` (no default hub id: e.g.
            ``openai/openai_humaneval`` (test split only) or ``google-research-datasets/mbpp``).
        layout: ``auto``, ``humaneval`` or ``mbpp``.
        prompt_template: format string; HumanEval: ``{prompt}``; MBPP: ``{text}`` and ``{tests}``. Default
            depends on the layout.
        chat, system_prompt: as for ``gsm8k``.
        reward: ``fraction`` (tests passed / tests) or ``all`` (1 only when every test passes).
        timeout_s, cpu_s, memory_mb: sandbox limits per completion.
        isolate_network, drop_privileges: sandbox layers (see ``passk_rl.verify.sandbox``).
        include_challenge_tests: MBPP: also run ``challenge_test_list``.
    """

    name = "code"
    continuous = True

    def __init__(
        self,
        train_files: FileSpec = None,
        test_files: FileSpec = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        layout: str = "auto",
        prompt_template: Optional[str] = None,
        system_prompt: Optional[str] = None,
        chat: bool = True,
        reward: str = "fraction",
        timeout_s: float = 10.0,
        cpu_s: Optional[int] = None,
        memory_mb: Optional[int] = 1024,
        isolate_network: bool = True,
        drop_privileges: bool = True,
        include_challenge_tests: bool = False,
        limit: Optional[int] = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"task code: layout must be one of {LAYOUTS}, got {layout!r}")
        if reward not in ("fraction", "all"):
            raise ValueError(f"task code: reward must be 'fraction' or 'all', got {reward!r}")
        self._init_source(train_files=train_files, test_files=test_files, dataset=dataset,
                          dataset_config=dataset_config, limit=limit)
        self.layout = layout
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.chat = chat
        self.reward = reward
        self.continuous = reward == "fraction"
        self.include_challenge_tests = include_challenge_tests
        self.limits = SandboxLimits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)
        self._sandbox_kw = dict(isolate_network=isolate_network, drop_privileges=drop_privileges)
        self._sandbox: Optional[Sandbox] = None
        self._lock = threading.Lock()
        self._file_layout: Dict[str, str] = {}

    @property
    def sandbox(self) -> Sandbox:
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self.limits, **self._sandbox_kw)
            return self._sandbox

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_sandbox"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- data
    def _layout_of(self, row: Row) -> str:
        if self.layout != "auto":
            return self.layout
        if row.source not in self._file_layout:
            d = row.data
            if "entry_point" in d or ("prompt" in d and "test" in d):
                self._file_layout[row.source] = "humaneval"
            elif "test_list" in d or "text" in d:
                self._file_layout[row.source] = "mbpp"
            else:
                raise row.error(f"cannot tell the layout from fields {sorted(d)}; expected {HUMANEVAL_LAYOUT} "
                                f"or {MBPP_LAYOUT} (or set task.layout)")
        return self._file_layout[row.source]

    def _row_to_prompt(self, row: Row, split: str) -> Prompt:
        if self._layout_of(row) == "humaneval":
            return self._humaneval_prompt(row, split)
        return self._mbpp_prompt(row, split)

    def _humaneval_prompt(self, row: Row, split: str) -> Prompt:
        tid = row.get("task_id", (str, int), layout=HUMANEVAL_LAYOUT)
        prompt = row.get("prompt", str, layout=HUMANEVAL_LAYOUT)
        test = row.get("test", str, layout=HUMANEVAL_LAYOUT)
        ep = row.get("entry_point", str, layout=HUMANEVAL_LAYOUT)
        sol = row.get("canonical_solution", str, layout=HUMANEVAL_LAYOUT, required=False)
        if not ep.isidentifier():
            raise row.error(f"field 'entry_point' is not a Python identifier: {ep!r}")
        try:
            setup, tests = split_check_tests(test)
        except SyntaxError as e:
            raise row.error(f"field 'test' is not valid Python: {e}") from None
        answer = {"prompt_code": prompt, "entry_point": ep, "setup": setup, "tests": tests}
        text = (self.prompt_template or HUMANEVAL_TEMPLATE).format(prompt=prompt) if self.chat else prompt
        return make_prompt(str(tid), text, answer, chat=self.chat, system_prompt=self.system_prompt,
                           meta={"source": row.source, "row": row.index, "split": split, "layout": "humaneval",
                                 "canonical_solution": sol or ""})

    def _mbpp_prompt(self, row: Row, split: str) -> Prompt:
        tid = row.get("task_id", (str, int), layout=MBPP_LAYOUT)
        text = row.get("text", str, layout=MBPP_LAYOUT, required=False) or row.get("prompt", str, layout=MBPP_LAYOUT)
        tests = row.get("test_list", list, layout=MBPP_LAYOUT)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise row.error(f"field 'test_list' should be a non-empty list of str ({MBPP_LAYOUT})")
        code = row.get("code", str, layout=MBPP_LAYOUT, required=False)
        setup = row.get("test_setup_code", str, layout=MBPP_LAYOUT, required=False) or ""
        extra = row.get("challenge_test_list", list, layout=MBPP_LAYOUT, required=False) or []
        all_tests = list(tests) + ([t for t in extra if isinstance(t, str)] if self.include_challenge_tests else [])
        for i, t in enumerate(all_tests):
            try:
                ast.parse(t)
            except SyntaxError as e:
                raise row.error(f"test {i} is not valid Python: {e}") from None
        ep = _mbpp_entry_point(code, tests)
        answer = {"prompt_code": "", "entry_point": ep, "setup": setup, "tests": all_tests}
        ptext = (self.prompt_template or MBPP_TEMPLATE).format(text=text, tests="\n".join(tests))
        return make_prompt(f"mbpp/{tid}", ptext, answer, chat=self.chat, system_prompt=self.system_prompt,
                           meta={"source": row.source, "row": row.index, "split": split, "layout": "mbpp",
                                 "canonical_solution": code or ""})

    # -- verification
    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        ans = prompt.answer
        if not isinstance(ans, dict) or "tests" not in ans:
            raise ValueError(f"prompt {prompt.id!r}: a code prompt's answer must be a dict with 'tests'")
        program = build_program(ans.get("prompt_code", ""), completion, ans.get("entry_point"))
        if not program.strip():
            return Verdict(0.0, "wrong_format", "no code in the completion")
        # The prompt's own code (HumanEval: helpers such as ``poly`` that some tests call) runs in the judge as
        # well, so a completion that redefines a helper cannot change what the tests measure.
        r = self.sandbox.run(program, ans["tests"], setup=ans.get("setup", ""), entry_point=ans.get("entry_point"),
                             trusted_code=ans.get("prompt_code", ""))
        reward = r.reward
        if self.reward == "all":
            reward = 1.0 if (r.status == "ok" and r.total > 0 and r.passed == r.total) else 0.0
        return Verdict(reward, r.status, r.detail)

    def interrupt(self) -> None:
        sb = self._sandbox
        if sb is not None:
            sb.interrupt()

    def warmup(self) -> None:
        _ = self.sandbox
