"""Atomic, verifiable run checkpoints on a filesystem (plain functions: no Ray, no DeepSpeed).

Layout under ``<run>/checkpoints``::

    step_000040/            a complete checkpoint: whatever the writer put there, plus
        MANIFEST.json       {relative path: [size, sha256 or null]} of every file, written last but one
        COMPLETE            written last
    latest                  the name of the newest complete checkpoint (replaced atomically)
    .step_000050.tmp/       a checkpoint being written (never loaded; removed by the next save)

Protocol (``commit``): the caller fills a temporary directory; its files are fsynced, the manifest and the marker
are written, the directory is renamed into place, and only then ``latest`` is replaced (write a temporary file,
fsync, rename, fsync the directory). A crash at any point leaves either the previous ``latest`` or the new one,
never a pointer to a half-written directory. ``usable`` walks candidates newest first and verifies each against
its manifest, so a checkpoint corrupted after the fact (a truncated or altered file) is skipped, with the reason.

Hashing: files up to ``HASH_LIMIT`` bytes get a sha256; larger ones (model shards of big runs) only their size,
so a save of a 30 GB checkpoint is not slowed by a full read-back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from passk_rl.files import fsync_path, sha256_file, write_atomic

MANIFEST = "MANIFEST.json"
MARKER = "COMPLETE"
LATEST = "latest"
HASH_LIMIT = 64 * 2**20
PREFIX = "step_"


def step_name(step: int) -> str:
    return f"{PREFIX}{int(step):06d}"


def _files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MARKER):
            yield p


def staging_dir(root: Path, step: int) -> Path:
    """An empty temporary directory to write the checkpoint of ``step`` into (a stale one is removed)."""
    tmp = Path(root) / f".{step_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, *, keep: int) -> Path:
    """Seal ``tmp`` (fsync, manifest, marker), rename it to ``step_<step>``, point ``latest`` at it, and keep only the
    ``keep`` newest complete checkpoints. Returns the checkpoint's path."""
    root = Path(root)
    manifest: Dict[str, List] = {}
    for f in _files(tmp):
        fsync_path(f)
        size = f.stat().st_size
        manifest[str(f.relative_to(tmp))] = [size, sha256_file(f) if size <= HASH_LIMIT else None]
    for d in sorted({f.parent for f in _files(tmp)} | {tmp}, key=lambda p: len(p.parts), reverse=True):
        fsync_path(d)
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=0, sort_keys=True))
    write_atomic(tmp / MARKER, "ok\n")
    final = root / step_name(step)
    if final.exists():  # the same step saved again (e.g. a preemption checkpoint at the last interval step)
        old = root / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    fsync_path(root)
    write_atomic(root / LATEST, final.name + "\n")
    for old in complete(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> List[Path]:
    """Checkpoints with their COMPLETE marker, newest first (the one ``latest`` names leads)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()),
                  key=lambda p: p.name, reverse=True)
    pointer = latest_name(root)
    if pointer is not None:
        dirs.sort(key=lambda p: p.name != pointer)  # stable: the pointed-to one first, then newest first
    return dirs


def latest_name(root: Path) -> Optional[str]:
    f = Path(root) / LATEST
    try:
        return f.read_text().strip() or None
    except OSError:
        return None


def verify(ckpt: Path) -> Optional[str]:
    """None when ``ckpt`` matches its manifest; else what is wrong with it."""
    ckpt = Path(ckpt)
    if not (ckpt / MARKER).is_file():
        return "no COMPLETE marker (an interrupted save)"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for rel, (size, digest) in manifest.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were saved"
        if digest is not None and sha256_file(f) != digest:
            return f"{rel} does not match its saved sha256"
    return None


def usable(root: Path, log=print) -> Tuple[Optional[Path], List[str]]:
    """The newest checkpoint that verifies, and the reasons the newer ones were skipped."""
    skipped = []
    for ck in complete(root):
        problem = verify(ck)
        if problem is None:
            return ck, skipped
        skipped.append(f"{ck.name}: {problem}")
        log(f"checkpoint {ck} is not usable ({problem}); trying an older one")
    return None, skipped


def step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name[len(PREFIX):])
