"""Data loading for file-backed tasks: local ``.jsonl`` / ``.json`` / ``.parquet`` files or a Hugging Face id.

Every row comes back as a ``Row`` that remembers its file and position, so a malformed row is reported as
``<file>: row <i> (line <n>): <what is wrong>``. Rows are counted from 0 in file order; for JSON Lines the
1-based line number is given as well.

Hub loading needs the ``datasets`` package and a network (or a warm cache). Without either, the error says
how to point the task at local files instead (``task.train_files`` / ``task.test_files``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

SPLITS = ("train", "test")

FileSpec = Union[None, str, Sequence[str]]


class DataError(ValueError):
    """A data file is missing, unreadable or has a malformed row (the message names file and row)."""


@dataclasses.dataclass(frozen=True)
class Row:
    source: str  # file path, or "hf:<id>[/<config>]:<split>"
    index: int  # 0-based position in the source
    data: Dict[str, Any]
    line: Optional[int] = None  # 1-based line number (JSON Lines only)

    @property
    def where(self) -> str:
        loc = f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{self.source}: {loc}"

    def error(self, msg: str) -> DataError:
        return DataError(f"{self.where}: {msg}")

    def get(self, key: str, types: Union[Type, Tuple[Type, ...]], *, layout: str, required: bool = True) -> Any:
        """Field ``key`` checked against ``types``; a missing required field or a wrong type raises ``DataError``
        naming the file, the row and the expected layout."""
        if key not in self.data or self.data[key] is None:
            if required:
                present = ", ".join(sorted(map(str, self.data))) or "none"
                raise self.error(f"missing field {key!r} ({layout}; fields present: {present})")
            return None
        v = self.data[key]
        if not isinstance(v, types) or isinstance(v, bool) and bool not in _as_tuple(types):
            names = "/".join(t.__name__ for t in _as_tuple(types))
            raise self.error(f"field {key!r} should be {names}, got {type(v).__name__} {_short(v)} ({layout})")
        return v


def _as_tuple(types: Union[Type, Tuple[Type, ...]]) -> Tuple[Type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def expand_files(files: FileSpec, *, what: str) -> List[str]:
    """``files`` (a path, a glob, or a list of them) → existing file paths in the given order (globs sorted).
    Raises ``DataError`` naming ``what`` (e.g. ``"task.train_files"``) for a path that matches nothing."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [os.fspath(files)]
    out: List[str] = []
    for f in files:
        if not isinstance(f, (str, os.PathLike)):
            raise DataError(f"{what}: expected file paths, got {type(f).__name__} {_short(f)}")
        f = os.path.expanduser(os.fspath(f))
        if any(c in f for c in "*?["):
            hits = sorted(glob.glob(f))
            if not hits:
                raise DataError(f"{what}: pattern {f!r} matches no file")
            out.extend(hits)
        elif os.path.isdir(f):
            hits = sorted(p for ext in ("jsonl", "json", "parquet") for p in glob.glob(os.path.join(f, f"*.{ext}")))
            if not hits:
                raise DataError(f"{what}: directory {f!r} holds no .jsonl/.json/.parquet file")
            out.extend(hits)
        elif not os.path.isfile(f):
            raise DataError(f"{what}: file not found: {f!r} (cwd {os.getcwd()!r})")
        else:
            out.append(f)
    return out


def read_rows(path: str) -> List[Row]:
    """All rows of one local file, chosen by extension: ``.jsonl`` (one JSON object per line; blank lines
    skipped), ``.json`` (a list of objects, or an object with a ``data``/``rows`` list), ``.parquet``."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(path)
    if lower.endswith(".json"):
        return _read_json(path)
    if lower.endswith((".parquet", ".pq")):
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def _read_jsonl(path: str) -> List[Row]:
    rows: List[Row] = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {len(rows)} (line {lineno}): not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {len(rows)} (line {lineno}): expected a JSON object, got "
                                f"{type(obj).__name__}")
            rows.append(Row(path, len(rows), obj, lineno))
    return rows


def _read_json(path: str) -> List[Row]:
    with open(path, "r", encoding="utf-8") as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if isinstance(obj, dict):
        for key in ("data", "rows"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of row objects")
    rows = []
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {i}: expected an object, got {type(r).__name__}")
        rows.append(Row(path, i, r))
    return rows


def _read_parquet(path: str) -> List[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the `pyarrow` package (pip install pyarrow), "
                        f"or convert the file to JSON Lines") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {type(e).__name__}: {e}") from None
    return [Row(path, i, r) for i, r in enumerate(table.to_pylist())]


def load_hub(task: str, dataset: str, *, config: Optional[str], split: str, hub_split: str) -> List[Row]:
    """Rows of ``dataset`` (a Hugging Face id) from the hub or its local cache; ``DataError`` with instructions
    for local files when ``datasets`` is missing or the hub cannot be reached."""
    how = (f"To train offline, download the {split} split as .parquet or .jsonl files and set "
           f"task.{split}_files to their paths (see configs/{task}_local.yaml).")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"task {task}: no task.{split}_files given, and loading {dataset!r} from the Hugging Face "
                        f"hub needs the `datasets` package, which is not installed. {how}") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - connection, offline mode, missing config: same remedy
        raise DataError(f"task {task}: could not load {dataset!r} (config {config!r}, split {hub_split!r}) from the "
                        f"Hugging Face hub: {type(e).__name__}: {str(e)[:300]}. This machine may be offline. "
                        f"{how}") from None
    source = f"hf:{dataset}" + (f"/{config}" if config else "") + f":{hub_split}"
    return [Row(source, i, dict(r)) for i, r in enumerate(ds)]


def load_split(
    task: str,
    split: str,
    *,
    train_files: FileSpec,
    test_files: FileSpec,
    dataset: Optional[str],
    dataset_config: Optional[str],
    hub_splits: Optional[Dict[str, str]] = None,
) -> List[Row]:
    """The rows of ``split`` for ``task``: from local files when any are configured, otherwise from the hub id
    ``dataset``. Giving files for one split and not the other is an error for the other split (never a silent
    fallback to the network)."""
    if split not in SPLITS:
        raise ValueError(f"task {task}: unknown split {split!r}; known: {SPLITS}")
    files = train_files if split == "train" else test_files
    if files:
        rows: List[Row] = []
        for path in expand_files(files, what=f"task.{split}_files"):
            rows.extend(read_rows(path))
        return rows
    if train_files or test_files:
        raise DataError(f"task {task}: no task.{split}_files given (only the other split has local files)")
    if not dataset:
        raise DataError(f"task {task}: give task.{split}_files (local .jsonl/.json/.parquet) or task.dataset "
                        f"(a Hugging Face id)")
    hub_split = (hub_splits or {}).get(split, split)
    return load_hub(task, dataset, config=dataset_config, split=split, hub_split=hub_split)


def unique_ids(ids: List[str]) -> List[str]:
    """Make ids unique by suffixing repeats with ``#2``, ``#3``… (first occurrence unchanged)."""
    seen: Dict[str, int] = {}
    out = []
    for i in ids:
        n = seen.get(i, 0) + 1
        seen[i] = n
        out.append(i if n == 1 else f"{i}#{n}")
    return out


class DatasetTask:
    """Mixin for tasks backed by ``load_split``: loads a split on first use and caches its prompts.

    Subclasses set ``name``, ``default_dataset``/``default_config`` and implement ``_row_to_prompt(row, split)``.
    Loading is lazy so a task built only to verify (inside a verifier actor) never touches the data files.
    """

    name = "dataset"
    hub_splits: Dict[str, str] = {}

    def _init_source(self, *, train_files: FileSpec, test_files: FileSpec, dataset: Optional[str],
                     dataset_config: Optional[str], limit: Optional[int]) -> None:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"task {self.name}: limit must be a positive integer or None, got {limit!r}")
        self.train_files = train_files
        self.test_files = test_files
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.limit = limit
        self._cache: Dict[str, list] = {}

    def prompts(self, split: str) -> list:
        if split not in self._cache:
            rows = load_split(self.name, split, train_files=self.train_files, test_files=self.test_files,
                              dataset=self.dataset, dataset_config=self.dataset_config, hub_splits=self.hub_splits)
            prompts = []
            for row in rows:
                p = self._row_to_prompt(row, split)
                if p is not None:
                    prompts.append(p)
                if self.limit is not None and len(prompts) >= self.limit:
                    break
            self._cache[split] = self._dedupe(prompts)
        return list(self._cache[split])

    @staticmethod
    def _dedupe(prompts: list) -> list:
        ids = unique_ids([p.id for p in prompts])
        if ids == [p.id for p in prompts]:
            return prompts
        return [dataclasses.replace(p, id=i) for p, i in zip(prompts, ids)]

    def _row_to_prompt(self, row: Row, split: str):  # pragma: no cover - abstract
        raise NotImplementedError
