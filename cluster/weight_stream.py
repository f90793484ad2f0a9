"""The weight stream's mechanics: a process group of its own, its wire format, the sending end (learner rank 0)
and the receiving end (each engine worker). Plain classes with no vLLM or Ray import, used by the collective
transport (``cluster/collective.py``) and by ``scripts/device_check.py``.

Group. ``1 + Σ engine workers`` ranks: rank 0 is the learner's rank 0 (the only sender), every vLLM worker of
every engine takes the next free rank from a counter in the store (receivers are interchangeable in a broadcast,
so no one has to know engine indices). The ``TCPStore`` is served by the driver (:class:`StoreServer`), each
member builds its backend directly on a ``PrefixStore`` for the group's id — never ``init_process_group``, so it
is independent of DeepSpeed's default group on the learner and of vLLM's own groups in the engines. The backend
comes from the device table (``cluster.devices``: gloo on cpu, nccl on cuda, hccl on npu) through one code path.
A new group id re-forms the group (every member drops its old end when it sees a new id).

Wire format of one sync, all broadcasts from rank 0:

1. ``int64[2]`` = (``MAGIC``, header length); 2. ``uint8[len]`` JSON header: step, bucket size, alignment and the
   entries ``[name, shape, dtype]`` in send order; 3. the data buckets of :func:`plan_buckets` (whole tensors packed
   at ``ALIGN``-byte offsets; a tensor larger than a bucket travels alone, straight from its own storage).

Tensors travel in the dtype they are trained in. Receivers check the header against the engine's expected
parameters before loading anything; on a mismatch they still take part in every broadcast (and discard the data)
so that the sender and the other engines are not left waiting. Both ends hash sampled bytes of every tensor in
send order (:func:`stream_checksum`), so the driver can compare what was sent with what each engine received.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from cluster.devices import device_spec
from cluster.weights import (
    _ST_DTYPES,
    _checksum_update,
    _sample_index,
    validate_params,
)

MAGIC = 0x7061_736B_776C  # "paskwl": a receiver that reads anything else is out of step with the sender
ALIGN = 64  # byte alignment of every tensor inside a bucket: any dtype can be viewed in place
PROTOCOL = 1
# Bucket size when the config leaves it open. Host memory (gloo): small buckets stay in cache while being packed,
# and reuse the allocator's memory, where a bucket over glibc's mmap threshold (≤ 32 MB) is page-faulted in anew
# each time; on a loaded 2-core CPU box 4 MB beat 16, 64 and 256 MB by 1.5-3x at 125 M parameters
# (benchmarks/bench_sync.py). Device memory (nccl, hccl): larger buckets amortise per-collective latency (vLLM's
# own packed NCCL transfer uses 1 GB); 256 MB keeps the engines' extra memory small. Not measured here.
DEFAULT_BUCKET_MB = {"gloo": 4.0, "nccl": 256.0, "hccl": 256.0}

Entry = Tuple[str, Tuple[int, ...], torch.dtype]


class GroupFullError(RuntimeError):
    """A receiver arrived after the weight group was complete (e.g. an engine restarted mid-run)."""


# ---------------------------------------------------------------------------------------------- backends
def backend_of(device: str) -> str:
    """The torch.distributed backend the device table names for ``device`` (gloo / nccl / hccl)."""
    return device_spec(device).dist_backend


def backend_problem(device: str) -> Optional[str]:
    """Why the collective transport cannot work for ``device`` in this installation (None: it can).

    Cheap and import-light, so a config can be rejected before any actor starts. It checks the build, not the
    hardware: a driver on a CPU-only head node may still launch a GPU run.
    """
    try:
        backend = backend_of(device)
    except ValueError as e:
        return str(e)
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if backend == "gloo" and not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    if backend == "nccl" and not dist.is_nccl_available():
        return f"device {device!r} streams over nccl, which this torch build ({torch.__version__}) does not have"
    if backend == "hccl" and importlib.util.find_spec("torch_npu") is None:
        return f"device {device!r} streams over hccl, which needs the torch_npu package (not installed)"
    if backend not in _BACKEND_FACTORIES:
        return f"no weight-group factory for backend {backend!r} (known: {sorted(_BACKEND_FACTORIES)})"
    return None


def _gloo(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> Any:
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, size, timeout)


def _nccl(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> Any:
    from torch.distributed import ProcessGroupNCCL

    opts = ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return ProcessGroupNCCL(store, rank, size, opts)


def _hccl(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> Any:
    import torch_npu  # noqa: F401 - registers the npu device with torch
    from torch_npu._C._distributed_c10d import ProcessGroupHCCL

    opts = ProcessGroupHCCL.Options()
    opts._timeout = timeout
    return ProcessGroupHCCL(store, rank, size, opts)


_BACKEND_FACTORIES: Dict[str, Callable[..., Any]] = {"gloo": _gloo, "nccl": _nccl, "hccl": _hccl}


# ------------------------------------------------------------------------------------------- rendezvous
@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """Where and how to join one weight group (plain fields: it travels through Ray and vLLM's RPC as a dict)."""

    host: str
    port: int
    group: str  # unique per formation; a new id re-forms the group
    world_size: int  # 1 sender + every engine worker
    backend: str
    timeout_s: float

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Rendezvous":
        return cls(host=str(d["host"]), port=int(d["port"]), group=str(d["group"]), world_size=int(d["world_size"]),
                   backend=str(d["backend"]), timeout_s=float(d["timeout_s"]))


class StoreServer:
    """The ``TCPStore`` every group member rendezvouses through, served by the driver for as long as it syncs.

    One server outlives any number of group formations (each uses its own key prefix). NCCL reads the store again
    when it creates its communicator at the first broadcast, so the server must live past the connect."""

    def __init__(self, host: str, *, timeout_s: float = 600.0):
        from torch.distributed import TCPStore

        self.host = host
        # port 0: the OS picks a free port while binding, so two runs on one node cannot race for one.
        self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
        self.port = int(self._store.port)

    def close(self) -> None:
        self._store = None


def _group_store(rdzv: Rendezvous) -> Any:
    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(rdzv.host, rdzv.port, is_master=False, timeout=datetime.timedelta(seconds=rdzv.timeout_s))
    return PrefixStore(f"passk_rl/weights/{rdzv.group}/", store)


class StreamGroup:
    """One member's end of a weight group: a torch backend built directly on the group's store (no global state).

    ``rank=0`` for the sender; receivers pass ``None`` and draw the next free rank. Construction blocks until all
    ``world_size`` members have joined (or ``timeout_s`` passes)."""

    def __init__(self, rdzv: Rendezvous, *, rank: Optional[int], device: torch.device | str):
        if rdzv.backend not in _BACKEND_FACTORIES:
            raise ValueError(f"weight group: unknown backend {rdzv.backend!r} (known: {sorted(_BACKEND_FACTORIES)})")
        if rdzv.world_size < 2:
            raise ValueError(f"weight group: world_size must be ≥ 2 (a sender and a receiver), got {rdzv.world_size}")
        self.rdzv = rdzv
        self.device = torch.device(device)
        store = _group_store(rdzv)
        if rank is None:
            rank = int(store.add("receivers", 1))  # 1, 2, …: the sender is 0
            if rank >= rdzv.world_size:
                raise GroupFullError(
                    f"weight group {rdzv.group} at {rdzv.host}:{rdzv.port} already has its {rdzv.world_size - 1} "
                    f"receivers; this one (receiver #{rank}) joined after it formed — an engine that restarts "
                    f"mid-run cannot be sent weights alone: the driver must re-form the group (a new group id)")
        self.rank = int(rank)
        self._store = store  # kept: nccl/hccl read it again when they build their communicator
        t0 = time.perf_counter()
        try:
            self._pg = _BACKEND_FACTORIES[rdzv.backend](store, self.rank, rdzv.world_size,
                                                        datetime.timedelta(seconds=rdzv.timeout_s))
        except RuntimeError as e:
            raise RuntimeError(f"weight group {rdzv.group}: rank {self.rank} of {rdzv.world_size} could not connect "
                               f"within {rdzv.timeout_s:g}s over {rdzv.backend} via {rdzv.host}:{rdzv.port} (did "
                               f"every engine and the learner join? {e})") from e
        if hasattr(self._pg, "_set_sequence_number_for_group"):
            self._pg._set_sequence_number_for_group()
        self.connect_seconds = time.perf_counter() - t0

    @property
    def group(self) -> str:
        return self.rdzv.group

    @property
    def closed(self) -> bool:
        return self._pg is None

    def broadcast(self, t: torch.Tensor) -> None:
        """Blocking broadcast of ``t`` from rank 0 into ``t`` everywhere."""
        if self._pg is None:
            raise RuntimeError(f"weight group {self.rdzv.group} is closed")
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        self._pg.broadcast([t], opts).wait()
        if self.device.type != "cpu":
            # wait() orders the calling thread's stream only; the tensor is read on another thread's stream
            torch.accelerator.synchronize(self.device)

    def close(self) -> None:
        """Drop this end. Peers blocked in a broadcast fail at once ("connection closed") instead of timing out."""
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - older builds: dropping the last reference closes the connections
                pass
        self._store = None


# ------------------------------------------------------------------------------------------- wire format
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"weight stream: unknown dtype {name!r}")
    return dt


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(int(d) for d in shape) * dtype.itemsize


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One broadcast: ``nbytes`` bytes holding ``items`` = (entry index, byte offset, byte length), in send order."""

    nbytes: int
    items: Tuple[Tuple[int, int, int], ...]


def plan_buckets(entries: Sequence[Entry], bucket_bytes: int) -> List[Bucket]:
    """Split ``entries`` (name, shape, dtype), in order, into buckets of at most ``bucket_bytes`` each.

    Whole tensors only (vLLM's weight loaders take a parameter in one piece), each at an ``ALIGN``-ed offset; a
    tensor larger than ``bucket_bytes`` gets a bucket of its own. Pure: the sender, every ZeRO-3 rank (which must
    gather the same parameters per bucket) and every receiver compute the same plan from the same entries."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be ≥ 1, got {bucket_bytes}")
    buckets: List[Bucket] = []
    items: List[Tuple[int, int, int]] = []
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = _nbytes(shape, dtype)
        start = _align(size)
        if items and start + n > bucket_bytes:
            buckets.append(Bucket(size, tuple(items)))
            items, start = [], 0
        items.append((i, start, n))
        size = start + n
    if items:
        buckets.append(Bucket(size, tuple(items)))
    return buckets


def _view(buf: torch.Tensor, offset: int, length: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return buf.narrow(0, offset, length).view(dtype).view(tuple(int(d) for d in shape))


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _checksum_add(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    raw = _bytes_of(t).view(-1, t.element_size()) if t.numel() else torch.empty(0, 1, dtype=torch.uint8)
    idx = torch.as_tensor(_sample_index(t.numel()), device=raw.device)
    sample = raw.index_select(0, idx).cpu().numpy().tobytes() if t.numel() else b""
    _checksum_update(h, name, tuple(t.shape), _ST_DTYPES.get(t.dtype, dtype_name(t.dtype)), sample)


def stream_checksum(named: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """Sampled sha256 of tensors in stream order (what both ends of a sync compute; cheap: O(#tensors))."""
    h = hashlib.sha256()
    for name, t in named:
        _checksum_add(h, name, t)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- sending
class WeightStream:
    """One sync from the sender's side: the header goes out on construction, then one :meth:`send` per bucket of
    :attr:`plan`, in order, then :meth:`finish`.

    A failed broadcast closes the group (so receivers fail at once instead of waiting out the timeout) and turns
    later :meth:`send` calls into no-ops: a ZeRO-3 caller keeps gathering with its peer ranks to the end of the
    plan, and :meth:`finish` raises."""

    def __init__(self, group: StreamGroup, step: int, entries: Sequence[Entry], bucket_bytes: int,
                 scratch: Optional["_Scratch"] = None):
        self.group, self.step = group, int(step)
        self.entries = [(str(n), tuple(int(d) for d in s), dt) for n, s, dt in entries]
        self.bucket_bytes = int(bucket_bytes)
        self.plan = plan_buckets(self.entries, self.bucket_bytes)
        self.error: Optional[BaseException] = None
        self.bytes_sent = 0  # tensor bytes (what a file of these tensors would hold)
        self.wire_bytes = 0  # including the alignment padding inside buckets
        self.transfer_seconds = 0.0  # inside broadcasts (the rest: packing, checksums, the caller's gathers)
        self._next = 0
        self._hash = hashlib.sha256()
        self._scratch = scratch if scratch is not None else _Scratch(group.device)
        self._t0 = time.perf_counter()
        header = json.dumps({"protocol": PROTOCOL, "step": self.step, "bucket_bytes": self.bucket_bytes,
                             "align": ALIGN, "entries": [[n, list(s), dtype_name(dt)] for n, s, dt in self.entries]}
                            ).encode()

        def send_header() -> None:
            group.broadcast(torch.tensor([MAGIC, len(header)], dtype=torch.int64, device=group.device))
            group.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(group.device))

        self._guard(send_header)

    def _guard(self, fn: Callable[[], Any]) -> None:
        if self.error is not None:
            return
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - kept for finish(); the group is unusable from here on
            self.error = e
            self.group.close()

    def send(self, bucket: Bucket, tensors: Sequence[torch.Tensor]) -> None:
        """Broadcast ``bucket`` (the next one of the plan); ``tensors`` are its entries' tensors, in order."""
        if bucket != self.plan[self._next]:
            raise ValueError(f"weight stream: bucket {self._next} of {len(self.plan)} expected, got another")
        self._next += 1
        if len(tensors) != len(bucket.items):
            raise ValueError(f"weight stream: bucket has {len(bucket.items)} entries, got {len(tensors)} tensors")
        for (i, _, _), t in zip(bucket.items, tensors):
            name, shape, dtype = self.entries[i]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"weight stream: {name} is {tuple(t.shape)} {t.dtype}, announced as {shape} {dtype}")
        if self.error is not None:
            return
        for (i, _, _), t in zip(bucket.items, tensors):
            _checksum_add(self._hash, self.entries[i][0], t)
        if bucket.nbytes == 0:
            return
        if len(tensors) == 1:
            payload = _bytes_of(tensors[0].to(self.group.device))  # alone in its bucket: no packing copy
        else:
            payload = self._scratch.get(bucket.nbytes)
            for (i, off, n), t in zip(bucket.items, tensors):
                _, shape, dtype = self.entries[i]
                if n:
                    _view(payload, off, n, shape, dtype).copy_(t.detach())
        t = time.perf_counter()
        self._guard(lambda: self.group.broadcast(payload))
        self.transfer_seconds += time.perf_counter() - t
        if self.error is None:
            self.bytes_sent += sum(n for _, _, n in bucket.items)
            self.wire_bytes += bucket.nbytes

    def finish(self) -> Dict[str, Any]:
        """``{"step", "checksum", "bytes", "wire_bytes", "buckets", "seconds", "transfer_seconds"}`` once every
        bucket went out; raises otherwise."""
        if self.error is not None:
            raise RuntimeError(f"weight stream for step {self.step} broke after {self.bytes_sent} bytes (group "
                               f"{self.group.group} closed, receivers fail too): {self.error}") from self.error
        if self._next != len(self.plan):
            raise RuntimeError(f"weight stream for step {self.step}: only {self._next} of {len(self.plan)} buckets "
                               f"were sent")
        return {"step": self.step, "checksum": self._hash.hexdigest(), "bytes": self.bytes_sent,
                "wire_bytes": self.wire_bytes, "buckets": len(self.plan), "seconds": time.perf_counter() - self._t0,
                "transfer_seconds": self.transfer_seconds}


class _Scratch:
    """The sender's packing buffer, kept across buckets and syncs: a fresh buffer of bucket size would be
    page-faulted in again for every bucket (host allocations this large come straight from mmap)."""

    def __init__(self, device: torch.device):
        self.device, self.buf = device, None

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = None
            self.buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buf.narrow(0, 0, nbytes)


class WeightSender:
    """The sending end (rank 0) of one weight group; reused by every sync until the group id changes."""

    def __init__(self, rdzv: Rendezvous, *, device: torch.device | str):
        self.group = StreamGroup(rdzv, rank=0, device=device)
        self._scratch = _Scratch(self.group.device)

    @property
    def group_id(self) -> str:
        return self.group.group

    def stream(self, step: int, entries: Sequence[Entry], *, bucket_bytes: int) -> WeightStream:
        return WeightStream(self.group, step, entries, bucket_bytes, self._scratch)

    def send_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, step: int, bucket_bytes: int
                        ) -> Dict[str, Any]:
        """Stream a full state dict (already on this process) in its own order."""
        named = [(k, v.detach()) for k, v in state_dict.items()]
        stream = self.stream(step, [(k, tuple(v.shape), v.dtype) for k, v in named], bucket_bytes=bucket_bytes)
        for bucket in stream.plan:
            stream.send(bucket, [named[i][1] for i, _, _ in bucket.items])
        return stream.finish()

    def close(self) -> None:
        self.group.close()
        self._scratch.buf = None


# --------------------------------------------------------------------------------------------- receiving
def _expected_problem(entries: Sequence[Entry], expected: Optional[Mapping[str, Sequence[int]]],
                      optional: Iterable[str], step: int) -> Optional[str]:
    names = [n for n, _, _ in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        return f"weights streamed for step {step} name some tensors twice: {dup[:10]}"
    if expected is None:
        return None
    try:
        validate_params({n: s for n, s, _ in entries}, expected, optional=optional,
                        source=f"weights streamed for step {step}", target="the engine's model")
    except ValueError as e:
        return str(e)
    return None


class WeightReceiver:
    """A receiving end of one weight group; ``load`` consumes an iterator of ``(name, tensor)`` (in vLLM: the
    worker's ``reload_weights(weights_iterator=...)``). Usable without vLLM (the tests pass a dict builder).

    ``ahead``: buckets received by a helper thread while ``load`` works on earlier ones (0: none). Without it the
    sender stalls whenever the engine is busy loading, and the two take turns instead of overlapping."""

    def __init__(self, rdzv: Rendezvous, *, device: torch.device | str, ahead: int = 1):
        if ahead < 0:
            raise ValueError(f"ahead must be ≥ 0, got {ahead}")
        self.group = StreamGroup(rdzv, rank=None, device=device)
        self.ahead = int(ahead)

    @property
    def group_id(self) -> str:
        return self.group.group

    def close(self) -> None:
        self.group.close()

    def _header(self) -> Dict[str, Any]:
        size = torch.zeros(2, dtype=torch.int64, device=self.group.device)
        self.group.broadcast(size)
        magic, n = (int(x) for x in size.cpu())
        if magic != MAGIC or not 0 < n < 1 << 31:
            raise RuntimeError(f"weight stream out of step: expected a header (magic {MAGIC:#x}), got ({magic:#x}, "
                               f"{n}); the group must be re-formed")
        raw = torch.empty(n, dtype=torch.uint8, device=self.group.device)
        self.group.broadcast(raw)
        header = json.loads(bytes(raw.cpu().numpy()))
        if header.get("protocol") != PROTOCOL or header.get("align") != ALIGN:
            raise RuntimeError(f"weight stream: sender speaks protocol {header.get('protocol')} / align "
                               f"{header.get('align')}, this receiver {PROTOCOL} / {ALIGN} (mixed checkouts?)")
        return header

    def _recv(self, bucket: Bucket, state: Dict[str, Any]) -> Optional[torch.Tensor]:
        t = time.perf_counter()
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.group.device)
        try:
            if bucket.nbytes:
                self.group.broadcast(buf)
        except Exception as e:  # noqa: BLE001 - the caller ends the stream and reports it
            state["error"] = e
            self.close()
            return None
        state["transfer"] += time.perf_counter() - t
        state["received"] += 1
        state["bytes"] += sum(n for _, _, n in bucket.items)
        return buf

    def _buckets(self, plan: Sequence[Bucket], state: Dict[str, Any]) -> Iterator[Tuple[Bucket, torch.Tensor]]:
        """The plan's buckets as they arrive, ``ahead`` of the consumer at most; stops at a transport error."""
        if self.ahead == 0:
            for bucket in plan:
                buf = self._recv(bucket, state)
                if buf is None:
                    return
                yield bucket, buf
            return
        q: "queue.Queue[Optional[Tuple[Bucket, torch.Tensor]]]" = queue.Queue(maxsize=self.ahead)

        def run() -> None:
            for bucket in plan:
                buf = self._recv(bucket, state)
                if buf is None:
                    break
                q.put((bucket, buf))
            q.put(None)

        thread = threading.Thread(target=run, name=f"weights-{self.group.group}", daemon=True)
        thread.start()
        while (item := q.get()) is not None:
            yield item
        thread.join()

    def receive(self, load: Callable[[Iterator[Tuple[str, torch.Tensor]]], Any], *,
                expected: Optional[Mapping[str, Sequence[int]]] = None, optional: Iterable[str] = ()
                ) -> Dict[str, Any]:
        """Take one sync and feed it to ``load``. Never raises for a bad or broken stream, because an exception
        inside vLLM's loading leaves the engine unusable; the report says what happened instead:
        ``{"ok", "weights": "new" | "unchanged" | "partial", "error", "step", "checksum", "bytes", ...}``."""
        t0 = time.perf_counter()
        report: Dict[str, Any] = {"ok": False, "weights": "unchanged", "error": None, "reason": None, "step": None,
                                  "checksum": "", "bytes": 0, "rank": self.group.rank}
        try:
            header = self._header()
        except Exception as e:  # noqa: BLE001 - reported
            self.close()
            report.update(error=f"{type(e).__name__}: {e}", reason="stream")
            return report
        step = report["step"] = int(header["step"])
        try:
            entries = [(str(n), tuple(int(d) for d in s), parse_dtype(dt)) for n, s, dt in header["entries"]]
            plan = plan_buckets(entries, int(header["bucket_bytes"]))
        except Exception as e:  # noqa: BLE001 - the sender cannot have planned what we cannot parse
            self.close()
            report.update(error=f"weight stream for step {step}: unreadable header ({e}); the group was closed",
                          reason="stream")
            return report
        problem = _expected_problem(entries, expected, optional, step)
        h = hashlib.sha256()
        state: Dict[str, Any] = {"received": 0, "bytes": 0, "error": None, "transfer": 0.0, "loaded": 0}

        def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
            # A transport error ends the iteration (vLLM then finalises a usable model) and is reported after.
            for bucket, buf in self._buckets(plan, state):
                state["loaded"] += 1
                for i, off, n in bucket.items:
                    name, shape, dtype = entries[i]
                    t = _view(buf, off, n, shape, dtype)
                    _checksum_add(h, name, t)
                    yield name, t

        if problem is not None:
            for _ in tensors():  # take part in every broadcast so no one waits; keep nothing
                pass
            report.update(error=problem, reason="mismatch", bytes=state["bytes"], seconds=time.perf_counter() - t0)
            if state["error"] is not None:
                report.update(error=problem + f" (and the stream broke: {state['error']})", reason="stream")
            return report

        it = tensors()
        load_error: Optional[BaseException] = None
        try:
            load(it)
        except Exception as e:  # noqa: BLE001 - reported below
            load_error = e
        left = sum(1 for _ in it)  # a loader that stopped early must not strand the sender mid-stream
        report.update(bytes=state["bytes"], buckets=state["received"], seconds=time.perf_counter() - t0,
                      transfer_seconds=state["transfer"], checksum=h.hexdigest())
        if state["error"] is not None or load_error is not None or left:
            what = (f"the stream broke after {state['received']} of {len(plan)} buckets: {state['error']}"
                    if state["error"] is not None else
                    f"loading failed: {type(load_error).__name__}: {load_error}" if load_error is not None else
                    f"the loader stopped {left} tensors early")
            report.update(weights="partial" if state["loaded"] else "unchanged", checksum="",
                          error=f"weights for step {step}: {what}",
                          reason="stream" if state["error"] is not None else "load")
            return report
        report.update(ok=True, weights="new")
        return report
