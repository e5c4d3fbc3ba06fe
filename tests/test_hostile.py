"""The hostile-input corpus (:func:`streamproc.testing.records.hostile_records`) among good
records, against the real broker, in both guarantees, with one processor start each.

Every record must end as one summary or exactly one dead letter with the corpus's reason; no
good record may be lost, duplicated, reordered or dead-lettered; the processor must neither
stop nor restart; and every record must be answered within ``SETTLE_BOUND_S`` of the
processor's start. The limits are lowered through the settings, so that an oversize key is
hundreds of kilobytes and a decompression bomb one megabyte: the output topic takes records
of at most ``OUTPUT_LIMIT`` bytes, less than a producer batch (16 KB), so a processor whose
batches ignore the topic's limit has good summaries refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streamproc.kafka.processor import StreamProcessor
from streamproc.settings import Settings
from streamproc.summarize.factory import build_worker
from streamproc.testing.kafka import committed_offsets, create_topics, read_to_end
from streamproc.testing.records import HostileRecord, hostile_records, produce_hostile
from tests.helpers import produce, running, unique_topic

pytestmark = pytest.mark.kafka

MAX_INPUT_BYTES = 200_000
MAX_REQUEST_SIZE = 131_072
MAX_BATCH_BYTES = 1 << 20
MAX_SUMMARY_CHARS = 1_000
OUTPUT_LIMIT = 4_096  # the output topic's max.message.bytes
PARTITIONS = 3
BURST = 150  # good records first, all at once
SETTLE_BOUND_S = 45.0  # every record, of every class, is answered within this of the start


def corpus_settings(bootstrap: str, guarantee: str) -> Settings:
    name = unique_topic("hostile")
    return Settings(  # type: ignore[call-arg]
        _env_file=None, kafka_bootstrap_servers=bootstrap, kafka_input_topic=f"{name}.raw",
        kafka_output_topic=f"{name}.out", kafka_dlq_topic=f"{name}.dlq",
        kafka_group_id=f"{name}-group", processing_guarantee=guarantee, summarizer="identity",
        gpu_device_ids="cpu", gpu_enable_warmup=False, gpu_batch_size=64, gpu_max_delay_ms=10,
        kafka_commit_interval_ms=200, kafka_connect_timeout_s=15, metrics_port=0,
        max_input_bytes=MAX_INPUT_BYTES, kafka_max_request_size=MAX_REQUEST_SIZE,
        kafka_max_decompressed_batch_bytes=MAX_BATCH_BYTES, max_summary_chars=MAX_SUMMARY_CHARS)


def good(n: int) -> HostileRecord:
    value = orjson.dumps({"id": f"good-{n:04d}", "text": f"Good story {n}. It ends well."})
    return HostileRecord(f"good {n}", f"good-{n:04d}".encode(), value, None)


def load(value: bytes) -> Any:
    """An output, read with its integers as written (one has 3,001 digits)."""
    return json.loads(value, parse_int=str)


def headers_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, bytes]:
    return dict(record.headers)


async def run_corpus(bootstrap: str, guarantee: str) -> None:
    settings = corpus_settings(bootstrap, guarantee)
    await create_topics(bootstrap, [
        NewTopic(settings.kafka_input_topic, PARTITIONS, 1),
        NewTopic(settings.kafka_output_topic, 1, 1,
                 topic_configs={"max.message.bytes": str(OUTPUT_LIMIT)}),
        NewTopic(settings.kafka_dlq_topic, 1, 1)])
    corpus = hostile_records(max_input_bytes=MAX_INPUT_BYTES, max_request_size=MAX_REQUEST_SIZE,
                             max_decompressed_batch_bytes=MAX_BATCH_BYTES)
    # A burst first: its summaries fill producer batches past OUTPUT_LIMIT unless the
    # batches are kept within it.
    plan: list[tuple[HostileRecord, int | None]] = [
        (good(n), n % PARTITIONS) for n in range(10_000, 10_000 + BURST)]
    for k, hostile in enumerate(corpus):  # good records around every hostile one
        partition = k % PARTITIONS
        plan += [(good(2 * k), partition), (hostile, partition), (good(2 * k + 1), partition)]
    metadata = await produce_hostile(bootstrap, settings.kafka_input_topic, plan)
    sent = {(m.partition, m.offset): record for (record, _), m in zip(plan, metadata, strict=True)}
    ends: dict[int, int] = defaultdict(int)
    for m in metadata:
        ends[m.partition] = max(ends[m.partition], m.offset + 1)

    started = time.time()
    async with (build_worker(settings) as worker, StreamProcessor(settings, worker) as processor,
                running(processor) as task):
        await asyncio.wait_for(processor.joined.wait(), 60)
        deadline = time.monotonic() + 120
        while processor.stats.answered() < len(sent) or await committed_offsets(
                bootstrap, settings.kafka_group_id, settings.kafka_input_topic) != dict(ends):
            assert not task.done() and processor.fatal is None, processor.fatal
            assert time.monotonic() < deadline, "the corpus was not all committed in 120 s"
            await asyncio.sleep(0.5)
        assert not task.done() and processor.fatal is None, processor.fatal

    outputs = await read_to_end(bootstrap, settings.kafka_output_topic)
    dead = await read_to_end(bootstrap, settings.kafka_dlq_topic)
    answers: dict[tuple[int, int], list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    order: dict[int, list[int]] = defaultdict(list)
    for record in outputs:
        source = load(record.value)["source"]
        partition, offset = int(source["partition"]), int(source["offset"])
        answers[partition, offset].append(record)
        order[partition].append(offset)
    for record in dead:
        headers = headers_of(record)
        answers[int(headers["streamproc.source.partition"]),
                int(headers["streamproc.source.offset"])].append(record)

    problems = []
    for source, record in sent.items():
        got = answers.get(source, [])
        if len(got) != 1:
            problems.append(f"{record.what}: {len(got)} answers")
            continue
        answer = got[0]
        if record.reason is None and answer.topic != settings.kafka_output_topic:
            problems.append(f"{record.what}: dead-lettered as "
                            f"{headers_of(answer)['streamproc.error.code']!r}")
        elif (record.reason is not None
              and headers_of(answer).get("streamproc.error.code") != record.reason.encode()):
            problems.append(f"{record.what}: {headers_of(answer).get('streamproc.error.code')!r}"
                            f", not {record.reason!r}")
        if answer.timestamp / 1000 - started > SETTLE_BOUND_S:
            problems.append(f"{record.what}: answered {answer.timestamp / 1000 - started:.1f} s "
                            f"after the start, past {SETTLE_BOUND_S} s")
    assert problems == [], "\n".join(problems)
    assert set(answers) == set(sent)
    for partition, offsets in order.items():
        assert offsets == sorted(offsets), f"partition {partition}'s summaries out of order"
    check_classes(sent, answers)


def check_classes(sent: dict[tuple[int, int], HostileRecord],
                  answers: dict[tuple[int, int], list[ConsumerRecord[bytes, bytes]]]) -> None:
    """What each class's answer must hold besides its reason."""
    by_what = {record.what: answers[source][0] for source, record in sent.items()}
    for what, answer in by_what.items():
        if answer.value is not None and answer.topic.endswith(".out"):
            summary: dict[str, Any] = load(answer.value)
            assert len(summary["summary"]) <= MAX_SUMMARY_CHARS, what
    assert b'"n":18446744073709551617' in by_what["an integer past 64 bits"].value
    assert b'"n":1' + b"0" * 3000 + b"," in by_what["10**3000"].value
    assert "since_source_timestamp" not in load(
        by_what["a timestamp of 1 ms"].value)["timings_ms"]
    assert by_what["a tombstone"].value is None
    for what in ("an oversize key and no value", "an oversize key on a good item"):
        letter = by_what[what]
        assert headers_of(letter)["streamproc.key.truncated_from"] == str(
            MAX_REQUEST_SIZE + 4096).encode(), what
        assert len(letter.key) < MAX_REQUEST_SIZE, what
    headers = headers_of(by_what["10,000 headers"])
    assert "h0" in headers and len(headers) < 10_000
    forged = headers_of(by_what["streamproc's own headers, forged"])
    assert forged == {"trace": b"t-1"}
    bomb = headers_of(by_what["a zstd decompression bomb"])
    assert b"KAFKA_MAX_DECOMPRESSED_BATCH_BYTES" in bomb["streamproc.error.reason"]
    assert by_what["a zstd decompression bomb"].value is None


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_the_hostile_corpus_ends_record_by_record_among_good_records(
        kafka_bootstrap: str, guarantee: str) -> None:
    await run_corpus(kafka_bootstrap, guarantee)


async def set_max_message_bytes(bootstrap: str, topic: str, limit: int) -> None:
    """Change ``topic``'s ``max.message.bytes`` and wait until the broker reports it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": limit})
        await admin.alter_configs([resource])
        deadline = time.monotonic() + 30
        while True:
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})])
            entries = response.to_object()["resources"][0]["config_entries"]
            if any(e["config_names"] == "max.message.bytes" and e["config_value"] == str(limit)
                   for e in entries):
                return
            assert time.monotonic() < deadline, "the broker did not take the new limit"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_record_whose_batch_was_refused_is_written_alone_not_dead_lettered(
        kafka_bootstrap: str, guarantee: str, caplog: pytest.LogCaptureFixture) -> None:
    """The output topic's limit drops below a producer batch after the processor read it:
    the broker refuses whole batches of summaries that each fit. Each is written again alone
    in its batch, and none is dead-lettered."""
    settings = corpus_settings(kafka_bootstrap, guarantee)
    await create_topics(kafka_bootstrap, {settings.kafka_input_topic: PARTITIONS,
                                          settings.kafka_output_topic: 1,
                                          settings.kafka_dlq_topic: 1})
    items = [good(n) for n in range(90)]
    async with (build_worker(settings) as worker, StreamProcessor(settings, worker) as processor,
                running(processor) as task):
        await asyncio.wait_for(processor.joined.wait(), 60)
        await set_max_message_bytes(kafka_bootstrap, settings.kafka_output_topic, 2048)
        # all at once, so that their summaries go out together, in batches past the limit
        await produce(kafka_bootstrap, settings.kafka_input_topic,
                      [(item.key, item.value) for item in items])
        deadline = time.monotonic() + 90
        while processor.stats.answered() < len(items):
            assert not task.done() and processor.fatal is None, processor.fatal
            assert time.monotonic() < deadline, processor.stats.as_dict()
            await asyncio.sleep(0.2)
    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    dead = await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic)
    refusals = [r for r in caplog.records if r.name == "streamproc.sinks"
                and ("producer replaced" in r.getMessage()
                     or "MessageSizeTooLargeError" in r.getMessage())]
    assert refusals, "no batch was refused: the test did not test anything"
    assert [headers_of(letter) for letter in dead] == []
    assert sorted(load(r.value)["id"] for r in outputs) == sorted(
        load(item.value)["id"] for item in items)
