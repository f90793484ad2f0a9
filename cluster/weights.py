"""What every weight transport shares: the handle, the interface, the parameter check and the sampled checksum.

Below both backends (``cluster/weight_sync.py``: files in shared memory; ``cluster/collective.py``: a stream over
a process group of its own), which never import each other; ``cluster/transports.py`` names them and drives a sync.
Imports neither vLLM nor Ray at import time.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from cluster.transports import WeightSync

Shape = Tuple[int, ...]
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


# vLLM ``worker_extension_cls`` every transport's engines load (the collective one extends it).
ENGINE_EXTENSION = "cluster.weights.EngineWeightsExtension"


class EngineWeightsExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): the weight-loading steps vLLM's own
    ``reload_weights`` leaves out. Names are prefixed: vLLM refuses an extension attribute its worker already has.

    Tied output layer: vLLM's CPU backend packs a *separate copy* of the lm_head weight for its GEMM at start-up
    (``UnquantizedEmbeddingMethod.process_weights_after_loading`` → ``dispatch_cpu_unquantized_gemm(...,
    remove_weight=False)``). With tied embeddings the checkpoint has no ``lm_head.weight``, so ``reload_weights``
    updates ``embed_tokens`` but never re-packs the head: the engine would go on sampling from the start-up output
    layer (measured: logprobs 0.26–0.86 off the learner's after one step, on Qwen2/Qwen3 with tied embeddings).
    Re-running the head's post-load processing after every reload re-packs it from the new embedding.
    """

    def passk_refresh_tied_head(self) -> bool:
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        method = getattr(head, "quant_method", None)
        if head is None or embed is None or method is None or getattr(head, "weight", None) is not embed.weight:
            return False
        method.process_weights_after_loading(head)
        return True

    def passk_reload_from_path(self, weights_path: str) -> bool:
        """``reload_weights`` from a checkpoint directory, then the tied head (see the class)."""
        self.reload_weights(weights_path=weights_path)
        return self.passk_refresh_tied_head()


class PartialWeightsError(RuntimeError):
    """Loading broke half way: the engine now holds a mix of two weight versions (neither the old nor the new)."""


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



# ------------------------------------------------------------------------------------------------ checks
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



# ---------------------------------------------------------------------------------------------- interface
class WeightTransport(abc.ABC):
    """Learner → generator weight transport. Callers never ask which backend they hold: each one implements the
    four roles of a sync below, and the driver only calls :meth:`deliver` (through ``WeightSync``).

    * learner, every rank at once — :meth:`publish_from` (``LearnerWorker.publish_weights``); rank 0 returns
      the :class:`WeightHandle`, the others None. :meth:`publish` does the same for a state dict already held
      by one process.
    * engine — :meth:`apply` loads a handle into a ``vllm.LLM``; :meth:`engine_kwargs` are what the engine needs
      at start.
    * driver — :meth:`deliver` runs one sync from the learner group to the generator pool, in whatever order
      the backend needs (publish then load, or both ends at once); :meth:`restore_engine` brings an engine that
      the pool replaced mid-run up to the current version.
    * :meth:`cleanup` drops published versions, :meth:`close` what the driver holds open.
    """

    kind: str = ""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Any) -> "WeightTransport":
        """The transport a run's config asks for (``cfg.sync``, ``cfg.run.name``, ``cfg.cluster.device``)."""

    @abc.abstractmethod
    def publish(self, state_dict: Dict[str, torch.Tensor], *, step: int) -> WeightHandle:
        """On one process holding ``state_dict`` (full, HF names): make it loadable by the engines as ``step``."""

    @abc.abstractmethod
    def publish_from(self, source: Any, *, step: int) -> Optional[WeightHandle]:
        """On every learner rank at once: publish the weights of ``source`` (a ``LearnerWorker``: ``rank``,
        ``device``, ``published_tensors()``, ``gathered(params)``, ``gather_state_dict()``) as version ``step``;
        rank 0 returns the handle, the others None."""

    @abc.abstractmethod
    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> Optional[Dict[str, Any]]:
        """Inside a generator: load the version ``handle`` names into ``engine_llm`` (a ``vllm.LLM``); may return a
        small report (bytes, checksum, timings) that the generator adds to its own.

        ``expected_params`` (name -> shape, usually ``checkpoint_params`` of the engine's model) is checked
        first; a mismatch raises ``ValueError`` and leaves the engine on its current weights.
        """

    @abc.abstractmethod
    def deliver(self, sync: "WeightSync", step: int) -> Dict[str, Any]:
        """On the driver: bring the learner's current weights (``sync.learner``) to every engine of
        ``sync.generators`` as version ``step``; ``{"step", "seconds", "publish_seconds", "bytes", "transport",
        "engines": [per-engine reports]}``."""

    def restore_engine(self, sync: "WeightSync", engine: int) -> None:
        """Engine ``engine`` was replaced by a fresh one: give it the weights every other engine holds."""
        sync.generators.load_current(engine)

    def cleanup(self, keep_last: int = 1) -> None:
        """Drop published versions except the newest ``keep_last`` (0: all)."""

    def close(self) -> None:
        """Release what the driver holds open for this transport (a store server, a sender)."""

    def engine_kwargs(self, device: str) -> Dict[str, Any]:
        """Extra ``vllm.LLM(...)`` arguments an engine needs for this transport (e.g. a worker extension)."""
        return {}


def _check_kind(handle: WeightHandle, kind: str) -> None:
    if not isinstance(handle, WeightHandle):
        raise TypeError(f"expected a WeightHandle, got {type(handle).__name__}")
    if handle.kind != kind:
        raise ValueError(f"handle for step {handle.step} was published by transport {handle.kind!r}; "
                         f"this transport is {kind!r}")



def _reachable_address() -> str:
    """This node's address as other Ray nodes see it (loopback outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
