"""Record batches as the consumer hands them over: every record isolated, and no batch
expanded past a bound.

aiokafka decodes a fetched batch (decompresses it, then parses its records) only when
``getmany`` hands its records over, and an error there escapes ``getmany`` naming neither the
partition nor the offset, so the same batch fails again after every restart. Inside
:func:`guarded` (the intake wraps each ``getmany`` in it), for the consumers of this process
that fetch within it and no others:

- **A batch that cannot be decoded** (a codec with no library, a compressed payload that
  does not decompress, a record that does not parse) yields the records that parsed before
  the failure as they are, and then one :class:`FetchedRecord` with a ``problem`` and no key
  or value for each remaining offset of the batch, so each becomes one dead letter and the
  partition moves on.
- **Decompression is bounded before it runs.** The expanded size of a compressed batch is
  bounded from its framing before anything is allocated (snappy, lz4 and zstd declare their
  block sizes; gzip is decompressed in a stream with a cap). A batch that could expand past
  ``KAFKA_MAX_DECOMPRESSED_BATCH_BYTES`` is not decompressed: its records are undecodable, as
  above.
- **No record holds more than it can use.** A value or key longer than
  ``KAFKA_MAX_REQUEST_SIZE`` (and than ``MAX_INPUT_BYTES``) is cut to that size: nothing
  larger can be written, and such a record is dead-lettered with its value or key cut
  anyway. Headers past ``KAFKA_MAX_REQUEST_SIZE`` in all are dropped and counted.
  ``serialized_value_size`` and ``serialized_key_size`` keep the original sizes.

A CRC mismatch is left to aiokafka, which raises: the broker checks CRCs when it takes a
batch, so a mismatch on the way out is damage in transit or on disk, not the record's own,
and the intake stops the service cleanly. So is every other error of the fetch path.

How: aiokafka's fetcher builds a ``PartitionRecords`` per partition and fetch, and its record
modules call the codec functions by module-level name. :func:`install` (run once, at import)
puts a subclass of the one and bounded wrappers of the others in their place. Outside
:func:`guarded` both behave exactly as aiokafka's own. ``tests/test_fetched.py`` pins the
aiokafka internals this relies on.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from aiokafka import codec
from aiokafka.consumer import fetcher
from aiokafka.record import default_records
from aiokafka.structs import ConsumerRecord

__all__ = ["BatchTooLarge", "FetchLimits", "FetchedRecord", "expanded_size_bound", "guarded",
           "install"]

CODECS = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
ZSTD_BLOCK_MAX = 128 * 1024  # zstd's Block_Maximum_Size: no block regenerates more
LZ4_BLOCK_MAX = {4: 64 * 1024, 5: 256 * 1024, 6: 1024 * 1024, 7: 4 * 1024 * 1024}
_XERIAL_MAGIC = b"\x82SNAPPY\x00"


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """What one batch and one record may take in memory."""

    max_batch_bytes: int  # KAFKA_MAX_DECOMPRESSED_BATCH_BYTES
    max_value_bytes: int  # values past this can never be written: cut to it
    max_key_bytes: int  # keys past this can never be written (KAFKA_MAX_REQUEST_SIZE)
    max_header_bytes: int  # header bytes past this can never be carried (idem)


_LIMITS: ContextVar[FetchLimits | None] = ContextVar("streamproc_fetch_limits", default=None)


@contextmanager
def guarded(limits: FetchLimits) -> Iterator[None]:
    """Decode what the consumer hands over in this context under ``limits``."""
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)


@dataclass
class FetchedRecord(ConsumerRecord[bytes, bytes]):  # type: ignore[misc]
    """A consumed record; ``problem`` says why the client could not decode it (its key and
    value are then None), ``headers_dropped`` how many of its headers were not kept."""

    problem: str | None = None
    headers_dropped: int = 0


class BatchTooLarge(Exception):
    """A compressed batch would expand past ``KAFKA_MAX_DECOMPRESSED_BATCH_BYTES``."""


# --- the expanded size of a compressed payload, from its framing ----------------------------
def _snappy_bound(payload: bytes) -> int:
    import cramjam

    if payload[:8] != _XERIAL_MAGIC:
        return int(cramjam.snappy.decompress_raw_len(payload))
    total, pos = 0, 16
    while pos < len(payload):
        (length,) = struct.unpack_from(">i", payload, pos)
        pos += 4
        total += int(cramjam.snappy.decompress_raw_len(payload[pos:pos + length]))
        pos += length
    return total


def _past_skippable(payload: bytes, pos: int) -> int:
    """Where the next frame after any skippable frames (LZ4's and zstd's, the same) from
    ``pos`` starts."""
    while pos < len(payload):
        (magic,) = struct.unpack_from("<I", payload, pos)
        if magic & 0xFFFFFFF0 != 0x184D2A50:
            break
        (size,) = struct.unpack_from("<I", payload, pos + 4)
        pos += 8 + size
    return pos


def _lz4_bound(payload: bytes) -> int:
    total, pos = 0, 0
    while (pos := _past_skippable(payload, pos)) < len(payload):
        (magic,) = struct.unpack_from("<I", payload, pos)
        if magic != 0x184D2204:
            raise ValueError(f"not an LZ4 frame (magic {magic:#x})")
        flags, descriptor = payload[pos + 4], payload[pos + 5]
        block_max = LZ4_BLOCK_MAX.get((descriptor >> 4) & 7)
        if block_max is None:
            raise ValueError("an LZ4 frame with an invalid block size")
        pos += 6 + (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0) + 1
        block_checksum = 4 if flags & 0x10 else 0
        while True:
            (size,) = struct.unpack_from("<I", payload, pos)
            pos += 4
            if size == 0:
                break
            stored = size & 0x7FFFFFFF
            total += stored if size & 0x80000000 else block_max
            pos += stored + block_checksum
        pos += 4 if flags & 0x04 else 0
    return total


def _zstd_bound(payload: bytes) -> int:
    total, pos = 0, 0
    while (pos := _past_skippable(payload, pos)) < len(payload):
        (magic,) = struct.unpack_from("<I", payload, pos)
        if magic != 0xFD2FB528:
            raise ValueError(f"not a zstd frame (magic {magic:#x})")
        descriptor = payload[pos + 4]
        single_segment = descriptor >> 5 & 1
        content_size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        pos += 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
        pos += content_size_bytes
        while True:
            header = int.from_bytes(payload[pos:pos + 3], "little")
            pos += 3
            last, kind, size = header & 1, header >> 1 & 3, header >> 3
            if kind == 0:  # raw
                total, pos = total + size, pos + size
            elif kind == 1:  # one byte repeated
                total, pos = total + size, pos + 1
            elif kind == 2:  # compressed
                total, pos = total + ZSTD_BLOCK_MAX, pos + size
            else:
                raise ValueError("a zstd block of the reserved type")
            if last:
                break
        pos += 4 if descriptor >> 2 & 1 else 0
    return total


def expanded_size_bound(codec_id: int, payload: bytes) -> int:
    """An upper bound of what ``payload`` decompresses to, read from its framing without
    decompressing (gzip has no such framing: its bound is its decompression, capped).
    Raises ``ValueError`` when the framing does not parse."""
    try:
        if codec_id == 2:
            return _snappy_bound(payload)
        if codec_id == 3:
            return _lz4_bound(payload)
        if codec_id == 4:
            return _zstd_bound(payload)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"truncated {CODECS[codec_id]} framing: {exc}") from None
    raise ValueError(f"no bound for codec {codec_id}")


def _gzip_capped(payload: bytes, cap: int) -> bytes:
    """Every gzip member of ``payload``, decompressed, failing as soon as it passes ``cap``."""
    data, out = bytes(payload), bytearray()
    while data:
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += stream.decompress(data, cap + 1 - len(out))
        if len(out) > cap or stream.unconsumed_tail:
            raise BatchTooLarge(f"a gzip batch expands past {cap} bytes "
                                "(KAFKA_MAX_DECOMPRESSED_BATCH_BYTES)")
        if not stream.eof:
            raise ValueError("a truncated gzip stream")
        data = stream.unused_data
    return bytes(out)


def _bounded(codec_id: int, decode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def decode_bounded(payload: Any) -> bytes:
        limits = _LIMITS.get()
        if limits is None:
            return decode(payload)
        if codec_id == 1:
            return _gzip_capped(payload, limits.max_batch_bytes)
        payload = bytes(payload)
        bound = expanded_size_bound(codec_id, payload)
        if bound > limits.max_batch_bytes:
            raise BatchTooLarge(f"a {CODECS[codec_id]} batch may expand to {bound} bytes, past "
                                f"{limits.max_batch_bytes} (KAFKA_MAX_DECOMPRESSED_BATCH_BYTES)")
        return decode(payload)

    decode_bounded.__wrapped__ = decode  # type: ignore[attr-defined]
    return decode_bounded


# --- isolating records ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in, in a batch, for a record that could not be read."""

    offset: int
    timestamp: int
    problem: str
    timestamp_type: int = 0
    key: None = None
    value: None = None
    checksum: None = None
    headers: tuple[()] = ()


class _Batch:
    """One fetched record batch: the real one's header, and records that never raise."""

    def __init__(self, batch: Any) -> None:
        self._batch = batch
        self.producer_id = batch.producer_id
        self.is_control_batch = batch.is_control_batch
        self.is_transactional = batch.is_transactional
        self.base_offset = batch.base_offset
        self.next_offset = batch.next_offset

    def validate_crc(self) -> bool:
        return True  # checked before it was wrapped

    def __iter__(self) -> Iterator[Any]:
        batch, last = self._batch, None
        try:
            for record in batch:
                last = record.offset
                yield record
        except Exception as exc:
            what = CODECS.get(batch.compression_type, "uncompressed")
            problem = (f"the record batch at offsets {batch.base_offset}-"
                       f"{batch.next_offset - 1} ({what}) cannot be read: "
                       f"{type(exc).__name__}: {exc}")
            first = batch.base_offset if last is None else last + 1
            for offset in range(first, batch.next_offset):
                yield _Undecodable(offset, -1, problem)


class _Batches:
    """A fetch response's batches, each wrapped in :class:`_Batch` inside :func:`guarded`."""

    def __init__(self, records: Any) -> None:
        self._records = records

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if (_LIMITS.get() is None or batch is None or batch.magic < 2
                or batch.is_control_batch or not batch.validate_crc()):
            return batch  # aiokafka's own handling (a bad CRC raises there)
        return _Batch(batch)


class _PartitionRecords(fetcher.PartitionRecords):  # type: ignore[misc]
    def __init__(self, tp: Any, records: Any, *args: Any) -> None:
        super().__init__(tp, _Batches(records), *args)

    def _consumer_record(self, tp: Any, record: Any) -> Any:
        limits = _LIMITS.get()
        if limits is None:
            return super()._consumer_record(tp, record)
        if isinstance(record, _Undecodable):
            return FetchedRecord(tp.topic, tp.partition, record.offset, -1, 0, None, None, None,
                                 -1, -1, (), problem=record.problem)
        key, value = record.key, record.value
        headers, dropped, room = [], 0, limits.max_header_bytes
        for name, content in record.headers:
            size = len(name) + (len(content) if content is not None else 0)
            if size > room:
                dropped += 1
                continue
            room -= size
            headers.append((name, content))
        return FetchedRecord(
            tp.topic, tp.partition, record.offset, record.timestamp, record.timestamp_type,
            key if key is None or len(key) <= limits.max_key_bytes
            else key[:limits.max_key_bytes],
            value if value is None or len(value) <= limits.max_value_bytes
            else value[:limits.max_value_bytes],
            None, -1 if key is None else len(key), -1 if value is None else len(value),
            tuple(headers), headers_dropped=dropped)


def _record_modules() -> list[ModuleType]:
    modules = [default_records]
    try:
        from aiokafka.record._crecords import default_records as compiled
    except ImportError:  # aiokafka built without its C extension
        return modules
    return [*modules, compiled]


def install() -> None:
    """Put the guarded ``PartitionRecords`` and the bounded decoders in aiokafka's place;
    idempotent. They behave as aiokafka's own outside :func:`guarded`."""
    if fetcher.PartitionRecords is not _PartitionRecords:
        fetcher.PartitionRecords = _PartitionRecords
    names = {1: "gzip_decode", 2: "snappy_decode", 3: "lz4_decode", 4: "zstd_decode"}
    for module in _record_modules():
        for codec_id, name in names.items():
            current = getattr(module, name)
            if not hasattr(current, "__wrapped__"):
                setattr(module, name, _bounded(codec_id, getattr(codec, name)))


install()
