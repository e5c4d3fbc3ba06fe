"""Shared fixtures: a tiny local seq2seq checkpoint, built once per test session; the test
broker; and a second broker with a SASL listener, started once for the tests that ask."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def ct2_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted CTranslate2 models go to a session directory, never to the user's cache (the
    services the tests start inherit it through the environment)."""
    directory = tmp_path_factory.mktemp("ct2-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CT2_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamproc.testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The real broker: ``KAFKA_BOOTSTRAP_SERVERS`` when it answers, else one started once per
    test session on ``KAFKA_TEST_PORT`` (default 19092; its data in .kafka/test-data, wiped
    first) and stopped at the end. A broker that cannot be started fails the tests that need
    it; it never skips them."""
    from streamproc.errors import BrokerUnavailable
    from streamproc.kafka.clients import broker_answers
    from streamproc.testing.kafka import LocalBroker
    from tests.helpers import REPO_ROOT, TEST_PORT

    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if given and broker_answers(given):
        yield given
        return
    broker = LocalBroker(TEST_PORT, REPO_ROOT / ".kafka" / "test-data")
    broker.stop(wipe=True)  # a clean state; also reaps a leftover test broker
    try:
        bootstrap = broker.start()
    except BrokerUnavailable as exc:
        pytest.fail(f"no Kafka broker for the integration tests: {exc}")
    yield bootstrap
    broker.stop()


SECOND_BROKER_USER = ("alice", "alice-secret")  # its SCRAM user
SECOND_BROKER_PROPERTIES = "\n".join([
    "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,OAUTHBEARER",
    *(f"listener.name.sasl_plaintext.{m}.sasl.jaas.config="
      "org.apache.kafka.common.security.scram.ScramLoginModule required;"
      for m in ("scram-sha-256", "scram-sha-512")),
    # No server callback handler: Kafka's unsecured JWS validator takes alg=none tokens.
    "listener.name.sasl_plaintext.oauthbearer.sasl.jaas.config="
    "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;",
    # More than its one node: a topic created with the broker's default is refused, which
    # shows the default was asked for.
    "default.replication.factor=2",
])


@pytest.fixture(scope="session")
def second_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(PLAINTEXT bootstrap, SASL_PLAINTEXT bootstrap) of a second real broker: SCRAM-SHA-256
    and -512 for :data:`SECOND_BROKER_USER`, OAUTHBEARER with unsecured tokens, and a
    ``default.replication.factor`` of 2. Started on first use, once per session."""
    from streamproc.testing.kafka import LocalBroker, free_port_pair

    sasl_port = free_port_pair()
    user, password = SECOND_BROKER_USER
    broker = LocalBroker.on_free_ports(tmp_path_factory.mktemp("second-kafka"),
                                       properties=SECOND_BROKER_PROPERTIES,
                                       listeners={"SASL_PLAINTEXT": sasl_port},
                                       scram_users={user: password})
    with broker:
        yield broker.bootstrap, f"127.0.0.1:{sasl_port}"
