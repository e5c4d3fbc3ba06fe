"""Shared fixtures: a tiny local seq2seq checkpoint, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamproc.devtools import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The real broker: started once per test session (scripts/kafka.sh), stopped at the end.
    A broker that cannot be started fails the tests that need it; it never skips them."""
    from tests.kafka_broker import BrokerUnavailable, ensure_broker

    try:
        bootstrap, stop = ensure_broker()
    except BrokerUnavailable as exc:
        pytest.fail(f"no Kafka broker for the integration tests: {exc}")
    yield bootstrap
    stop()
