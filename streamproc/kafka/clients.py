"""Kafka clients built from the settings: security options, and a bounded start that tells a
setting no retry can fix from a broker that is not up yet."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from ..errors import BrokerUnavailable, ConfigError
from ..settings import KafkaSettings
from .auth import oauth_refusal, security_options, token_variable
from .group import group_options

__all__ = [
    "broker_answers", "check_client_extras", "client_options", "connect_problem",
    "consumer_for", "first_server", "producer_for", "record_size", "retriable", "start_with_retry",
]

log = logging.getLogger("streamproc.kafka")
PRODUCER_BATCH_BYTES = 16_384  # aiokafka's default batch size, kept where topics take it


def broker_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a TCP connection to the first ``host:port`` of ``bootstrap`` succeeds."""
    host, _, port = bootstrap.split(",")[0].strip().split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                      timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Options shared by every client: bootstrap, client id, and the TLS and SASL options
    (:mod:`.auth`)."""
    return {"bootstrap_servers": settings.kafka_bootstrap_servers,
            "client_id": settings.kafka_client_id, **security_options(settings)}


_NOT_OPTIONS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _option_problem(client: type[AIOKafkaConsumer | AIOKafkaProducer], key: str,
                    value: object) -> str | None:
    """Why ``key=value`` (a value JSON gave) is not an option of ``client``, or None. A value
    is checked against the type of the option's default: an int takes an int, a float an
    int or a float, a bool only a bool, a str only a str; an option with no default (None)
    takes any single value."""
    parameter = inspect.signature(client.__init__).parameters.get(key)
    if parameter is None or key in ("self", "loop") or parameter.kind in _NOT_OPTIONS:
        return f"{key!r} is not an option of aiokafka's {client.__name__}"
    default = parameter.default
    if default is None or default is inspect.Parameter.empty:
        fits = not isinstance(value, dict | list)
        wanted = "a single value"
    elif isinstance(default, bool | str):
        fits = isinstance(value, type(default))
        wanted = f"a {type(default).__name__}"
    elif isinstance(default, int | float):
        kinds = (int,) if isinstance(default, int) else (int, float)
        fits = isinstance(value, kinds) and not isinstance(value, bool)
        wanted = f"an {type(default).__name__}" if isinstance(default, int) else "a float"
    else:
        return (f"{key!r} cannot be given as JSON (aiokafka's {client.__name__} takes a "
                f"{type(default).__name__})")
    return None if fits else f"{key!r} takes {wanted}, not {value!r}"


def _extra(variable: str, client: type[AIOKafkaConsumer | AIOKafkaProducer],
           options: dict[str, Any]) -> dict[str, Any]:
    """``KAFKA_CONSUMER_EXTRA`` or ``KAFKA_PRODUCER_EXTRA``, every key an option of
    ``client`` with a value of its type (the settings already refused streamproc's own)."""
    for key, value in options.items():
        if (problem := _option_problem(client, key, value)) is not None:
            raise ConfigError(variable, options, problem)
    return options


def check_client_extras(settings: KafkaSettings) -> None:
    """``KAFKA_CONSUMER_EXTRA`` and ``KAFKA_PRODUCER_EXTRA`` as the clients will take them;
    a :class:`ConfigError` naming the variable and the key otherwise. Run at start, before
    the model loads (a producer is built only at the first assignment under exactly_once)."""
    _extra("KAFKA_CONSUMER_EXTRA", AIOKafkaConsumer, settings.kafka_consumer_extra)
    _extra("KAFKA_PRODUCER_EXTRA", AIOKafkaProducer, settings.kafka_producer_extra)


def consumer_for(settings: KafkaSettings, **overrides: Any) -> AIOKafkaConsumer:
    """The group's consumer (its group options are :func:`~.group.group_options`), with
    ``KAFKA_CONSUMER_EXTRA``'s options. Its own ``auto_offset_reset`` is always ``earliest``:
    :class:`~.partition.Partition` applies ``KAFKA_AUTO_OFFSET_RESET`` to a partition with no
    committed offset, so aiokafka's reset only meets a committed offset that is out of range
    (retention or a deletion passed it), and resumes at the first record still retained."""
    return AIOKafkaConsumer(**{
        **client_options(settings),
        **group_options(settings),
        "enable_auto_commit": False,
        # KAFKA_AUTO_OFFSET_RESET is the Partition's (no committed offset); aiokafka's reset
        # only meets a committed offset out of range, read from the first retained record
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": settings.kafka_max_poll_records,
        **_extra("KAFKA_CONSUMER_EXTRA", AIOKafkaConsumer, settings.kafka_consumer_extra),
        **overrides,
    })


def producer_for(settings: KafkaSettings, *, record_limit: int | None = None,
                 **overrides: Any) -> AIOKafkaProducer:
    """A producer with ``acks=all`` and idempotence, compressing as ``KAFKA_COMPRESSION_TYPE``
    says. ``record_limit``: the largest batch the topics it writes take (the smallest of their
    ``max.message.bytes``, read at start). Its batches are kept within it: the broker checks
    a topic's limit against a whole producer batch, so one larger than the limit would refuse
    records that each fit. ``KAFKA_PRODUCER_EXTRA``'s options come on top (``linger_ms``, for
    one, replaces the 5 ms here)."""
    compression = settings.kafka_compression_type
    options: dict[str, Any] = {
        "acks": "all", "enable_idempotence": True, "linger_ms": 5,
        "max_request_size": settings.kafka_max_request_size,
        "compression_type": None if compression == "none" else compression,
        "max_batch_size": min(PRODUCER_BATCH_BYTES, record_limit or PRODUCER_BATCH_BYTES),
    }
    if "transactional_id" in overrides:
        options["transaction_timeout_ms"] = settings.kafka_transaction_timeout_ms
    options.update(_extra("KAFKA_PRODUCER_EXTRA", AIOKafkaProducer,
                          settings.kafka_producer_extra))
    options.update(overrides)
    return AIOKafkaProducer(**client_options(settings), **options)


def connect_problem(exc: BaseException, settings: KafkaSettings) -> ConfigError | None:
    """A connection failure that no retry can fix, as the setting to change; None for one
    that may pass (broker not up yet, network)."""
    mechanism = settings.kafka_sasl_mechanism or "PLAIN"
    if isinstance(exc, ConfigError):  # a token provider's own
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigError("KAFKA_SSL_CAFILE", settings.kafka_ssl_cafile,
                           f"the broker's TLS certificate was not trusted ({exc.verify_message}); "
                           "point KAFKA_SSL_CAFILE at the CA that signed it")
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        return ConfigError("KAFKA_SASL_MECHANISM", mechanism, str(exc))
    auth_failed = kafka_errors.SaslAuthenticationFailed | kafka_errors.AuthenticationFailedError
    if isinstance(exc, auth_failed):
        if mechanism == "OAUTHBEARER":
            variable = token_variable(settings)
            return ConfigError(variable, getattr(settings, variable.lower()),
                               f"SASL OAUTHBEARER authentication failed ({exc}); check the "
                               f"token {variable} gives")
        if mechanism == "GSSAPI":
            return ConfigError("KAFKA_SASL_KERBEROS_SERVICE_NAME",
                               settings.kafka_sasl_kerberos_service_name,
                               f"SASL GSSAPI authentication failed ({exc}); check the "
                               "Kerberos ticket (kinit, KRB5_CLIENT_KTNAME) and "
                               "KAFKA_SASL_KERBEROS_SERVICE_NAME")
        return ConfigError("KAFKA_SASL_USERNAME", settings.kafka_sasl_username,
                           f"SASL {mechanism} authentication failed ({exc}); check "
                           "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM")
    return None


def first_server(settings: KafkaSettings) -> tuple[str, int]:
    """The first of ``KAFKA_BOOTSTRAP_SERVERS`` as aiokafka's clients read it: ``host``,
    ``host:port``, ``[ipv6]`` or ``[ipv6]:port``, Kafka's port 9092 when none is given."""
    host, port, _ = collect_hosts(settings.kafka_bootstrap_servers, randomize=False)[0]
    return str(host), int(port)


async def _connect_error(settings: KafkaSettings) -> BaseException | None:
    """Why one connection to the first bootstrap server fails, or None if it succeeds. The
    clients only say "Unable to bootstrap"; a single connection raises the cause itself."""
    options = client_options(settings)
    del options["bootstrap_servers"]
    options["request_timeout_ms"] = 10_000
    try:
        conn = await create_conn(*first_server(settings), **options)
    except Exception as exc:
        return exc
    conn.close()
    return None


async def _check_token(settings: KafkaSettings) -> None:
    """OAUTHBEARER: a token the broker refuses stops start-up at once, naming the variable
    that gives it (aiokafka's clients would not say; see :func:`~.auth.oauth_refusal`)."""
    if not (settings.kafka_security_protocol.startswith("SASL")
            and settings.kafka_sasl_mechanism == "OAUTHBEARER"):
        return
    if (refusal := await oauth_refusal(settings, *first_server(settings))) is not None:
        variable = token_variable(settings)
        raise ConfigError(variable, getattr(settings, variable.lower()),
                          f"SASL OAUTHBEARER authentication failed (the broker said: "
                          f"{refusal}); check the token {variable} gives")


def retriable(exc: BaseException) -> bool:
    """A Kafka error a later try may not meet: aiokafka's retriable ones, and the plain
    ``KafkaError`` it raises for a connection dropped in the middle of a request (a
    coordinator lookup, for one)."""
    return isinstance(exc, OSError) or (isinstance(exc, KafkaError) and (
        exc.retriable or type(exc) is KafkaError))


async def start_with_retry(name: str, start: Callable[[], Awaitable[None]],
                           settings: KafkaSettings) -> None:
    """Start a client, retrying with backoff for ``KAFKA_CONNECT_TIMEOUT_S`` at most. Each try
    is bounded by what is left of that time, since a start may wait forever on its own (a
    transactional producer's coordinator lookup and ``InitProducerId``). A failure no retry
    can fix (SASL authentication, an untrusted certificate) raises a :class:`ConfigError`
    at once; any other Kafka error that is not retriable, a :class:`BrokerUnavailable`, as
    does a broker that never answers. The OAUTHBEARER token check (:func:`_check_token`)
    runs first, within the same ``KAFKA_CONNECT_TIMEOUT_S``. The
    caller stops the client when this raises: a cancelled start may leave it half-started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.kafka_connect_timeout_s
    delay = 0.5
    checked = False
    while True:
        try:
            if not checked:  # the OAUTHBEARER token, within the same deadline
                await asyncio.wait_for(_check_token(settings), max(deadline - loop.time(), 0.01))
                checked = True
            await asyncio.wait_for(start(), max(deadline - loop.time(), 0.01))
            return
        except TimeoutError:
            raise BrokerUnavailable(
                f"the {name} did not start within KAFKA_CONNECT_TIMEOUT_S="
                f"{settings.kafka_connect_timeout_s:g} s (KAFKA_BOOTSTRAP_SERVERS="
                f"{settings.kafka_bootstrap_servers})") from None
        except (KafkaError, OSError) as exc:
            cause = exc
            if isinstance(exc, KafkaConnectionError | OSError):  # the clients hide the cause
                cause = await _connect_error(settings) or exc
            if (problem := connect_problem(cause, settings)) is not None:
                raise problem from None
            if not retriable(exc):
                raise BrokerUnavailable(f"the {name} could not start: {exc!r}") from exc
            if loop.time() + delay > deadline:
                raise BrokerUnavailable(
                    f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS="
                    f"{settings.kafka_bootstrap_servers} for the {name} after "
                    f"{settings.kafka_connect_timeout_s:.0f} s: {exc}") from None
            log.warning("%s: Kafka not reachable yet (%s); retrying in %.1f s", name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def record_size(key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes | None]]) -> int:
    """An upper bound of one record's size in a batch of its own: the size aiokafka checks
    against ``max_request_size``, and the broker against the topic's ``max.message.bytes``."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))
