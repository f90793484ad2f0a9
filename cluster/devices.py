"""Device abstraction: one table maps a device kind to everything that differs between CPU, CUDA and Ascend NPU.

The rest of the system asks ``device_spec(kind)`` and never branches on the kind itself, so moving a run from
this CPU machine to GPUs or 910B NPUs is a config change (``cluster.device: cpu|cuda|npu``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "cpu" | "cuda" | "npu"
    torch_device_type: str  # torch.device type string
    dist_backend: str  # torch.distributed backend for the learner group
    visible_devices_env: Optional[str]  # env var that restricts a process to its devices
    ray_resource: Optional[str]  # Ray resource name that reserves one device (None: CPU only)
    ds_accelerator: str  # value for DS_ACCELERATOR
    torch_extension: Optional[str]  # module to import before torch sees the device (torch_npu)
    memory_gib: float  # default per-device memory budget for the planner (0 = host RAM, not planned)

    def env_for(self, device_ids: Optional[list] = None) -> Dict[str, str]:
        """Environment for a worker process that owns ``device_ids`` (empty for CPU)."""
        env = {"DS_ACCELERATOR": self.ds_accelerator}
        if self.visible_devices_env and device_ids is not None:
            env[self.visible_devices_env] = ",".join(str(d) for d in device_ids)
        return env

    def import_extension(self) -> None:
        """Import the torch extension for this device (torch_npu for Ascend); clear error if missing."""
        if self.torch_extension is None:
            return
        try:
            importlib.import_module(self.torch_extension)
        except ImportError as e:
            raise RuntimeError(
                f"device {self.kind!r} needs the package {self.torch_extension!r} (install the build matching "
                f"your torch and CANN); import failed: {e}"
            ) from e


DEVICES: Dict[str, DeviceSpec] = {
    "cpu": DeviceSpec("cpu", "cpu", "gloo", None, None, "cpu", None, 0.0),
    "cuda": DeviceSpec("cuda", "cuda", "nccl", "CUDA_VISIBLE_DEVICES", "GPU", "cuda", None, 80.0),
    # Ascend 910B: 64 GB HBM per device; HCCL collectives; vllm-ascend plugin on top of vllm.
    "npu": DeviceSpec("npu", "npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES", "NPU", "npu", "torch_npu", 64.0),
}


def device_spec(kind: str) -> DeviceSpec:
    if kind not in DEVICES:
        raise ValueError(f"unknown device {kind!r}; known devices: {sorted(DEVICES)}")
    return DEVICES[kind]


def set_process_env(spec: DeviceSpec, device_ids: Optional[list] = None) -> None:
    """Apply ``spec.env_for`` to this process (call before importing deepspeed/vllm in a worker)."""
    for k, v in spec.env_for(device_ids).items():
        os.environ[k] = v
