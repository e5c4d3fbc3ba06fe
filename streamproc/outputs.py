"""What is written for each consumed record: its summary, or a dead letter.

A summary goes to ``KAFKA_OUTPUT_TOPIC`` as a :class:`~streamproc.messages.Summary`, keyed by
the input's key (or the item id). A dead letter goes to ``KAFKA_DLQ_TOPIC``: the input's value
and key byte for byte, with headers naming the error and the source record.

Every record is checked against the largest record its topic takes (the smaller of
``KAFKA_MAX_REQUEST_SIZE`` and the topic's ``max.message.bytes``) before it is sent. A summary
that would not fit becomes a dead letter with reason ``output_too_large``; a dead letter that
would not fit has its value cut, and a header gives the original length. So no output is ever
refused for its size, and a refusal the broker still makes for a record's own reason
(:meth:`Outputs.refused`) turns it into a dead letter too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from .errors import InvalidRecord, StreamprocError
from .kafka_clients import record_size
from .messages import FeedItem, SourceRef, Summary
from .settings import Settings

__all__ = ["Outbound", "Outputs", "dead_letter_headers"]

TRUNCATED_HEADER = "streamproc.value.truncated_from"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One record to write for one consumed record (``source``)."""

    source: ConsumerRecord[bytes, bytes]
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    reason_code: str | None  # None for a summary, else the dead letter's reason code

    @property
    def offset(self) -> int:
        return int(self.source.offset)

    @property
    def size(self) -> int:
        return record_size(self.key, self.value, self.headers)


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


class Outputs:
    """Builds the outbound records, within the size limits ``limits`` (by topic) that
    :func:`~streamproc.kafka_clients.ensure_topics` read from the broker."""

    def __init__(self, settings: Settings, limits: dict[str, int]) -> None:
        self.output_topic = settings.kafka_output_topic
        self.dlq_topic = settings.kafka_dlq_topic
        self.model = settings.resolved_model_name
        self.limits = limits

    def limit(self, topic: str) -> int:
        return self.limits.get(topic, 1024 * 1024)

    def summary(self, record: ConsumerRecord[bytes, bytes], item: FeedItem, text: str,
                fetched_at: float) -> Outbound:
        """``fetched_at`` (monotonic) starts ``timings_ms.processing``. A summary too large
        for the output topic becomes a dead letter instead."""
        timings = {"processing": (time.monotonic() - fetched_at) * 1000}
        if record.timestamp and record.timestamp > 0:
            timings["since_source_timestamp"] = time.time() * 1000 - record.timestamp
        value = Summary(item.id, text, self.model,
                        SourceRef(record.topic, record.partition, record.offset),
                        timings, item.passthrough()).to_json()
        out = Outbound(record, self.output_topic, value, record.key or item.id.encode(), [],
                       None)
        size, limit = out.size, self.limit(self.output_topic)
        if size > limit:
            return self.dead_letter(record, InvalidRecord(
                f"its summary record is {size} bytes; {self.output_topic} takes at most "
                f"{limit} (KAFKA_MAX_REQUEST_SIZE, max.message.bytes)", "output_too_large"))
        return out

    def dead_letter(self, record: ConsumerRecord[bytes, bytes],
                    error: StreamprocError) -> Outbound:
        """The source record's value and key, with the error's headers; the value is cut to
        fit the DLQ topic when it must be."""
        headers = dead_letter_headers(error, record.topic, record.partition, record.offset)
        value = record.value or b""
        limit = self.limit(self.dlq_topic)
        if record_size(record.key, value, headers) > limit:
            headers.append((TRUNCATED_HEADER, str(len(value)).encode()))
            room = limit - record_size(record.key, b"", headers) - 16
            value = value[:max(room, 0)]
        return Outbound(record, self.dlq_topic, value, record.key, headers, error.reason_code)

    def refused(self, out: Outbound, exc: BaseException) -> Outbound | None:
        """The dead letter that replaces an output the broker refused for its own reason;
        ``None`` when the refused record already was a dead letter (nothing left to try)."""
        if out.reason_code is not None:
            return None
        return self.dead_letter(out.source, InvalidRecord(
            f"the broker refused its summary record: {type(exc).__name__}: {exc}",
            "output_refused"))
