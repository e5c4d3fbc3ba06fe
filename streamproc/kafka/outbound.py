"""What is written for each consumed record: its summary, or a dead letter.

A summary goes to ``KAFKA_OUTPUT_TOPIC`` as a :class:`~streamproc.records.Summary`, keyed by
the input's key (or the item id). A dead letter goes to ``KAFKA_DLQ_TOPIC``: the input's value
and key byte for byte (a tombstone's null value stays null), with headers naming the error
and the source record. Both carry the input's headers, except those named as streamproc's own
(:data:`OWN_HEADERS`, which a producer could otherwise forge), where they fit. With tracing
on (:mod:`.tracing`), the record's own trace context replaces the input's ``traceparent`` and
``tracestate``.

Every record is checked against the largest record its topic takes (the smaller of
``KAFKA_MAX_REQUEST_SIZE`` and the topic's ``max.message.bytes``) before it is sent:

- A summary that does not fit with the input's headers drops them, one by one from the end;
  one that does not fit without them becomes a dead letter with reason ``output_too_large``.
- A dead letter always fits: its value is cut first, then its key, each with a header giving
  the original length; the input's headers go in where room is left, and a header counts
  those that did not.

So no output is refused for its own size. A refusal the broker still makes (the record was in
a batch larger than the topic takes, or the topic's limit changed) is retried with the record
alone in its batch (:meth:`Outputs.refused`); refused alone, a summary becomes a dead letter.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from ..errors import InvalidRecord, StreamprocError
from ..records import FeedItem, SourceRef, Summary
from ..settings import KafkaSettings
from .clients import record_size
from .tracing import TRACE_HEADERS

__all__ = ["OWN_HEADERS", "Header", "Outbound", "Outputs", "dead_letter_headers", "source_age_s"]

Header = tuple[str, bytes | None]
VALUE_TRUNCATED = "streamproc.value.truncated_from"
KEY_TRUNCATED = "streamproc.key.truncated_from"
HEADERS_DROPPED = "streamproc.headers.dropped"
# The headers streamproc writes: never copied from an input record.
OWN_HEADERS = frozenset({
    "streamproc.error.class", "streamproc.error.code", "streamproc.error.reason",
    "streamproc.source.topic", "streamproc.source.partition", "streamproc.source.offset",
    VALUE_TRUNCATED, KEY_TRUNCATED, HEADERS_DROPPED,
})
_OWN_AND_TRACE = OWN_HEADERS | frozenset(TRACE_HEADERS)  # a traced record's own replace these
SIZE_SLACK = 16  # varints that grow when a cut changes a length
HEADER_OVERHEAD = 10  # the two length varints of one header, at most
# HEADERS_DROPPED with a count of up to 10 digits: kept free by every cut of a dead letter.
COUNT_HEADER_ROOM = len(HEADERS_DROPPED) + 10 + HEADER_OVERHEAD
# A source timestamp outside [now - MAX_SOURCE_AGE_S, now + MAX_CLOCK_SKEW_S] is the
# producer's to set and says nothing about latency: it is left out of the metrics.
MAX_SOURCE_AGE_S = 7 * 24 * 3600.0
MAX_CLOCK_SKEW_S = 300.0


def source_age_s(record: ConsumerRecord[bytes, bytes], now: float | None = None) -> float | None:
    """Seconds from the record's timestamp to ``now`` (wall clock), or None when the
    timestamp is missing or implausible (producers set it: 1 ms, or next year)."""
    timestamp: int | None = record.timestamp
    if timestamp is None or timestamp <= 0:
        return None
    age = (time.time() if now is None else now) - timestamp / 1000
    if -MAX_CLOCK_SKEW_S <= age <= MAX_SOURCE_AGE_S:
        return max(age, 0.0)
    return None


@dataclass(frozen=True, slots=True)
class Outbound:
    """One record to write for one consumed record (``source``). ``alone``: it goes out in a
    batch of its own (its batch was refused once)."""

    source: ConsumerRecord[bytes, bytes]
    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[Header]
    reason_code: str | None  # None for a summary, else the dead letter's reason code
    alone: bool = False

    @property
    def offset(self) -> int:
        return int(self.source.offset)

    @property
    def size(self) -> int:
        return _size(self.key, self.value, self.headers)


def _size(key: bytes | None, value: bytes | None, headers: Sequence[Header]) -> int:
    return record_size(key, value, list(headers))


def _header_cost(header: Header) -> int:
    name, content = header
    return len(name.encode("utf-8", "surrogatepass")) + len(content or b"") + HEADER_OVERHEAD


def dead_letter_headers(error: StreamprocError, topic: str, partition: int,
                        offset: int) -> list[Header]:
    """streamproc's own headers of a DLQ record."""
    return [
        ("streamproc.error.class", type(error).__name__.encode()),
        ("streamproc.error.code", error.reason_code.encode()),
        ("streamproc.error.reason", error.reason.encode("utf-8", "replace")[:4096]),
        ("streamproc.source.topic", topic.encode()),
        ("streamproc.source.partition", str(partition).encode()),
        ("streamproc.source.offset", str(offset).encode()),
    ]


def _original_size(data: bytes | None, serialized: int | None) -> int:
    """The size a key or value had on the wire (the consumer may hold it cut)."""
    held = -1 if data is None else len(data)
    return max(held, serialized if isinstance(serialized, int) else -1)


class Outputs:
    """Builds the outbound records, within the size limits ``limits`` (by topic) that
    :func:`~streamproc.kafka.topics.ensure_topics` read from the broker."""

    def __init__(self, settings: KafkaSettings, model: str,
                 limits: dict[str, int] | None = None) -> None:
        self.output_topic = settings.kafka_output_topic
        self.dlq_topic = settings.kafka_dlq_topic
        self.model = model
        self.limits = dict(limits or {})

    def limit(self, topic: str) -> int:
        return self.limits.get(topic, 1024 * 1024)

    @staticmethod
    def carried(record: ConsumerRecord[bytes, bytes],
                trace: Sequence[Header] = ()) -> list[Header]:
        """The input's headers an output carries: all but streamproc's own names; with a
        ``trace`` context, that in place of the input's."""
        left_out = _OWN_AND_TRACE if trace else OWN_HEADERS
        return [*trace, *((name, content) for name, content in record.headers or ()
                          if name not in left_out)]

    def summary(self, record: ConsumerRecord[bytes, bytes], item: FeedItem, text: str,
                fetched_at: float, trace: Sequence[Header] = ()) -> Outbound:
        """``fetched_at`` (monotonic) starts ``timings_ms.processing``; ``trace``: the
        headers of the record's trace context, if traced. A summary too large for the output
        topic becomes a dead letter instead."""
        timings = {"processing": (time.monotonic() - fetched_at) * 1000}
        age = source_age_s(record)
        if age is not None:
            timings["since_source_timestamp"] = age * 1000
        value = Summary(item.id, text, self.model,
                        SourceRef(record.topic, record.partition, record.offset),
                        timings, item.passthrough()).to_json()
        key = record.key or item.id.encode()
        limit = self.limit(self.output_topic)
        size = _size(key, value, [])
        if size > limit:
            return self.dead_letter(record, InvalidRecord(
                f"its summary record is {size} bytes; {self.output_topic} takes at most "
                f"{limit} (KAFKA_MAX_REQUEST_SIZE, max.message.bytes)", "output_too_large"),
                trace)
        headers, _ = _fill(self.carried(record, trace), limit - size - SIZE_SLACK)
        return Outbound(record, self.output_topic, value, key, headers, None)

    def dead_letter(self, record: ConsumerRecord[bytes, bytes], error: StreamprocError,
                    trace: Sequence[Header] = ()) -> Outbound:
        """The source record's value and key, with the error's headers, cut to fit the DLQ
        topic: the value first, then the key, each with its original length in a header;
        then as many of the input's headers as fit."""
        limit = self.limit(self.dlq_topic)
        headers = dead_letter_headers(error, record.topic, record.partition, record.offset)
        key, value = record.key, record.value
        key_size = _original_size(key, getattr(record, "serialized_key_size", None))
        value_size = _original_size(value, getattr(record, "serialized_value_size", None))
        if value is not None and (len(value) < value_size
                                  or _size(key, value, headers) > limit):
            headers.append((VALUE_TRUNCATED, str(value_size).encode()))
            room = limit - _size(key, b"", headers) - SIZE_SLACK - COUNT_HEADER_ROOM
            value = value[:max(room, 0)]
        if key is not None and (len(key) < key_size or _size(key, value, headers) > limit):
            headers.append((KEY_TRUNCATED, str(key_size).encode()))
            room = limit - _size(b"", value, headers) - SIZE_SLACK - COUNT_HEADER_ROOM
            key = key[:max(room, 0)]
        carried = self.carried(record, trace)
        dropped = int(getattr(record, "headers_dropped", 0) or 0)
        room = limit - _size(key, value, headers) - SIZE_SLACK - COUNT_HEADER_ROOM
        kept, left_out = _fill(carried, room)
        if dropped + left_out:
            headers.append((HEADERS_DROPPED, str(dropped + left_out).encode()))
        headers.extend(kept)
        if key is None and value is None:  # a client may not send a record with neither
            key = b""
        return Outbound(record, self.dlq_topic, value, key, headers, error.reason_code)

    def refused(self, out: Outbound, exc: BaseException) -> Outbound | None:
        """What replaces an output the broker refused for its own reason: first the same
        record alone in its batch (the batch, not the record, may have been too large); a
        summary refused alone becomes a dead letter; ``None`` for a dead letter refused
        alone (nothing left to try)."""
        if not out.alone:
            return dataclasses.replace(out, alone=True)
        if out.reason_code is not None:
            return None
        letter = self.dead_letter(out.source, InvalidRecord(
            f"the broker refused its summary record: {type(exc).__name__}: {exc}",
            "output_refused"), [h for h in out.headers if h[0] in TRACE_HEADERS])
        return dataclasses.replace(letter, alone=True)


def _fill(headers: list[Header], room: int) -> tuple[list[Header], int]:
    """The headers that fit in ``room`` bytes, in order; and how many did not."""
    kept: list[Header] = []
    for header in headers:
        cost = _header_cost(header)
        if cost <= room:
            kept.append(header)
            room -= cost
    return kept, len(headers) - len(kept)
