"""Loading GSM8K / MATH / HumanEval / MBPP from small local files in the standard layouts (jsonl, json,
parquet), clear errors for malformed rows (file + row named), missing files, and hub ids while offline."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest

from passk_rl.tasks import TASKS, make_task
from passk_rl.tasks.code import build_program, extract_code, split_check_tests
from passk_rl.tasks.loaders import DataError, expand_files, read_rows

DATA = os.path.join(os.path.dirname(__file__), "data")
GSM = os.path.join(DATA, "gsm8k")
MATH = os.path.join(DATA, "math")
CODE = os.path.join(DATA, "code")


def _jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_tasks_registered():
    for name in ("gsm8k", "math", "code", "faulty"):
        assert name in TASKS


# --------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_local_jsonl():
    t = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl"), test_files=os.path.join(GSM, "test.jsonl"))
    train, test = t.prompts("train"), t.prompts("test")
    rows = _jsonl(os.path.join(GSM, "train.jsonl"))
    assert len(train) == len(rows) and len(test) == len(_jsonl(os.path.join(GSM, "test.jsonl")))
    assert [p.answer for p in train] == [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    assert len({p.id for p in train}) == len(train)
    assert all(r["question"] in p.text and "####" in p.text for p, r in zip(train, rows))
    assert train[1].meta["row"] == 1 and train[1].meta["source"].endswith("train.jsonl")
    # ids depend on content only: a reordered copy gives the same id for the same question
    t2 = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl"), test_files=os.path.join(GSM, "test.jsonl"))
    assert [p.id for p in t2.prompts("train")] == [p.id for p in train]
    with pytest.raises(ValueError, match="unknown split"):
        t.prompts("validation")


def test_gsm8k_parquet_and_json_match_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _jsonl(os.path.join(GSM, "train.jsonl"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "train.json").write_text(json.dumps(rows))
    ref = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl")).prompts("train")
    for name in ("train.parquet", "train.json"):
        got = make_task("gsm8k", train_files=str(tmp_path / name)).prompts("train")
        assert [(p.id, p.answer, p.text) for p in got] == [(p.id, p.answer, p.text) for p in ref]


def test_globs_directories_and_limit(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        shutil.copy(os.path.join(GSM, "train.jsonl" if name == "a.jsonl" else "test.jsonl"), tmp_path / name)
    n_a, n_b = len(_jsonl(tmp_path / "a.jsonl")), len(_jsonl(tmp_path / "b.jsonl"))
    assert len(make_task("gsm8k", train_files=str(tmp_path / "*.jsonl")).prompts("train")) == n_a + n_b
    assert len(make_task("gsm8k", train_files=str(tmp_path)).prompts("train")) == n_a + n_b
    assert len(make_task("gsm8k", train_files=str(tmp_path), limit=2).prompts("train")) == 2
    assert expand_files([str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")], what="x") == [
        str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]
    with pytest.raises(ValueError, match="limit"):
        make_task("gsm8k", train_files=str(tmp_path), limit=0)


def test_duplicate_questions_get_unique_ids(tmp_path):
    rows = _jsonl(os.path.join(GSM, "test.jsonl"))
    p = tmp_path / "dup.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows + rows[:1]))
    ids = [x.id for x in make_task("gsm8k", train_files=str(p)).prompts("train")]
    assert len(set(ids)) == len(ids) and ids[-1] == ids[0] + "#2"


@pytest.mark.parametrize(
    "file, needles",
    [
        ("bad_missing_answer.jsonl", ["bad_missing_answer.jsonl", "row 1", "line 2", "missing field 'answer'"]),
        ("bad_types.jsonl", ["bad_types.jsonl", "row 2", "'question'", "list"]),
        ("bad_no_final.jsonl", ["bad_no_final.jsonl", "row 1", "####"]),
    ],
)
def test_gsm8k_malformed_rows_name_file_and_row(file, needles):
    t = make_task("gsm8k", train_files=os.path.join(GSM, file))
    with pytest.raises(DataError) as ei:
        t.prompts("train")
    for n in needles:
        assert n in str(ei.value), str(ei.value)


def test_invalid_json_line_and_unknown_extension(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: row 1 \(line 3\): not valid JSON"):
        read_rows(str(p))
    q = tmp_path / "rows.csv"
    q.write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(str(q))


def test_missing_file_and_missing_split():
    with pytest.raises(DataError, match="file not found.*nope.jsonl"):
        make_task("gsm8k", train_files="nope.jsonl").prompts("train")
    with pytest.raises(DataError, match="matches no file"):
        make_task("gsm8k", train_files="nope/*.jsonl").prompts("train")
    t = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl"))
    with pytest.raises(DataError, match="no task.test_files"):
        t.prompts("test")


def test_hub_id_offline_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-passk-hf-home")  # no warm cache either
    t = make_task("gsm8k")  # default: the hub id openai/gsm8k
    with pytest.raises(DataError) as ei:
        t.prompts("train")
    msg = str(ei.value)
    assert "openai/gsm8k" in msg and "task.train_files" in msg and ".jsonl" in msg
    if importlib.util.find_spec("datasets") is None:
        assert "needs the `datasets` package, which is not installed" in msg
    else:
        assert "may be offline" in msg


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="x.parquet: reading parquet needs the `pyarrow` package"):
        read_rows(str(p))


# --------------------------------------------------------------------------------------------- MATH
def test_math_layouts_levels_and_types():
    t = make_task("math", train_files=os.path.join(MATH, "train.jsonl"), test_files=os.path.join(MATH, "test.jsonl"))
    train = t.prompts("train")
    rows = _jsonl(os.path.join(MATH, "train.jsonl"))
    assert len(train) == len(rows)
    assert train[0].answer == "\\frac{1}{2}" and train[0].meta["level"] == 1 and train[0].meta["type"] == "Prealgebra"
    assert train[-1].meta["level"] is None  # "Level ?"
    assert "\\boxed{}" in train[0].text
    test = t.prompts("test")  # MATH-500 layout: answer field, subject, int level, unique_id
    assert [p.answer for p in test] == [r["answer"] for r in _jsonl(os.path.join(MATH, "test.jsonl"))]
    assert test[0].id == "math-test/prealgebra/1.json"
    lv = make_task("math", train_files=os.path.join(MATH, "train.jsonl"), levels=[1]).prompts("train")
    assert {p.meta["level"] for p in lv} == {1} and len(lv) == sum(r["level"] == "Level 1" for r in rows)
    ty = make_task("math", train_files=os.path.join(MATH, "train.jsonl"), types=["algebra"]).prompts("train")
    assert len(ty) == sum(r["type"] == "Algebra" for r in rows)


@pytest.mark.parametrize(
    "file, needles",
    [("bad_no_boxed.jsonl", ["bad_no_boxed.jsonl", "row 3", "\\boxed"]),
     ("bad_level.jsonl", ["bad_level.jsonl", "row 0", "'level'", "hard"])],
)
def test_math_malformed_rows(file, needles):
    with pytest.raises(DataError) as ei:
        make_task("math", train_files=os.path.join(MATH, file)).prompts("train")
    for n in needles:
        assert n in str(ei.value), str(ei.value)


# --------------------------------------------------------------------------------------------- code
def test_code_layouts():
    t = make_task("code", test_files=[os.path.join(CODE, "humaneval.jsonl"), os.path.join(CODE, "mbpp.jsonl")])
    ps = t.prompts("test")
    assert [p.id for p in ps] == ["Local/0", "Local/1", "Local/2", "mbpp/901", "mbpp/902", "mbpp/903"]
    assert [p.answer["entry_point"] for p in ps] == ["running_max", "is_palindrome_word", "count_vowels",
                                                     "sum_squares", "reverse_words", "circle_area"]
    assert ps[3].answer["tests"] == _jsonl(os.path.join(CODE, "mbpp.jsonl"))[0]["test_list"]
    assert ps[5].answer["setup"] == "import math"
    assert "def running_max" in ps[0].text and "sum_squares([1, 2, 3]) == 14" in ps[3].text
    assert t.continuous is True


@pytest.mark.parametrize(
    "file, needles",
    [("bad_mbpp.jsonl", ["bad_mbpp.jsonl", "row 1", "'test_list'", "list"]),
     ("bad_humaneval.jsonl", ["bad_humaneval.jsonl", "row 1", "missing field 'entry_point'"])],
)
def test_code_malformed_rows(file, needles):
    with pytest.raises(DataError) as ei:
        make_task("code", test_files=os.path.join(CODE, file)).prompts("test")
    for n in needles:
        assert n in str(ei.value), str(ei.value)


def test_split_check_tests():
    src = ("import math\nX = 3\n\ndef check(f):\n    \"\"\"doc\"\"\"\n    y = f(1)\n    assert y == 1\n"
           "    assert True\n    for i in range(3):\n        assert f(i) == i\n    print('done')\n")
    setup, tests = split_check_tests(src)
    assert setup == "import math\nX = 3"
    assert tests == ["f = candidate\ny = f(1)\nassert y == 1", "f = candidate\nfor i in range(3):\n    assert f(i) == i"]
    setup, tests = split_check_tests("def helper():\n    pass\n")
    assert tests == ["check(candidate)"]


def test_program_building():
    prompt = "from typing import List\n\ndef f(xs: List[int]) -> int:\n    \"\"\"doc\"\"\"\n"
    assert build_program(prompt, "    return 1\n", "f") == prompt + "    return 1\n"
    chat = "Sure:\n```python\ndef f(xs):\n    return 2\n```\nand a usage example\n```python\nprint(f([]))\n```"
    prog = build_program(prompt, chat, "f")
    assert prog.startswith(prompt.rstrip("\n")) and prog.endswith("def f(xs):\n    return 2\n")
    assert extract_code("```python\ndef g():\n    return 1", "g") == "def g():\n    return 1"  # truncated fence
    assert build_program("", "def g():\n    return 1\n", "g") == "def g():\n    return 1\n"


# --------------------------------------------------------------------------------------------- formatting
def test_format_prompt_uses_chat_template_when_present():
    from passk_rl.models.tiny import build_tokenizer

    t = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl"))
    p = t.prompts("train")[0]
    plain = build_tokenizer()
    assert t.format_prompt(p, plain) == p.text  # no chat template: the text itself
    templ = build_tokenizer()
    templ.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert t.format_prompt(p, templ) == f"<|user|>{p.text}\n<|assistant|>"
    sys_t = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl"), system_prompt="Be brief.")
    sp = sys_t.prompts("train")[0]
    assert sp.messages[0] == {"role": "system", "content": "Be brief."}
    assert sys_t.format_prompt(sp, templ).startswith("<|system|>Be brief.\n<|user|>")
    raw = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl"), chat=False)
    assert raw.format_prompt(raw.prompts("train")[0], templ) == p.text  # chat=False: never templated


def test_bad_task_parameters():
    with pytest.raises(ValueError, match="extraction"):
        make_task("gsm8k", extraction="loose")
    with pytest.raises(ValueError, match="question"):
        make_task("gsm8k", prompt_template="no placeholder")
    with pytest.raises(ValueError, match="layout"):
        make_task("code", layout="apps")
    with pytest.raises(ValueError, match="hang_mode"):
        make_task("faulty", inner="gsm8k", hang_mode="nap")
    with pytest.raises(ValueError, match="<= 1"):
        make_task("faulty", inner="gsm8k", raise_frac=0.6, hang_frac=0.6)


def test_faulty_is_deterministic_and_delegates():
    params = dict(inner="gsm8k", inner_params={"train_files": os.path.join(GSM, "train.jsonl")},
                  raise_frac=0.3, hang_frac=0.2, seed=7)
    a, b = make_task("faulty", **params), make_task("faulty", **params)
    ps = a.prompts("train")
    assert [p.id for p in ps] == [p.id for p in make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl")).prompts("train")]
    pairs = [(p.id, f"#### {k}") for p in ps for k in range(40)]
    fa = [a.fault_for(*x) for x in pairs]
    assert fa == [b.fault_for(*x) for x in pairs]
    n = len(pairs)
    assert abs(fa.count("raise") / n - 0.3) < 0.08 and abs(fa.count("hang") / n - 0.2) < 0.08
    assert fa.count("crash") == 0
    clean = next(x for x, f in zip(pairs, fa) if f is None and x[0] == ps[0].id)
    try:
        assert a.verify(ps[0], clean[1]).status == "ok"
        bad = next(x for x, f in zip(pairs, fa) if f == "raise")
        with pytest.raises(RuntimeError, match="injected"):
            a.verify(next(p for p in ps if p.id == bad[0]), bad[1])
    finally:
        a.close()
        b.close()
