"""PROCESSING_GUARANTEE=exactly_once against the real local broker, in process.

Each test uses its own topics, group and transactional-id prefix, and a GPUWorker around the
identity summarizer (no model). What is checked is what a ``read_committed`` reader sees:
every id exactly once, and the group's committed offsets at the end of the input.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamproc.engine import SummaryWorker
from streamproc.kafka_clients import producer_for
from streamproc.partition import Phase
from streamproc.pipeline import StreamProcessor
from streamproc.settings import Settings
from streamproc.sinks import ExactlyOnceSink
from tests.kafka_broker import committed_offsets, create_topic, read_all, unique_topic
from tests.pipeline_helpers import identity_worker, running

pytestmark = pytest.mark.kafka


def eos_settings(bootstrap: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_input_topic": unique_topic("eos-in"),
        "kafka_output_topic": unique_topic("eos-out"),
        "kafka_dlq_topic": unique_topic("eos-dlq"),
        "kafka_group_id": unique_topic("eos-group"),
        "kafka_transactional_id_prefix": unique_topic("eos-txn"),
        "processing_guarantee": "exactly_once",
        "kafka_commit_interval_ms": 200,
        "kafka_max_poll_records": 100,
        "kafka_connect_timeout_s": 15,
        "shutdown_timeout_s": 20,
        "summarizer": "identity",
        "gpu_device_ids": "cpu",
        "gpu_enable_warmup": False,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def eos_worker(delay_s: float = 0.0) -> SummaryWorker:
    return identity_worker(delay_s=delay_s, max_delay_ms=10)


def items(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    return [(f"{prefix}-{i:04d}".encode(),
             orjson.dumps({"id": f"{prefix}-{i:04d}", "text": f"Story {i} happened. Then more."}))
            for i in range(n)]


async def setup_topics(settings: Settings, partitions: int) -> None:
    await create_topic(settings.kafka_bootstrap_servers, settings.kafka_input_topic, partitions)
    await create_topic(settings.kafka_bootstrap_servers, settings.kafka_output_topic, 1)
    await create_topic(settings.kafka_bootstrap_servers, settings.kafka_dlq_topic, 1)


async def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> dict[
        int, int]:
    """Send the records; returns the end offset of every partition written to."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=v, key=k) for k, v in records]
        metadata = await asyncio.wait_for(asyncio.gather(*sent), 30)
    finally:
        await producer.stop()
    ends: dict[int, int] = {}
    for m in metadata:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    return ends


async def committed(settings: Settings) -> dict[int, int]:
    return await committed_offsets(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                                   settings.kafka_input_topic)


async def output_ids(settings: Settings, isolation_level: str = "read_committed") -> Counter[str]:
    records = await read_all(settings.kafka_bootstrap_servers, settings.kafka_output_topic,
                             isolation_level=isolation_level)
    return Counter(orjson.loads(r.value)["id"] for r in records)


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for_output(settings: Settings, n: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while sum((await output_ids(settings)).values()) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {n} committed outputs")
        await asyncio.sleep(0.3)


@asynccontextmanager
async def running_processor(settings: Settings, worker: SummaryWorker | None = None
                            ) -> AsyncIterator[StreamProcessor]:
    """A started processor with ``run()`` in a task; on exit: stop, drain, commit, close."""
    async with worker or eos_worker() as started_worker:
        processor = StreamProcessor(settings, started_worker)
        async with running(processor):
            yield processor


# --- round trip ----------------------------------------------------------------------------


async def test_round_trip_every_id_exactly_once_and_offsets_committed(
        kafka_bootstrap: str) -> None:
    settings = eos_settings(kafka_bootstrap)
    await setup_topics(settings, 3)
    sent = items(300, "rt")
    ends = await produce(kafka_bootstrap, settings.kafka_input_topic, sent)
    assert sorted(ends) == [0, 1, 2]
    async with running_processor(settings) as processor:
        await wait_for_output(settings, len(sent))
    ids = await output_ids(settings)
    assert ids == Counter(k.decode() for k, _ in sent)  # every id, exactly once
    assert await read_all(kafka_bootstrap, settings.kafka_dlq_topic) == []
    assert await committed(settings) == ends
    assert processor.stats.produced == len(sent) and processor.stats.commits > 0


# --- zombie fencing ------------------------------------------------------------------------


async def test_a_fenced_partition_drops_its_work_then_recovers_when_still_assigned(
        kafka_bootstrap: str) -> None:
    """A holds results for its partition in its open buffer (long commit interval). Another
    producer starts the partition's transactional id, as a new owner would: A's next commit
    fails with ProducerFenced, writes nothing, commits no offset and drops its work, and the
    partition waits, paused. No rebalance takes it away (the fence came from elsewhere, as a
    coordinator's transaction timeout does), so after twice the session timeout A starts a new
    producer, rewinds, and the partition is processed once, in full."""
    settings = eos_settings(kafka_bootstrap, kafka_commit_interval_ms=600_000,
                            kafka_session_timeout_ms=6000)
    await setup_topics(settings, 1)
    tp = TopicPartition(settings.kafka_input_topic, 0)
    first = items(20, "fenced")
    await produce(kafka_bootstrap, settings.kafka_input_topic, first)
    async with running_processor(settings) as processor:
        sink = processor.sink
        assert isinstance(sink, ExactlyOnceSink)
        await wait_for(lambda: sink.buffered(tp) == len(first), "A's buffer")
        epoch = processor.partition(tp).epoch  # type: ignore[union-attr]

        other = producer_for(settings, transactional_id=sink.transactional_id(tp))
        await other.start()  # init_transactions: bumps the epoch, A's producer is fenced
        try:
            await processor.commit()
            partition = processor.partition(tp)
            assert partition is not None and partition.phase is Phase.SEEKING  # paused
            assert sink.buffered(tp) == 0  # its work is dropped ...
            assert processor.stats.produced == 0 and sink.stats.commits == 0
            assert await output_ids(settings) == Counter()  # nothing visible
            assert await committed(settings) == {}  # and no offset committed
        finally:
            await other.stop()
        late = items(5, "late")
        await produce(kafka_bootstrap, settings.kafka_input_topic, late)
        # still assigned after 2 x the session timeout: a new producer, the same partition
        await wait_for(lambda: partition.running and partition.epoch > epoch, "the recovery",
                       timeout_s=30)
        await wait_for(lambda: sink.buffered(tp) == len(first) + len(late), "the rewind")
        await processor.commit()
        assert processor.stats.produced == len(first) + len(late)
    assert await output_ids(settings) == Counter(k.decode() for k, _ in first + late)
    assert await committed(settings) == {0: len(first) + len(late)}


def test_transactional_ids_carry_the_group_id() -> None:
    """Two groups reading one topic with the same prefix never fence each other."""
    tp = TopicPartition("feeds", 3)
    ids = {ExactlyOnceSink(eos_settings("127.0.0.1:1", kafka_group_id=group), None, None,
                           None, lambda e: None).transactional_id(tp)  # type: ignore[arg-type]
           for group in ("a", "b")}
    assert len(ids) == 2 and all(i.endswith("-feeds-3") for i in ids)


# --- rebalance in the middle of transactions -----------------------------------------------


async def test_a_member_joining_and_leaving_mid_transaction_loses_and_repeats_nothing(
        kafka_bootstrap: str) -> None:
    """Items keep flowing (commits every 500 ms, so transactions are open at every moment)
    while a second processor joins the group, answers some, and leaves."""
    settings = eos_settings(kafka_bootstrap, kafka_commit_interval_ms=500)
    await setup_topics(settings, 4)
    sent = items(800, "reb")
    ends: dict[int, int] = {}
    fed = 0

    async def feed(upto: int) -> None:  # a steady stream: 20 items every 50 ms
        nonlocal fed
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            while fed < upto:
                chunk, fed = sent[fed:fed + 20], min(fed + 20, upto)
                for m in await asyncio.gather(*[await producer.send(
                        settings.kafka_input_topic, value=v, key=k) for k, v in chunk]):
                    ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()

    async with running_processor(settings, eos_worker(delay_s=0.01)) as first:
        feeding = asyncio.create_task(feed(200))
        try:
            await wait_for(lambda: first.stats.produced >= 100, "the first 100 answers")
            async with running_processor(settings, eos_worker(delay_s=0.01)) as second:
                await wait_for(lambda: len(second.assigned) > 0, "the join's rebalance")
                await asyncio.wait_for(feeding, 60)
                feeding = asyncio.create_task(feed(600))
                await wait_for(lambda: second.stats.produced >= 50, "50 answers by the second")
            await asyncio.wait_for(feeding, 60)
            await wait_for(lambda: len(first.assigned) == 4, "the leave's rebalance")
            await feed(len(sent))
        finally:
            feeding.cancel()
        await wait_for_output(settings, len(sent))
    assert await output_ids(settings) == Counter(k.decode() for k, _ in sent)
    assert await committed(settings) == ends
    assert first.stats.produced + second.stats.produced == len(sent)


# --- what downstream readers see -----------------------------------------------------------


async def test_an_aborted_transaction_is_seen_by_read_uncommitted_only(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first transaction fails after its outputs reached the broker: it is aborted and
    the partition rewound. read_uncommitted readers see the aborted copies as well;
    read_committed readers see every id exactly once."""
    settings = eos_settings(kafka_bootstrap)
    await setup_topics(settings, 1)
    sent = items(30, "abort")
    await produce(kafka_bootstrap, settings.kafka_input_topic, sent)
    original = AIOKafkaProducer.send_offsets_to_transaction
    failures: list[int] = []

    async def fail_once(self: AIOKafkaProducer, offsets: Any, group_id: str) -> None:
        if not failures:
            failures.append(1)
            await self.flush()  # the outputs are in the log, inside the open transaction
            raise KafkaError("injected failure before the offsets joined the transaction")
        await original(self, offsets, group_id)

    monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", fail_once)
    async with running_processor(settings):
        await wait_for_output(settings, len(sent))
    expected = Counter(k.decode() for k, _ in sent)
    assert failures and await output_ids(settings) == expected
    uncommitted = await output_ids(settings, "read_uncommitted")
    assert set(uncommitted) == set(expected) and sum(uncommitted.values()) > len(sent)
    assert await committed(settings) == {0: len(sent)}
