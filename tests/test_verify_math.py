"""Math answers: extraction, math-verify equivalence (fractions, LaTeX forms, units/commas, wrong answers),
timeouts that work off the main thread, and the GSM8K / MATH task verifiers on small local files."""

from __future__ import annotations

import os
import threading

import pytest

from passk_rl.tasks import make_task
from passk_rl.verify import (
    MathChecker,
    extract_answer_phrase,
    extract_hash_answer,
    gsm8k_gold_answer,
    last_boxed,
    last_number,
    normalize_numeric_answer,
)

DATA = os.path.join(os.path.dirname(__file__), "data")


# ------------------------------------------------------------------------------------- pure extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\{2,3\\}}", "\\{2,3\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 and more", "5"),
        ("\\boxed {x^{2}}", "x^{2}"),
        ("truncated \\boxed{\\frac{1}{2", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_hash_and_phrase_and_number_extraction():
    assert extract_hash_answer("work\n#### 1,298\n") == "1,298"
    assert extract_hash_answer("#### 3\nmore\n#### 4 apples") == "4 apples"
    assert extract_hash_answer("####   \n") is None
    assert extract_hash_answer("no marker") is None
    assert extract_answer_phrase("So the answer is: 42.\nDone") == "42"
    assert extract_answer_phrase("nothing") is None
    assert last_number("I had 3 apples, then 1,250.5 pears") == "1250.5"
    assert last_number("none") is None


@pytest.mark.parametrize(
    "raw, norm",
    [("$1,234.00.", "1234.00"), ("18 dollars", "18"), ("\\$18", "18"), ("-7", "-7"), ("3/4", "3/4"),
     ("\\frac{1}{2}", "\\frac{1}{2}"), ("2^{10}", "2^{10}"), ("5 + 3", "5 + 3")],
)
def test_normalize_numeric_answer(raw, norm):
    assert normalize_numeric_answer(raw) == norm


def test_gsm8k_gold_answer():
    assert gsm8k_gold_answer("a\nb = <<1+1=2>>2\n#### 1,000") == "1000"
    assert gsm8k_gold_answer("no final line") is None


# ------------------------------------------------------------------------------------- equivalence
@pytest.fixture(scope="module")
def checker():
    with MathChecker(timeout_s=20.0) as c:
        yield c


EQUIV = [
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("0.25", "\\frac14", True),
    # LaTeX forms
    ("2\\sqrt{5}", "\\sqrt{20}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\{2,3\\}", "\\{3, 2\\}", True),
    ("[-2, 7)", "[-2,7)", True),
    ("(2,\\infty)", "(2, \\infty)", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    # units, currency, thousands separators, degrees, percent
    ("1234", "1,234", True),
    ("18", "18 \\text{ dollars}", True),
    ("18", "\\$18", True),
    ("120^\\circ", "120", True),
    ("10\\%", "10", True),
    ("32.50", "\\$32.5", True),
    # wrong answers
    ("1234", "1243", False),
    ("2\\sqrt{5}", "2\\sqrt{3}", False),
    ("\\{2,3\\}", "\\{2,4\\}", False),
    ("x^2+2x+1", "(x-1)^2", False),
    ("-7", "7", False),
]


@pytest.mark.parametrize("gold, pred, equal", EQUIV)
def test_math_equivalence(checker, gold, pred, equal):
    r = checker.check(gold, pred)
    assert r.status == "ok", r
    assert r.equal is equal, (gold, pred, r)


def test_any_mode_and_wrong_format(checker):
    r = checker.check("\\frac{1}{2}", "Thinking... so the answer is $\\frac{1}{2}$.", pred_mode="any")
    assert r.status == "ok" and r.equal
    r = checker.check("5", "I do not know.", pred_mode="any")
    assert r.status == "wrong_format" and not r.equal


def test_raw_math_verify_fails_off_main_thread():
    """Why the checker exists: math-verify's default signal.alarm timeout raises in a non-main thread."""
    from math_verify import parse

    err = []

    def run():
        try:
            parse("$\\frac{1}{2}$")
        except ValueError as e:
            err.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert err and "thread" in err[0]


def test_checker_same_results_in_thread(checker):
    cases = [(g, p) for g, p, _ in EQUIV]
    main = [checker.check(g, p) for g, p in cases]
    out = []
    t = threading.Thread(target=lambda: out.extend(checker.check(g, p) for g, p in cases))
    t.start()
    t.join()
    assert [(r.status, r.equal) for r in out] == [(r.status, r.equal) for r in main]
    assert [r.equal for r in out] == [e for _, _, e in EQUIV]


def test_checker_timeout_kills_and_recovers():
    """A pathological expression hits the wall-clock limit (from a non-main thread too); the next check works."""
    with MathChecker(timeout_s=1.5) as c:
        c.start()
        res = []
        t = threading.Thread(target=lambda: res.append(c.check("1", "9^{9^{9^{9}}}")))
        t.start()
        t.join(60)
        assert res and res[0].status == "timeout", res
        assert "1.5s" in res[0].detail
        r = c.check("\\frac{1}{2}", "0.5")
        assert r.status == "ok" and r.equal
        assert c.restarts == 1


def test_checker_interrupt_returns_error_promptly():
    with MathChecker(timeout_s=60.0) as c:
        c.start()
        res = []
        t = threading.Thread(target=lambda: res.append(c.check("1", "9^{9^{9^{9}}}")))
        t.start()
        threading.Event().wait(0.5)
        c.interrupt()
        t.join(20)
        assert not t.is_alive()
        assert res[0].status == "error" and "died" in res[0].detail


def test_checker_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        MathChecker(timeout_s=0)
    with MathChecker() as c, pytest.raises(ValueError, match="pred_mode"):
        c.check("1", "1", pred_mode="fuzzy")


# ------------------------------------------------------------------------------------- task verifiers
@pytest.fixture(scope="module")
def gsm8k():
    t = make_task("gsm8k", train_files=os.path.join(DATA, "gsm8k", "train.jsonl"),
                  test_files=os.path.join(DATA, "gsm8k", "test.jsonl"))
    yield t
    t.close()


@pytest.fixture(scope="module")
def math_task():
    t = make_task("math", train_files=os.path.join(DATA, "math", "train.jsonl"),
                  test_files=os.path.join(DATA, "math", "test.jsonl"))
    yield t
    t.close()


def test_gsm8k_verifier(gsm8k):
    p = gsm8k.prompts("train")[0]  # answer 27
    assert p.answer == "27"
    cases = {
        "3*12 = 36, 36-9 = 27\n#### 27": (1.0, "ok"),
        "#### 27 pencils.": (1.0, "ok"),
        "#### $27.00": (1.0, "ok"),
        "so \\boxed{27}": (1.0, "ok"),
        "#### 28": (0.0, "ok"),
        "The answer is 27": (0.0, "wrong_format"),  # strict extraction
        "": (0.0, "wrong_format"),
    }
    for completion, (reward, status) in cases.items():
        v = gsm8k.verify(p, completion)
        assert (v.reward, v.status) == (reward, status), (completion, v)
    p2 = gsm8k.prompts("train")[2]  # '#### 1,298' in the data
    assert p2.answer == "1298"
    assert gsm8k.verify(p2, "#### 1,298").reward == 1.0
    assert gsm8k.verify(p2, "#### 1298.0").reward == 1.0


def test_gsm8k_flexible_extraction():
    t = make_task("gsm8k", train_files=os.path.join(DATA, "gsm8k", "train.jsonl"), extraction="flexible")
    try:
        p = t.prompts("train")[0]
        assert t.verify(p, "So the answer is 27.").reward == 1.0
        assert t.verify(p, "He has 27 left").reward == 1.0
        assert t.verify(p, "He has 26 left").reward == 0.0
        assert t.verify(p, "no idea").status == "wrong_format"
    finally:
        t.close()


def test_math_verifier(math_task):
    by_answer = {p.answer: p for p in math_task.prompts("train")}
    cases = [
        ("\\frac{1}{2}", "... $=\\boxed{0.5}$", 1.0, "ok"),
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0, "ok"),
        ("2\\sqrt{5}", "\\boxed{\\sqrt{20}}", 1.0, "ok"),
        ("\\{2,3\\}", "\\boxed{\\{3,2\\}}", 1.0, "ok"),
        ("120^\\circ", "\\boxed{120}", 1.0, "ok"),
        ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0, "ok"),
        ("12", "The answer is 12", 0.0, "wrong_format"),
    ]
    for gold, completion, reward, status in cases:
        v = math_task.verify(by_answer[gold], completion)
        assert (v.reward, v.status) == (reward, status), (gold, completion, v)


def test_task_verify_same_in_thread_as_main(gsm8k, math_task):
    """The task verifiers (not just the checker) give identical verdicts from a non-main thread."""
    pairs = [(p, f"#### {p.answer}") for p in gsm8k.prompts("test")] + [(p, "#### 0") for p in gsm8k.prompts("test")]
    mpairs = [(p, f"\\boxed{{{p.answer}}}") for p in math_task.prompts("test")] + [
        (p, "\\boxed{-1}") for p in math_task.prompts("test")]
    main = [gsm8k.verify(p, c) for p, c in pairs] + [math_task.verify(p, c) for p, c in mpairs]
    out = []
    t = threading.Thread(target=lambda: out.extend(
        [gsm8k.verify(p, c) for p, c in pairs] + [math_task.verify(p, c) for p, c in mpairs]))
    t.start()
    t.join()
    assert [(v.reward, v.status) for v in out] == [(v.reward, v.status) for v in main]
    assert sum(v.reward for v in out) == len(pairs) // 2 + len(mpairs) // 2  # no silent zeros
