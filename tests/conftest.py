"""Shared fixtures: a tiny local seq2seq checkpoint, built once per test session."""

from __future__ import annotations

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
