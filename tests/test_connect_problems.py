"""Kafka connection failures that no retry can fix stop start-up at once, naming the setting.

The mapping is checked on aiokafka's own error classes; the TLS case also end to end, against
a real TLS listener whose self-signed certificate the client does not trust. Refused SASL
logins against a real SASL listener are in ``test_auth.py``.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka import errors

from streamproc.errors import BrokerUnavailable, ConfigError
from streamproc.kafka.clients import (
    connect_problem,
    first_server,
    producer_for,
    start_with_retry,
)
from streamproc.settings import Settings, load_settings


def sasl_settings(**values: object) -> Settings:
    return load_settings(None, kafka_security_protocol="SASL_PLAINTEXT",
                         kafka_sasl_username="alice", kafka_sasl_password="wrong", **values)


def test_a_failed_sasl_login_names_the_username_and_the_mechanism() -> None:
    failed = errors.SaslAuthenticationFailed("Authentication failed: Invalid username or password")
    problem = connect_problem(failed, sasl_settings(kafka_sasl_mechanism="SCRAM-SHA-256"))
    assert problem is not None and problem.variable == "KAFKA_SASL_USERNAME"
    assert str(problem).startswith("KAFKA_SASL_USERNAME='alice': SASL SCRAM-SHA-256 "
                                   "authentication failed (")
    assert "wrong" not in str(problem), "the password is never shown"
    plain = connect_problem(errors.AuthenticationFailedError(), sasl_settings())
    assert plain is not None and "SASL PLAIN authentication failed" in str(plain)


def test_an_unsupported_mechanism_names_kafka_sasl_mechanism() -> None:
    unsupported = errors.UnsupportedSaslMechanismError("Kafka broker does not support SCRAM")
    problem = connect_problem(unsupported, sasl_settings(kafka_sasl_mechanism="SCRAM-SHA-512"))
    assert problem is not None and problem.variable == "KAFKA_SASL_MECHANISM"


def test_transient_failures_are_left_to_the_retries() -> None:
    for transient in (ConnectionRefusedError(111, "Connection refused"),
                      errors.KafkaConnectionError("Unable to bootstrap"), TimeoutError()):
        assert connect_problem(transient, load_settings(None)) is None


@pytest.fixture
def untrusted_tls_context(tmp_path: Path) -> ssl.SSLContext:
    """A TLS listener with a self-signed certificate (no Kafka behind it)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_an_untrusted_broker_certificate_names_kafka_ssl_cafile(
    untrusted_tls_context: ssl.SSLContext,
) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=untrusted_tls_context)
    port = server.sockets[0].getsockname()[1]
    settings = load_settings(None, kafka_bootstrap_servers=f"127.0.0.1:{port}",
                             kafka_security_protocol="SSL", kafka_connect_timeout_s=60)
    producer = producer_for(settings)
    began = time.monotonic()
    try:
        with pytest.raises(ConfigError) as raised:
            await start_with_retry("producer", producer.start, settings)
    finally:
        await producer.stop()
        server.close()
    assert raised.value.variable == "KAFKA_SSL_CAFILE"
    assert "certificate was not trusted" in str(raised.value)
    assert time.monotonic() - began < 30, "at once, not after KAFKA_CONNECT_TIMEOUT_S"


def oauth_settings(bootstrap: str, **values: object) -> Settings:
    return load_settings(None, kafka_bootstrap_servers=bootstrap,
                         kafka_security_protocol="SASL_PLAINTEXT",
                         kafka_sasl_mechanism="OAUTHBEARER", kafka_sasl_oauth_token="t",
                         **values)


@pytest.mark.parametrize(("bootstrap", "server"), [
    ("broker1", ("broker1", 9092)), ("broker1:9093,broker2", ("broker1", 9093)),
    ("[::1]", ("::1", 9092)), ("[::1]:9094", ("::1", 9094)),
])
def test_the_token_check_reads_the_bootstrap_as_aiokafka_does(
        bootstrap: str, server: tuple[str, int]) -> None:
    """A server without a port is on Kafka's default one, as aiokafka's clients take it."""
    assert first_server(oauth_settings(bootstrap)) == server


async def test_a_broker_that_never_answers_the_token_check_is_unavailable_not_a_traceback(
) -> None:
    """A listener that takes the connection and never answers: the OAUTHBEARER check
    waits only as long as the start may, and says which servers did not answer."""
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = oauth_settings(f"127.0.0.1:{port}", kafka_connect_timeout_s=1)
    started: list[bool] = []

    async def start() -> None:
        started.append(True)

    try:
        with pytest.raises(BrokerUnavailable, match=f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}"):
            await asyncio.wait_for(start_with_retry("consumer", start, settings), 5)
    finally:
        for writer in held:
            writer.close()
        server.close()
    assert started == []
