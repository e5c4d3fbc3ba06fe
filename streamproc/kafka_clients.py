"""Kafka clients built from the settings: security options, bounded start and close, topic
checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from .errors import BrokerUnavailable, ConfigError, StreamprocError
from .settings import Settings

__all__ = [
    "broker_answers", "cancelling", "client_options", "connect_problem", "consumer_for",
    "ensure_topics", "producer_for", "record_size", "start_with_retry", "within",
]

log = logging.getLogger("streamproc.kafka")


def cancelling() -> bool:
    """The running task itself is being cancelled (not just a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def within(what: str, awaitable: Awaitable[Any], seconds: float,
                 tolerate: tuple[type[BaseException], ...] = ()) -> bool:
    """A bounded wait on the shutdown and clean-up paths: await for at most ``seconds``.
    False, with a warning, when it timed out, raised one of ``tolerate``, or ended in its own
    cancellation (a client's close may); the caller's own cancellation, and any other error,
    propagate."""
    try:
        await asyncio.wait_for(awaitable, max(seconds, 0.01))
        return True
    except TimeoutError:
        log.warning("%s did not finish within %.1f s", what, seconds)
    except tolerate as exc:
        log.warning("%s did not finish cleanly: %r", what, exc)
    except asyncio.CancelledError:
        if cancelling():
            raise
        log.warning("%s was cancelled", what)
    return False


def broker_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a TCP connection to the first ``host:port`` of ``bootstrap`` succeeds."""
    host, _, port = bootstrap.split(",")[0].strip().split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                      timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def client_options(settings: Settings) -> dict[str, Any]:
    """Options shared by every client: bootstrap, client id, and SASL/SSL pass-through."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile)
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def consumer_for(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **client_options(settings),
        group_id=settings.kafka_group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=settings.kafka_max_poll_records,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(settings.kafka_session_timeout_ms // 3, 100),
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        **overrides,
    )


def producer_for(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 5,
                               "max_request_size": settings.kafka_max_request_size}
    if "transactional_id" in overrides:
        options["transaction_timeout_ms"] = settings.kafka_transaction_timeout_ms
    options.update(overrides)
    return AIOKafkaProducer(**client_options(settings), **options)


def connect_problem(exc: BaseException, settings: Settings) -> ConfigError | None:
    """A connection failure that no retry can fix, as the setting to change; None for one
    that may pass (broker not up yet, network)."""
    mechanism = settings.kafka_sasl_mechanism or "PLAIN"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigError("KAFKA_SSL_CAFILE", settings.kafka_ssl_cafile,
                           f"the broker's TLS certificate was not trusted ({exc.verify_message}); "
                           "point KAFKA_SSL_CAFILE at the CA that signed it")
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        return ConfigError("KAFKA_SASL_MECHANISM", mechanism, str(exc))
    auth_failed = kafka_errors.SaslAuthenticationFailed | kafka_errors.AuthenticationFailedError
    if isinstance(exc, auth_failed):
        return ConfigError("KAFKA_SASL_USERNAME", settings.kafka_sasl_username,
                           f"SASL {mechanism} authentication failed ({exc}); check "
                           "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM")
    return None


async def _connect_error(settings: Settings) -> BaseException | None:
    """Why one connection to the first bootstrap server fails, or None if it succeeds. The
    clients only say "Unable to bootstrap"; a single connection raises the cause itself."""
    options = client_options(settings)
    host, _, port = options.pop("bootstrap_servers").split(",")[0].strip().rpartition(":")
    options["request_timeout_ms"] = 10_000
    try:
        conn = await create_conn(host.strip("[]") or "127.0.0.1", int(port), **options)
    except Exception as exc:
        return exc
    conn.close()
    return None


async def start_with_retry(name: str, start: Callable[[], Awaitable[None]],
                           settings: Settings) -> None:
    """Start a client, retrying with backoff for ``KAFKA_CONNECT_TIMEOUT_S`` at most. A
    failure no retry can fix (SASL authentication, an untrusted certificate) raises a
    :class:`ConfigError` at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.kafka_connect_timeout_s
    delay = 0.5
    while True:
        try:
            await start()
            return
        except (KafkaConnectionError, OSError) as exc:
            problem = connect_problem(await _connect_error(settings) or exc, settings)
            if problem is not None:
                raise problem from None
            if loop.time() + delay > deadline:
                raise BrokerUnavailable(
                    f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS="
                    f"{settings.kafka_bootstrap_servers} for the {name} after "
                    f"{settings.kafka_connect_timeout_s:.0f} s: {exc}") from None
            log.warning("%s: Kafka not reachable yet (%s); retrying in %.1f s", name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def record_size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of one record's size in a batch of its own: the size aiokafka checks
    against ``max_request_size``, and the broker against the topic's ``max.message.bytes``."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


async def ensure_topics(settings: Settings) -> dict[str, int]:
    """Check the input, output and DLQ topics exist; create missing ones when
    ``KAFKA_CREATE_TOPICS=true``, else fail naming the topic and the variable.

    Returns the largest record each output topic (``KAFKA_OUTPUT_TOPIC``, ``KAFKA_DLQ_TOPIC``)
    takes: the smaller of ``KAFKA_MAX_REQUEST_SIZE`` and the topic's ``max.message.bytes``."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await start_with_retry("admin client", admin.start, settings)
    try:
        existing = set(await admin.list_topics())
        wanted = {
            "KAFKA_INPUT_TOPIC": settings.kafka_input_topic,
            "KAFKA_OUTPUT_TOPIC": settings.kafka_output_topic,
            "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        }
        missing = {var: topic for var, topic in wanted.items() if topic not in existing}
        if missing and not settings.kafka_create_topics:
            var, topic = next(iter(missing.items()))
            raise ConfigError(var, topic, "the topic does not exist; create it or set "
                              "KAFKA_CREATE_TOPICS=true")
        if missing:
            new = [NewTopic(t, settings.kafka_topic_partitions, 1)
                   for t in set(missing.values())]
            with contextlib.suppress(TopicAlreadyExistsError):  # another instance was first
                await admin.create_topics(new)
            log.info("created topics %s", sorted(set(missing.values())))
        return await _record_limits(admin, settings)
    except KafkaError as exc:
        raise StreamprocError(f"could not check topics: {exc}") from exc
    finally:
        await admin.close()


async def _record_limits(admin: AIOKafkaAdminClient, settings: Settings) -> dict[str, int]:
    topics = {settings.kafka_output_topic, settings.kafka_dlq_topic}
    limits = dict.fromkeys(topics, settings.kafka_max_request_size)
    responses = await admin.describe_configs([
        ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        for topic in sorted(topics)])
    for response in responses:
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"]:
                if entry["config_names"] == "max.message.bytes" and entry["config_value"]:
                    topic = resource["resource_name"]
                    limits[topic] = min(limits[topic], int(entry["config_value"]))
    return limits
