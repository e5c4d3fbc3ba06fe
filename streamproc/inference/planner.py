"""How many model replicas each device gets.

:func:`plan_device` is a pure function of the device's memory and the settings; it is what
the tests exercise. :func:`resolve_devices` and :func:`probe_memory` read the real hardware
(torch is imported lazily, only there).

Reading of the settings, from widest to narrowest:

* memory allows ``floor((free - buffer) / (model + activations))`` replicas, never fewer than 1;
* ``GPU_ENABLE_MULTI_MODEL_INSTANCES=false`` means 1;
* ``GPU_MAX_MODEL_INSTANCES`` caps it (unset: memory decides);
* ``MODEL_POOL_ENABLED=false`` means 1, else ``MODEL_POOL_MAX_INSTANCES`` caps it. Its default
  of 1 is deliberate: replicas in threads of one process share the GIL, and measured slower
  than one replica with a larger batch. Raise it only when a benchmark says so.

The caps alone are :func:`replica_cap`: the most workers the CTranslate2 backend's shared
translator may get. Its workers on one device share the weights, so with
``shared_weights`` a replica past the first costs only its activations.

Free memory is ``torch.cuda.mem_get_info``: the driver's view, which includes every other
process on the card, not just this one's allocations.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .config import GPUConfig

__all__ = ["DeviceMemory", "DevicePlan", "plan_device", "probe_memory", "replica_cap",
           "resolve_devices"]

GIB = 1024**3
log = logging.getLogger("streamproc.planner")


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """Memory of one device in GiB. ``None`` for the CPU, where VRAM does not apply."""

    device: str
    total_gb: float | None
    free_gb: float | None


@dataclass(frozen=True, slots=True)
class DevicePlan:
    device: str
    replicas: int
    memory_allows: int | None
    limited_by: Literal["memory", "multi_instance_disabled", "GPU_MAX_MODEL_INSTANCES",
                        "MODEL_POOL_ENABLED", "MODEL_POOL_MAX_INSTANCES", "cpu", "autotune"]
    total_gb: float | None
    free_gb: float | None
    model_gb: float
    activation_gb: float
    buffer_gb: float
    warning: str | None = None
    shared_weights: bool = False  # the replicas on the device hold one copy of the model

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def planned_bytes(self) -> float:
        """The device memory the plan gives its replicas: each one's activations, and the
        weights once per replica (once in all with ``shared_weights``)."""
        copies = 1 if self.shared_weights else self.replicas
        return (copies * self.model_gb + self.replicas * self.activation_gb) * GIB

    def describe(self) -> str:
        mem = (
            f"free={self.free_gb:.1f}/{self.total_gb:.1f}GiB memory_allows={self.memory_allows}"
            if self.free_gb is not None and self.total_gb is not None
            else "no VRAM"
        )
        return (
            f"{self.device}: replicas={self.replicas} ({mem}, model={self.model_gb:.2f}GiB, "
            f"activations={self.activation_gb:.2f}GiB, buffer={self.buffer_gb:.1f}GiB, "
            f"limited_by={self.limited_by})"
        )


def replica_cap(config: GPUConfig) -> tuple[int, str]:
    """The most replicas the settings allow on one device, whatever its memory, and the
    setting that says so."""
    caps: list[tuple[int, str]] = []
    if not config.enable_multi_model_instances:
        caps.append((1, "multi_instance_disabled"))
    if config.max_model_instances is not None:
        caps.append((config.max_model_instances, "GPU_MAX_MODEL_INSTANCES"))
    caps.append((config.pool_max_instances, "MODEL_POOL_MAX_INSTANCES")
                if config.pool_enabled else (1, "MODEL_POOL_ENABLED"))
    cap, name = min(caps, key=lambda c: c[0])  # the first of equal caps names it
    return cap, name


def plan_device(
    memory: DeviceMemory,
    config: GPUConfig,
    *,
    model_gb: float | None = None,
    activation_gb: float = 0.0,
    shared_weights: bool = False,
) -> DevicePlan:
    """Replicas for one device. ``model_gb`` defaults to ``GPU_ESTIMATED_MODEL_SIZE_GB``;
    after the first replica is loaded the worker passes its measured footprint and the
    warm-up batch's peak activations instead. With ``shared_weights`` (CTranslate2's workers
    on one device hold one copy of the model), a replica past the first costs only its
    activations."""
    size = config.estimated_model_size_gb if model_gb is None else model_gb
    per_replica = max(size + activation_gb, 1e-6)
    warning: str | None = None
    limited_by: Any
    if memory.free_gb is None:
        # No VRAM to plan from: only the caps below decide (the pool cap always applies).
        memory_allows, replicas, limited_by = None, 10**6, "cpu"
    else:
        usable = memory.free_gb - config.model_memory_buffer_gb
        if shared_weights:
            extra = max(activation_gb, 1e-6)
            memory_allows = max(1, 1 + math.floor((usable - per_replica) / extra + 1e-9))
        else:
            memory_allows = max(1, math.floor(usable / per_replica + 1e-9))
        replicas, limited_by = memory_allows, "memory"
        if usable < per_replica:
            warning = (
                f"{memory.device}: {memory.free_gb:.1f} GiB free leaves no room for a "
                f"{per_replica:.2f} GiB replica after the {config.model_memory_buffer_gb:.1f} GiB "
                "buffer; planning 1 replica, which may run out of memory"
            )
    cap, name = replica_cap(config)
    if cap < replicas:
        replicas, limited_by = cap, name
    return DevicePlan(
        device=memory.device, replicas=max(1, replicas), memory_allows=memory_allows,
        limited_by=limited_by, total_gb=memory.total_gb, free_gb=memory.free_gb, model_gb=size,
        activation_gb=activation_gb, buffer_gb=config.model_memory_buffer_gb, warning=warning,
        shared_weights=shared_weights,
    )


def resolve_devices(config: GPUConfig) -> list[str]:
    """``GPU_DEVICE_IDS`` to torch device strings: all visible GPUs by default, else the CPU.
    The seed document's ``device_id`` names one GPU; without CUDA it falls back to the CPU,
    with a warning."""
    if config.device_ids == "cpu":
        return ["cpu"]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.device_id is not None:
        if count == 0:
            log.warning("device_id=%d: no CUDA device here; running on the CPU",
                        config.device_id)
            return ["cpu"]
        wanted: list[int] = [config.device_id]
    elif config.device_ids is None:
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    else:
        wanted = config.device_ids
    missing = [i for i in wanted if i >= count]
    if missing:
        from ..errors import ConfigError

        variable = "GPU_DEVICE_IDS" if config.device_id is None else "device_id"
        raise ConfigError(variable, wanted, f"only {count} CUDA device(s) visible")
    return [f"cuda:{i}" for i in wanted]


def probe_memory(device: str) -> DeviceMemory:
    """Total and free memory as the driver sees them (all processes on the card)."""
    if not device.startswith("cuda"):
        return DeviceMemory(device, None, None)
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return DeviceMemory(device, total / GIB, free / GIB)
