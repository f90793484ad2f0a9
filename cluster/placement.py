"""Ray placement groups for the generator engines and the learner ranks.

One bundle per engine (its CPUs and, on accelerators, ``tensor_parallel_size`` devices) and one bundle per
learner rank (its CPUs and one device). Reserving them up front makes a run that cannot fit fail at start with
the missing resources named, instead of hanging with actors pending.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from cluster.devices import DeviceSpec


@dataclasses.dataclass
class Placement:
    generator_pg: Any
    learner_pg: Any

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in (self.generator_pg, self.learner_pg):
            if pg is not None:
                remove_placement_group(pg)


def bundles(spec: DeviceSpec, count: int, cpus: float, devices: int,
            extra: Optional[Dict[str, float]] = None) -> List[Dict[str, float]]:
    """``count`` bundles of ``cpus`` CPUs and ``devices`` devices; ``extra`` custom resources (e.g. a node's label
    resource, {"gen_node": 0.01}) decide which nodes may host them."""
    b: Dict[str, float] = {"CPU": cpus, **{k: float(v) for k, v in (extra or {}).items()}}
    if spec.ray_resource is not None:
        b[spec.ray_resource] = float(devices)
    return [dict(b) for _ in range(count)]


def reserve(spec: DeviceSpec, *, num_engines: int, tp: int, cpus_per_engine: float, world_size: int,
            cpus_per_rank: float, strategy: str = "PACK", timeout_s: float = 120.0,
            generator_resources: Optional[Dict[str, float]] = None,
            learner_resources: Optional[Dict[str, float]] = None) -> Placement:
    import ray
    from ray.util.placement_group import placement_group

    gen = placement_group(bundles(spec, num_engines, cpus_per_engine, tp, generator_resources), strategy=strategy,
                          name="passk_rl.generators")
    learn = placement_group(bundles(spec, world_size, cpus_per_rank, 1, learner_resources), strategy=strategy,
                            name="passk_rl.learner")
    ready, _ = ray.wait([gen.ready(), learn.ready()], num_returns=2, timeout=timeout_s)
    if len(ready) < 2:
        avail = ray.available_resources()
        for pg in (gen, learn):
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
        raise RuntimeError(
            f"could not reserve resources in {timeout_s:.0f}s: generators need {num_engines} × "
            f"{bundles(spec, 1, cpus_per_engine, tp, generator_resources)[0]}, learner needs {world_size} × "
            f"{bundles(spec, 1, cpus_per_rank, 1, learner_resources)[0]}; the cluster has available {avail}"
        )
    return Placement(gen, learn)


def optional_bundle(pg_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Ray ``.options()`` kwargs for a placement-group bundle (empty when not placed)."""
    if not pg_kwargs or pg_kwargs.get("placement_group") is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg_kwargs["placement_group"],
        placement_group_bundle_index=pg_kwargs["placement_group_bundle_index"])}
