"""Logging: plain text by default, one JSON object a line with ``LOG_FORMAT=json``."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from ..settings import OpsSettings

__all__ = ["JsonFormatter", "TransientCoordinatorErrors", "configure_logging"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TransientCoordinatorErrors(logging.Filter):
    """aiokafka logs a retriable failure to find the group coordinator as ERROR, then retries.
    On a fresh broker that is routine (``GroupCoordinatorNotAvailableError`` until the
    offsets topic exists), not an error: such records become DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == "Group Coordinator Request failed: %s" and args \
                and getattr(args[0], "retriable", False):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(settings: OpsSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("aiokafka", "kafka", "transformers", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    if not any(isinstance(f, TransientCoordinatorErrors) for f in coordinator.filters):
        coordinator.addFilter(TransientCoordinatorErrors())
