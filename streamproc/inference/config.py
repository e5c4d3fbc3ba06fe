"""``GPUConfig``: what :class:`~streamproc.inference.worker.GPUWorker` needs, the library face
of the engine's settings.

Each field's default and range are declared here. A service reads them from the environment
under the names in :data:`ENV_NAMES` (``GPU_BATCH_SIZE`` for ``batch_size``, ...; see
:class:`streamproc.settings.EngineSettings`), so a bad value raises a
:class:`~streamproc.errors.ConfigError` naming that variable either way.

The seed document's names work too: ``max_batch_size`` is ``batch_size``, and ``device_id``
picks one device (``cuda:{device_id}``; on a machine without CUDA, the CPU, with a warning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError

__all__ = ["ENV_NAMES", "DeviceIds", "GPUConfig", "config_error"]

_NONE_STRINGS = {"", "null", "none"}

# GPUConfig field -> the environment variable a service reads it from.
ENV_NAMES = {
    "enable_multi_model_instances": "GPU_ENABLE_MULTI_MODEL_INSTANCES",
    "max_model_instances": "GPU_MAX_MODEL_INSTANCES",
    "model_memory_buffer_gb": "GPU_MODEL_MEMORY_BUFFER_GB",
    "estimated_model_size_gb": "GPU_ESTIMATED_MODEL_SIZE_GB",
    "batch_size": "GPU_BATCH_SIZE",
    "max_delay_ms": "GPU_MAX_DELAY_MS",
    "queue_size": "GPU_QUEUE_SIZE",
    "use_fp16": "GPU_USE_FP16",
    "enable_warmup": "GPU_ENABLE_WARMUP",
    "pool_enabled": "MODEL_POOL_ENABLED",
    "pool_max_instances": "MODEL_POOL_MAX_INSTANCES",
    "device_ids": "GPU_DEVICE_IDS",
    "max_batch_tokens": "GPU_MAX_BATCH_TOKENS",
    "length_sort_window": "GPU_LENGTH_SORT_WINDOW",
    "replica_max_failures": "REPLICA_MAX_FAILURES",
}


def _device_ids(value: Any) -> Any:
    """``GPU_DEVICE_IDS``: ``all`` (or unset), ``cpu``, or GPU ids like ``0,1``."""
    if isinstance(value, int):
        return [value]
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in _NONE_STRINGS or text == "all":
        return None
    if text == "cpu":
        return "cpu"
    try:
        ids = [int(part) for part in text.strip("[]").split(",") if part.strip()]
    except ValueError:
        raise ValueError("expected 'all', 'cpu' or GPU ids like '0,1'") from None
    if not ids or min(ids) < 0:
        raise ValueError("GPU ids must be non-negative integers")
    return ids


DeviceIds = Annotated[list[int] | Literal["cpu"] | None, BeforeValidator(_device_ids)]


def config_error(exc: ValidationError, variable: Callable[[str], str], whole: str) -> ConfigError:
    """A :class:`ConfigError` naming the first bad variable (``variable`` maps a field name
    to it; ``whole`` names a problem of no single field) and listing every problem."""
    errors = exc.errors()
    names = [variable(str(e["loc"][0])) if e["loc"] else whole for e in errors]
    problems = "; ".join(f"{name}: {e['msg']}" for name, e in zip(names, errors, strict=True))
    return ConfigError(names[0], errors[0].get("input"), problems)


class GPUConfig(BaseModel):
    """The engine's settings (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enable_multi_model_instances: bool = True
    max_model_instances: int | None = Field(default=None, ge=1)
    model_memory_buffer_gb: float = Field(default=2.0, ge=0)
    estimated_model_size_gb: float = Field(default=1.5, gt=0)
    batch_size: int = Field(default=48, ge=1)
    max_delay_ms: float = Field(default=50.0, ge=0)
    queue_size: int = Field(default=1000, ge=1)
    use_fp16: bool = True
    enable_warmup: bool = True
    pool_enabled: bool = True
    pool_max_instances: int = Field(default=1, ge=1)
    device_ids: DeviceIds = None
    device_id: int | None = Field(default=None, ge=0)  # the seed document's one device
    max_batch_tokens: int | None = Field(default=None, ge=1)
    length_sort_window: int | None = Field(default=None, ge=0)  # None: the queue, with a cost
    autotune: bool = False
    autotune_candidates: tuple[int, ...] | None = None  # None: calibration's defaults
    replica_max_failures: int = Field(default=3, ge=1)
    warmup_payloads: tuple[Any, ...] = ()
    calibration_payloads: tuple[Any, ...] = ()  # mixed lengths; none: the warm-up payloads

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc, lambda field: ENV_NAMES.get(field, field),
                               "GPUConfig") from None

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, values: Any) -> Any:
        if isinstance(values, dict) and "max_batch_size" in values:
            values = dict(values)
            size = values.pop("max_batch_size")
            if values.setdefault("batch_size", size) != size:
                raise ValueError("max_batch_size and batch_size are the same setting; give one")
        return values

    @model_validator(mode="after")
    def _one_device_choice(self) -> GPUConfig:
        if self.device_id is not None and self.device_ids is not None:
            raise ValueError("device_id and device_ids both choose devices; give one")
        return self

    @property
    def max_batch_size(self) -> int:
        """The seed document's name for :attr:`batch_size`."""
        return self.batch_size
