"""The file backend of the weight transport: a safetensors file in shared memory, loaded by vLLM's reload.

:class:`ShmSafetensorsTransport` (``sync.transport: shm_safetensors``): rank 0 writes one ``model.safetensors``
under ``root/run_name/step_<n>/`` (atomically: a hidden temp dir, then ``rename``), every engine calls vLLM's
``collective_rpc("reload_weights", kwargs={"weights_path": dir})``. ``/dev/shm`` is node-local, so this backend
needs rank 0 and all engines on one node (or ``root`` on a shared filesystem).

Also here: reading safetensors headers and checkpoints (what an engine validates published weights against) and
handles for weights already on disk (``handle_for_model_dir``). The interface and what every backend shares are in
``cluster/weights.py``; the streaming backend is ``cluster/collective.py`` (the two never import each other);
``cluster/transports.py`` names them. Imports neither vLLM nor Ray at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from cluster.weights import (  # noqa: F401 - re-exported: the names this module always offered
    ENGINE_EXTENSION,
    _ST_DTYPES,
    _ST_ITEMSIZE,
    Shape,
    WeightHandle,
    WeightTransport,
    _check_kind,
    _checksum_update,
    _sample_index,
    state_dict_checksum,
    validate_params,
)

WEIGHTS_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------ helpers
def _safetensors_layout(path: str | Path) -> Tuple[Dict[str, Dict[str, Any]], int]:
    """(``name -> {"dtype", "shape", "data_offsets"}``, file offset of the data section) of a safetensors file,
    read through ``safetensors.safe_open`` (no tensor data read).

    safe_open gives names, shapes and dtypes but not byte offsets, which :func:`file_checksum` needs to sample
    the raw bytes. They follow from what it does give: it refuses any file whose tensors do not tile the data
    section exactly, in order and without holes, up to the end of the file, so walking ``offset_keys()`` and
    summing ``numel * itemsize`` reproduces the header's ``data_offsets``, and the data starts that many bytes
    before the end of the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    layout: Dict[str, Dict[str, Any]] = {}
    end = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.offset_keys():
                sl = f.get_slice(name)
                shape, dtype = [int(d) for d in sl.get_shape()], sl.get_dtype()
                if dtype not in _ST_ITEMSIZE:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which the weight sync does not "
                                     f"handle (known: {sorted(_ST_ITEMSIZE)})")
                begin, end = end, end + int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dtype]
                layout[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    return layout, path.stat().st_size - end


def read_safetensors_header(path: str | Path) -> Dict[str, Dict[str, Any]]:
    """The tensors of a safetensors file: ``name -> {"dtype", "shape", "data_offsets"}`` (no tensor data read)."""
    return _safetensors_layout(path)[0]


def checkpoint_params(model_path: str | Path) -> Dict[str, Shape]:
    """Names and shapes of the parameters in an HF checkpoint directory, from the safetensors headers.

    This is the reference a published state dict is validated against: vLLM accepted exactly these names when the
    engine started. Sharded checkpoints (``model.safetensors.index.json``) are followed; a directory without
    safetensors falls back to instantiating the HF architecture on the meta device (no memory, no weights read).
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_path}")
    files: List[Path]
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_path.glob("*.safetensors"))
    if files:
        out: Dict[str, Shape] = {}
        for f in files:
            for name, meta in read_safetensors_header(f).items():
                out[name] = tuple(int(d) for d in meta["shape"])
        return out
    return _meta_model_params(model_path)


def _meta_model_params(model_path: Path) -> Dict[str, Shape]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def optional_param_names(model_path: str | Path) -> frozenset:
    """Names that may be present or absent without harm: the output projection of a tied-embedding model.

    HF ``state_dict()`` lists ``lm_head.weight`` for tied models while ``save_pretrained`` drops it; vLLM skips
    it when ``tie_word_embeddings`` is set. Everything else must match exactly.
    """
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        return frozenset()
    cfg = json.loads(cfg_file.read_text())
    text_cfg = cfg.get("text_config") or {}
    tied = cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False))
    return frozenset({"lm_head.weight"}) if tied else frozenset()


def file_checksum(path: str | Path) -> str:
    """:func:`state_dict_checksum` of a safetensors file, reading only the sampled bytes (memory-mapped)."""
    header, start = _safetensors_layout(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    h = hashlib.sha256()
    for name in sorted(header):
        meta = header[name]
        itemsize = _ST_ITEMSIZE[meta["dtype"]]
        b0, b1 = meta["data_offsets"]
        numel = (b1 - b0) // itemsize
        rows = data[start + b0: start + b1].reshape(numel, itemsize)
        _checksum_update(h, name, meta["shape"], meta["dtype"], np.ascontiguousarray(rows[_sample_index(numel)]).tobytes())
    return h.hexdigest()


def handle_for_model_dir(model_dir: str | Path, *, step: int) -> WeightHandle:
    """A ``shm_safetensors`` handle for weights already on disk: an HF directory with one ``model.safetensors``
    (what ``export_hf`` and ``make_base`` write). Engines then load another model of the same architecture in
    place, with the same name/shape/checksum validation as a published step, instead of starting a new engine."""
    f = Path(model_dir) / WEIGHTS_FILE
    header = read_safetensors_header(f)  # FileNotFoundError naming the file
    extra = sorted(p.name for p in Path(model_dir).glob("*.safetensors") if p.name != WEIGHTS_FILE)
    if extra:
        raise ValueError(f"{model_dir}: sharded weights ({extra[:3]}...) cannot be loaded in place; one "
                         f"{WEIGHTS_FILE} is expected")
    return WeightHandle(step=int(step), kind=ShmSafetensorsTransport.kind, location=str(Path(model_dir)),
                        tensors={k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()},
                        checksum=file_checksum(f), host=socket.gethostname(), nbytes=f.stat().st_size,
                        created_unix=f.stat().st_mtime)


def _cpu_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; names aliasing the same storage (tied weights) are kept once.

    safetensors refuses shared tensors; the first name in state-dict order (``model.embed_tokens.weight`` before
    ``lm_head.weight``) is the one vLLM loads for tied models.
    """
    if not state_dict:
        raise ValueError("publish: the state dict is empty")
    out: Dict[str, torch.Tensor] = {}
    seen: Dict[Tuple[int, int, Tuple[int, ...], Tuple[int, ...]], str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"publish: state dict entry {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.device.type != "meta" and t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key in seen:
                continue
            seen[key] = name
        elif t.device.type == "meta":
            raise ValueError(f"publish: {name!r} is on the meta device (gather the full state dict first, e.g. "
                             f"ZeRO-3 `consolidated_16bit_state_dict` on rank 0)")
        out[name] = t.detach().to("cpu").contiguous()
    return out



# ------------------------------------------------------------------------------------------- shm files
class ShmSafetensorsTransport(WeightTransport):
    """Safetensors file in shared memory + vLLM ``reload_weights`` (the CPU backend; also works on one GPU node).

    ``root/run_name/step_<n:08d>/model.safetensors``. ``keep_last`` versions survive each publish (≥ 1: the
    engines read the newest; keeping 2 lets a straggler still read the previous one). ``verify_checksum`` makes
    ``apply`` recompute the sampled checksum from the file (cheap) before loading.
    """

    kind = "shm_safetensors"
    _STEP_RE = re.compile(r"^step_(\d+)$")

    def __init__(self, root: str = "/dev/shm/passk_rl", run_name: str = "default", *, keep_last: int = 2,
                 verify_checksum: bool = True):
        if not run_name or "/" in run_name or run_name in (".", ".."):
            raise ValueError(f"run_name must be a plain directory name, got {run_name!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be ≥ 1 (the engines read the newest version), got {keep_last}")
        self.root = str(root)
        self.run_name = run_name
        self.keep_last = int(keep_last)
        self.verify_checksum = bool(verify_checksum)

    @classmethod
    def from_config(cls, cfg: Any) -> "ShmSafetensorsTransport":
        return cls(root=cfg.sync.root, run_name=cfg.run.name, keep_last=cfg.sync.keep_last,
                   verify_checksum=cfg.sync.verify_checksum)

    def engine_kwargs(self, device: str) -> Dict[str, Any]:
        return {"worker_extension_cls": ENGINE_EXTENSION}  # reload + the tied head (cluster/weights.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.run_name

    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"step_{int(step):08d}"

    def publish(self, state_dict: Dict[str, torch.Tensor], *, step: int) -> WeightHandle:
        from safetensors.torch import save_file

        if int(step) < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        tensors = _cpu_state_dict(state_dict)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        # Engines glob the directory for *.safetensors: build it under a hidden name and rename it into place, so
        # no engine can ever see a half-written file.
        tmp = self.run_dir / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "step": str(int(step))})
            if final.exists():
                old = self.run_dir / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        handle = WeightHandle(
            step=int(step), kind=self.kind, location=str(final),
            tensors={k: (tuple(v.shape), _ST_DTYPES.get(v.dtype, str(v.dtype))) for k, v in tensors.items()},
            checksum=state_dict_checksum(tensors), host=socket.gethostname(),
            nbytes=sum(v.numel() * v.element_size() for v in tensors.values()), created_unix=time.time(),
        )
        self.cleanup(self.keep_last)
        return handle

    def publish_from(self, source: Any, *, step: int) -> Optional[WeightHandle]:
        sd = source.gather_state_dict()  # collective under ZeRO-3: every rank takes part
        return self.publish(sd, step=step) if source.rank == 0 else None

    def deliver(self, sync: Any, step: int) -> Dict[str, Any]:
        # The file is complete when publish returns; then the engines read it (an engine that dies meanwhile is
        # restarted by the pool and reads the same file).
        t0 = time.perf_counter()
        handle = sync.learner.publish_weights(self, step=step)
        t1 = time.perf_counter()
        report = sync.generators.sync_weights(handle)
        return {**report, "seconds": time.perf_counter() - t0, "publish_seconds": t1 - t0, "bytes": handle.nbytes,
                "transport": self.kind}

    def check(self, handle: WeightHandle, *, expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> Path:
        """Everything ``apply`` verifies before touching the engine; returns the weights directory."""
        _check_kind(handle, self.kind)
        d = Path(handle.location)
        f = d / WEIGHTS_FILE
        if not f.is_file():
            here = socket.gethostname()
            hint = (f" (published on host {handle.host!r}, this is {here!r}: the shm transport needs the learner's "
                    f"rank 0 and every engine on one node, or a `root` on a shared filesystem)"
                    if handle.host and handle.host != here else
                    " (was it cleaned up? raise `keep_last` if engines apply versions late)")
            raise FileNotFoundError(f"weights for step {handle.step} not found at {f}{hint}")
        header = read_safetensors_header(f)
        published = {k: tuple(v["shape"]) for k, v in header.items()}
        validate_params(published, handle.shapes, source=f"weights file {f}",
                        target=f"its handle for step {handle.step}")
        if expected_params is not None:
            validate_params(published, expected_params, optional=optional_params,
                            source=f"weights for step {handle.step} in {d}", target="the engine's model")
        if self.verify_checksum and handle.checksum:
            got = file_checksum(f)
            if got != handle.checksum:
                raise ValueError(f"weights file {f} does not hold the tensors published for step {handle.step} "
                                 f"(checksum {got[:12]}… ≠ {handle.checksum[:12]}…)")
        return d

    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> None:
        d = self.check(handle, expected_params=expected_params, optional_params=optional_params)
        engine_llm.collective_rpc("passk_reload_from_path", kwargs={"weights_path": str(d)})
        engine_llm.reset_prefix_cache()

    def cleanup(self, keep_last: int = 1) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be ≥ 0, got {keep_last}")
        if not self.run_dir.is_dir():
            return
        steps = sorted((int(m.group(1)), p) for p in self.run_dir.iterdir()
                       if p.is_dir() and (m := self._STEP_RE.match(p.name)))
        doomed = steps[: max(len(steps) - keep_last, 0)]
        for _, p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        if keep_last == 0:
            for p in self.run_dir.iterdir():  # leftovers of a crashed publish
                if p.name.startswith(".step_"):
                    shutil.rmtree(p, ignore_errors=True)
            for d in (self.run_dir, Path(self.root)):  # only if empty: other runs may share the root
                try:
                    d.rmdir()
                except OSError:
                    break

