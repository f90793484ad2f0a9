"""Learner → generator weight transport.

One interface, several backends:

``publish(state_dict, step=...) -> WeightHandle``
    runs on the learner's rank 0 with the full, HF-named state dict (what ``model.state_dict()`` of the HF model
    returns, gathered under ZeRO-3). It returns a small picklable :class:`WeightHandle` that the driver forwards
    to every generator actor.
``apply(engine_llm, handle, expected_params=...)``
    runs inside a generator actor with its ``vllm.LLM``. It validates the published names/shapes against what
    the engine's model expects (vLLM itself fails with a bare ``AssertionError`` deep in a weight loader), loads
    the weights, and drops the engine's prefix cache (cached KV blocks were computed with the old weights; reusing
    them would silently mix policies).
``wait()``
    blocks until a publish has been fully delivered (no-op for file-based backends; the collective backend sends
    from a background thread so that the learner's publish and the engines' apply can rendezvous).
``cleanup(keep_last)``
    drops old published versions.

Backends (``make_transport(kind, **params)``):

* ``"shm_safetensors"`` — :class:`ShmSafetensorsTransport`: rank 0 writes one ``model.safetensors`` under
  ``root/run_name/step_<n>/`` (atomically: a hidden temp dir, then ``rename``), every engine calls vLLM's
  ``collective_rpc("reload_weights", kwargs={"weights_path": dir})``. ``/dev/shm`` is node-local, so this backend
  needs rank 0 and all engines on one node (or ``root`` on a shared filesystem). This is the CPU default.
* ``"collective"`` — :class:`CollectiveTransport`: NCCL (cuda) / HCCL (npu) broadcast from learner rank 0 straight
  into the engine workers, built on vLLM's weight-transfer API. Designed here, not runnable without accelerators.

The module imports neither vLLM nor Ray; engines are only touched through the ``engine_llm`` object passed in.
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

    ``tensors`` maps each HF parameter name to ``(shape, safetensors dtype string)`` in publish order (the
    collective backend broadcasts in exactly this order). ``location`` is backend-specific: a directory for
    ``shm_safetensors``, ``host:port`` of the rendezvous for ``collective``; ``host`` is where it lives.
    """

    step: int
    kind: str
    location: str
    tensors: Dict[str, Tuple[Shape, str]]
    checksum: str
    host: str = ""
    nbytes: int = 0
    created_unix: float = 0.0

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

    @abc.abstractmethod
    def publish(self, state_dict: Dict[str, torch.Tensor], *, step: int) -> WeightHandle:
        """On the learner's rank 0: make ``state_dict`` (full, HF names) loadable by the engines as version ``step``."""

    @abc.abstractmethod
    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> None:
        """Inside a generator: load the version ``handle`` names into ``engine_llm`` (a ``vllm.LLM``).

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
    """Broadcast from the learner's rank 0 into every engine worker over NCCL (cuda) or HCCL (npu).

    Design (vLLM ≥ 0.3x weight-transfer API; ``vllm.distributed.weight_transfer``):

    * Group: one stateless process group of ``1 + Σ_engines tensor_parallel_size`` ranks, rank 0 = learner rank 0,
      engine ``e`` worker ``w`` = ``1 + Σ_{e'<e} tp_{e'} + w``. Not torch's default group, so it coexists with
      the learner's ZeRO group and the engines' TP groups.
    * Engines are built with ``weight_transfer_config={"backend": engine_backend}`` (see :meth:`engine_kwargs`);
      ``connect_engine`` calls ``llm.init_weight_transfer_engine({"init_info": {master_address, master_port,
      rank_offset, world_size, packed: False}})`` while the learner calls ``connect_learner`` (the rendezvous is
      collective: the driver must launch both sides concurrently, once per run).
    * ``publish`` builds the handle (names, shapes, dtypes in send order) and starts a background thread that
      broadcasts each tensor from rank 0 in that order, then returns; ``apply`` on each engine runs
      ``start_weight_update`` → ``update_weights({"update_info": {names, dtype_names, shapes}})`` →
      ``finish_weight_update`` (vLLM receives into fresh buffers and loads them with the layerwise-reload
      lifecycle, which also re-runs the backend's weight post-processing) and then ``reset_prefix_cache``.
      ``wait`` joins the sender; the learner must call it before its next optimizer step mutates the tensors.
    * A validation failure in ``apply`` happens before the engine joins the broadcast, so the sender times out
      (``timeout_s``) instead of delivering half a model; the group must then be rebuilt.

    What runs here: the handle, rank arithmetic, validation and the engine-side call sequence. What needs an
    accelerator (raises ``NotImplementedError`` on this CPU-only build): opening the communicator and the
    broadcast itself. HCCL additionally needs vllm-ascend to register a weight-transfer engine under
    ``engine_backend`` (``"hccl"`` assumed).
    """

    kind = "collective"
    _BACKENDS = {"cuda": "nccl", "npu": "hccl"}

    def __init__(self, *, device: str = "cuda", master_address: Optional[str] = None, master_port: int = 0,
                 world_size: int = 0, engine_backend: Optional[str] = None, timeout_s: float = 600.0,
                 run_name: str = "default", root: Optional[str] = None):
        # `root` is accepted (and unused) so make_transport can be called with one set of sync.* params.
        if device not in self._BACKENDS:
            raise ValueError(f"the collective transport needs an accelerator device {sorted(self._BACKENDS)}, got "
                             f"{device!r}; use 'shm_safetensors' on cpu")
        self.device = device
        self.engine_backend = engine_backend or self._BACKENDS[device]
        self.master_address = master_address
        self.master_port = int(master_port)
        self.world_size = int(world_size)
        self.timeout_s = float(timeout_s)
        self.run_name = run_name
        self._sender: Optional[threading.Thread] = None
        self._sender_error: Optional[BaseException] = None
        self._group: Any = None

    def __getstate__(self) -> Dict[str, Any]:
        # Handed to actors by pickling: the communicator and sender thread stay with the process that owns them.
        state = dict(self.__dict__)
        state.update(_sender=None, _sender_error=None, _group=None)
        return state

    @staticmethod
    def rank_offsets(tp_sizes: Sequence[int]) -> Tuple[List[int], int]:
        """(rank offset of each engine's first worker, group world size); the learner's sender is rank 0."""
        if any(int(t) < 1 for t in tp_sizes):
            raise ValueError(f"tensor parallel sizes must be ≥ 1, got {list(tp_sizes)}")
        offsets, nxt = [], 1
        for t in tp_sizes:
            offsets.append(nxt)
            nxt += int(t)
        return offsets, nxt

    def engine_kwargs(self, device: str) -> Dict[str, Any]:
        return {"weight_transfer_config": {"backend": self.engine_backend}}

    def init_info(self, rank_offset: int) -> Dict[str, Any]:
        if not self.master_address or not self.master_port or self.world_size < 2:
            raise ValueError("collective transport: set master_address, master_port and world_size "
                             "(1 + total engine workers; see rank_offsets) before connecting")
        return {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": int(rank_offset),
                "world_size": self.world_size, "packed": False}

    def connect_engine(self, engine_llm: Any, *, rank_offset: int) -> None:
        """Inside a generator actor, concurrently with :meth:`connect_learner`."""
        engine_llm.init_weight_transfer_engine({"init_info": self.init_info(rank_offset)})

    def connect_learner(self) -> None:
        """On the learner's rank 0: open rank 0 of the transfer group."""
        self.init_info(1)  # validates the rendezvous fields
        raise NotImplementedError(
            f"collective transport ({self.engine_backend}): opening the learner's end of the group needs "
            f"{self.device} devices. Wire: vllm.distributed.weight_transfer.nccl_common.stateless_init_process_group("
            f"master_address, master_port, rank=0, world_size, device) for nccl; the vllm-ascend equivalent for hccl")

    def publish(self, state_dict: Dict[str, torch.Tensor], *, step: int) -> WeightHandle:
        tensors = {k: v.detach() for k, v in state_dict.items()}
        if not tensors:
            raise ValueError("publish: the state dict is empty")
        handle = WeightHandle(
            step=int(step), kind=self.kind, location=f"{self.master_address}:{self.master_port}",
            tensors={k: (tuple(v.shape), _ST_DTYPES.get(v.dtype, str(v.dtype))) for k, v in tensors.items()},
            checksum="", host=socket.gethostname(),
            nbytes=sum(v.numel() * v.element_size() for v in tensors.values()), created_unix=time.time())
        if self._group is None:
            raise NotImplementedError(
                "collective transport: no transfer group on this process (connect_learner must run first, and it "
                "needs an accelerator)")
        self.wait()
        self._sender_error = None
        self._sender = threading.Thread(target=self._send, args=(list(tensors.values()),), daemon=True,
                                        name=f"weight-broadcast-step{step}")
        self._sender.start()
        return handle

    def _send(self, tensors: List[torch.Tensor]) -> None:
        try:
            for t in tensors:
                self._group.broadcast(t.contiguous(), src=0)
        except BaseException as e:  # surfaced by wait()
            self._sender_error = e

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._sender is not None:
            self._sender.join(self.timeout_s if timeout is None else timeout)
            if self._sender.is_alive():
                raise TimeoutError("weight broadcast did not finish: an engine did not join (see its apply error)")
            self._sender = None
        if self._sender_error is not None:
            err, self._sender_error = self._sender_error, None
            raise RuntimeError(f"weight broadcast failed: {err}") from err

    def update_info(self, handle: WeightHandle) -> Dict[str, Any]:
        """The ``update_weights`` payload of vLLM's NCCL weight-transfer engine for ``handle`` (send order)."""
        names = list(handle.tensors)
        dtype_names = [_TORCH_NAME_OF_ST[handle.tensors[n][1]] for n in names]
        return {"names": names, "dtype_names": dtype_names, "shapes": [list(handle.tensors[n][0]) for n in names]}

    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> None:
        _check_kind(handle, self.kind)
        if expected_params is not None:
            validate_params(handle.shapes, expected_params, optional=optional_params,
                            source=f"weights published for step {handle.step}", target="the engine's model")
        info = self.update_info(handle)
        engine_llm.start_weight_update()
        engine_llm.update_weights({"update_info": info})
        engine_llm.finish_weight_update(weight_version=str(handle.step))
        engine_llm.reset_prefix_cache()


_TORCH_NAME_OF_ST = {v: str(k).split(".")[-1] for k, v in _ST_DTYPES.items()}

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
    allowed = set(inspect.signature(cls).parameters)
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(f"weight transport {kind!r} does not take {bad}; it takes {sorted(allowed)}")
    return cls(**params)
