"""What is written for each consumed record: its summary, or a dead letter.

A summary goes to ``KAFKA_OUTPUT_TOPIC`` as a :class:`~streamproc.messages.Summary`, keyed by
the input's key (or the item id). A dead letter goes to ``KAFKA_DLQ_TOPIC``: the input's value
and key byte for byte, with headers naming the error and the source record. A value too big
for one produce request is cut, and a header gives its original length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from .errors import StreamprocError
from .messages import FeedItem, SourceRef, Summary

__all__ = ["DLQ_MAX_VALUE_BYTES", "Outbound", "dead_letter", "dead_letter_headers", "summary"]

# aiokafka's default max_request_size is 1 MiB; keep room for the key and the headers.
DLQ_MAX_VALUE_BYTES = 1024 * 1024 - 64 * 1024


@dataclass(frozen=True, slots=True)
class Outbound:
    """One record to write for one consumed offset."""

    offset: int
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    reason_code: str | None  # None for a summary, else the dead letter's reason code
    source_timestamp_ms: int | None = None


def dead_letter_headers(error: StreamprocError, topic: str, partition: int,
                        offset: int) -> list[tuple[str, bytes]]:
    """Headers of a DLQ record; its value is the source record's value, byte for byte."""
    return [
        ("streamproc.error.class", type(error).__name__.encode()),
        ("streamproc.error.code", error.reason_code.encode()),
        ("streamproc.error.reason", error.reason.encode("utf-8", "replace")[:4096]),
        ("streamproc.source.topic", topic.encode()),
        ("streamproc.source.partition", str(partition).encode()),
        ("streamproc.source.offset", str(offset).encode()),
    ]


def dead_letter(record: ConsumerRecord[bytes, bytes], error: StreamprocError,
                topic: str) -> Outbound:
    headers = dead_letter_headers(error, record.topic, record.partition, record.offset)
    value = record.value or b""
    if len(value) > DLQ_MAX_VALUE_BYTES:  # would not fit in one produce request
        headers.append(("streamproc.value.truncated_from", str(len(value)).encode()))
        value = value[:DLQ_MAX_VALUE_BYTES]
    return Outbound(record.offset, topic, value, record.key, headers, error.reason_code,
                    record.timestamp)


def summary(record: ConsumerRecord[bytes, bytes], item: FeedItem, text: str, model: str,
            topic: str, fetched_at: float) -> Outbound:
    """``fetched_at`` (monotonic) starts ``timings_ms.processing``."""
    timings = {"processing": (time.monotonic() - fetched_at) * 1000}
    if record.timestamp and record.timestamp > 0:
        timings["since_source_timestamp"] = time.time() * 1000 - record.timestamp
    value = Summary(item.id, text, model, SourceRef(record.topic, record.partition,
                                                    record.offset),
                    timings, item.passthrough()).to_json()
    return Outbound(record.offset, topic, value, record.key or item.id.encode(), [], None,
                    record.timestamp)
