"""Logging set-up: what a new user sees from aiokafka."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiokafka import errors

from streamproc.ops.logs import configure_logging
from streamproc.settings import load_settings


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def coordinator_lookup_fails(error: Exception) -> None:
    """What aiokafka's GroupCoordinator.ensure_coordinator_known logs before it retries."""
    logging.getLogger("aiokafka.consumer.group_coordinator").error(
        "Group Coordinator Request failed: %s", error)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_retriable_coordinator_lookup_failure_is_not_an_error(
    level: str, capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(load_settings(None, log_level=level))
    coordinator_lookup_fails(errors.GroupCoordinatorNotAvailableError())
    coordinator_lookup_fails(errors.GroupAuthorizationFailedError("streamproc"))
    lines = capsys.readouterr().err.splitlines()
    errors_shown = [line for line in lines if " ERROR " in line]
    assert len(errors_shown) == 1 and "GroupAuthorizationFailedError" in errors_shown[0]
    transient = [line for line in lines if "CoordinatorNotAvailable" in line]
    if level == "INFO":
        assert transient == []
    else:
        assert len(transient) == 1 and " DEBUG " in transient[0]
