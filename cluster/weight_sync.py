"""Learner → generator weight transport.

One interface, several backends:

``publish(state_dict, step=...) -> WeightHandle``
    runs on the learner's rank 0 with the full, HF-named state dict (what ``model.state_dict()`` of the HF model
    returns, gathered under ZeRO-3). It returns a small picklable :class:`WeightHandle` that the driver forwards
    to every generator actor. (The learner streams to a collective transport bucket by bucket instead, never
    holding the full state dict: ``LearnerWorker.publish_weights``.)
``apply(engine_llm, handle, expected_params=...)``
    runs inside a generator actor with its ``vllm.LLM``. It validates the published names/shapes against what
    the engine's model expects (vLLM itself fails with a bare ``AssertionError`` deep in a weight loader), loads
    the weights, and drops the engine's prefix cache (cached KV blocks were computed with the old weights; reusing
    them would silently mix policies).
``wait()``
    blocks until a publish has been fully delivered (a no-op for both backends here: a file is complete when
    ``publish`` returns, and a collective ``publish`` returns once every engine has received its stream, which is
    why it must run concurrently with ``apply`` — :class:`WeightSync`).
``cleanup(keep_last)``
    drops old published versions.

Backends (``make_transport(kind, **params)``):

* ``"shm_safetensors"`` — :class:`ShmSafetensorsTransport`: rank 0 writes one ``model.safetensors`` under
  ``root/run_name/step_<n>/`` (atomically: a hidden temp dir, then ``rename``), every engine calls vLLM's
  ``collective_rpc("reload_weights", kwargs={"weights_path": dir})``. ``/dev/shm`` is node-local, so this backend
  needs rank 0 and all engines on one node (or ``root`` on a shared filesystem). This is the CPU default.
* ``"collective"`` — :class:`CollectiveTransport`: learner rank 0 streams the parameters, in their training dtype
  and in fixed-size buckets, over a process group of its own (gloo / nccl / hccl from the device table) straight
  into every engine worker, which loads them in place through vLLM's layerwise reload (``cluster/collective.py``
  documents the protocol and what vLLM 0.32 offers). No file; under ZeRO-3 the learner gathers one bucket at a
  time. Both ends must run at once: :class:`WeightSync` drives a sync for either backend from the driver.

The module imports neither vLLM nor Ray at import time; engines are only touched through the ``engine_llm`` object
passed in.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

Shape = Tuple[int, ...]
WEIGHTS_FILE = "model.safetensors"
# Elements sampled per tensor for the checksum: a content check that costs O(#tensors), not O(#parameters), so it
# can run on every sync of a 7B model. It catches stale, truncated or foreign files, not single flipped bits.
CHECKSUM_SAMPLES = 4096

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclasses.dataclass(frozen=True)
class WeightHandle:
    """What the driver hands each generator to load one published weight version.

    ``tensors`` maps each HF parameter name to ``(shape, safetensors dtype string)`` in publish order (empty in a
    collective handle made before the stream: the stream's header carries them). ``location`` is backend-specific:
    a directory for ``shm_safetensors``, ``host:port/group`` of the rendezvous for ``collective``; ``host`` is
    where it was made. ``rendezvous`` (collective only): how an engine joins the group.
    """

    step: int
    kind: str
    location: str
    tensors: Dict[str, Tuple[Shape, str]]
    checksum: str
    host: str = ""
    nbytes: int = 0
    created_unix: float = 0.0
    rendezvous: Optional[Dict[str, Any]] = None

    @property
    def shapes(self) -> Dict[str, Shape]:
        return {k: tuple(v[0]) for k, v in self.tensors.items()}


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


def validate_params(published: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]], *,
                    optional: Iterable[str] = (), source: str = "published weights", target: str = "the engine's model",
                    max_listed: int = 20) -> None:
    """Raise ``ValueError`` naming every missing, unexpected and shape-mismatched parameter.

    ``published``/``expected``: name -> shape. Names in ``optional`` may be absent on either side.
    """
    optional = set(optional)
    pub = {k: tuple(int(d) for d in v) for k, v in published.items()}
    exp = {k: tuple(int(d) for d in v) for k, v in expected.items()}
    missing = sorted(set(exp) - set(pub) - optional)
    unexpected = sorted(set(pub) - set(exp) - optional)
    mismatched = sorted(k for k in set(pub) & set(exp) if pub[k] != exp[k])
    if not (missing or unexpected or mismatched):
        return

    def listed(items: List[str]) -> str:
        more = f", … (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
        return ", ".join(items[:max_listed]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {listed(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} with wrong shape: " +
                     listed([f"{k} {list(pub[k])} (expected {list(exp[k])})" for k in mismatched]))
    raise ValueError(f"{source} do not match {target}; " + "; ".join(parts))


def _sample_index(numel: int, samples: int = CHECKSUM_SAMPLES) -> np.ndarray:
    if numel <= samples:
        return np.arange(numel, dtype=np.int64)
    return np.linspace(0, numel - 1, samples).round().astype(np.int64)


def _checksum_update(h: "hashlib._Hash", name: str, shape: Sequence[int], dtype: str, sample_bytes: bytes) -> None:
    h.update(f"{name}|{list(shape)}|{dtype}|".encode())
    h.update(sample_bytes)


def state_dict_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """Sampled sha256 over names, shapes, dtypes and up to ``CHECKSUM_SAMPLES`` evenly spaced elements per tensor.

    Computed from the raw bytes, so the file-side :func:`file_checksum` reproduces it exactly. Expects CPU tensors.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        itemsize = t.element_size()
        # Raw bytes through numpy: no dtype conversion (bf16 has no numpy dtype) and cheap fancy indexing.
        rows = t.reshape(-1).view(torch.uint8).numpy().reshape(-1, itemsize)
        _checksum_update(h, name, t.shape, _ST_DTYPES.get(t.dtype, str(t.dtype)),
                         np.ascontiguousarray(rows[_sample_index(t.numel())]).tobytes())
    return h.hexdigest()


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


# ---------------------------------------------------------------------------------------------- interface
class WeightTransport(abc.ABC):
    """Learner → generator weight transport (see the module docstring for the protocol)."""

    kind: str = ""
    # True: publish and apply must run at the same time (they meet in each broadcast); see WeightSync.
    streams: bool = False

    @abc.abstractmethod
    def publish(self, state_dict: Dict[str, torch.Tensor], *, step: int) -> WeightHandle:
        """On the learner's rank 0: make ``state_dict`` (full, HF names) loadable by the engines as version ``step``."""

    @abc.abstractmethod
    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> Optional[Dict[str, Any]]:
        """Inside a generator: load the version ``handle`` names into ``engine_llm`` (a ``vllm.LLM``); may return a
        small report (bytes, checksum, timings) that the generator adds to its own.

        ``expected_params`` (name -> shape, usually :func:`checkpoint_params` of the engine's model) is checked
        first; a mismatch raises ``ValueError`` and leaves the engine on its current weights.
        """

    def cleanup(self, keep_last: int = 1) -> None:
        """Drop published versions except the newest ``keep_last`` (0: all)."""

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the last publish has been fully delivered (no-op unless the backend sends asynchronously)."""

    def engine_kwargs(self, device: str) -> Dict[str, Any]:
        """Extra ``vllm.LLM(...)`` arguments an engine needs for this transport (e.g. a weight-transfer config)."""
        return {}


def _check_kind(handle: WeightHandle, kind: str) -> None:
    if not isinstance(handle, WeightHandle):
        raise TypeError(f"expected a WeightHandle, got {type(handle).__name__}")
    if handle.kind != kind:
        raise ValueError(f"handle for step {handle.step} was published by transport {handle.kind!r}; "
                         f"this transport is {kind!r}")


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
        engine_llm.collective_rpc("reload_weights", kwargs={"weights_path": str(d)})
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

    def published_steps(self) -> List[int]:
        if not self.run_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.run_dir.iterdir() if (m := self._STEP_RE.match(p.name)))


# ---------------------------------------------------------------------------------------------- collective
class CollectiveTransport(WeightTransport):
    """Stream the weights from the learner's rank 0 into every engine worker over a process group of their own
    (``cluster.collective``): gloo on cpu, nccl on cuda, hccl on npu, from the device table. No file, and no
    host ever holds the full model for the transfer: under ZeRO-3 the learner gathers one bucket at a time, and
    the engines load each layer as soon as its tensors have arrived.

    Roles (the object is pickled to every actor; connections stay with the process that opened them):

    * driver — :meth:`serve` starts the store and names a group; :meth:`pending_handle` is what the engines get;
      :meth:`reset` makes the next sync re-form the group (after a failure, or when engines changed);
      :class:`WeightSync` runs both ends of a sync concurrently (they rendezvous in every broadcast).
    * learner rank 0 — :meth:`open_sender` (``LearnerWorker.publish_weights`` keeps it between syncs), or
      :meth:`publish` for a state dict already in this process.
    * engine — :meth:`apply` asks every vLLM worker of the engine (``worker_extension_cls``, see
      :meth:`engine_kwargs`) to join the group if needed, receive the stream, check it against the engine's
      parameters and load it in place with vLLM's layerwise reload.

    ``bucket_mb``: MB per broadcast (bigger: fewer round trips; smaller: less memory on both ends, and on host
    memory faster, see ``cluster.collective.DEFAULT_BUCKET_MB``); None or 0: that per-backend default.
    ``timeout_s``: how long any member waits for the others (to join, or inside a broadcast).

    Limitation: weights reach all engines together or none. An engine that ``GeneratorPool`` restarts mid-run
    cannot load the current version by itself (its ``sync_weights`` fails with ``GroupFullError``, naming the
    cause); :class:`WeightSync` re-forms the group at the next sync when it sees ``restarts`` change.
    """

    kind = "collective"
    streams = True

    def __init__(self, *, device: str, bucket_mb: Optional[float] = None, timeout_s: float = 600.0,
                 run_name: str = "default", root: Optional[str] = None):
        # `root` is accepted (and unused) so a caller can pass one set of sync.* options to either transport.
        from cluster.collective import DEFAULT_BUCKET_MB, backend_of

        self.device = device
        self.backend = backend_of(device)  # ValueError naming the known devices
        bucket_mb = bucket_mb or DEFAULT_BUCKET_MB.get(self.backend, 256.0)
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0 (or 0 for the backend's default), got {bucket_mb}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.bucket_bytes = max(1, int(float(bucket_mb) * 2**20))
        self.timeout_s = float(timeout_s)
        self.run_name = run_name
        self.rendezvous: Optional[Dict[str, Any]] = None  # set by serve(); travels with the pickled object
        self._server: Any = None
        self._sender: Any = None

    def __getstate__(self) -> Dict[str, Any]:
        # Handed to actors by pickling: the store server and any open group stay with the process that owns them.
        state = dict(self.__dict__)
        state.update(_server=None, _sender=None)
        return state

    def engine_kwargs(self, device: str) -> Dict[str, Any]:
        from cluster.collective import EXTENSION

        return {"worker_extension_cls": EXTENSION}

    # ------------------------------------------------------------------------------------------- driver
    def serve(self, *, receivers: int, host: str = "127.0.0.1") -> Dict[str, Any]:
        """Name a group for 1 sender + ``receivers`` engine workers (reusing the current one when it has that
        size); start the store on ``host`` (an address every member can reach) the first time."""
        from cluster.collective import Rendezvous, StoreServer, backend_problem, new_group_id

        if receivers < 1:
            raise ValueError(f"collective transport: at least one engine worker must receive, got {receivers}")
        if self.rendezvous is not None and self.rendezvous["world_size"] == 1 + receivers and self._server is not None:
            return self.rendezvous
        problem = backend_problem(self.device)
        if problem:
            raise RuntimeError(f"collective transport on {self.device!r}: {problem}")
        if self._server is None or self._server.host != host:
            self._server = StoreServer(host, timeout_s=self.timeout_s)
        self.rendezvous = Rendezvous(host=host, port=self._server.port, group=new_group_id(self.run_name),
                                     world_size=1 + int(receivers), backend=self.backend,
                                     timeout_s=self.timeout_s).as_dict()
        return self.rendezvous

    def reset(self) -> None:
        """Forget the current group: the next :meth:`serve` names a new one, which every member joins afresh."""
        self.rendezvous = None

    def close(self) -> None:
        """Stop serving the store and close a sender opened in this process."""
        self.rendezvous = None
        sender, server, self._sender, self._server = self._sender, self._server, None, None
        for obj in (sender, server):
            if obj is not None:
                obj.close()

    def pending_handle(self, step: int) -> WeightHandle:
        """The handle engines apply while the learner streams version ``step`` (names, shapes and dtypes travel in
        the stream's header)."""
        rdzv = self._require_rendezvous()
        return WeightHandle(step=int(step), kind=self.kind, location=f"{rdzv['host']}:{rdzv['port']}/{rdzv['group']}",
                            tensors={}, checksum="", host=socket.gethostname(), created_unix=time.time(),
                            rendezvous=dict(rdzv))

    def _require_rendezvous(self) -> Dict[str, Any]:
        if self.rendezvous is None:
            raise RuntimeError("collective transport: no weight group named yet (the driver calls serve(), which "
                               "WeightSync does before each sync)")
        return self.rendezvous

    # ------------------------------------------------------------------------------------------ learner
    def open_sender(self, device: Any, previous: Any = None) -> Any:
        """The sending end for the current group: ``previous`` if it already is (the usual case), else a new one
        (closing ``previous``). Blocks until every engine worker has joined."""
        from cluster.collective import Rendezvous, WeightSender

        rdzv = self._require_rendezvous()
        if previous is not None and previous.group_id == rdzv["group"] and not previous.group.closed:
            return previous
        if previous is not None:
            previous.close()
        return WeightSender(Rendezvous.from_dict(rdzv), device=device)

    def handle_for(self, step: int, entries: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                   result: Mapping[str, Any]) -> WeightHandle:
        """The handle describing a finished stream (``result`` of ``WeightStream.finish``)."""
        rdzv = self._require_rendezvous()
        return WeightHandle(step=int(step), kind=self.kind, location=f"{rdzv['host']}:{rdzv['port']}/{rdzv['group']}",
                            tensors={n: (tuple(int(d) for d in s), _ST_DTYPES.get(dt, str(dt))) for n, s, dt in entries},
                            checksum=result["checksum"], host=socket.gethostname(), nbytes=int(result["bytes"]),
                            created_unix=time.time(), rendezvous=dict(rdzv))

    def publish(self, state_dict: Dict[str, torch.Tensor], *, step: int) -> WeightHandle:
        """Stream a state dict held by this process (a learner without ZeRO-3 partitioning, a benchmark)."""
        if not state_dict:
            raise ValueError("publish: the state dict is empty")
        first = next(iter(state_dict.values()))
        device = first.device if first.device.type != "meta" else torch.device("cpu")
        self._sender = self.open_sender(device, self._sender)
        try:
            result = self._sender.send_state_dict(state_dict, step=step, bucket_bytes=self.bucket_bytes)
        except BaseException:
            self._sender.close()
            self._sender = None
            raise
        return self.handle_for(step, [(k, v.shape, v.dtype) for k, v in state_dict.items()], result)

    # ------------------------------------------------------------------------------------------- engine
    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> Dict[str, Any]:
        """Receive the version being streamed for ``handle`` into every worker of ``engine_llm``. Returns
        ``{"checksum", "bytes", "receive_seconds", "workers"}``; raises ``ValueError`` for weights that do not fit
        the model (the engine keeps its weights), ``PartialWeightsError`` when the stream broke during loading."""
        from cluster.collective import PartialWeightsError

        _check_kind(handle, self.kind)
        if not handle.rendezvous:
            raise ValueError(f"handle for step {handle.step} names no weight group (build it with pending_handle)")
        expected = None if expected_params is None else {k: list(v) for k, v in expected_params.items()}
        reports = engine_llm.collective_rpc("passk_receive_weights", kwargs={
            "rendezvous": dict(handle.rendezvous), "expected": expected, "optional": sorted(optional_params)})
        bad = [r for r in reports if not r["ok"]]
        if bad:
            errors = "; ".join(sorted({str(r["error"]) for r in bad}))
            if any(r["weights"] == "partial" for r in reports):
                raise PartialWeightsError(f"{errors} — this engine now holds a mix of two weight versions; it must "
                                          f"receive a complete sync before it is used again")
            if all(r.get("reason") == "mismatch" for r in bad):
                raise ValueError(errors)  # nothing loaded: the engine keeps the weights it had
            raise RuntimeError(errors)
        checksums = {r["checksum"] for r in reports}
        if len(checksums) != 1:
            raise RuntimeError(f"step {handle.step}: the workers of one engine received different bytes {checksums}")
        engine_llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return {"checksum": checksums.pop(), "bytes": max(r["bytes"] for r in reports),
                "receive_seconds": max(r.get("seconds", 0.0) for r in reports),
                "transfer_seconds": max(r.get("transfer_seconds", 0.0) for r in reports),
                "connect_seconds": max(r.get("connect_seconds", 0.0) for r in reports), "workers": len(reports)}

    def close_engine(self, engine_llm: Any) -> None:
        """Drop the engine workers' ends of the group (they rejoin at the next sync)."""
        engine_llm.collective_rpc("passk_close_weight_group")


class WeightSync:
    """Driver side of a sync, learner group → generator pool, for any transport; what the trainer calls.

    File transports publish, then the engines load. A streaming transport has both ends run at once (they meet
    in every broadcast): the learner's ``publish_weights`` in a helper thread, the pool's ``sync_weights`` here.
    If either side fails, the other fails fast (a closed group), the group is re-formed at the next sync, and the
    learner's error — the cause, usually — is raised, with the engines' as context.

    ``learner``: has ``publish_weights(transport, step=)`` (``LearnerGroup``); ``generators``: has
    ``sync_weights(handle)`` and ``num_engines`` (``GeneratorPool``); ``workers_per_engine``: vLLM workers per
    engine (its tensor-parallel size); ``host``: the driver's address as the engines and learner see it.
    """

    def __init__(self, learner: Any, generators: Any, transport: WeightTransport, *, workers_per_engine: int = 1,
                 host: Optional[str] = None):
        if workers_per_engine < 1:
            raise ValueError(f"workers_per_engine must be ≥ 1, got {workers_per_engine}")
        self.learner, self.generators, self.transport = learner, generators, transport
        self.workers_per_engine = int(workers_per_engine)
        self.host = host or _reachable_address()
        self._restarts = getattr(generators, "restarts", 0)

    def sync(self, step: int) -> Dict[str, Any]:
        """Deliver the learner's current weights to every engine as version ``step``; returns ``{"step",
        "seconds", "publish_seconds", "bytes", "transport", "engines": [per-engine reports]}``.

        Streaming: an engine that died during the broadcast is replaced (``generators.replace_dead()``) and the
        whole sync is done once more, with a re-formed group; a second failure propagates."""
        if not getattr(self.transport, "streams", False):
            return self._sync_once(step)
        try:
            return self._sync_once(step)
        except BaseException as first:  # noqa: BLE001 - retried only when an engine is gone; else re-raised
            replace = getattr(self.generators, "replace_dead", None)
            if replace is None or not replace():
                raise
            print(f"[passk_rl.weight_sync] an engine died during the sync of step {step} "
                  f"({type(first).__name__}); replaced it and re-sending the weights to every engine", flush=True)
            return self._sync_once(step)

    def _sync_once(self, step: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        if not getattr(self.transport, "streams", False):
            handle = self.learner.publish_weights(self.transport, step=step)
            t1 = time.perf_counter()
            report = self.generators.sync_weights(handle)
            return {**report, "seconds": time.perf_counter() - t0, "publish_seconds": t1 - t0,
                    "bytes": handle.nbytes, "transport": self.transport.kind}

        tr = self.transport
        restarts = getattr(self.generators, "restarts", 0)
        if restarts != self._restarts:  # a replaced engine is not in the old group
            tr.reset()
            self._restarts = restarts
        tr.serve(receivers=self.generators.num_engines * self.workers_per_engine, host=self.host)
        handle = tr.pending_handle(step)
        box: Dict[str, Any] = {}

        def publish() -> None:
            t = time.perf_counter()
            try:
                box["handle"] = self.learner.publish_weights(tr, step=step)
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
                box["error"] = e
            box["seconds"] = time.perf_counter() - t

        sender = threading.Thread(target=publish, name=f"publish-weights-step{step}", daemon=True)
        sender.start()
        engine_error: Optional[BaseException] = None
        report: Dict[str, Any] = {}
        try:
            report = self.generators.sync_weights(handle)
        except BaseException as e:  # noqa: BLE001 - decided below, once the learner side has ended too
            engine_error = e
        # A safety net, not an expected wait: each of the learner's broadcasts gives up after timeout_s, and once
        # the engines have returned (done, or their ends closed) what is left on the learner is local work.
        sender.join(tr.timeout_s * 2 + 60)
        if sender.is_alive():
            tr.reset()
            raise TimeoutError(f"step {step}: the learner did not finish streaming its weights within "
                               f"{2 * tr.timeout_s + 60:g}s") from engine_error
        if "error" in box or engine_error is not None:
            tr.reset()
            if "error" in box:
                raise box["error"] from engine_error
            raise engine_error  # type: ignore[misc]
        published: WeightHandle = box["handle"]
        wrong = [i for i, r in enumerate(report["engines"]) if r.get("checksum") != published.checksum]
        if wrong:
            tr.reset()
            raise RuntimeError(f"step {step}: engines {wrong} received bytes that differ from what the learner sent "
                               f"(sampled checksum); their weights are not the learner's")
        return {**report, "seconds": time.perf_counter() - t0, "publish_seconds": box["seconds"],
                "bytes": published.nbytes, "transport": tr.kind}

    def close(self) -> None:
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()


def _reachable_address() -> str:
    """This node's address as other Ray nodes see it (loopback outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


# --------------------------------------------------------------------------------------------- registry
TRANSPORTS: Dict[str, Callable[..., WeightTransport]] = {
    ShmSafetensorsTransport.kind: ShmSafetensorsTransport,
    CollectiveTransport.kind: CollectiveTransport,
}


def make_transport(kind: str, **params: Any) -> WeightTransport:
    """Build a transport by name (``sync.transport`` in the config); unknown names/params raise ``ValueError``."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {kind!r}; known: {sorted(TRANSPORTS)}")
    import inspect

    cls = TRANSPORTS[kind]
    signature = inspect.signature(cls).parameters
    bad = sorted(set(params) - set(signature))
    if bad:
        raise ValueError(f"weight transport {kind!r} does not take {bad}; it takes {sorted(signature)}")
    missing = sorted(k for k, p in signature.items() if p.default is inspect.Parameter.empty and k not in params)
    if missing:
        raise ValueError(f"weight transport {kind!r} needs {missing} (e.g. device=cluster.device: its backend "
                         f"comes from the device table)" if "device" in missing else
                         f"weight transport {kind!r} needs {missing}")
    return cls(**params)
