"""The stream processor against the real local Kafka broker (no fakes of Kafka).

Every test uses its own topics and consumer group. The round trip and the bad-input test run
the tiny seq2seq checkpoint; the tests about pipeline mechanics (restart, rebalance, a
poisoned item) run a GPUWorker around the identity summarizer, sometimes slowed down by a
sleep so that the interesting moment (half done, a rebalance) can be reached reliably.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError

from streamproc.errors import RebalanceFailed
from streamproc.kafka import intake
from streamproc.kafka.partition import Partition, Phase
from streamproc.kafka.processor import StreamProcessor
from streamproc.settings import Settings
from streamproc.summarize.factory import build_worker
from streamproc.testing.kafka import committed_offsets, partitions_of, read_to_end
from tests.helpers import (
    end_offsets,
    identity_worker,
    produce,
    running,
    service_topics,
    settings_for,
)

pytestmark = pytest.mark.kafka

REPO_ROOT = Path(__file__).resolve().parent.parent
Record = ConsumerRecord[bytes, bytes]

SENTENCES = (
    "The city council approved a new budget on Tuesday after a long debate about transport.",
    "Officials said the plan would add more buses to busy routes and repair old bridges.",
    "Shares of technology companies rose sharply as investors welcomed strong earnings.",
    "Heavy rain caused flooding in several coastal towns over the weekend.",
    "Scientists reported the discovery of a new species of frog in a remote forest.",
    "The national football team won its opening match of the tournament with a late goal.",
    "A new report from the health ministry found that more people exercise regularly.",
)


# --- helpers -------------------------------------------------------------------------------


def feed_item(i: int, prefix: str = "item") -> tuple[str, bytes]:
    item_id = f"{prefix}-{i:04d}"
    text = f"Story {i}. " + " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))
    return item_id, orjson.dumps({"id": item_id, "title": f"Title {i}", "text": text})


def make_settings(bootstrap: str, **overrides: Any) -> Settings:
    """:func:`settings_for` with topics made by the test, batches of 32 and 20 ms delays."""
    values: dict[str, Any] = {"kafka_create_topics": False, "gpu_batch_size": 32,
                              "gpu_max_delay_ms": 20, "gpu_use_fp16": False,
                              "shutdown_timeout_s": 30}
    return settings_for(bootstrap, **(values | overrides))


def headers_of(record: Record) -> dict[str, str]:
    return {key: value.decode() for key, value in record.headers}


def source_of(record: Record, settings: Settings) -> tuple[int, int]:
    """(partition, offset) of the input record an output or dead letter answers."""
    if record.topic == settings.kafka_output_topic:
        source = orjson.loads(record.value)["source"]
        assert source["topic"] == settings.kafka_input_topic
        return source["partition"], source["offset"]
    headers = headers_of(record)
    assert headers["streamproc.source.topic"] == settings.kafka_input_topic
    return int(headers["streamproc.source.partition"]), int(headers["streamproc.source.offset"])


class Answers:
    """Follows the output and DLQ topics from their beginning while a test runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[Record] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed")

    async def __aenter__(self) -> Answers:
        await self._consumer.start()
        bootstrap = self.settings.kafka_bootstrap_servers
        tps = [TopicPartition(topic, p)
               for topic in (self.settings.kafka_output_topic, self.settings.kafka_dlq_topic)
               for p in await partitions_of(bootstrap, topic)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    def ids(self) -> set[str]:
        return {orjson.loads(r.value)["id"] for r in self.records
                if r.topic == self.settings.kafka_output_topic}

    def count(self) -> int:
        return len(self.records)

    async def wait_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} "
                                     f"({len(self.records)} answers so far)")
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                self.records.extend(records)


async def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


def seq2seq_settings(bootstrap: str, model_dir: Path, **overrides: Any) -> Settings:
    return make_settings(bootstrap, summarizer="seq2seq", model_name=str(model_dir),
                         **overrides)


# --- 1. round trip -------------------------------------------------------------------------


async def test_round_trip_every_item_once_in_order_and_committed(
        kafka_bootstrap: str, tiny_model_dir: Path) -> None:
    n = 500
    settings = seq2seq_settings(kafka_bootstrap, tiny_model_dir)
    await service_topics(settings)
    items = [feed_item(i) for i in range(n)]
    metadata = await produce(kafka_bootstrap, settings.kafka_input_topic,
                             [(item_id.encode(), value) for item_id, value in items])
    where = {item_id: (m.partition, m.offset)
             for (item_id, _), m in zip(items, metadata, strict=True)}
    ends = end_offsets(metadata)
    assert sorted(ends) == [0, 1, 2], "keys should spread the items over all 3 partitions"

    async with (build_worker(settings) as worker,
                StreamProcessor(settings, worker) as processor,
                Answers(settings) as answers, running(processor)):
        await answers.wait_until(lambda: answers.count() >= n, 180, f"{n} answers")

    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    assert await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic) == []
    summaries = [orjson.loads(r.value) for r in outputs]
    counts = Counter(s["id"] for s in summaries)
    assert set(counts) == set(where)
    assert max(counts.values()) == 1, "an item was answered twice in a clean run"
    for record, summary in zip(outputs, summaries, strict=True):
        assert record.key == summary["id"].encode()  # keyed like the input
        assert isinstance(summary["summary"], str)
        assert summary["model"] == str(tiny_model_dir)
        assert summary["title"].startswith("Title ")  # optional fields pass through
        partition, offset = where[summary["id"]]
        assert summary["source"] == {"topic": settings.kafka_input_topic,
                                     "partition": partition, "offset": offset}
        assert summary["timings_ms"]["processing"] >= 0
    assert sum(bool(s["summary"]) for s in summaries) > n // 2

    # Order: the output topic has ONE partition, so its offsets are the order in which the
    # processor's sends were written. Per input partition, the source offsets must appear in
    # increasing order there (outputs are keyed by the input key; with several output
    # partitions, only outputs sharing an output partition would be comparable).
    by_source: dict[int, list[int]] = defaultdict(list)
    for summary in summaries:
        by_source[summary["source"]["partition"]].append(summary["source"]["offset"])
    for partition, offsets in by_source.items():
        assert offsets == sorted(offsets), f"input partition {partition} reordered"
        assert len(offsets) == ends[partition]

    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    assert committed == ends
    assert processor.stats.produced == n and processor.stats.consumed == n


# --- 2. bad inputs -------------------------------------------------------------------------

# (what, value, expected reason code, a word the human reason must contain)
BAD_INPUTS: list[tuple[str, bytes | None, str, str]] = [
    ("not JSON", b"<rss><item>not json</item></rss>", "not_json", "JSON"),
    ("invalid UTF-8", b'{"id": "bad-utf8", "text": "caf\xe9"}', "invalid_utf8", "UTF-8"),
    ("JSON array", b'["id", "text"]', "not_object", "not an object"),
    ("JSON string", b'"just a string"', "not_object", "not an object"),
    ("missing id", b'{"text": "A story without an id."}', "missing_id", "'id'"),
    ("empty id", b'{"id": "  ", "text": "A story with a blank id."}', "missing_id", "empty"),
    ("missing text", b'{"id": "bad-no-text"}', "missing_text", "'text'"),
    ("id not a string", b'{"id": 42, "text": "Numbers are not ids."}', "wrong_type", "string"),
    ("title not a string", b'{"id": "bad-title", "text": "Fine text.", "title": 7}',
     "wrong_type", "title"),
    ("too large", orjson.dumps({"id": "bad-big", "text": "x" * 3000}), "too_large",
     "MAX_INPUT_BYTES"),
    ("tombstone", None, "empty", "null"),
    ("empty value", b"", "empty", "empty"),
]


async def test_bad_inputs_go_to_the_dlq_with_reason_and_original_bytes(
        kafka_bootstrap: str, tiny_model_dir: Path) -> None:
    settings = seq2seq_settings(kafka_bootstrap, tiny_model_dir, max_input_bytes=2000)
    await service_topics(settings)
    records: list[tuple[bytes | None, bytes | None]] = []
    good_ids: list[str] = []
    for k, (what, value, _, _) in enumerate(BAD_INPUTS):
        for j in range(2):  # good items on both sides of every bad one, on every partition
            item_id, good = feed_item(10 * k + j, prefix="good")
            records.append((item_id.encode(), good))
            good_ids.append(item_id)
        records.append((f"bad-{what}".encode(), value))
    metadata = await produce(kafka_bootstrap, settings.kafka_input_topic, records)
    sent = {(m.partition, m.offset): value for (_, value), m in zip(records, metadata, strict=True)}
    bad_at = {(m.partition, m.offset): bad
              for bad, m in zip(BAD_INPUTS, metadata[2::3], strict=True)}
    ends = end_offsets(metadata)

    async with (build_worker(settings) as worker,
                StreamProcessor(settings, worker) as processor,
                Answers(settings) as answers, running(processor)):
        await answers.wait_until(lambda: answers.count() >= len(records), 90,
                                 f"{len(records)} answers")

    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    dead = await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic)
    assert sorted(orjson.loads(r.value)["id"] for r in outputs) == sorted(good_ids)
    assert len(dead) == len(BAD_INPUTS)
    seen: set[tuple[int, int]] = set()
    for record in dead:
        headers = headers_of(record)
        source = source_of(record, settings)
        assert source in bad_at, f"a good record landed in the DLQ: {headers}"
        what, _, code, word = bad_at[source]
        seen.add(source)
        assert headers["streamproc.error.code"] == code, what
        assert headers["streamproc.error.class"] == "InvalidRecord", what
        assert word in headers["streamproc.error.reason"], (what, headers)
        # The original bytes, byte for byte (a tombstone's null value stays null).
        assert record.value == sent[source], what
    assert seen == set(bad_at)
    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    assert committed == ends
    assert sum(processor.stats.dead_letters.values()) == len(BAD_INPUTS)


async def test_item_whose_inference_fails_goes_to_the_dlq(kafka_bootstrap: str) -> None:
    settings = make_settings(kafka_bootstrap)
    await service_topics(settings, input_partitions=1)
    records: list[tuple[bytes | None, bytes | None]] = []
    for i in range(30):
        item_id, value = feed_item(i)
        if i == 13:
            value = orjson.dumps({"id": item_id, "text": "This story is POISON to the model."})
        records.append((item_id.encode(), value))
    metadata = await produce(kafka_bootstrap, settings.kafka_input_topic, records)

    async with (identity_worker(poison="POISON") as worker,
                StreamProcessor(settings, worker) as processor,
                Answers(settings) as answers, running(processor)):
        await answers.wait_until(lambda: answers.count() >= len(records), 60, "30 answers")

    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    dead = await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic)
    assert sorted(orjson.loads(r.value)["id"] for r in outputs) == [
        f"item-{i:04d}" for i in range(30) if i != 13]
    assert len(dead) == 1
    headers = headers_of(dead[0])
    assert headers["streamproc.error.code"] == "inference_failed"
    assert headers["streamproc.error.class"] == "InferenceFailed"
    assert "POISON" in headers["streamproc.error.reason"]
    assert source_of(dead[0], settings) == (0, metadata[13].offset)
    assert dead[0].value == records[13][1]
    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    assert committed == end_offsets(metadata)


# --- 3. restart ----------------------------------------------------------------------------


async def test_restart_resumes_from_the_committed_offsets(kafka_bootstrap: str) -> None:
    n = 400
    # Slow batches and a small queue, so that stopping at half way leaves work for the
    # second processor (a fast one would have fetched and answered everything).
    settings = make_settings(kafka_bootstrap, gpu_queue_size=20, kafka_max_poll_records=10)
    await service_topics(settings)
    items = [feed_item(i) for i in range(n)]
    metadata = await produce(kafka_bootstrap, settings.kafka_input_topic,
                             [(item_id.encode(), value) for item_id, value in items])
    ends = end_offsets(metadata)

    async with (identity_worker(delay_s=0.02, batch_size=5, queue_size=20) as worker,
                StreamProcessor(settings, worker) as first, running(first)):
        await wait_for(lambda: first.stats.produced >= n // 2, 60, "half the answers")
    answered_first = first.stats.produced
    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    uncommitted = sum(end - committed.get(p, 0) for p, end in ends.items())
    assert 0 < uncommitted < n, "the first processor should stop half way"
    # A clean stop drains what was fetched and commits it: answered == committed.
    assert answered_first == n - uncommitted

    async with (identity_worker() as worker, StreamProcessor(settings, worker) as second,
                Answers(settings) as answers, running(second)):
        await answers.wait_until(lambda: len(answers.ids()) >= n, 60, "every id")
    assert second.stats.consumed == uncommitted  # it resumed exactly at the commits

    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    counts = Counter(orjson.loads(r.value)["id"] for r in outputs)
    assert set(counts) == {item_id for item_id, _ in items}, "an id was never answered"
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= uncommitted
    assert await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                   settings.kafka_input_topic) == ends


# --- 4. two processors in one group ----------------------------------------------------------


async def test_two_processors_split_partitions_and_one_takes_over(kafka_bootstrap: str) -> None:
    n = 400
    settings = make_settings(kafka_bootstrap, gpu_queue_size=20, kafka_max_poll_records=10)
    await service_topics(settings, input_partitions=4)
    items = [feed_item(i) for i in range(n)]
    seen_assigned: dict[str, set[TopicPartition]] = {"a": set(), "b": set()}

    async with (identity_worker(delay_s=0.02, batch_size=5, queue_size=20) as worker_a,
                identity_worker(delay_s=0.02, batch_size=5, queue_size=20) as worker_b,
                StreamProcessor(settings, worker_a) as a,
                StreamProcessor(settings, worker_b) as b):

        async def watch() -> None:
            while True:
                seen_assigned["a"].update(a.assigned)
                seen_assigned["b"].update(b.assigned)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            async with Answers(settings) as answers, running(b):
                async with running(a):
                    # Both joined and split the partitions before any input exists.
                    await wait_for(lambda: bool(a.assigned) and bool(b.assigned), 60,
                                   "both processors to hold partitions")
                    assert not set(a.assigned) & set(b.assigned)
                    await produce(kafka_bootstrap, settings.kafka_input_topic,
                                  [(item_id.encode(), value) for item_id, value in items])
                    await answers.wait_until(lambda: answers.count() >= n // 3, 60,
                                             "a third of the answers")
                # a left the group in the middle; b must take over its partitions.
                assert 0 < a.stats.produced < n
                await wait_for(lambda: len(b.assigned) == 4, 60, "b to take all 4 partitions")
                await answers.wait_until(lambda: len(answers.ids()) >= n, 90, "every id")
        finally:
            watcher.cancel()
    assert seen_assigned["a"] and seen_assigned["b"]

    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    ids = {orjson.loads(r.value)["id"] for r in outputs}
    assert ids == {item_id for item_id, _ in items}, "an id was never answered"
    ends = await end_offsets_of(kafka_bootstrap, settings.kafka_input_topic)
    assert await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                   settings.kafka_input_topic) == ends


async def end_offsets_of(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {tp.partition: end for tp, end in ends.items() if end > 0}


# --- 5. backpressure -----------------------------------------------------------------------


@pytest.mark.parametrize("long_stall", [False, True], ids=["short-waits", "long-stall"])
async def test_backpressure_bounds_open_records_and_pauses_only_long_stalls(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, long_stall: bool) -> None:
    """A slow model and a small queue: the fetch stops while the queue is full or too many
    records are open, and every record is still answered once. Short waits do not pause the
    partitions; a stall longer than ``PAUSE_AFTER_S`` does, and fetching resumes after it."""
    n, queue, poll = 300, 20, 10
    monkeypatch.setattr(intake, "PAUSE_AFTER_S", 0.05 if long_stall else 60.0)
    settings = make_settings(kafka_bootstrap, gpu_queue_size=queue,
                             kafka_max_poll_records=poll)
    await service_topics(settings)
    items = [feed_item(i) for i in range(n)]
    await produce(kafka_bootstrap, settings.kafka_input_topic,
                  [(item_id.encode(), value) for item_id, value in items])
    most_open = 0
    async with (identity_worker(delay_s=0.03, batch_size=5, queue_size=queue) as worker,
                StreamProcessor(settings, worker) as processor, running(processor)):

        def watch() -> bool:
            nonlocal most_open
            most_open = max(most_open, processor.in_flight())
            return processor.stats.produced >= n

        await wait_for(watch, 60, "every answer")
        assert not processor.intake.paused, "fetching did not resume"
        assert not processor.consumer.paused()
    limit = intake.OPEN_RECORDS_PER_QUEUE_SLOT * queue
    assert 0 < most_open <= limit + poll  # one poll may land past the limit
    assert processor.stats.backpressure_seconds > 0
    assert (processor.stats.pauses > 0) is long_stall
    outputs = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    assert Counter(orjson.loads(r.value)["id"] for r in outputs) == Counter(
        item_id for item_id, _ in items)


async def test_a_failed_partition_set_up_stops_the_member_non_zero(kafka_bootstrap: str) -> None:
    """aiokafka swallows what a rebalance callback raises. If setting up the assigned
    partitions fails (here the sink's set-up raises as an unreachable broker would), the
    processor stops them and itself with RebalanceFailed, rather than stay a member with
    partitions it never serves."""
    settings = make_settings(kafka_bootstrap)
    await service_topics(settings)
    worker = identity_worker()
    await worker.start()
    processor = StreamProcessor(settings, worker)

    async def set_up_fails(partitions: list[Partition]) -> None:
        raise KafkaConnectionError("the broker went away during set-up")

    processor.sink.assigned = set_up_fails  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(processor.start(), 60)
        with pytest.raises(RebalanceFailed, match="the broker went away"):
            await asyncio.wait_for(processor.run(), 60)
        stopped = [processor.partition(tp) for tp in processor.assigned]
        assert stopped and all(p is not None and p.phase is Phase.STOPPED for p in stopped)
        assert processor.stats.consumed == 0
    finally:
        await processor.stop()
        await worker.stop(1)


async def test_shutdown_is_bounded_by_shutdown_timeout(kafka_bootstrap: str) -> None:
    n, shutdown_timeout_s, margin_s = 80, 1.0, 2.5
    settings = make_settings(kafka_bootstrap, shutdown_timeout_s=shutdown_timeout_s)
    await service_topics(settings)
    metadata = await produce(kafka_bootstrap, settings.kafka_input_topic,
                             [(i.encode(), v) for i, v in (feed_item(k) for k in range(n))])
    # 10 items/s: everything is fetched and queued at once, and takes ~8 s to answer.
    worker = identity_worker(delay_s=0.5, batch_size=5)
    await worker.start()
    processor = StreamProcessor(settings, worker)
    try:
        await asyncio.wait_for(processor.start(), 60)
        task = asyncio.create_task(processor.run())
        await wait_for(lambda: processor.stats.produced > 0, 60, "the first answer")
        stopped_at = time.monotonic()
        processor.request_stop()
        await asyncio.wait_for(task, 60)
        took = time.monotonic() - stopped_at
    finally:
        await processor.stop()
        await worker.stop(1)
    answered: dict[int, set[int]] = defaultdict(set)
    for record in await read_to_end(kafka_bootstrap, settings.kafka_output_topic):
        answered[source_of(record, settings)[0]].add(source_of(record, settings)[1])
    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    for partition in end_offsets(metadata):
        assert set(range(committed.get(partition, 0))) <= answered[partition]
    assert took < shutdown_timeout_s + margin_s, (
        f"run() took {took:.1f} s after request_stop (SHUTDOWN_TIMEOUT_S={shutdown_timeout_s})")


# --- 6-8. the service as a process -----------------------------------------------------------


def service_env(**variables: object) -> dict[str, str]:
    """The current environment without any streamproc setting, plus ``variables``."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["METRICS_PORT"] = "0"  # no fixed port: another test session may run a service too
    env.update({k: str(v) for k, v in variables.items()})
    return env


def start_service(tmp_path: Path, *args: str, **variables: object
                  ) -> tuple[subprocess.Popen[bytes], Path]:
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamproc", *args], cwd=tmp_path,  # no .env there
            env=service_env(**variables), stdout=subprocess.PIPE, stderr=err)
    return process, stderr


def wait_exit(process: subprocess.Popen[bytes], timeout_s: float, stderr: Path) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise AssertionError(f"the service did not exit within {timeout_s} s; stderr:\n"
                             + stderr.read_text(errors="replace")[-4000:]) from None


async def test_sigterm_mid_batch_drains_commits_and_exits_0(
        kafka_bootstrap: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    n = 300
    shutdown_timeout_s = 45  # generous: the drain must finish for the exact check below
    settings = seq2seq_settings(kafka_bootstrap, tiny_model_dir)
    await service_topics(settings)
    metadata = await produce(kafka_bootstrap, settings.kafka_input_topic,
                             [(i.encode(), v) for i, v in (feed_item(k) for k in range(n))])
    ends = end_offsets(metadata)
    # Long generations make every batch take a while, so the signal lands in one; a small
    # queue bounds what is open (and must be drained) when it does.
    process, stderr = start_service(
        tmp_path, "run",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_INPUT_TOPIC=settings.kafka_input_topic,
        KAFKA_OUTPUT_TOPIC=settings.kafka_output_topic,
        KAFKA_DLQ_TOPIC=settings.kafka_dlq_topic,
        KAFKA_GROUP_ID=settings.kafka_group_id,
        KAFKA_CREATE_TOPICS="false", KAFKA_COMMIT_INTERVAL_MS=200, KAFKA_MAX_POLL_RECORDS=8,
        SUMMARIZER="seq2seq", MODEL_NAME=str(tiny_model_dir), GPU_DEVICE_IDS="cpu",
        GPU_BATCH_SIZE=8, GPU_QUEUE_SIZE=16, GPU_MAX_DELAY_MS=20, GPU_ENABLE_WARMUP="false",
        GPU_USE_FP16="false", GEN_NUM_BEAMS=1, GEN_MIN_LENGTH=120, GEN_MAX_LENGTH=120,
        SHUTDOWN_TIMEOUT_S=shutdown_timeout_s, LOG_INTERVAL_S=1)
    try:
        async with Answers(settings) as answers:
            await answers.wait_until(lambda: answers.count() > 0 or process.poll() is not None,
                                     120, "the service's first answers")
        assert process.poll() is None, stderr.read_text(errors="replace")[-4000:]
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.to_thread(wait_exit, process, shutdown_timeout_s + 30, stderr)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = stderr.read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert "stopped cleanly" in log, log[-4000:]
    assert "still open after" not in log, f"the drain timed out ({took:.1f} s):\n{log[-4000:]}"

    committed = await committed_offsets(kafka_bootstrap, settings.kafka_group_id,
                                        settings.kafka_input_topic)
    answered: dict[int, set[int]] = defaultdict(set)
    for topic in (settings.kafka_output_topic, settings.kafka_dlq_topic):
        for record in await read_to_end(kafka_bootstrap, topic):
            partition, offset = source_of(record, settings)
            answered[partition].add(offset)
    assert sum(committed.values()) > 0
    assert sum(committed.values()) < n, f"the service finished before the signal:\n{log}"
    for partition in ends:
        position = committed.get(partition, 0)
        # Every record before the commit has an answer, and (the open work was drained
        # before the final commit) every answer is before the commit: exactly the prefix.
        assert answered[partition] == set(range(position)), (
            partition, position, sorted(answered[partition]), log[-4000:])


def test_unreachable_broker_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    started = time.monotonic()
    process, stderr = start_service(
        tmp_path, "run", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", KAFKA_CONNECT_TIMEOUT_S=2,
        SUMMARIZER="identity", GPU_DEVICE_IDS="cpu", GPU_ENABLE_WARMUP="false")
    code = wait_exit(process, 60, stderr)
    log = stderr.read_text(errors="replace")
    assert code != 0, log
    assert time.monotonic() - started < 30, log
    assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1" in log, log
    assert "Traceback" not in log, log


def test_bad_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    process, stderr = start_service(tmp_path, "run", GPU_BATCH_SIZE="abc")
    code = wait_exit(process, 60, stderr)
    log = stderr.read_text(errors="replace")
    assert code == 2, log
    assert "GPU_BATCH_SIZE" in log
    assert "Traceback" not in log

    plan = subprocess.run([sys.executable, "-m", "streamproc", "plan", "--json"], cwd=tmp_path,
                          env=service_env(GPU_DEVICE_IDS="cpu"), capture_output=True,
                          timeout=60, check=False)
    assert plan.returncode == 0, plan.stderr.decode(errors="replace")
    report = orjson.loads(plan.stdout)
    assert isinstance(report["plan"], list) and report["plan"]
    assert report["plan"][0]["device"] == "cpu"
