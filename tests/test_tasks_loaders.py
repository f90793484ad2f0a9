"""Loading GSM8K / MATH / HumanEval / MBPP through Hugging Face ``datasets`` from small local sources in the
standard layouts (jsonl, json, parquet, arrow, save_to_disk directories), clear errors for malformed rows (file +
row named), missing files, and hub ids without network. No test here touches the network: every test runs with
internet sockets blocked and its own ``datasets`` cache."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import shutil
import socket
import sys
import threading
import time

import datasets
import huggingface_hub.constants
import pytest

from passk_rl.tasks import TASKS, make_task
from passk_rl.tasks.arith import ArithTask
from passk_rl.tasks.code import build_program, extract_code, split_check_tests
from passk_rl.tasks.loaders import DataError, expand_files, read_rows

DATA = os.path.join(os.path.dirname(__file__), "data")
GSM = os.path.join(DATA, "gsm8k")
MATH = os.path.join(DATA, "math")
CODE = os.path.join(DATA, "code")


def _jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


@pytest.fixture(autouse=True)
def _no_network_own_cache(monkeypatch, tmp_path_factory):
    """Internet sockets and DNS (all but loopback) fail at once (so a test that reached for the hub would fail, not hang), and the
    datasets cache is a fresh directory rather than the user's (no warm cache hides a bug, none is polluted)."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "::1", "localhost")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            raise OSError(f"network disabled in tests (connect to {address!r})")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            raise OSError(f"network disabled in tests (resolve {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets-cache")))


def test_tasks_registered_and_fixture_tasks_come_from_the_module_variable(tmp_path, monkeypatch):
    import subprocess
    import sys

    for name in ("arith", "gsm8k", "math", "code", "faulty"):
        assert name in TASKS
    # faulty is a test fixture: a fresh process knows it only through $PASSK_RL_TASK_MODULES (set by conftest)
    probe = "from passk_rl.tasks import TASKS; print(sorted(TASKS))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PASSK_RL_TASK_MODULES"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "'faulty'" not in out.stdout and "'arith'" in out.stdout, out.stderr
    bad = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True,
                         env=dict(env, PASSK_RL_TASK_MODULES="tests.faulty_task,no_such_task_module"))
    assert bad.returncode != 0 and "PASSK_RL_TASK_MODULES: cannot import task module 'no_such_task_module'" in bad.stderr
    monkeypatch.setenv("PASSK_RL_TASK_MODULES", "")
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*PASSK_RL_TASK_MODULES"):
        make_task("nope")


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
    # set after datasets was imported (as a launcher or a test does): the loader must still honour it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-passk-hf-home")  # no warm cache either
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    t = make_task("gsm8k")  # default: the hub id openai/gsm8k
    start = time.monotonic()
    with pytest.raises(DataError) as ei:
        t.prompts("train")
    assert time.monotonic() - start < 5.0
    msg = str(ei.value)
    assert "openai/gsm8k" in msg and "task.train_files" in msg and ".jsonl" in msg
    if importlib.util.find_spec("datasets") is None:
        assert "needs the `datasets` package, which is not installed" in msg
    else:
        assert "may be offline" in msg and "HF_HUB_OFFLINE" in msg
    assert datasets.config.HF_HUB_OFFLINE is False  # forced offline for that one load only


def test_hub_id_without_network_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(DataError) as ei:  # sockets are blocked: the hub probe fails, then the (empty) cache
        make_task("math").prompts("test")
    assert time.monotonic() - start < 5.0  # not the ~25 s of the hub client's retries
    msg = str(ei.value)
    assert "did not answer" in msg and "may be offline" in msg and "task.test_files" in msg, msg
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("hub", ["offline", "unreachable", "online"])
def test_hub_rows_and_when_only_the_cache_is_used(monkeypatch, hub):
    from passk_rl.tasks import loaders

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if hub == "offline":
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(loaders, "hub_unreachable", lambda: "no route" if hub == "unreachable" else None)
    ref = _key(make_task("gsm8k", test_files=os.path.join(GSM, "test.jsonl")).prompts("test"))
    calls = []

    def load_dataset(path, name=None, *, split):  # stands in for the hub (or its warm cache)
        calls.append((path, name, split, datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return datasets.Dataset.from_list(_jsonl(os.path.join(GSM, "test.jsonl")))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = make_task("gsm8k").prompts("test")
    cache_only = hub != "online"
    assert calls == [("openai/gsm8k", "main", "test", cache_only, cache_only)]
    assert _key(got) == ref
    assert got[1].meta["source"] == "hf:openai/gsm8k/main:test" and got[1].meta["row"] == 1
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_hub_probe_counts_any_http_answer(monkeypatch):
    from passk_rl.tasks.loaders import hub_unreachable

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_unreachable(5.0) is None  # an error status is still an answer: the hub decides the rest
    finally:
        server.shutdown()
        server.server_close()
    why = hub_unreachable(5.0)  # the port is closed now
    assert why is not None and why.startswith(f"http://127.0.0.1:{server.server_port} did not answer"), why


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"x\.parquet: cannot read as parquet: ArrowInvalid"):
        read_rows(str(tmp_path / "x.parquet"))
    (tmp_path / "x.arrow").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"x\.arrow: cannot read as arrow"):
        read_rows(str(tmp_path / "x.arrow"))
    (tmp_path / "x.json").write_text('[{"question": "a"},\n {"question": ]')
    with pytest.raises(DataError, match=r"x\.json: not valid JSON \(line 2\)"):
        read_rows(str(tmp_path / "x.json"))
    (tmp_path / "y.json").write_text('[{"question": "a"}, 3]')
    with pytest.raises(DataError, match=r"y\.json: row 1: expected an object, got int"):
        read_rows(str(tmp_path / "y.json"))
    with pytest.raises(DataError, match=r"file not found.*gone\.parquet"):
        read_rows(str(tmp_path / "gone.parquet"))


def test_without_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"train\.jsonl: reading needs the `datasets` package"):
        read_rows(os.path.join(GSM, "train.jsonl"))
    with pytest.raises(DataError, match="needs the `datasets` package, which is not installed"):
        make_task("gsm8k").prompts("train")


def _key(prompts):
    return [(p.id, p.answer, p.text) for p in prompts]


def test_arrow_files_and_saved_datasets(tmp_path):
    ref_train = make_task("gsm8k", train_files=os.path.join(GSM, "train.jsonl")).prompts("train")
    ref_test = make_task("gsm8k", test_files=os.path.join(GSM, "test.jsonl")).prompts("test")
    train = datasets.Dataset.from_list(_jsonl(os.path.join(GSM, "train.jsonl")))
    test = datasets.Dataset.from_list(_jsonl(os.path.join(GSM, "test.jsonl")))
    train.save_to_disk(str(tmp_path / "one"))
    got = make_task("gsm8k", train_files=str(tmp_path / "one")).prompts("train")
    assert _key(got) == _key(ref_train) and got[2].meta["source"] == str(tmp_path / "one")
    # the .arrow file inside it, on its own and through a glob
    got = make_task("gsm8k", train_files=str(tmp_path / "one" / "*.arrow")).prompts("train")
    assert _key(got) == _key(ref_train) and got[0].meta["source"].endswith(".arrow")
    # a DatasetDict: each split from its own subdirectory
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(dd))
    t = make_task("gsm8k", train_files=str(dd), test_files=str(dd))
    assert _key(t.prompts("train")) == _key(ref_train) and _key(t.prompts("test")) == _key(ref_test)
    assert t.prompts("test")[0].meta["source"] == str(dd / "test")
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "dd_train_only"))
    with pytest.raises(DataError, match=r"dd_train_only: a saved DatasetDict with splits \['train'\], and it has no "
                                        r"'test' split"):
        make_task("gsm8k", train_files=str(tmp_path / "dd_train_only"),
                  test_files=str(tmp_path / "dd_train_only")).prompts("test")


def test_malformed_rows_in_columnar_files_name_file_and_row(tmp_path):
    rows = _jsonl(os.path.join(GSM, "train.jsonl"))
    rows[1] = {"question": rows[1]["question"], "answer": None}
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError) as ei:
        make_task("gsm8k", train_files=str(path)).prompts("train")
    msg = str(ei.value)
    assert msg.startswith(f"{path}: row 1: missing field 'answer'") and "fields present: question)" in msg, msg
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: row 1: missing field 'answer'"):
        make_task("gsm8k", train_files=str(tmp_path / "saved")).prompts("train")


def test_json_layouts_blank_lines_and_mixed_numbers(tmp_path):
    rows = _jsonl(os.path.join(GSM, "test.jsonl"))
    ref = _key(make_task("gsm8k", train_files=os.path.join(GSM, "test.jsonl")).prompts("train"))
    for key in ("data", "rows"):
        (tmp_path / f"{key}.json").write_text(json.dumps({key: rows}))
        assert _key(make_task("gsm8k", train_files=str(tmp_path / f"{key}.json")).prompts("train")) == ref
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON Lines named .json
    assert _key(make_task("gsm8k", train_files=str(tmp_path / "lines.json")).prompts("train")) == ref
    # blank lines do not shift the reported line
    (tmp_path / "gaps.jsonl").write_text(f"\n{json.dumps(rows[0])}\n   \n{json.dumps({'question': 'q'})}\n")
    with pytest.raises(DataError, match=r"gaps\.jsonl: row 1 \(line 4\): missing field 'answer'"):
        make_task("gsm8k", train_files=str(tmp_path / "gaps.jsonl")).prompts("train")
    # a column of ints and floats comes back as floats: 42 must still be "42"
    (tmp_path / "nums.jsonl").write_text('{"question": "a", "answer": 42}\n{"question": "b", "answer": 3.5}\n')
    assert [p.answer for p in make_task("gsm8k", train_files=str(tmp_path / "nums.jsonl")).prompts("train")] == [
        "42", "3.5"]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_rows(str(tmp_path / "empty.jsonl")) == []


def test_arith_export_round_trips_through_the_loader(tmp_path):
    task = ArithTask()
    for split in ("train", "test"):
        ds = task.to_dataset(split)
        assert ds.column_names == ["id", "prompt", "numbers", "target", "num_solutions"] and str(ds.split) == split
        ds.save_to_disk(str(tmp_path / split))
        (path,) = expand_files(str(tmp_path / split), what="arith export")
        rows = read_rows(path)
        prompts = task.prompts(split)
        assert [r.data["prompt"] for r in rows] == [p.text for p in prompts]
        assert [r.data["id"] for r in rows] == [p.id for p in prompts]
        assert [{"numbers": r.data["numbers"], "target": r.data["target"]} for r in rows] == [p.answer for p in prompts]
        assert [r.data["num_solutions"] for r in rows] == [p.meta["num_solutions"] for p in prompts]
    with pytest.raises(ValueError, match="unknown split"):
        task.to_dataset("validation")


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
