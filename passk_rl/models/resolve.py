"""The one model resolver: what a model name in a config or on a command line means on this machine.

- ``builtin:<name>``: a model committed in the package (``BUILTIN_MODELS``), checked before use. The built-in
  arith model is the seed-0 build whatever a run's seed, so runs with different seeds start from the same weights
  on every machine, which comparing their final pass@k against the base needs.
- a Hugging Face model directory (has ``config.json``): itself.
- a run directory (``config.yaml`` / ``metrics.jsonl`` / ``final_model/``): its ``final_model/``.
- anything else, when ``hub`` allows it: a hub id that vLLM / transformers fetch or read from the local HF cache
  (refused offline, or when it cannot be a hub id).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Dict, Optional


def _arith_base(check: bool) -> Path:
    from passk_rl.tasks.make_base import BUILTIN_DIR, builtin_base_model

    return builtin_base_model() if check else BUILTIN_DIR


# name after "builtin:" -> (check) -> directory; ``check`` verifies recipe and weights (False: only the path)
BUILTIN_MODELS: Dict[str, Callable[[bool], Path]] = {"arith-base": _arith_base}


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    path: str  # an HF directory (absolute) or a hub id
    run_dir: Optional[str] = None  # the run directory when the spec named one


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def resolve_model(spec: str, *, key: str = "model", hub: bool = False, check: bool = True) -> ResolvedModel:
    """Resolve ``spec`` (see the module docstring). Errors name ``key`` (the config key or option it came from):
    ValueError for an unknown built-in name, FileNotFoundError when nothing loadable is there."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"{key}: unknown built-in model {spec!r}; known: "
                             f"{[f'builtin:{n}' for n in BUILTIN_MODELS]}")
        return ResolvedModel(str(BUILTIN_MODELS[name](check)))
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{key}: {spec!r} is not a directory (expected an HF model directory or a run "
                                    f"directory)")
        if _is_hf_dir(p):
            return ResolvedModel(str(p.resolve()))
        if any((p / f).exists() for f in ("final_model", "config.yaml", "metrics.jsonl")):
            fm = p / "final_model"
            if not _is_hf_dir(fm):
                raise FileNotFoundError(f"{key}: {spec!r} is a run directory without {fm}/config.json (did the run "
                                        f"finish? final_model/ is written after the last step)")
            return ResolvedModel(str(fm.resolve()), str(p.resolve()))
        raise FileNotFoundError(f"{key}: {p} is neither an HF model directory (no config.json) nor a run directory "
                                f"(no final_model/)")
    if not hub:
        raise FileNotFoundError(f"{key}: {spec!r}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in spec:
        raise FileNotFoundError(f"{key}: {spec!r} is not a local directory and cannot be fetched offline")
    return ResolvedModel(spec)
