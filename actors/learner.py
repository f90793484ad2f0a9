"""The learner as Ray actors: W DeepSpeed ZeRO ranks forming one torch.distributed group.

A thin shell: ``LearnerGroup`` starts W ``LearnerActor`` s, each holding one
:class:`actors.learner_engine.LearnerWorker` (the engine, usable without Ray), shards every batch
(:class:`passk_rl.batch.Batch`, columns) across the ranks by tokens and returns the reduced metrics. The loss and
off-policy correction live in :mod:`passk_rl.losses`, weight export and streaming in :mod:`actors.learner_export`.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from actors.learner_engine import LearnerOptions, LearnerWorker, as_batch
from cluster.devices import device_spec
from passk_rl.batch import Batch, shard_by_tokens

__all__ = ["Batch", "LearnerActor", "LearnerGroup", "LearnerOptions", "LearnerWorker", "shard_by_tokens"]

BatchLike = Union[Batch, Sequence[Mapping[str, Any]]]


# ---------------------------------------------------------------------- Ray


class LearnerActor:
    """Thin Ray wrapper: created empty, so rank 0 can report its address/port before the group initialises."""

    def __init__(self):
        self.worker: Optional[LearnerWorker] = None

    def address_and_free_port(self):
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_worker(self, model_path: str, options: LearnerOptions, **placement) -> bool:
        self.worker = LearnerWorker(model_path, options, **placement)
        return True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, method: str, *args, **kwargs):
        if self.worker is None:
            raise RuntimeError("learner worker not initialised")
        return getattr(self.worker, method)(*args, **kwargs)

    def apply(self, fn, *args, **kwargs):
        """``fn(worker, *args, **kwargs)`` in this rank's process (drives the engine directly; tests use it)."""
        if self.worker is None:
            raise RuntimeError("learner worker not initialised")
        return fn(self.worker, *args, **kwargs)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


class LearnerGroup:
    """W ``LearnerWorker`` ranks as Ray actors forming one DeepSpeed data-parallel group.

    ``placement_group``: optional Ray placement group whose bundle ``i`` hosts rank ``i``. Each rank reserves
    ``num_cpus_per_rank`` CPUs plus one device of the kind's Ray resource (GPU / NPU) when the device is not CPU.
    The ranks' :class:`LearnerOptions` come as ``options`` or as its flat names (zero_stage, lr, micro_batch_size,
    aggregation, …; an unknown name is an error).
    """

    def __init__(self, world_size: int, model_path: str, *, device: str = "cpu", num_cpus_per_rank: float = 0.5,
                 placement_group=None, options: Optional[LearnerOptions] = None, wait: bool = True,
                 **flat_options):
        import ray

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        for k in ("rank", "world_size", "master_addr", "master_port", "local_rank"):
            if k in flat_options:
                raise ValueError(f"LearnerGroup sets {k!r} itself; do not pass it")
        if options is not None and flat_options:
            raise ValueError(f"pass options= or flat options, not both (got {sorted(flat_options)})")
        options = options if options is not None else LearnerOptions.from_flat(**flat_options)
        spec = device_spec(device)
        self.world_size = world_size
        self.device = device
        remote_cls = ray.remote(LearnerActor)
        self.actors = []
        for r in range(world_size):
            opts: Dict[str, Any] = {"num_cpus": num_cpus_per_rank}
            if spec.ray_resource == "GPU":
                opts["num_gpus"] = 1
            elif spec.ray_resource:
                opts["resources"] = {spec.ray_resource: 1}
            if placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=r)
            self.actors.append(remote_cls.options(**opts).remote())
        addr, port = ray.get(self.actors[0].address_and_free_port.remote())
        # Accelerator ranks see exactly one device (Ray sets the visible-devices variable), hence local rank 0.
        self._ready = [a.init_worker.remote(model_path, options, rank=r, world_size=world_size, master_addr=addr,
                                            master_port=port, local_rank=r if spec.kind == "cpu" else 0,
                                            device=device)
                       for r, a in enumerate(self.actors)]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every rank has its DeepSpeed engine (``wait=False`` in the constructor returns before)."""
        import ray

        if self._ready:
            refs, self._ready = self._ready, []
            ray.get(refs)

    # LearnerConfig fields that place the ranks rather than configure one (LearnerGroup's own arguments)
    PLACEMENT_FIELDS = ("world_size", "num_cpus_per_rank")

    @classmethod
    def from_config(cls, cfg: Any, model_path: str, *, placement_group=None, wait: bool = True) -> "LearnerGroup":
        """The group a run's config asks for: every ``cfg.learner`` field is passed by name (a new LearnerConfig
        field that LearnerOptions does not take fails here, loudly), plus what follows from other sections."""
        import dataclasses

        L = cfg.learner
        worker = {f.name: getattr(L, f.name) for f in dataclasses.fields(L) if f.name not in cls.PLACEMENT_FIELDS}
        worker.update(
            betas=tuple(L.betas), ds_config_overrides=dict(L.ds_config_overrides) or None,
            # Dr. GRPO's constant normaliser: the longest answer the generator may write, not this batch's longest
            max_response_len=L.max_response_len or cfg.generator.max_tokens,
            ref_model=L.kl_coef > 0, seed=cfg.run.seed, bf16=cfg.model.dtype == "bfloat16",
            # the learner scores the policy the generator samples from: softmax(logits / T), paired with vLLM's
            # processed logprobs (the engine's logprobs_mode follows the same temperature)
            temperature=cfg.generator.temperature,
        )
        return cls(L.world_size, model_path, device=cfg.cluster.device, num_cpus_per_rank=L.num_cpus_per_rank,
                   placement_group=placement_group, wait=wait, **worker)

    def _all(self, method: str, per_rank_args=None, **kwargs) -> list:
        import ray
        refs = []
        for r, a in enumerate(self.actors):
            args = per_rank_args[r] if per_rank_args is not None else ()
            refs.append(a.call.remote(method, *args, **kwargs))
        return ray.get(refs)

    def _shards(self, batch: BatchLike, **kw):
        """The batch as columns, validated, and each rank's part of it (balanced by tokens)."""
        batch = as_batch(batch, where="batch", **kw)
        shards = shard_by_tokens(batch, self.world_size)
        return batch, shards

    def train_step(self, batch: BatchLike, *, step: int) -> Dict[str, Any]:
        batch, shards = self._shards(batch)
        results = self._all("train_step", [(batch.select(sh),) for sh in shards], step=step)
        return results[0]  # metrics are already all-reduced over ranks inside the workers

    def compute_logprobs(self, batch: BatchLike, *, ref: bool = False,
                         temperature: Optional[float] = None) -> List[List[float]]:
        batch, shards = self._shards(batch, default_advantage=0.0)
        parts = self._all("compute_logprobs", [(batch.select(sh),) for sh in shards], ref=ref,
                          temperature=temperature)
        out: List[Optional[List[float]]] = [None] * len(batch)
        for sh, part in zip(shards, parts):
            for i, lp in zip(sh, part):
                out[i] = lp
        return out  # type: ignore[return-value]

    def apply(self, fn, per_rank_args=None, **kwargs) -> list:
        """``fn(worker, *args, **kwargs)`` on every rank together (``per_rank_args[r]``: rank r's args)."""
        import ray
        return ray.get([a.apply.remote(fn, *(per_rank_args[r] if per_rank_args is not None else ()), **kwargs)
                        for r, a in enumerate(self.actors)])

    def gather_state_dict(self) -> Dict[str, torch.Tensor]:
        return self._all("gather_state_dict")[0]

    def info(self) -> List[Dict[str, Any]]:
        """Per-rank :meth:`LearnerWorker.info` (includes each rank's start-up seconds)."""
        return self._all("info")

    def node_ids(self) -> List[str]:
        """The Ray node each rank runs on."""
        import ray

        return ray.get([a.node_id.remote() for a in self.actors])

    def publish_weights(self, transport, step: int):
        return self._all("publish_weights", None, transport=transport, step=step)[0]

    def save_checkpoint(self, ckpt_dir: str, *, step: int, client_state: Optional[Mapping[str, Any]] = None) -> str:
        return self._all("save_checkpoint", None, ckpt_dir=ckpt_dir, step=step, client_state=client_state)[0]

    def load_checkpoint(self, ckpt_dir: str, *, tag: Optional[str] = None) -> Dict[str, Any]:
        return self._all("load_checkpoint", None, ckpt_dir=ckpt_dir, tag=tag)[0]

    def export_hf(self, out_dir: str, *, dtype: Optional[torch.dtype] = None) -> str:
        return self._all("export_hf", None, out_dir=out_dir, dtype=dtype)[0]

    def shutdown(self) -> None:
        import ray
        if not self.actors:
            return
        starting, self._ready = getattr(self, "_ready", []), []
        if not starting:  # a rank still starting (the engines failed first) would run shutdown only after its start
            try:
                ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
            except Exception:
                pass  # a dead rank must not stop the others from being killed
        for a in self.actors:
            ray.kill(a)
        self.actors = []
