"""Guarded decoding of fetched batches (:mod:`streamproc.kafka.fetched`), on batches built
with aiokafka's own record builder and read through its own ``PartitionRecords``; and a batch
damaged on the broker's disk, which must stop the service cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from pathlib import Path

import pytest
from aiokafka import TopicPartition, codec
from aiokafka.consumer import fetcher
from aiokafka.record import default_records
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import ConsumerRecord

from streamproc.errors import FetchFailed
from streamproc.kafka import fetched
from streamproc.kafka.fetched import (
    BatchTooLarge,
    FetchedRecord,
    FetchLimits,
    expanded_size_bound,
    guarded,
)
from streamproc.kafka.processor import StreamProcessor
from streamproc.ops.http import OpsServer
from streamproc.settings import Settings
from tests.helpers import REPO_ROOT, TEST_PORT, identity_worker, produce, running, unique_topic

CODEC_IDS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
LIMITS = FetchLimits(max_batch_bytes=1 << 20, max_value_bytes=100_000, max_key_bytes=50_000,
                     max_header_bytes=10_000)
TP = TopicPartition("in", 0)


def batch(records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]], *,
          codec_id: int = 0, base_offset: int = 0) -> bytearray:
    """One record batch as the broker stores it, built by aiokafka's builder."""
    builder = DefaultRecordBatchBuilder(2, codec_id, 0, -1, -1, -1, 64 << 20)
    for i, (key, value, headers) in enumerate(records):
        builder.append(i, 1_700_000_000_000, key, value, headers)
    built = bytearray(builder.build())
    struct.pack_into(">q", built, 0, base_offset)
    return built


def with_crc(data: bytearray) -> bytes:
    """``data`` with its batch CRC computed again (as a producer would have written it)."""
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))
    return bytes(data)


def read(data: bytes) -> list[ConsumerRecord[bytes, bytes]]:
    """The records aiokafka's consumer hands over for one fetched ``data``."""
    records = fetcher.PartitionRecords(TP, MemoryRecords(data), [], 0, None, None, True,
                                       fetcher.READ_UNCOMMITTED)
    return list(records)


def test_every_codec_kafka_has_is_installed() -> None:
    """aiokafka decodes snappy, lz4 and zstd with cramjam, which it does not install by
    itself: without it, one such batch crashed the consumer, after every restart."""
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()


def test_aiokafka_uses_the_guarded_parts() -> None:
    """The aiokafka internals the guard replaces (kept in their place by ``install``)."""
    assert fetcher.PartitionRecords is fetched._PartitionRecords
    for module in fetched._record_modules():
        for name in ("gzip_decode", "snappy_decode", "lz4_decode", "zstd_decode"):
            assert hasattr(getattr(module, name), "__wrapped__"), (module, name)
    assert default_records in fetched._record_modules()


@pytest.mark.parametrize("name", ["snappy", "lz4", "zstd"])
def test_the_expanded_size_bound_holds_and_is_tight(name: str) -> None:
    encode = getattr(codec, f"{name}_encode")
    for payload in (b"", b"x", os.urandom(70_000), b"\0" * 3_000_000,
                    os.urandom(1000) * 300):
        bound = expanded_size_bound(CODEC_IDS[name], encode(payload))
        assert len(payload) <= bound <= len(payload) + 4 * 1024 * 1024, (name, len(payload))


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_skippable_frames_count_nothing_and_frames_after_them_count(name: str) -> None:
    """A skippable frame (magic 0x184D2A5?, then its size) may stand before, between and
    after real frames; the bound passes over it and still counts the frames behind it."""
    encode = getattr(codec, f"{name}_encode")
    skip = struct.pack("<II", 0x184D2A5A, 5) + b"hello"
    frame = encode(b"\0" * 200_000)
    alone = expanded_size_bound(CODEC_IDS[name], frame)
    assert expanded_size_bound(CODEC_IDS[name], skip + frame + skip + frame + skip) == 2 * alone
    assert alone >= 200_000


def test_gzip_is_decompressed_within_its_cap() -> None:
    decode = fetched._bounded(1, codec.gzip_decode)
    with guarded(LIMITS):
        assert decode(codec.gzip_encode(b"y" * 1000)) == b"y" * 1000
        with pytest.raises(BatchTooLarge, match="KAFKA_MAX_DECOMPRESSED_BATCH_BYTES"):
            decode(codec.gzip_encode(b"\0" * (LIMITS.max_batch_bytes + 1)))
    assert len(decode(codec.gzip_encode(b"\0" * (LIMITS.max_batch_bytes + 1)))) > (
        LIMITS.max_batch_bytes)  # unguarded: aiokafka's own


@pytest.mark.parametrize("name", list(CODEC_IDS))
def test_a_bomb_is_not_expanded_and_its_records_come_out_undecodable(name: str) -> None:
    bomb = batch([(b"k", b"\0" * (2 << 20), []), (b"k2", b"v", [])],
                 codec_id=CODEC_IDS[name], base_offset=40)
    with guarded(LIMITS):
        records = read(bytes(bomb))
    assert [r.offset for r in records] == [40, 41]
    for record in records:
        assert isinstance(record, FetchedRecord)
        assert record.key is None and record.value is None
        assert record.problem is not None and "KAFKA_MAX_DECOMPRESSED_BATCH_BYTES" in (
            record.problem), record.problem


def test_records_before_an_unreadable_one_come_out_whole() -> None:
    """A header key that is not UTF-8 fails aiokafka's parse of the record and of the rest
    of its batch; the records before it are read as they are."""
    data = batch([(b"a", b"1", []), (b"b", b"2", [("mark", b"x")]), (b"c", b"3", [])],
                 base_offset=7)
    data[data.index(b"mark")] = 0xFF
    with pytest.raises(UnicodeDecodeError):  # aiokafka's own, unguarded
        read(with_crc(data))
    with guarded(LIMITS):
        records = read(with_crc(data))
    assert [(r.offset, r.value, r.problem) for r in records][:1] == [(7, b"1", None)]
    assert [r.offset for r in records[1:]] == [8, 9]
    assert all(r.problem and "UnicodeDecodeError" in r.problem for r in records[1:])


def test_a_record_holds_no_more_than_can_be_written() -> None:
    headers = [(f"h{i}", b"v" * 100) for i in range(200)]
    data = batch([(b"k" * 60_000, b"v" * 300_000, headers)], codec_id=4)
    with guarded(LIMITS):
        (record,) = read(bytes(data))
    assert len(record.value) == LIMITS.max_value_bytes
    assert record.serialized_value_size == 300_000
    assert len(record.key) == LIMITS.max_key_bytes and record.serialized_key_size == 60_000
    kept = sum(len(k) + len(v) for k, v in record.headers)
    assert kept <= LIMITS.max_header_bytes and record.headers_dropped == 200 - len(
        record.headers)


def segment_of(topic: str) -> Path:
    """The test broker's log segment of partition 0 of ``topic``."""
    segment = REPO_ROOT / ".kafka" / "test-data" / str(TEST_PORT) / "logs" / f"{topic}-0" / (
        "00000000000000000000.log")
    assert segment.is_file(), f"{segment}: the test session's own broker keeps its data there"
    return segment


@pytest.mark.kafka
async def test_a_batch_damaged_on_the_broker_stops_the_service_cleanly(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """A CRC mismatch is no record's own (the broker checked the CRC when it took the batch):
    the processor stops with one clear line and the reason on /healthz, and commits
    nothing past it; no traceback, no crash."""
    name = unique_topic("damaged")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, kafka_bootstrap_servers=kafka_bootstrap,
        kafka_input_topic=f"{name}.raw", kafka_output_topic=f"{name}.out",
        kafka_dlq_topic=f"{name}.dlq", kafka_group_id=f"{name}-group",
        kafka_create_topics=True, kafka_topic_partitions=1, kafka_commit_interval_ms=200,
        metrics_port=0, shutdown_timeout_s=5)
    from streamproc.testing.kafka import committed_offsets, create_topics

    await create_topics(kafka_bootstrap, {settings.kafka_input_topic: 1})
    await produce(kafka_bootstrap, settings.kafka_input_topic,
                  [(b"k", b'{"id": "x", "text": "Fine. Text."}')] * 3)
    segment = segment_of(settings.kafka_input_topic)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # a value byte of the last batch
    segment.write_bytes(bytes(data))

    caplog.set_level(logging.ERROR)
    async with identity_worker() as worker:
        processor = StreamProcessor(settings, worker)
        ops = OpsServer(settings, worker, processor)
        with pytest.raises(FetchFailed, match="CorruptRecordException"):
            async with running(processor) as task:
                await asyncio.wait_for(asyncio.shield(task), 60)
        alive, why = ops.liveness()
    assert not alive and "fetching from" in why and "CRC" in why, why
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and r.name.startswith("streamproc")]
    assert len(errors) == 1 and errors[0].exc_info is None, errors
    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    assert committed.get(0, 0) <= 2  # nothing past the damaged batch
