"""Shared fixtures: a tiny local seq2seq checkpoint, built once per test session."""

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
