"""File helpers below every other module (no passk_rl imports): content hashes and atomic, durable writes.

Checkpoints (``passk_rl.checkpoint``), the committed base model (``passk_rl.tasks.make_base``) and the experiment's
evaluation cache (``passk_rl.experiment``) all identify files by the same sha256 and replace them the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: os.PathLike) -> None:
    """fsync a file or directory by path (a directory's fsync makes a rename in it durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
