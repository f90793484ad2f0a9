"""The built-in task "arith": a countdown-style arithmetic puzzle with several valid answers.

A prompt gives a few small numbers and a target; the answer combines each given number exactly once with the task's
operators to reach the target, written as worked steps (the form the base model learns) or as one expression::

    Use 3 7 5 to make 26.
    Answer: 3*7=21, 21+5=26          (or: 3*7+5)

Worked steps make the arithmetic local — each step is one small operation a character-level model can learn —
while choosing which numbers to combine first remains a search: sampling several attempts pays off.

Why this task: it is exactly verifiable, most puzzles have several correct answers (so sampling breadth pays off
and pass@k grows with k), and a tiny character-level model can learn the format quickly but the arithmetic only
partly — the base model made by ``passk_rl.tasks.make_base`` solves some puzzles and has room to improve at every k.

Problems are all (multiset of numbers, reachable target) pairs for the task's parameters; a seeded shuffle splits
them into three disjoint splits: "test" (held out), "train" (the RL puzzles) and "sft" (the rest, used only by the
base model's supervised warm start). Disjointness is on the multiset and target, so a puzzle is never a
reordering of another split's numbers. Keeping RL puzzles out of the warm start matters: RL on puzzles the base
model was fitted to mostly recalls them, and its gains then do not carry over to held-out puzzles.

The verifier never evaluates code: it extracts steps / an expression with a character whitelist and parses them
with a small recursive-descent parser over integers, ``+ - * /`` and parentheses, computing exactly with
``fractions.Fraction``. Every intermediate result of a reference solution is a non-negative integer.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from passk_rl.tasks.base import Prompt, Status, Task, Verdict, register_task

SPLITS = ("train", "val", "test", "sft")
ALL_OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

# Bounds that keep parsing cheap whatever a policy emits.
MAX_EXPR_CHARS = 128
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 6


class ExprError(ValueError):
    """The text is not an expression of the grammar (a format problem, not a wrong answer)."""


# ------------------------------------------------------------------------------------------ parsing
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


def _tokenize(text: str) -> List[str]:
    toks: List[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ExprError(f"unexpected character {text[pos]!r} at {pos}")
        if m.group(1) is not None and len(m.group(1)) > MAX_LITERAL_DIGITS:
            raise ExprError(f"number literal longer than {MAX_LITERAL_DIGITS} digits")
        toks.append(m.group(1) if m.group(1) is not None else m.group(2))
        pos = m.end()
    return toks


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'.

    No unary minus (countdown rules: only the given numbers and binary operators). Division is exact; a
    division by zero raises ZeroDivisionError, which the verifier scores as a wrong answer.
    """

    def __init__(self, tokens: List[str]):
        self.toks = tokens
        self.i = 0
        self.literals: List[int] = []
        self.ops: List[str] = []

    def parse(self) -> Fraction:
        if not self.toks:
            raise ExprError("empty expression")
        value = self._expr(0)
        if self.i != len(self.toks):
            raise ExprError(f"unexpected {self.toks[self.i]!r} after a complete expression")
        return value

    def _peek(self) -> Optional[str]:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.toks[self.i]
            self.i += 1
            self.ops.append(op)
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.toks[self.i]
            self.i += 1
            self.ops.append(op)
            rhs = self._factor(depth)
            value = value * rhs if op == "*" else value / rhs  # Fraction / 0 raises ZeroDivisionError
        return value

    def _factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise ExprError("expression ends early")
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExprError(f"parentheses nested deeper than {MAX_DEPTH}")
            self.i += 1
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise ExprError("missing ')'")
            self.i += 1
            return value
        if tok.isdigit():
            self.i += 1
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise ExprError(f"unexpected {tok!r}")


def parse_expression(text: str) -> Tuple[Fraction, List[int], List[str]]:
    """Parse ``text`` → (exact value, integer literals in order, operators used). Raises ExprError.

    Raises ZeroDivisionError for a syntactically valid expression that divides by zero.
    """
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    p = _Parser(_tokenize(text))
    value = p.parse()
    return value, p.literals, p.ops


# ------------------------------------------------------------------------------------------ extraction
_ANSWER_RE = re.compile(r"answer\s*(?:is)?\s*[:=]?", re.IGNORECASE)
# Newlines end a candidate: an expression never spans lines.
_RUN_RE = re.compile(r"[0-9+\-*/() \t]+")
# One worked step "E = R": an expression, "=", a (signed) integer result not followed by more expression.
_STEP_RE = re.compile(r"([0-9+\-*/() \t]*[0-9)])[ \t]*=[ \t]*(-?\d{1,%d})(?![0-9+\-*/(=])" % MAX_LITERAL_DIGITS)
_EOS_MARKERS = ("</s>", "<|endoftext|>", "<|im_end|>")


def _parses(candidate: str) -> bool:
    try:
        parse_expression(candidate)
    except ExprError:
        return False
    except ZeroDivisionError:
        return True  # well formed; the verifier scores it as wrong
    return True


def _answer_region(completion: str) -> str:
    """The completion before any end-of-sequence marker, after the last "Answer:" (if any)."""
    text = completion
    for marker in _EOS_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    matches = list(_ANSWER_RE.finditer(text))
    if matches:
        text = text[matches[-1].end():]
    return text


def _trim(run: str) -> Optional[str]:
    """``run`` if it parses, else ``run`` without stray leading/trailing operators if that parses, else None."""
    run = run.strip()
    if _parses(run):
        return run
    trimmed = run.rstrip("+-*/( \t").lstrip("+*/) \t")
    if trimmed and trimmed != run and _parses(trimmed):
        return trimmed
    return None


def extract_steps(completion: str) -> Optional[List[Tuple[str, int]]]:
    """Worked steps "E = R" in order (as (expression, claimed integer result)), or None when there are none.

    Steps may be separated by commas, semicolons, spaces or newlines, with any text around them. A step whose
    left side does not parse makes the whole answer malformed (None is not returned then: ExprError is raised).
    """
    text = _answer_region(completion)
    steps = []
    for m in _STEP_RE.finditer(text):
        expr = _trim(m.group(1))
        if expr is None:
            raise ExprError(f"cannot parse the left side of step {m.group(0).strip()!r}")
        steps.append((expr, int(m.group(2))))
    return steps or None


def extract_expression(completion: str) -> Optional[str]:
    """The answer expression in a completion without worked steps, or None when there is none.

    Tolerates formatting noise: an end-of-sequence marker and anything after it, an "Answer:" prefix (the text
    after the last one is used), spaces, trailing words or punctuation. Among the maximal runs of expression
    characters (digits, ``+-*/()``, spaces) that contain a digit and parse, the first one with an operator wins,
    else the first one (a lone number). A run with stray trailing operators or an unmatched trailing ``(``
    (e.g. "3*7+5 - done") is retried with them trimmed.
    """
    found: List[str] = []
    for m in _RUN_RE.finditer(_answer_region(completion)):
        run = m.group(0)
        if any(ch.isdigit() for ch in run):
            cand = _trim(run)
            if cand is not None:
                found.append(cand)
    if not found:
        return None
    for cand in found:
        if any(op in cand for op in ALL_OPS):
            return cand
    return found[0]


# ------------------------------------------------------------------------------------------ enumeration
# A node of an expression tree: (value, expression string with minimal brackets, top operator, worked steps).
_Node = Tuple[Fraction, str, Optional[str], Tuple[str, ...]]


def _wrap(node: _Node, parent_op: str, right: bool) -> str:
    _, s, op, _ = node
    if op is None:
        return s
    if _PREC[op] < _PREC[parent_op] or (right and _PREC[op] == _PREC[parent_op] and parent_op in "-/"):
        return f"({s})"
    return s


def _combine(a: _Node, b: _Node, op: str) -> Optional[_Node]:
    """a op b, or None when the result is not a non-negative integer (countdown rule for every step)."""
    va, vb = a[0], b[0]
    if op == "+":
        v = va + vb
    elif op == "-":
        v = va - vb
    elif op == "*":
        v = va * vb
    else:
        if vb == 0:
            return None
        v = va / vb
    if v < 0 or v.denominator != 1:
        return None
    step = f"{va}{op}{vb}={v}"
    return (v, f"{_wrap(a, op, False)}{op}{_wrap(b, op, True)}", op, a[3] + b[3] + (step,))


@lru_cache(maxsize=None)
def _trees(nums: Tuple[int, ...], ops: str) -> Tuple[_Node, ...]:
    """Every expression using each of ``nums`` (an ordered tuple) once, in that order."""
    if len(nums) == 1:
        return ((Fraction(nums[0]), str(nums[0]), None, ()),)
    out = []
    for cut in range(1, len(nums)):
        for a in _trees(nums[:cut], ops):
            for b in _trees(nums[cut:], ops):
                for op in ops:
                    node = _combine(a, b, op)
                    if node is not None:
                        out.append(node)
    return tuple(out)


STEP_SEP = ", "


def solve(numbers: Sequence[int], ops: str = "+-*") -> Dict[int, List[str]]:
    """target → sorted distinct worked solutions ("3*7=21, 21+5=26") using each number exactly once.

    Every intermediate result is a non-negative integer; all number orders and bracketings are included.
    """
    by_value: Dict[int, set] = {}
    for perm in set(itertools.permutations(sorted(numbers))):
        for value, _, _, steps in _trees(tuple(perm), ops):
            by_value.setdefault(int(value), set()).add(STEP_SEP.join(steps))
    return {v: sorted(ss) for v, ss in by_value.items()}


def solve_expressions(numbers: Sequence[int], ops: str = "+-*") -> Dict[int, List[str]]:
    """target → sorted distinct single expressions ("3*7+5"), same rules as ``solve``."""
    by_value: Dict[int, set] = {}
    for perm in set(itertools.permutations(sorted(numbers))):
        for value, expr, _, _ in _trees(tuple(perm), ops):
            by_value.setdefault(int(value), set()).add(expr)
    return {v: sorted(ss) for v, ss in by_value.items()}


# ------------------------------------------------------------------------------------------ the task
def format_prompt_text(numbers: Sequence[int], target: int) -> str:
    return f"Use {' '.join(str(x) for x in numbers)} to make {target}.\nAnswer: "


def _stable_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@register_task("arith")
class ArithTask(Task):
    """Countdown-style puzzles: use each of ``num_count`` numbers in [1, ``max_number``] once to make the target.

    Parameters (all keyword, all part of the problem set's identity):
    - ``seed``: the split and the order in which each puzzle shows its numbers.
    - ``num_count`` (3), ``max_number`` (12): puzzle size. ``min_target`` (1) / ``max_target`` (100): the
      targets kept among the reachable values.
    - ``ops`` ("+-*"): the operators a correct answer may use. An answer with another operator is wrong.
    - ``test_size`` (256): held-out puzzles ("test"); ``train_size`` (1024): the RL puzzles, of which the first
      ``val_size`` (128) are set aside as "val" (for choosing hyperparameters: never trained on, never the test
      split) and the rest are "train"; all the others form "sft", the split the base model's supervised warm
      start uses. The splits are disjoint, so RL trains on puzzles the base model never saw — what it gains
      there is skill, not recall, and carries over to the held-out split.

    ``Prompt.answer`` is ``{"numbers": [...], "target": int}`` (what ``verify`` needs); ``Prompt.meta`` has
    ``num_solutions``. ``solutions(prompt)`` lists every worked solution (the supervised warm start uses it).
    """

    name = "arith"
    continuous = False

    def __init__(self, *, seed: int = 0, num_count: int = 3, max_number: int = 12, min_target: int = 1,
                 max_target: int = 100, ops: str = "+-*", test_size: int = 256, train_size: int = 1024,
                 val_size: int = 128):
        if not 2 <= num_count <= 4:
            raise ValueError(f"arith: num_count must be 2..4, got {num_count}")
        if not 1 <= max_number <= 99:
            raise ValueError(f"arith: max_number must be 1..99, got {max_number}")
        if min_target > max_target:
            raise ValueError(f"arith: min_target {min_target} > max_target {max_target}")
        if not ops or any(op not in ALL_OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"arith: ops must be distinct characters of {ALL_OPS!r}, got {ops!r}")
        if test_size < 1 or train_size < 1:
            raise ValueError(f"arith: test_size and train_size must be >= 1, got {test_size}, {train_size}")
        if not 0 <= val_size < train_size:
            raise ValueError(f"arith: val_size must be in [0, train_size={train_size}), got {val_size}")
        self.seed = int(seed)
        self.num_count = num_count
        self.max_number = max_number
        self.min_target = min_target
        self.max_target = max_target
        self.ops = "".join(op for op in ALL_OPS if op in ops)  # canonical order: same problems, same ids
        self.test_size = test_size
        self.train_size = train_size
        self.val_size = val_size
        self._splits: Optional[Dict[str, List[Prompt]]] = None
        self._solutions: Dict[str, List[str]] = {}

    # ---- problem set
    def _build(self) -> Dict[str, List[Prompt]]:
        problems = []  # (sorted numbers, target, solutions)
        for nums in itertools.combinations_with_replacement(range(1, self.max_number + 1), self.num_count):
            for value, sols in solve(nums, self.ops).items():
                if self.min_target <= value <= self.max_target:
                    problems.append((nums, value, sols))
        problems.sort(key=lambda t: (t[0], t[1]))
        order = list(range(len(problems)))
        random.Random(self.seed).shuffle(order)
        if self.test_size + self.train_size >= len(problems):
            raise ValueError(f"arith: test_size {self.test_size} + train_size {self.train_size} leaves no puzzles "
                             f"for the warm start (only {len(problems)} puzzles for these parameters)")
        cut = self.test_size + self.train_size
        val_end = self.test_size + self.val_size
        parts = {"test": order[: self.test_size], "val": order[self.test_size: val_end], "train": order[val_end: cut],
                 "sft": order[cut:]}
        splits: Dict[str, List[Prompt]] = {}
        for split, idx in parts.items():
            prompts = []
            for i in idx:
                nums, target, sols = problems[i]
                shown = list(nums)
                _stable_rng(self.seed, "order", nums, target).shuffle(shown)
                pid = f"arith/{'-'.join(map(str, shown))}/{target}"
                prompts.append(Prompt(id=pid, text=format_prompt_text(shown, target),
                                      answer={"numbers": shown, "target": target},
                                      meta={"num_solutions": len(sols), "split": split}))
                self._solutions[pid] = sols
            splits[split] = prompts
        return splits

    def prompts(self, split: str) -> List[Prompt]:
        if split not in SPLITS:
            raise ValueError(f"arith: unknown split {split!r}; known splits: {list(SPLITS)}")
        if self._splits is None:
            self._splits = self._build()
        return list(self._splits[split])

    def to_dataset(self, split: str):
        """The prompts of ``split`` as a ``datasets.Dataset``, one row per puzzle in ``prompts(split)`` order, with
        columns ``id``, ``prompt`` (the text), ``numbers``, ``target`` and ``num_solutions``: the problem set in the
        form the usual tools read (``save_to_disk``, ``to_parquet``, ``push_to_hub``). The columns are all that
        ``verify`` needs, so a saved split reads back through ``passk_rl.tasks.loaders`` unchanged."""
        import datasets  # here, not at module top: importing it costs seconds, and most users of arith never export

        prompts = self.prompts(split)
        features = datasets.Features({
            "id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "numbers": datasets.Sequence(datasets.Value("int64")),
            "target": datasets.Value("int64"),
            "num_solutions": datasets.Value("int64"),
        })
        columns = {
            "id": [p.id for p in prompts],
            "prompt": [p.text for p in prompts],
            "numbers": [list(p.answer["numbers"]) for p in prompts],
            "target": [p.answer["target"] for p in prompts],
            "num_solutions": [p.meta["num_solutions"] for p in prompts],
        }
        return datasets.Dataset.from_dict(columns, features=features, split=split)

    def solutions(self, prompt: Prompt) -> List[str]:
        """Every worked solution of ``prompt`` ("3*7=21, 21+5=26"; all number orders and bracketings), sorted."""
        if self._splits is None:
            self._splits = self._build()
        if prompt.id in self._solutions:
            return list(self._solutions[prompt.id])
        nums, target = self._unpack(prompt)
        return list(solve(nums, self.ops).get(target, []))

    # ---- verification
    @staticmethod
    def _unpack(prompt: Prompt) -> Tuple[List[int], int]:
        ans = prompt.answer
        if not isinstance(ans, dict) or "numbers" not in ans or "target" not in ans:
            raise ValueError(f"arith: prompt {prompt.id!r} has no {{'numbers', 'target'}} answer: {ans!r}")
        return [int(x) for x in ans["numbers"]], int(ans["target"])

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        """1 for a correct answer, else 0; ``wrong_format`` when no answer can be read.

        Two answer forms are accepted: worked steps ("3*7=21, 21+5=26": each step's claim must be exact, each
        step uses numbers still available — given ones or earlier results — once, and all of it must end in just
        the target) or one expression ("3*7+5", "(1+3)*11": uses each given number once and equals the target).
        """
        numbers, target = self._unpack(prompt)
        try:
            steps = extract_steps(completion)
        except ExprError as e:
            return Verdict(0.0, Status.WRONG_FORMAT.value, str(e))
        if steps is None:
            expr = extract_expression(completion)
            if expr is None:
                return Verdict(0.0, Status.WRONG_FORMAT.value, "no arithmetic expression found")
            return self._check_expression(expr, numbers, target)
        return self._check_steps(steps, numbers, target)

    def _check_ops(self, expr: str, ops: Sequence[str]) -> Optional[Verdict]:
        bad_ops = sorted(set(ops) - set(self.ops))
        if bad_ops:
            return Verdict(0.0, Status.OK.value, f"{expr!r} uses operator(s) {bad_ops}; allowed: {list(self.ops)}")
        return None

    def _check_expression(self, expr: str, numbers: List[int], target: int) -> Verdict:
        try:
            value, literals, ops = parse_expression(expr)
        except ZeroDivisionError:
            return Verdict(0.0, Status.OK.value, f"{expr!r} divides by zero")
        bad = self._check_ops(expr, ops)
        if bad is not None:
            return bad
        if sorted(literals) != sorted(numbers):
            return Verdict(0.0, Status.OK.value, f"{expr!r} uses numbers {sorted(literals)}, "
                                                 f"must use each of {sorted(numbers)} exactly once")
        if value != target:
            return Verdict(0.0, Status.OK.value, f"{expr!r} = {value}, target {target}")
        return Verdict(1.0, Status.OK.value, f"{expr!r} = {target}")

    def _check_steps(self, steps: List[Tuple[str, int]], numbers: List[int], target: int) -> Verdict:
        pool = Counter(numbers)
        for expr, claimed in steps:
            shown = f"{expr}={claimed}"
            try:
                value, literals, ops = parse_expression(expr)
            except ZeroDivisionError:
                return Verdict(0.0, Status.OK.value, f"step {shown!r} divides by zero")
            bad = self._check_ops(shown, ops)
            if bad is not None:
                return bad
            missing = Counter(literals) - pool
            if missing:
                return Verdict(0.0, Status.OK.value, f"step {shown!r} uses {sorted(missing.elements())}, not "
                                                     f"available (available: {sorted(pool.elements())})")
            if value != claimed:
                return Verdict(0.0, Status.OK.value, f"step {shown!r} is wrong: {expr} = {value}")
            pool -= Counter(literals)
            pool[claimed] += 1
        left = sorted(pool.elements())
        if left != [target]:
            if target in left:
                return Verdict(0.0, Status.OK.value, f"reaches {target} but leaves {left}: each of "
                                                     f"{sorted(numbers)} must be used exactly once")
            return Verdict(0.0, Status.OK.value, f"ends with {left}, target {target}")
        return Verdict(1.0, Status.OK.value, f"reaches {target} in {len(steps)} step(s)")
