"""docs/config.md is generated from the config dataclasses (python -m passk_rl.config_doc): it must be current,
list every field, and take each meaning from the comments next to the field in the source."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import io
import sys
import textwrap
import typing

import pytest

from passk_rl import config_doc
from passk_rl.config import Config
from passk_rl.config_doc import DOC_PATH, collect, main, render, render_config_doc, undocumented, warn_undocumented


def _expected_keys(cls: type, prefix: str = ""):
    """Every dotted key under ``cls``, walked here independently of the generator. The root's dataclass fields are
    sections (headings, not keys)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        subs = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        if not (prefix == "" and subs and hints[f.name] is subs[0]):
            yield key, f
        for sub in subs:
            yield from _expected_keys(sub, key)


def test_docs_config_md_is_current():
    expected = render_config_doc()
    current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
    if current != expected:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                                 "docs/config.md", "generated"))[:60])
        pytest.fail(f"docs/config.md is stale: run `python -m passk_rl.config_doc` to regenerate it\n{diff}")


def test_every_field_appears_with_type_default_and_choices():
    text = DOC_PATH.read_text(encoding="utf-8")
    expected = list(_expected_keys(Config))
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(expected), "one table row per config key"
    for key, f in expected:
        row = next((r for r in rows if r.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is missing from docs/config.md"
        for choice in f.metadata.get("choices", ()):
            assert f"`{choice}`" in row, f"{key}: allowed value {choice!r} not shown"
    assert "| `run.checkpoint_interval` | `int` | `0` |" in text
    assert "| `model.spec` | `ModelSpec \\| None` | `null` |" in text
    assert "| `learner.betas` | `list[float]` | `[0.9, 0.999]` |" in text


FAKE = '''
"""A made-up config tree."""
from __future__ import annotations

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class Inner:
    """Inner things."""

    depth: int = 3  # how deep


@dataclasses.dataclass
class Alpha:
    """The alpha section."""

    plain: int = 1
    # Above the field,
    # over two lines.
    above: str = "x"  # and inline | with a pipe
    hashes: str = "####"  # written to <run>/dir
    # a comment after a field, then a blank line: it belongs to no field

    apart: bool = True
    documented: List[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """An attribute docstring."""
    mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
    nested: Optional[Inner] = None
    multi: float = dataclasses.field(
        default=0.5,
    )  # after a multi-line field


@dataclasses.dataclass
class Root:
    alpha: Alpha = dataclasses.field(default_factory=Alpha)
    version: int = 1  # a top-level key
'''


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    path = tmp_path / "fake_passk_config.py"
    path.write_text(textwrap.dedent(FAKE))
    spec = importlib.util.spec_from_file_location("fake_passk_config", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fake_passk_config", mod)  # get_type_hints resolves names through it
    spec.loader.exec_module(mod)
    return mod.Root


def test_meanings_come_from_comments_and_docstrings(fake_root):
    sections = collect(fake_root)
    assert [s.name for s in sections] == ["", "alpha"]
    assert sections[1].intro == "The alpha section."
    keys = {k.key: k for s in sections for k in s.keys}
    assert sorted(k for k, _ in _expected_keys(fake_root)) == sorted(keys)
    assert keys["version"].meaning == "a top-level key"
    assert keys["alpha.plain"].meaning == ""
    assert keys["alpha.above"].meaning == "Above the field, over two lines. and inline | with a pipe"
    assert keys["alpha.hashes"].meaning == "written to <run>/dir" and keys["alpha.hashes"].default == "'####'"
    assert keys["alpha.apart"].meaning == ""  # the comment above is cut off by a blank line
    assert keys["alpha.documented"].meaning == "An attribute docstring."
    assert keys["alpha.documented"].default == "[1, 2]" and keys["alpha.documented"].type == "list[int]"
    assert keys["alpha.mode"].choices == ("a", "b")
    assert keys["alpha.nested"].meaning == "Inner things." and keys["alpha.nested"].type == "Inner | None"
    assert keys["alpha.nested.depth"].meaning == "how deep" and keys["alpha.nested.depth"].default == "3"
    assert keys["alpha.multi"].meaning == "after a multi-line field"
    assert undocumented(sections) == ["alpha.plain", "alpha.apart", "alpha.mode"]


def test_rendering_and_warning(fake_root):
    sections = collect(fake_root)
    text = render(sections)
    assert "## Top-level keys" in text and "## alpha" in text
    assert "| `alpha.plain` | `int` | `1` | — |" in text
    assert "and inline \\| with a pipe |" in text  # a pipe would split the table cell
    assert "written to &lt;run&gt;/dir" in text  # <run> would vanish as an HTML tag
    assert "| `alpha.mode` | `str`, one of `a`, `b` | `a` |" in text
    err = io.StringIO()
    warn_undocumented(sections, err)
    assert "3 config key(s)" in err.getvalue() and "alpha.plain, alpha.apart, alpha.mode" in err.getvalue()


def test_cli_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["--check", "-o", str(out)]) == 1 and not out.exists()
    assert "is stale" in capsys.readouterr().err
    assert main(["-o", str(out)]) == 0 and out.read_text() == render_config_doc()
    assert main(["--check", "-o", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert main(["--check", "-o", str(out)]) == 1
    assert config_doc.DOC_PATH.name == "config.md" and config_doc.DOC_PATH.parent.name == "docs"
