"""Data loading for file-backed tasks, through Hugging Face ``datasets``.

Sources: local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.arrow`` files, directories written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a Hugging Face hub id. Every row comes back as a
``Row`` that remembers its source and position, so a malformed row is reported as
``<file>: row <i> (line <n>): <what is wrong>``. Rows are counted from 0 in file order; for JSON Lines the
1-based line number is given as well.

Local files go through ``datasets.load_dataset`` with the builder chosen by extension (so they share the
``datasets`` cache, ``HF_DATASETS_CACHE``). When ``datasets`` cannot parse a JSON file it names neither row nor
line well, so the file is then re-read line by line to name the offending row.

Hub ids need a network or a warm cache. With ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` (read when the
data is loaded, not only when ``datasets`` was imported), or when the hub does not answer a short probe, only
the local cache is tried: a machine without network fails in seconds, not after the hub client's retries. The
error says how to point the task at local files instead (``task.train_files`` / ``task.test_files``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

SPLITS = ("train", "test")

FileSpec = Union[None, str, Sequence[str]]

# extension -> the datasets builder that reads it
BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".arrow": "arrow"}
DIR_EXTENSIONS = ("jsonl", "json", "parquet", "arrow")  # what a plain directory of data files is searched for
# A hub that does not answer within this many seconds is taken as unreachable: without it, a machine with no
# network waits through the hub client's retries (about 25 s when connections are refused, minutes when dropped).
HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class DataError(ValueError):
    """A data file is missing, unreadable or has a malformed row (the message names file and row)."""


@dataclasses.dataclass(frozen=True)
class Row:
    source: str  # file path, saved-dataset directory, or "hf:<id>[/<config>]:<split>"
    index: int  # 0-based position in the source
    data: Dict[str, Any]
    # row index -> 1-based line number (JSON Lines only); computed on first use, since only errors need it
    line_of: Optional[Callable[[int], Optional[int]]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def line(self) -> Optional[int]:
        return self.line_of(self.index) if self.line_of is not None else None

    @property
    def where(self) -> str:
        line = self.line
        loc = f"row {self.index}" + (f" (line {line})" if line is not None else "")
        return f"{self.source}: {loc}"

    def error(self, msg: str) -> DataError:
        return DataError(f"{self.where}: {msg}")

    def get(self, key: str, types: Union[Type, Tuple[Type, ...]], *, layout: str, required: bool = True) -> Any:
        """Field ``key`` checked against ``types``; a missing required field or a wrong type raises ``DataError``
        naming the file, the row and the expected layout."""
        if key not in self.data or self.data[key] is None:
            if required:
                # datasets gives every row every column (None where a row lacks it): list only real values
                present = ", ".join(sorted(str(k) for k, v in self.data.items() if v is not None)) or "none"
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


def _import_datasets(what: str):
    """The ``datasets`` module, or a ``DataError`` saying ``what`` needs it (it is an install requirement, so this
    only happens in a hand-made environment)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"{what} needs the `datasets` package, which is not installed (pip install datasets)") from None
    return datasets


def is_saved_dataset(path: str) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    if not os.path.isdir(path):
        return False
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("dataset_dict.json") or (has("dataset_info.json") and has("state.json"))


def expand_files(files: FileSpec, *, what: str) -> List[str]:
    """``files`` (a path, a glob, or a list of them) → existing data files and saved-dataset directories, in the
    given order (globs sorted). A plain directory stands for its ``.jsonl``/``.json``/``.parquet``/``.arrow``
    files. Raises ``DataError`` naming ``what`` (e.g. ``"task.train_files"``) for a path that matches nothing."""
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
            hits = [h for h in sorted(glob.glob(f)) if os.path.isfile(h) or is_saved_dataset(h)]
            if not hits:
                raise DataError(f"{what}: pattern {f!r} matches no file")
            out.extend(hits)
        elif is_saved_dataset(f):
            out.append(f)
        elif os.path.isdir(f):
            hits = sorted(p for ext in DIR_EXTENSIONS for p in glob.glob(os.path.join(f, f"*.{ext}")))
            if not hits:
                raise DataError(f"{what}: directory {f!r} holds no .jsonl/.json/.parquet/.arrow file and is not a "
                                f"dataset saved with save_to_disk")
            out.extend(hits)
        elif not os.path.isfile(f):
            raise DataError(f"{what}: file not found: {f!r} (cwd {os.getcwd()!r})")
        else:
            out.append(f)
    return out


def read_rows(path: str, split: Optional[str] = None) -> List[Row]:
    """All rows of one local source, read by ``datasets``: a file chosen by extension (``.jsonl``/``.ndjson``:
    one JSON object per line, blank lines skipped; ``.json``: a list of objects, an object with a ``data``/``rows``
    list, or JSON Lines; ``.parquet``/``.pq``; ``.arrow``), or a ``save_to_disk`` directory (for a saved
    ``DatasetDict``, its ``split``)."""
    path = os.fspath(path)
    if is_saved_dataset(path):
        return _read_saved(path, split)
    builder = BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, .arrow, or a directory "
                        f"written by save_to_disk)")
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path!r} (cwd {os.getcwd()!r})")
    datasets = _import_datasets(f"{path}: reading")
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
        if builder == "json" and path.lower().endswith(".json") and ds.num_rows == 1:
            key = _wrapping_key(ds)
            if key is not None:  # {"data": [...]}: the rows are that list
                ds = datasets.load_dataset("json", data_files=path, field=key, split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many types for a bad file
        if builder == "json" and _check_json(path) == 0:
            return []  # a file without rows: datasets cannot build a table from it, but it is not malformed
        raise DataError(f"{path}: cannot read as {builder}: {_describe(e)}") from None
    line_of = _JsonlLines(path, ds.num_rows) if builder == "json" and not path.lower().endswith(".json") else None
    return _to_rows(ds, path, line_of)


def _read_saved(path: str, split: Optional[str]) -> List[Row]:
    datasets = _import_datasets(f"{path}: reading a saved dataset")
    try:
        obj = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - a damaged directory fails in several ways
        raise DataError(f"{path}: cannot load the dataset saved there: {_describe(e)}") from None
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None or split not in obj:
            which = "no split was asked for" if split is None else f"it has no {split!r} split"
            example = os.path.join(path, names[0]) if names else path
            raise DataError(f"{path}: a saved DatasetDict with splits {names}, and {which}; point the task's "
                            f"files at one split's directory (e.g. {example!r})")
        return _to_rows(obj[split], os.path.join(path, split))
    return _to_rows(obj, path)


def _to_rows(ds: Any, source: str, line_of: Optional[Callable[[int], Optional[int]]] = None) -> List[Row]:
    return [Row(source, i, r, line_of) for i, r in enumerate(ds.to_list())]


def _wrapping_key(ds: Any) -> Optional[str]:
    """``"data"`` or ``"rows"`` when a one-row JSON dataset is really one object wrapping the list of rows."""
    first = ds[0]
    for key in ("data", "rows"):
        if isinstance(first.get(key), list):
            return key
    return None


def _describe(e: BaseException) -> str:
    # datasets wraps the parser's error in a generic "An error occurred while generating the dataset"
    cause = e.__cause__ if e.__cause__ is not None else e
    return f"{type(cause).__name__}: {str(cause)[:300]}"


class _JsonlLines:
    """Row index → 1-based line of a JSON Lines file (``datasets`` skips blank lines, so row i is the i-th
    non-blank line). Read on first call: only error messages need it."""

    def __init__(self, path: str, num_rows: int):
        self.path = path
        self.num_rows = num_rows
        self._lines: Optional[List[int]] = None

    def __call__(self, index: int) -> Optional[int]:
        if self._lines is None:
            with open(self.path, "rb") as fh:
                self._lines = [n for n, line in enumerate(fh, start=1) if line.strip()]
        # counts that disagree mean the mapping is unknown: better no line number than a wrong one
        if len(self._lines) != self.num_rows or not 0 <= index < self.num_rows:
            return None
        return self._lines[index]


def _check_json(path: str) -> int:
    """Re-read a JSON / JSON Lines file that ``datasets`` failed on, to name the malformed row and line (raises
    ``DataError``); returns the number of rows when it finds nothing wrong."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): not a JSON file") from None
    if path.lower().endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            first = next((l for l in text.split("\n") if l.strip()), "")
            if not first.lstrip().startswith("{") or not _parses(first):
                raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
            obj = None  # JSON Lines in a .json file: checked line by line below
        if obj is not None:
            if isinstance(obj, dict):
                for key in ("data", "rows"):
                    if isinstance(obj.get(key), list):
                        obj = obj[key]
                        break
            if not isinstance(obj, list):
                raise DataError(f"{path}: expected a JSON list of row objects")
            for i, r in enumerate(obj):
                if not isinstance(r, dict):
                    raise DataError(f"{path}: row {i}: expected an object, got {type(r).__name__}")
            return len(obj)
    n = 0
    # split on newlines only, as the JSON Lines reader does (str.splitlines would also split at U+2028 and others)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {n} (line {lineno}): not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: row {n} (line {lineno}): expected a JSON object, got {type(obj).__name__}")
        n += 1
    return n


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the hub
def offline_requested() -> bool:
    """Whether the environment asks for no hub access now. ``datasets`` and ``huggingface_hub`` read these
    variables once, at import; a launcher (or a test) may set them later, and that must still hold."""
    if any(os.environ.get(v, "").strip().upper() in _TRUE for v in _OFFLINE_VARS):
        return True
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        return False
    return bool(datasets.config.HF_HUB_OFFLINE)


def hub_unreachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the hub endpoint answers (any HTTP status) within ``timeout_s``, else why not. Uses the hub
    client's own session, so proxies, certificates and ``HF_ENDPOINT`` are those the real download would use."""
    import datasets  # type: ignore[import-not-found]
    from huggingface_hub import get_session

    endpoint = datasets.config.HF_ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, TLS, proxy: all mean "not reachable"
        return f"{endpoint} did not answer ({type(e).__name__}: {str(e)[:200]})"
    return None


@contextlib.contextmanager
def _cache_only(datasets: Any) -> Iterator[None]:
    """Force ``datasets``/``huggingface_hub`` offline for one load, so that only the local cache is used. Both
    read ``HF_HUB_OFFLINE`` into module globals at import, and consult those globals on every request."""
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub(task: str, dataset: str, *, config: Optional[str], split: str, hub_split: str) -> List[Row]:
    """Rows of ``dataset`` (a Hugging Face id) from the hub or its local cache; ``DataError`` with instructions
    for local files when ``datasets`` is missing or the dataset cannot be had without the network."""
    how = (f"To train offline, download the {split} split as .parquet or .jsonl files (or save it with "
           f"save_to_disk) and set task.{split}_files to their paths (see configs/{task}_local.yaml).")
    datasets = _import_datasets(f"task {task}: no task.{split}_files given, and loading {dataset!r} from the "
                                f"Hugging Face hub")
    what = f"task {task}: could not load {dataset!r} (config {config!r}, split {hub_split!r})"
    offline = offline_requested()
    unreachable = None if offline else hub_unreachable()
    try:
        if offline or unreachable:
            with _cache_only(datasets):
                ds = datasets.load_dataset(dataset, config, split=hub_split)
        else:
            ds = datasets.load_dataset(dataset, config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - connection, cache miss, missing config: same remedy
        if offline:
            flags = [v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().upper() in _TRUE] or ["HF_HUB_OFFLINE"]
            why = (f"hub access is off ({'/'.join(flags)} set) and the local cache does not hold it. This machine "
                   f"may be offline")
        elif unreachable:
            why = f"{unreachable}, and the local cache does not hold it. This machine may be offline"
        else:
            why = f"from the Hugging Face hub: {_describe(e)}. This machine may be offline, or the id is wrong"
        raise DataError(f"{what}: {why}. {how}") from None
    source = f"hf:{dataset}" + (f"/{config}" if config else "") + f":{hub_split}"
    return _to_rows(ds, source)


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
            rows.extend(read_rows(path, split))
        return rows
    if train_files or test_files:
        raise DataError(f"task {task}: no task.{split}_files given (only the other split has local files)")
    if not dataset:
        raise DataError(f"task {task}: give task.{split}_files (local .jsonl/.json/.parquet/.arrow files or a "
                        f"save_to_disk directory) or task.dataset (a Hugging Face id)")
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
