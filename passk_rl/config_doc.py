"""docs/config.md, generated from the config dataclasses (``passk_rl.config``).

    python -m passk_rl.config_doc            # rewrite docs/config.md
    python -m passk_rl.config_doc --check    # exit 1 if docs/config.md is stale
    python -m passk_rl.config_doc -o -       # print it

Every key reachable from ``Config`` is listed as ``section.key`` (nested sections as ``section.sub.key``) with its
type, default, allowed values (``metadata={"choices": ...}``) and meaning. The meaning is read from the source next
to the field, so a new field documents itself: comment lines directly above it, its inline ``# comment``, and a
string literal right after it (an attribute docstring), joined into one line. A section's class docstring becomes
its introduction. Fields with none of these still appear (meaning "—") and are listed in a warning on stderr.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import yaml

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
NO_MEANING = "—"
# tool directives, not documentation
_PRAGMA = re.compile(r"^(noqa|type:|pragma|fmt:|pylint:|isort:)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. "learner.lr" or "model.spec.params_b"
    type: str
    default: str  # as it would be written in YAML
    choices: Optional[Tuple[Any, ...]]
    meaning: str  # "" when the source says nothing


@dataclasses.dataclass(frozen=True)
class SectionDoc:
    name: str  # "" for keys of the root class itself
    intro: str
    keys: Tuple[KeyDoc, ...]


# ------------------------------------------------------------------------------------------ reading the source
@functools.lru_cache(maxsize=None)
def _parsed(path: str, mtime_ns: int) -> Tuple[ast.Module, Dict[int, str], frozenset]:
    """(syntax tree, line → comment text, lines holding nothing but a comment) of one source file, cached per
    version of the file. Comments come from the tokenizer so that a ``#`` inside a string ("####") is never taken
    for one."""
    source = Path(path).read_text(encoding="utf-8")
    comments: Dict[int, str] = {}
    alone = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                alone.add(tok.start[0])
    return ast.parse(source), comments, frozenset(alone)


def _class_node(cls: type) -> Tuple[Optional[ast.ClassDef], Dict[int, str], frozenset]:
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # built in a way that left no source (exec, a REPL)
        path = None
    if not path or not Path(path).is_file():
        return None, {}, frozenset()
    tree, comments, alone = _parsed(path, Path(path).stat().st_mtime_ns)
    node: Any = tree
    for part in cls.__qualname__.split("."):  # nested classes too
        node = next((n for n in getattr(node, "body", []) if isinstance(n, ast.ClassDef) and n.name == part), None)
        if node is None:
            break
    return node, comments, alone


def _clean(texts: Sequence[str]) -> str:
    kept = [t for t in texts if t and not _PRAGMA.match(t)]
    return re.sub(r"\s+", " ", " ".join(kept)).strip()


def field_meanings(cls: type) -> Dict[str, str]:
    """Field name → its meaning from the source of ``cls`` ("" when there is none)."""
    node, comments, alone = _class_node(cls)
    if node is None:
        return {}
    out: Dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: List[str] = []
        line = stmt.lineno - 1
        while line in alone:  # a comment block directly above (a blank line or code ends it)
            above.insert(0, comments[line])
            line -= 1
        inline = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                  if n in comments and n not in alone]
        after = body[i + 1] if i + 1 < len(body) else None
        doc = [after.value.value] if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                                      and isinstance(after.value.value, str)) else []
        out[stmt.target.id] = _clean(above + inline + doc)
    return out


def class_intro(cls: type) -> str:
    """The class docstring as one line; "" when there is none (dataclasses make up a ``__doc__``: not used)."""
    node, _, _ = _class_node(cls)
    doc = ast.get_docstring(node) if node is not None else None
    return _clean([doc]) if doc else ""


# ------------------------------------------------------------------------------------------ types and values
def _dataclass_of(tp: Any) -> Optional[type]:
    """The dataclass in ``tp`` (``X`` or ``Optional[X]``), or None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_of(inner[0])
    return None


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is typing.Union or (getattr(types, "UnionType", None) is not None and origin is types.UnionType)


def type_name(tp: Any) -> str:
    """``Optional[int]`` → ``int | None``, ``List[float]`` → ``list[float]``, a dataclass → its name."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if _is_union(tp):
        args = typing.get_args(tp)
        return " | ".join([type_name(a) for a in args if a is not type(None)] + (["None"] if type(None) in args else []))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def yaml_value(value: Any) -> str:
    """``value`` as it would be written in a YAML config (``null``, ``true``, ``[1, 4]``, ``{k: 4}``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return re.sub(r"\n\.\.\.$", "", text)  # safe_dump ends a bare scalar with a document end marker


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml_value(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return yaml_value(f.default_factory())  # type: ignore[misc]
    return "(required)"


# ------------------------------------------------------------------------------------------ the key tree
def collect(root: Optional[type] = None) -> List[SectionDoc]:
    """The sections under ``root`` (default ``passk_rl.config.Config``): one per dataclass-typed field of the root,
    in field order, after a section "" for the root's other fields (if any). Keys of nested dataclasses follow the
    key that holds them."""
    if root is None:
        from passk_rl.config import Config as root  # noqa: N813
    hints = typing.get_type_hints(root)
    top: List[KeyDoc] = []
    sections: List[SectionDoc] = []
    meanings = field_meanings(root)
    for f in dataclasses.fields(root):
        sub = _dataclass_of(hints[f.name])
        if sub is not None and typing.get_origin(hints[f.name]) is None:  # a plain section, not Optional[...]
            sections.append(SectionDoc(f.name, _clean([meanings.get(f.name, ""), class_intro(sub)]),
                                       tuple(_keys(sub, f.name))))
        else:
            top.extend(_field_keys(root, f, hints[f.name], "", meanings))
    return ([SectionDoc("", class_intro(root), tuple(top))] if top else []) + sections


def _keys(cls: type, prefix: str) -> List[KeyDoc]:
    hints = typing.get_type_hints(cls)
    meanings = field_meanings(cls)
    out: List[KeyDoc] = []
    for f in dataclasses.fields(cls):
        out.extend(_field_keys(cls, f, hints[f.name], prefix, meanings))
    return out


def _field_keys(cls: type, f: dataclasses.Field, tp: Any, prefix: str, meanings: Dict[str, str]) -> List[KeyDoc]:
    key = f"{prefix}.{f.name}" if prefix else f.name
    choices = f.metadata.get("choices")
    sub = _dataclass_of(tp)
    meaning = meanings.get(f.name, "")
    if sub is not None and not meaning:
        meaning = class_intro(sub)  # a nested section explains itself in its docstring
    out = [KeyDoc(key, type_name(tp), _default(f), tuple(choices) if choices is not None else None, meaning)]
    if sub is not None:
        out.extend(_keys(sub, key))
    return out


def undocumented(sections: Sequence[SectionDoc]) -> List[str]:
    return [k.key for s in sections for k in s.keys if not k.meaning]


# ------------------------------------------------------------------------------------------ markdown
def _md(text: str, *, cell: bool = True) -> str:
    """Markdown for source text: ``<``/``>``/``&`` escaped outside code spans (``runs/<name>`` would otherwise
    vanish as an HTML tag); in a table cell also ``|``, which would split the cell."""
    parts = re.split(r"(`[^`]*`)", text)
    for i, part in enumerate(parts):
        if not (part.startswith("`") and part.endswith("`") and len(part) > 1):
            parts[i] = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = "".join(parts)
    return text.replace("|", "\\|") if cell else text


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def render(sections: Sequence[SectionDoc], *, source: str = "passk_rl/config.py") -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `python -m passk_rl.config_doc` from {source}; edit the comments there, then rerun it. "
        f"tests/test_config_doc.py fails while this file is stale. -->",
        "",
        "Every key of a run's YAML config, as `section.key`. A config file sets any subset of them (the rest keep "
        "the defaults below); `python -m passk_rl.launch --config FILE section.key=value ...` overrides single keys. "
        "Loading is strict: an unknown key, a value of the wrong type or one outside its allowed values is an error "
        "naming the key, raised before anything starts. Defaults are written as in YAML.",
        "",
    ]
    named = [s.name for s in sections if s.name]
    if named:
        lines += ["Sections: " + ", ".join(f"[{n}](#{n})" for n in named) + ".", ""]
    for s in sections:
        lines += [f"## {s.name}" if s.name else "## Top-level keys", ""]
        if s.intro:
            lines += [_md(s.intro, cell=False), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in s.keys:
            typ = _code(k.type)
            if k.choices is not None:
                typ += ", one of " + ", ".join(_code(yaml_value(c)) for c in k.choices)
            lines.append(f"| {_code(k.key)} | {typ} | {_code(k.default)} | {_md(k.meaning) or NO_MEANING} |")
        lines.append("")
    return "\n".join(lines)


def render_config_doc(root: Optional[type] = None) -> str:
    """The text of docs/config.md for ``root`` (default ``passk_rl.config.Config``)."""
    return render(collect(root))


def warn_undocumented(sections: Sequence[SectionDoc], stream: TextIO) -> None:
    missing = undocumented(sections)
    if missing:
        print(f"warning: {len(missing)} config key(s) have no comment or docstring next to their field (shown as "
              f"'{NO_MEANING}'): {', '.join(missing)}", file=stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m passk_rl.config_doc", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", default=str(DOC_PATH), help="output file, or - for stdout (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the output file is stale")
    args = p.parse_args(argv)
    sections = collect()
    text = render(sections)
    warn_undocumented(sections, sys.stderr)
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            print(f"{out} is stale: run `python -m passk_rl.config_doc` to regenerate it", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({sum(len(s.keys) for s in sections)} keys)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
