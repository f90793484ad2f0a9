"""The weight transports by name, and the driver's side of a sync.

``make_transport(kind, **params)`` / ``transport_from_config(cfg)`` build a backend (``sync.transport``);
:class:`WeightSync` is what the trainer holds: ``sync(step)`` delivers the learner's weights to every engine, and an
engine that the pool replaces mid-run is brought to the current version, whatever the backend. Above both
backends (``cluster/weight_sync.py``, ``cluster/collective.py``), which share only ``cluster/weights.py``.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Dict, Optional

from cluster.collective import CollectiveTransport
from cluster.weight_sync import ShmSafetensorsTransport
from cluster.weights import WeightTransport, _reachable_address

TRANSPORTS: Dict[str, Callable[..., WeightTransport]] = {
    ShmSafetensorsTransport.kind: ShmSafetensorsTransport,
    CollectiveTransport.kind: CollectiveTransport,
}


def make_transport(kind: str, **params: Any) -> WeightTransport:
    """Build a transport by name; unknown names/params raise ``ValueError``."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {kind!r}; known: {sorted(TRANSPORTS)}")
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


def transport_from_config(cfg: Any) -> WeightTransport:
    """The transport ``cfg.sync.transport`` names, with the ``sync.*`` options that backend takes."""
    if cfg.sync.transport not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {cfg.sync.transport!r}; known: {sorted(TRANSPORTS)}")
    return TRANSPORTS[cfg.sync.transport].from_config(cfg)


class WeightSync:
    """Driver side of a sync, learner group → generator pool, for any transport; what the trainer calls.

    ``learner``: has ``publish_weights(transport, step=)`` (``LearnerGroup``); ``generators``: has
    ``sync_weights(handle, max_restarts=)``, ``load_current(engine)``, ``replace_dead()``, ``restarts``,
    ``num_engines`` and a ``restart_hook`` slot (``GeneratorPool``); ``workers_per_engine``: vLLM workers per engine
    (its tensor-parallel size); ``host``: the driver's address as the engines and learner see it.
    """

    def __init__(self, learner: Any, generators: Any, transport: WeightTransport, *, workers_per_engine: int = 1,
                 host: Optional[str] = None):
        if workers_per_engine < 1:
            raise ValueError(f"workers_per_engine must be ≥ 1, got {workers_per_engine}")
        self.learner, self.generators, self.transport = learner, generators, transport
        self.workers_per_engine = int(workers_per_engine)
        self.host = host or _reachable_address()
        # an engine the pool replaces is brought to the current version the way this backend can
        generators.restart_hook = lambda engine: transport.restore_engine(self, engine)

    def sync(self, step: int) -> Dict[str, Any]:
        """Deliver the learner's current weights to every engine as version ``step``; returns ``{"step",
        "seconds", "publish_seconds", "bytes", "transport", "engines": [per-engine reports]}``."""
        return self.transport.deliver(self, step)

    @staticmethod
    def log(msg: str) -> None:
        print(f"[passk_rl {time.strftime('%H:%M:%S')}] weight sync: {msg}", flush=True)

    def close(self) -> None:
        self.transport.close()
