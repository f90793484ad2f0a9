"""The built-in "arith" task: deterministic disjoint splits, an exact verifier, tolerant answer extraction."""

from __future__ import annotations

import pickle
from fractions import Fraction

import pytest

from passk_rl.tasks import TASKS, Prompt, make_task
from passk_rl.tasks.arith import (ArithTask, ExprError, extract_expression, extract_steps, parse_expression, solve,
                                  solve_expressions)


@pytest.fixture(scope="module")
def task() -> ArithTask:
    return make_task("arith")


def _prompt(numbers, target) -> Prompt:
    return Prompt(id="t", text="x", answer={"numbers": list(numbers), "target": target})


def _key(p: Prompt):
    return tuple(sorted(p.answer["numbers"])), p.answer["target"]


# ------------------------------------------------------------------------------------------ splits
def test_registered():
    assert "arith" in TASKS
    assert isinstance(make_task("arith"), ArithTask)


def test_splits_are_deterministic(task):
    again = make_task("arith")
    for split in ("train", "val", "test", "sft"):
        a, b = task.prompts(split), again.prompts(split)
        assert [p.id for p in a] == [p.id for p in b]
        assert [p.text for p in a] == [p.text for p in b]


def test_splits_are_disjoint_on_numbers_and_target(task):
    train, val, test, sft = (task.prompts(s) for s in ("train", "val", "test", "sft"))
    assert (len(test), len(train), len(val)) == (256, 1024 - 128, 128) and len(sft) > len(train)
    # disjoint up to reordering of the numbers, not just by id
    keys = [{_key(p) for p in split} for split in (train, val, test, sft)]
    assert sum(map(len, keys)) == len(train) + len(val) + len(test) + len(sft)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not keys[i] & keys[j], (i, j)
    ids = [p.id for p in train + val + test + sft]
    assert len(ids) == len(set(ids))


def test_val_is_carved_from_the_rl_puzzles_and_leaves_test_and_sft_alone(task):
    """Choosing hyperparameters on "val" never touches "test", and the base model's warm start ("sft") is the
    same whatever val_size is: the same base model serves every experiment."""
    none = make_task("arith", val_size=0)
    assert none.prompts("val") == [] and len(none.prompts("train")) == 1024
    assert {p.id for p in task.prompts("train") + task.prompts("val")} == {p.id for p in none.prompts("train")}
    for split in ("test", "sft"):
        assert [p.id for p in task.prompts(split)] == [p.id for p in none.prompts(split)]
    with pytest.raises(ValueError, match="val_size"):
        make_task("arith", val_size=1024)


def test_seed_changes_the_split(task):
    other = make_task("arith", seed=1)
    assert {_key(p) for p in other.prompts("test")} != {_key(p) for p in task.prompts("test")}
    # same problem universe
    everything = lambda t: {_key(p) for s in ("train", "val", "test", "sft") for p in t.prompts(s)}  # noqa: E731
    assert everything(other) == everything(task)


def test_prompt_shape(task):
    p = task.prompts("test")[0]
    nums, target = p.answer["numbers"], p.answer["target"]
    assert p.text == f"Use {' '.join(map(str, nums))} to make {target}.\nAnswer: "
    assert p.messages is None and len(nums) == 3 and all(1 <= x <= 12 for x in nums) and 1 <= target <= 100
    assert task.format_prompt(p) == p.text
    assert pickle.loads(pickle.dumps(p)) == p  # prompts travel to verifier processes


def test_every_prompt_is_solvable_and_solutions_verify(task):
    prompts = task.prompts("train")[:200] + task.prompts("test")[:200] + task.prompts("sft")[:200]
    for p in prompts:
        sols = task.solutions(p)
        assert len(sols) == p.meta["num_solutions"] >= 1
        for s in sols:
            assert task.verify(p, s).reward == 1.0, (p.id, s)


def test_unknown_split_and_bad_params():
    t = make_task("arith")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        t.prompts("dev")
    with pytest.raises(ValueError, match="ops"):
        make_task("arith", ops="+^")
    with pytest.raises(ValueError, match="num_count"):
        make_task("arith", num_count=7)
    with pytest.raises(ValueError, match="leaves no puzzles"):
        make_task("arith", max_number=2, test_size=10).prompts("train")


def test_train_size_moves_puzzles_between_train_and_sft_only():
    t, ref = make_task("arith", train_size=50, val_size=0), make_task("arith", val_size=0)
    assert len(t.prompts("train")) == 50
    assert [p.id for p in t.prompts("test")] == [p.id for p in ref.prompts("test")]
    assert {p.id for p in t.prompts("train") + t.prompts("sft")} == {p.id for p in ref.prompts("train") + ref.prompts("sft")}


# ------------------------------------------------------------------------------------------ verifier
P = _prompt([3, 7, 5], 26)


@pytest.mark.parametrize("completion", [
    "3*7+5", "5+3*7", "7*3+5", "(3*7)+5", "((3*7)+5)", " 3 * 7 + 5 ",
])
def test_several_correct_answers(completion):
    v = ArithTask().verify(P, completion)
    assert (v.reward, v.status) == (1.0, "ok"), v


@pytest.mark.parametrize("completion", [
    "3*7=21, 21+5=26", "7*3=21,5+21=26", "3*7=21\n21+5=26", "3 * 7 = 21; 21 + 5 = 26", "Answer: 3*7=21, 21+5=26</s>",
    "3*7=21 so 21+5=26.", "3*7+5=26", "(3*7)+5 = 26 done", "3*7=21, 21+5=26 x",
])
def test_worked_steps_accepted(completion):
    v = ArithTask().verify(P, completion)
    assert (v.reward, v.status) == (1.0, "ok"), (completion, v)


@pytest.mark.parametrize("completion,why", [
    ("3*7=22, 22+4=26", "wrong"),               # a false claim in a step
    ("3*7=21, 21+5=27", "wrong"),
    ("3*7=21, 21+6=27", "not available"),       # 6 is neither given nor an earlier result
    ("3*7=21, 21+21=42", "not available"),      # an intermediate used twice
    ("3*7=21", "ends with [5, 21]"),            # a number left over
    ("3*7=21, 21+5=26, 26*1=26", "not available"),
    ("5+7=12, 12*3=36", "ends with [36]"),
    ("3*7+5=25", "wrong"),                      # the claimed result matters
])
def test_wrong_steps_are_ok_status_zero_reward(completion, why):
    v = ArithTask().verify(P, completion)
    assert (v.reward, v.status) == (0.0, "ok"), (completion, v)
    assert why in v.detail, v.detail


def test_steps_with_unparseable_left_side_are_wrong_format():
    v = ArithTask().verify(P, "3*(7=21, 21+5=26")
    assert v.status == "wrong_format" and "left side" in v.detail
    assert extract_steps("no steps") is None
    assert extract_steps("Answer: 1+2=3, 3*3=9") == [("1+2", 3), ("3*3", 9)]


@pytest.mark.parametrize("completion", [
    "3*7+5</s>", "3*7+5</s>garbage 1+1", "Answer: 3*7+5", "answer:3*7+5", "The answer is 3*7+5.",
    "3*7+5 = 26", "3*7+5=26\n", "3*7+5, done", "3*7+5\nUse 1 2 3 to make 6", "3*7+5 - yes",
    "Answer: 1+2\nAnswer: 3*7+5",
])
def test_tolerant_extraction(completion):
    v = ArithTask().verify(P, completion)
    assert (v.reward, v.status) == (1.0, "ok"), (completion, v)


@pytest.mark.parametrize("completion,why", [
    ("3*7-5", "= 16"),            # right numbers, wrong value
    ("3*7+5+1", "exactly once"),  # extra number
    ("7*3+2+3", "exactly once"),  # right value, wrong numbers
    ("3*7", "exactly once"),      # a number missing
    ("26", "exactly once"),       # the target itself
    ("(3+7)/5", "operator"),      # '/' is not allowed by default
    ("3*7+5.", ""),               # trailing punctuation still extracts, so this one is right: checked below
])
def test_wrong_answers_are_ok_status_zero_reward(completion, why):
    v = ArithTask().verify(P, completion)
    if completion == "3*7+5.":
        assert v.reward == 1.0
        return
    assert (v.reward, v.status) == (0.0, "ok"), v
    assert why in v.detail


@pytest.mark.parametrize("completion", [
    "", "   ", "\n", "I don't know", "three times seven plus five", "+*", "()", "((",
    "__import__('os').system('echo pwned')", "3*(7+5", "(3*7+5))",
])
def test_malformed_is_wrong_format(completion):
    v = ArithTask().verify(P, completion)
    assert (v.reward, v.status) == (0.0, "wrong_format"), (completion, v)


def test_no_code_is_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {marker}')", f"open('{marker}','w')",
                f"3*7+5; __import__('os').system('touch {marker}')"]
    t = ArithTask()
    for s in payloads:
        v = t.verify(P, s)
        assert v.reward in (0.0, 1.0)
    assert not marker.exists()
    # the last payload has a real answer in front: the answer is read, the rest ignored, nothing run
    assert t.verify(P, payloads[2]).reward == 1.0
    # text around an expression is never evaluated, only the extracted expression is parsed
    assert t.verify(P, "eval('3*7+5')").reward == 1.0
    assert t.verify(P, "lambda: 0").detail.startswith("'0' uses numbers [0]")


def test_division_when_allowed_is_exact():
    t = ArithTask(ops="+-*/")
    assert t.verify(_prompt([8, 4, 3], 6), "8/4*3").reward == 1.0
    assert t.verify(_prompt([7, 2, 2], 7), "7/2*2").reward == 1.0  # exact rational arithmetic, not int division
    v = t.verify(_prompt([5, 3, 3], 0), "5/(3-3)")
    assert (v.reward, v.status) == (0.0, "ok") and "zero" in v.detail


def test_unary_minus_and_huge_inputs_are_rejected_cleanly():
    t = ArithTask()
    assert t.verify(_prompt([3, 7, 5], -26), "-3*7-5").status == "wrong_format"
    long_expr = "+".join(["1"] * 500)
    assert t.verify(P, long_expr).status == "wrong_format"
    assert t.verify(P, "(" * 100 + "3*7+5" + ")" * 100).status == "wrong_format"
    assert t.verify(P, "9" * 5000).status == "wrong_format"


def test_bad_prompt_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="numbers"):
        ArithTask().verify(Prompt(id="x", text="x", answer="26"), "3*7+5")


# ------------------------------------------------------------------------------------------ parser / solver
def test_parser_precedence_and_errors():
    assert parse_expression("2+3*4")[0] == 14
    assert parse_expression("(2+3)*4")[0] == 20
    assert parse_expression("8-3-2")[0] == 3          # left associative
    assert parse_expression("8/4/2")[0] == 1
    assert parse_expression("7/2")[0] == Fraction(7, 2)
    assert parse_expression("3 * 7 + 5")[1:] == ([3, 7, 5], ["*", "+"])
    for bad in ["", "3+", "(3", "3)", "3 4", "a+1", "3**2", "3//2"]:
        with pytest.raises(ExprError):
            parse_expression(bad)
    with pytest.raises(ZeroDivisionError):
        parse_expression("1/(2-2)")


def test_solver_expressions_evaluate_to_their_value():
    for value, exprs in solve_expressions([2, 3, 4], "+-*/").items():
        for e in exprs:
            v, lits, _ = parse_expression(e)
            assert v == value and sorted(lits) == [2, 3, 4]
    assert "(2+3)*4" in solve_expressions([2, 3, 4])[20]
    assert "4-(3-2)" in solve_expressions([2, 3, 4])[3]  # brackets kept where they matter


def test_solver_steps_verify_and_agree_with_expressions():
    t = ArithTask()
    steps, exprs = solve([2, 3, 4]), solve_expressions([2, 3, 4])
    assert set(steps) == set(exprs)  # the same reachable targets in both forms
    assert "2+3=5, 5*4=20" in steps[20]
    for target, sols in steps.items():
        for s in sols:
            assert t.verify(_prompt([4, 2, 3], target), s).reward == 1.0, (target, s)
    # intermediate results are never negative: 2-3 is not a step of any solution
    assert not any("2-3=" in s for sols in steps.values() for s in sols)


def test_extract_expression_prefers_an_expression_over_a_lone_number():
    assert extract_expression("26 is 3*7+5") == "3*7+5"
    assert extract_expression("just 26") == "26"
    assert extract_expression("no digits here") is None
