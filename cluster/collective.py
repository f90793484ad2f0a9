"""Weight streaming from the learner's rank 0 into every vLLM engine worker over a process group of its own.

:class:`CollectiveTransport` (``sync.transport: collective``, the default) and the mechanics behind it: the group, the wire format, the sending end
(learner rank 0), the receiving end (each vLLM worker, through :class:`WeightReceiverExtension`) and the checks
that a config can work at all (:func:`backend_problem`). Plain classes; nothing here imports Ray, and vLLM only
inside the extension's methods, which run in vLLM's worker processes.

What vLLM 0.32 offers for loading weights in place (checked on its CPU build, /work/main/.venv):

* ``model.load_weights(iterable)`` on the live model does not work on CPU. ``UnquantizedLinearMethod.
  process_weights_after_loading`` (model_executor/layers/linear.py) calls ``dispatch_cpu_unquantized_gemm(layer,
  remove_weight=True)`` (model_executor/layers/utils.py), which captures the weight in a oneDNN / sgl packed
  handle and replaces ``layer.weight`` by an empty parameter: loading a linear weight then fails ("Attempted to
  load weight (torch.Size([128, 512])) into parameter (torch.Size([0]))"). ``lm_head`` (vocab_parallel_embedding.py,
  ``remove_weight=False``) keeps its weight, so loading it succeeds silently, but the engine keeps computing with
  the packed copy: its logprobs do not move at all.
* ``GPUModelRunner.reload_weights(weights_iterator=..., is_checkpoint_format=True)`` (v1/worker/gpu_model_runner.py;
  ``CPUModelRunner`` inherits it, and ``Worker.reload_weights`` wraps it in the vLLM config context) works on CPU.
  It runs ``model_executor/model_loader/reload/``: ``initialize_layerwise_reload`` puts every layer back on the
  meta device with its checkpoint-format shapes and wraps the weight loaders; ``model.load_weights(iterator)``
  buffers each layer's tensors until the layer is complete, then materialises it, loads it, re-runs the layer's
  ``process_weights_after_loading`` (the CPU repacking) and copies the result into the original kernel tensors;
  ``finalize_layerwise_reload`` does the layers that never completed. ``weights_path=`` (what the file transport
  uses) is the same code fed from ``get_all_weights`` of a directory. Measured on the tiny Llama: a lazy generator
  of tensors, as the receiver below yields them, reproduces the HF model's logprobs to < 2e-6.
* The iterator must be complete: when ``load_weights`` raises half way, nothing calls ``finalize``, layers stay on
  the meta device and the engine dies at its next forward (``_C::onednn_mm ... Meta tensors`` → EngineDeadError).
  The receiver therefore never raises out of the iterator: a transport failure ends the iteration, vLLM finalises,
  and the failure is reported after (the engine then holds a mix of old and new weights, and says so).
* ``vllm.distributed.weight_transfer`` (nccl_engine.py: the same layerwise lifecycle around a PyNccl broadcast)
  ships NCCL, IPC and RDMA-style backends only, no gloo or hccl, and the synchronous ``vllm.LLM`` has no
  ``init_weight_transfer_engine`` / ``update_weights`` wrappers (only ``AsyncLLM``); the worker methods exist but
  need a registered engine. ``collective_rpc`` with a callable needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, and
  tensors passed as RPC arguments arrive as nested lists. Hence a ``worker_extension_cls`` with named methods, and
  a data plane of our own.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import torch

from cluster.weight_stream import (
    DEFAULT_BUCKET_MB,
    GroupFullError,
    Rendezvous,
    StoreServer,
    WeightReceiver,
    WeightSender,
    backend_of,
    backend_problem,
    plan_buckets,
)
from cluster.weights import (
    _ST_DTYPES,
    EngineWeightsExtension,
    Shape,
    PartialWeightsError,
    WeightHandle,
    WeightTransport,
    _check_kind,
)

EXTENSION = "cluster.collective.WeightReceiverExtension"  # vLLM ``worker_extension_cls``


# ---------------------------------------------------------------------------------------- vLLM extension
class WeightReceiverExtension(EngineWeightsExtension):
    """vLLM ``worker_extension_cls``: mixed into every vLLM worker, so ``llm.collective_rpc("passk_receive_weights",
    ...)`` runs :meth:`passk_receive_weights` inside each worker process (names are prefixed: vLLM refuses an
    extension attribute that its worker class already has). The worker keeps its end of the group between
    syncs."""

    def passk_receive_weights(self, rendezvous: Mapping[str, Any], expected: Optional[Mapping[str, Any]] = None,
                              optional: Sequence[str] = ()) -> Dict[str, Any]:
        rdzv = Rendezvous.from_dict(rendezvous)
        receiver: Optional[WeightReceiver] = getattr(self, "_passk_receiver", None)
        t0 = time.perf_counter()
        if receiver is None or receiver.group_id != rdzv.group:
            if receiver is not None:
                receiver.close()
            self._passk_receiver = None
            try:
                receiver = WeightReceiver(rdzv, device=self.model_runner.device)
            except Exception as e:  # noqa: BLE001 - errors travel as data (see WeightReceiver.receive)
                return {"ok": False, "weights": "unchanged", "error": f"{type(e).__name__}: {e}", "step": None,
                        "reason": "group_full" if isinstance(e, GroupFullError) else "connect", "checksum": "",
                        "bytes": 0, "rank": None}
            self._passk_receiver = receiver
        connect = time.perf_counter() - t0

        def load(it: Iterator[Tuple[str, torch.Tensor]]) -> None:
            # The checkpoint-format layerwise reload: re-runs each layer's post-load processing (the CPU repack).
            try:
                self.reload_weights(weights_iterator=it, is_checkpoint_format=True)
                self.passk_refresh_tied_head()
            except BaseException:
                self._passk_finalize_failed_reload()
                raise

        report = receiver.receive(load, expected=expected, optional=optional)
        if report["error"] is not None and receiver.group.closed:
            self._passk_receiver = None  # closed: the next sync joins a fresh group
        report["connect_seconds"] = connect
        return report

    def _passk_finalize_failed_reload(self) -> None:
        """``reload_weights`` does not finalise when loading raises, and layers left on the meta device kill the
        engine at its next forward: finalise here, so it stays usable (with mixed weights, as reported)."""
        try:
            from vllm.config import set_current_vllm_config
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        except Exception:  # noqa: BLE001 - the loading error is the one to report
            pass

    def passk_close_weight_group(self) -> bool:
        receiver = getattr(self, "_passk_receiver", None)
        if receiver is not None:
            receiver.close()
        self._passk_receiver = None
        return True


class CollectiveTransport(WeightTransport):
    """Stream the weights from the learner's rank 0 into every engine worker over a process group of their own
    (this module): gloo on cpu, nccl on cuda, hccl on npu, from the device table. No file, and no
    host ever holds the full model for the transfer: under ZeRO-3 the learner gathers one bucket at a time, and
    the engines load each layer as soon as its tensors have arrived.

    Roles (the object is pickled to every actor; connections stay with the process that opened them):

    * driver — :meth:`serve` starts the store and names a group; :meth:`pending_handle` is what the engines get;
      :meth:`reset` makes the next sync re-form the group (after a failure, or when engines changed);
      :meth:`deliver` runs both ends of a sync concurrently (they rendezvous in every broadcast).
    * learner — :meth:`publish_from` on every rank (rank 0 keeps its sender between syncs in the source's
      ``weight_sender``), or :meth:`publish` for a state dict already in this process.
    * engine — :meth:`apply` asks every vLLM worker of the engine (``worker_extension_cls``, see
      :meth:`engine_kwargs`) to join the group if needed, receive the stream, check it against the engine's
      parameters and load it in place with vLLM's layerwise reload.

    ``bucket_mb``: MB per broadcast (bigger: fewer round trips; smaller: less memory on both ends, and on host
    memory faster, see :data:`DEFAULT_BUCKET_MB`); None or 0: that per-backend default.
    ``timeout_s``: how long any member waits for the others (to join, or inside a broadcast).

    Limitation: weights reach all engines together or none. An engine that ``GeneratorPool`` restarts mid-run
    cannot load the current version by itself (its ``sync_weights`` fails with ``GroupFullError``, naming the
    cause): :meth:`restore_engine` re-forms the group and sends the current version to every engine again.
    """

    kind = "collective"

    def __init__(self, *, device: str, bucket_mb: Optional[float] = None, timeout_s: float = 600.0,
                 run_name: str = "default", root: Optional[str] = None):
        # `root` is accepted (and unused) so a caller can pass one set of sync.* options to either transport.
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
        self._restarts = 0  # the pool's restart count at the last sync: a replaced engine is not in the group
        self._step: Optional[int] = None  # the version every engine holds

    @classmethod
    def from_config(cls, cfg: Any) -> "CollectiveTransport":
        return cls(device=cfg.cluster.device, bucket_mb=cfg.sync.bucket_mb, timeout_s=cfg.sync.timeout_s,
                   run_name=cfg.run.name)

    def __getstate__(self) -> Dict[str, Any]:
        # Handed to actors by pickling: the store server and any open group stay with the process that owns them.
        state = dict(self.__dict__)
        state.update(_server=None, _sender=None)
        return state

    def engine_kwargs(self, device: str) -> Dict[str, Any]:
        return {"worker_extension_cls": EXTENSION}

    # ------------------------------------------------------------------------------------------- driver
    def serve(self, *, receivers: int, host: str = "127.0.0.1") -> Dict[str, Any]:
        """Name a group for 1 sender + ``receivers`` engine workers (reusing the current one when it has that
        size); start the store on ``host`` (an address every member can reach) the first time."""
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

    def publish_from(self, source: Any, *, step: int) -> Optional[WeightHandle]:
        """The parameters in their training dtype, one bucket of the plan at a time: under ZeRO-3 every rank
        gathers the bucket's parameters (``source.gathered`` is collective) while rank 0 broadcasts them, so no
        rank ever holds more than one bucket of gathered weights. A failure on rank 0 is raised only after the
        last bucket, so the other ranks' gathers stay in step."""
        named = source.published_tensors()
        entries = [(n, tuple(int(d) for d in getattr(t, "ds_shape", t.shape)), t.dtype) for n, t in named]
        plan = plan_buckets(entries, self.bucket_bytes)
        stream, error = None, None
        if source.rank == 0:
            try:
                source.weight_sender = self.open_sender(source.device, source.weight_sender)
                stream = source.weight_sender.stream(step, entries, bucket_bytes=self.bucket_bytes)
            except BaseException as e:  # noqa: BLE001 - raised after the gathers below
                source.weight_sender, error = None, e
        try:
            for bucket in plan:
                tensors = [named[i][1] for i, _, _ in bucket.items]
                with source.gathered([t for t in tensors if isinstance(t, torch.nn.Parameter)]):
                    if stream is not None:
                        stream.send(bucket, [t.detach() for t in tensors])
            if source.rank != 0:
                return None
            if error is not None:
                raise error
            result = stream.finish()
        except BaseException:
            if source.rank == 0 and source.weight_sender is not None:
                # closing it makes the engines fail now instead of waiting out the group's timeout
                source.weight_sender.close()
                source.weight_sender = None
            raise
        return self.handle_for(step, entries, result)

    # ------------------------------------------------------------------------------------------- engine
    def apply(self, engine_llm: Any, handle: WeightHandle, *,
              expected_params: Optional[Mapping[str, Shape]] = None,
              optional_params: Iterable[str] = ()) -> Dict[str, Any]:
        """Receive the version being streamed for ``handle`` into every worker of ``engine_llm``. Returns
        ``{"checksum", "bytes", "receive_seconds", "workers"}``; raises ``ValueError`` for weights that do not fit
        the model (the engine keeps its weights), ``PartialWeightsError`` when the stream broke during loading."""
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


    # ------------------------------------------------------------------------------------------- driver
    def deliver(self, sync: Any, step: int) -> Dict[str, Any]:
        """Both ends at once: the learner's ``publish_weights`` in a helper thread, the pool's ``sync_weights``
        here. If either side fails, the other fails fast (a closed group), the group is re-formed at the next
        sync, and the learner's error — the cause, usually — is raised, with the engines' as context. An engine
        that died during the broadcast is replaced (``generators.replace_dead()``) and the whole sync is done
        once more, with a re-formed group; a second failure propagates."""
        try:
            return self._deliver_once(sync, step)
        except BaseException as first:  # noqa: BLE001 - retried only when an engine is gone; else re-raised
            if not sync.generators.replace_dead():
                raise
            sync.log(f"an engine died during the sync of step {step} ({type(first).__name__}); replaced it and "
                     f"re-sending the weights to every engine")
            return self._deliver_once(sync, step)

    def restore_engine(self, sync: Any, engine: int) -> None:
        # A replaced engine cannot take a broadcast alone: the whole group is re-formed and every engine re-sent.
        if self._step is not None:
            self.deliver(sync, self._step)

    def _deliver_once(self, sync: Any, step: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        gens = sync.generators
        if gens.restarts != self._restarts:  # a replaced engine is not in the old group
            self.reset()
            self._restarts = gens.restarts
        self.serve(receivers=gens.num_engines * sync.workers_per_engine, host=sync.host)
        handle = self.pending_handle(step)
        box: Dict[str, Any] = {}

        def publish() -> None:
            t = time.perf_counter()
            try:
                box["handle"] = sync.learner.publish_weights(self, step=step)
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
                box["error"] = e
            box["seconds"] = time.perf_counter() - t

        sender = threading.Thread(target=publish, name=f"publish-weights-step{step}", daemon=True)
        sender.start()
        engine_error: Optional[BaseException] = None
        report: Dict[str, Any] = {}
        try:
            # a streamed version cannot be re-sent to one engine mid-broadcast: no restarts inside this call
            report = gens.sync_weights(handle, max_restarts=0)
        except BaseException as e:  # noqa: BLE001 - decided below, once the learner side has ended too
            engine_error = e
        # A safety net, not an expected wait: each of the learner's broadcasts gives up after timeout_s, and once
        # the engines have returned (done, or their ends closed) what is left on the learner is local work.
        sender.join(self.timeout_s * 2 + 60)
        if sender.is_alive():
            self.reset()
            raise TimeoutError(f"step {step}: the learner did not finish streaming its weights within "
                               f"{2 * self.timeout_s + 60:g}s") from engine_error
        if "error" in box or engine_error is not None:
            self.reset()
            if "error" in box:
                raise box["error"] from engine_error
            raise engine_error  # type: ignore[misc]
        published: WeightHandle = box["handle"]
        wrong = [i for i, r in enumerate(report["engines"]) if r.get("checksum") != published.checksum]
        if wrong:
            self.reset()
            raise RuntimeError(f"step {step}: engines {wrong} received bytes that differ from what the learner sent "
                               f"(sampled checksum); their weights are not the learner's")
        self._step = int(step)
        return {**report, "seconds": time.perf_counter() - t0, "publish_seconds": box["seconds"],
                "bytes": published.nbytes, "transport": self.kind}


def new_group_id(run_name: str) -> str:
    return f"{run_name}-{uuid.uuid4().hex[:12]}"
