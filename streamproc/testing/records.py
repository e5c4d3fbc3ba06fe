"""Feed records for tests and demos: deliberately bad ones, one of each kind the dead-letter
topic must explain, with the reason code each must get; and a hostile corpus, every kind of
input that once stopped or stalled a consumer, with what each must end as.

``BAD_RECORDS`` are plain values. :func:`hostile_records` builds the corpus for the limits a
test sets (so an "oversize" key is hundreds of kilobytes, not megabytes), and
:func:`produce_hostile` writes it, each record with its own compression, headers and
timestamp, in order, with aiokafka's producer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = ["BAD_RECORDS", "CODECS", "BadRecord", "HostileRecord", "hostile_records",
           "produce_hostile"]

CODECS = ("gzip", "snappy", "lz4", "zstd")


class BadRecord(NamedTuple):
    what: str
    value: bytes
    reason: str  # the dead letter's streamproc.error.code


BAD_RECORDS: tuple[BadRecord, ...] = (
    BadRecord("not JSON", b"<rss><item>not json</item></rss>", "not_json"),
    BadRecord("invalid UTF-8", b'{"id": "bad-utf8", "text": "caf\xe9"}', "invalid_utf8"),
    BadRecord("JSON that is not an object", b'["id", "text"]', "not_object"),
    BadRecord("missing text", b'{"id": "bad-no-text"}', "missing_text"),
    BadRecord("wrong type", b'{"id": 42, "text": "numbers are not ids"}', "wrong_type"),
)


class HostileRecord(NamedTuple):
    """One record of the corpus: what it must end as (``reason``: its dead letter's code, or
    None for a summary), and how it is written."""

    what: str
    key: bytes | None
    value: bytes | None
    reason: str | None
    headers: tuple[tuple[str, bytes], ...] = ()
    compression: str | None = None  # the producer's compression_type for its batch
    timestamp_ms: int | None = None  # None: the producer's clock


def _item(item_id: str, text: str, **extra: str) -> bytes:
    import orjson

    return orjson.dumps({"id": item_id, "text": text, **extra})


def _raw(item_id: str, text_json: bytes, extra: bytes = b"") -> bytes:
    """A feed item written by hand, for what a JSON encoder would not write."""
    return b'{"id": "' + item_id.encode() + b'", "text": ' + text_json + extra + b"}"


def hostile_records(*, max_input_bytes: int, max_request_size: int,
                    max_decompressed_batch_bytes: int) -> tuple[HostileRecord, ...]:
    """The corpus, sized to the service's ``MAX_INPUT_BYTES``, ``KAFKA_MAX_REQUEST_SIZE`` and
    ``KAFKA_MAX_DECOMPRESSED_BATCH_BYTES``. Each id starts with ``hostile-``."""
    story = "The council met on Tuesday. It approved the budget. Buses will run later."
    bomb = max_decompressed_batch_bytes + 1024  # zeros: a few kilobytes compressed
    key_size = max_request_size + 4096
    records = [
        *(HostileRecord(f"a {codec} batch", f"hostile-{codec}".encode(),
                        _item(f"hostile-{codec}", story), None, compression=codec)
          for codec in CODECS),
        *(HostileRecord(f"a {codec} decompression bomb", f"hostile-{codec}-bomb".encode(),
                        _item(f"hostile-{codec}-bomb", "0" * bomb), "undecodable",
                        compression=codec)
          for codec in CODECS),
        HostileRecord("an oversize key and no value", b"k" * key_size, b"", "empty"),
        HostileRecord("an oversize key on a good item", b"k" * key_size,
                      _item("hostile-big-key", story), "output_too_large"),
        HostileRecord("a tombstone", b"hostile-tombstone", None, "empty"),
        HostileRecord("a value over MAX_INPUT_BYTES", b"hostile-too-large",
                      _item("hostile-too-large", "x" * max_input_bytes), "too_large"),
        *(HostileRecord(bad.what, f"hostile-{bad.reason}".encode(), bad.value, bad.reason)
          for bad in BAD_RECORDS),
        HostileRecord("a lone surrogate", b"hostile-surrogate",
                      _raw("hostile-surrogate", b'"lone \\ud800 surrogate."'), "not_json"),
        HostileRecord("a byte order mark", b"hostile-bom",
                      b"\xef\xbb\xbf" + _item("hostile-bom", story), "not_json"),
        HostileRecord("nesting too deep to write back", b"hostile-deep",
                      _raw("hostile-deep", b'"deep."', b', "x": ' + b"[" * 300 + b"]" * 300),
                      "unserializable"),
        HostileRecord("nesting too deep to read", b"hostile-deeper",
                      _raw("hostile-deeper", b'"deeper."',
                           b', "x": ' + b"[" * 2000 + b"]" * 2000), "not_json"),
        HostileRecord("NUL characters", b"hostile-nul",
                      _raw("hostile-nul", b'"nul \\u0000 inside. Then more."'), None),
        HostileRecord("a huge id", b"hostile-huge-id", _item("hostile-" + "i" * 1000, story),
                      None),
        HostileRecord("10,000 headers", b"hostile-headers", _item("hostile-headers", story),
                      None, headers=tuple((f"h{i}", b"v") for i in range(10_000))),
        HostileRecord("streamproc's own headers, forged", b"hostile-forged",
                      _item("hostile-forged", story), None,
                      headers=(("streamproc.error.code", b"forged"), ("trace", b"t-1"))),
        HostileRecord("a binary key", bytes(range(256)), _item("hostile-binary-key", story),
                      None),
        HostileRecord("an integer past 64 bits", b"hostile-bigint",
                      _raw("hostile-bigint", b'"big."', b', "n": 18446744073709551617'), None),
        HostileRecord("10**3000", b"hostile-huge-number",
                      _raw("hostile-huge-number", b'"huge."', b', "n": 1' + b"0" * 3000),
                      None),
        HostileRecord("a timestamp of 1 ms", b"hostile-epoch", _item("hostile-epoch", story),
                      None, timestamp_ms=1),
        HostileRecord("initials, over and over", b"hostile-initials",
                      _item("hostile-initials", "A. " * (max_input_bytes // 4)), None),
        HostileRecord("one huge word", b"hostile-word",
                      _item("hostile-word", "w" * (max_input_bytes // 2)), None),
        HostileRecord("combining characters", b"hostile-combining",
                      _item("hostile-combining", "e" + "\u0301" * (max_input_bytes // 5)),
                      None),
    ]
    return tuple(records)


async def produce_hostile(bootstrap: str, topic: str,
                          records: Sequence[tuple[HostileRecord, int | None]]) -> list[Any]:
    """Write ``(record, partition)`` pairs in order (``partition`` None: by key), each in a
    batch of its own compressed as the record says; each one's metadata."""
    from aiokafka import AIOKafkaProducer

    producers: dict[str | None, AIOKafkaProducer] = {}
    try:
        for codec in {record.compression for record, _ in records}:
            producers[codec] = AIOKafkaProducer(
                bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                compression_type=codec, max_request_size=64 * 1024 * 1024)
            await producers[codec].start()
        sent = []
        for record, partition in records:
            delivery = await producers[record.compression].send(
                topic, value=record.value, key=record.key, partition=partition,
                headers=list(record.headers), timestamp_ms=record.timestamp_ms)
            sent.append(await asyncio.wait_for(delivery, 30))
        return sent
    finally:
        for producer in producers.values():
            await producer.stop()
