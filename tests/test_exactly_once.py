"""PROCESSING_GUARANTEE=exactly_once against the real local broker, in process.

Each test uses its own topics, group and transactional-id prefix, and a GPUWorker around the
identity summarizer (no model). What is checked is what a ``read_committed`` reader sees:
every id exactly once, and the group's committed offsets at the end of the input.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from streamproc.kafka.clients import producer_for
from streamproc.kafka.exactly_once import ExactlyOnceSink
from streamproc.kafka.partition import Phase
from streamproc.kafka.processor import StreamProcessor
from streamproc.settings import Settings
from streamproc.summarize.base import SummaryWorker
from streamproc.testing.kafka import read_to_end
from tests.helpers import (
    committed,
    end_offsets,
    identity_worker,
    items,
    never_retrieved,
    output_ids,
    produce,
    running,
    running_processor,
    service_topics,
    settings_for,
    wait_for,
    wait_for_output,
)

pytestmark = pytest.mark.kafka


def eos_settings(bootstrap: str, **overrides: Any) -> Settings:
    return settings_for(bootstrap, "exactly_once", **overrides)


def eos_worker(delay_s: float = 0.0) -> SummaryWorker:
    return identity_worker(delay_s=delay_s, max_delay_ms=10)


# --- round trip ----------------------------------------------------------------------------


async def test_round_trip_every_id_exactly_once_and_offsets_committed(
        kafka_bootstrap: str) -> None:
    settings = eos_settings(kafka_bootstrap)
    await service_topics(settings, 3)
    sent = items(300, "rt")
    ends = end_offsets(await produce(kafka_bootstrap, settings.kafka_input_topic, sent))
    assert sorted(ends) == [0, 1, 2]
    async with running_processor(settings) as processor:
        await wait_for_output(settings, len(sent))
    ids = await output_ids(settings)
    assert ids == Counter(k.decode() for k, _ in sent)  # every id, exactly once
    assert await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic) == []
    assert await committed(settings) == ends
    assert processor.stats.produced == len(sent) and processor.stats.commits > 0


# --- zombie fencing ------------------------------------------------------------------------


async def test_a_fenced_partition_drops_its_work_then_recovers_when_still_assigned(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """A holds results for its partition in its open buffer (long commit interval). Another
    producer starts the partition's transactional id, as a new owner would: A's next commit
    fails with ProducerFenced, writes nothing, commits no offset and drops its work, and the
    partition waits, paused. No rebalance takes it away (the fence came from elsewhere, as a
    coordinator's transaction timeout does), so after twice the session timeout A starts a new
    producer, rewinds, and the partition is processed once, in full."""
    settings = eos_settings(kafka_bootstrap, kafka_commit_interval_ms=600_000,
                            kafka_session_timeout_ms=6000)
    await service_topics(settings, 1)
    never_retrieved([])  # what earlier tests left behind is collected now
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
            assert processor.in_flight() == 0  # ... and holds back no fetch while it waits
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
    assert never_retrieved(caplog.records) == []  # the fenced producer's own futures


def test_transactional_ids_carry_the_group_id() -> None:
    """Two groups reading one topic with the same prefix never fence each other."""
    tp = TopicPartition("feeds", 3)
    ids = {ExactlyOnceSink(eos_settings("127.0.0.1:1", kafka_group_id=group), None, None,
                           None, lambda e: None,  # type: ignore[arg-type]
                           commit_early_at=1).transactional_id(tp)
           for group in ("a", "b")}
    assert len(ids) == 2 and all(i.endswith("-feeds-3") for i in ids)


# --- rebalance in the middle of transactions -----------------------------------------------


async def test_a_member_joining_and_leaving_mid_transaction_loses_and_repeats_nothing(
        kafka_bootstrap: str) -> None:
    """Items keep flowing (commits every 500 ms, so transactions are open at every moment)
    while a second processor joins the group, answers some, and leaves."""
    settings = eos_settings(kafka_bootstrap, kafka_commit_interval_ms=500)
    await service_topics(settings, 4)
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
                for partition, end in end_offsets(await asyncio.gather(*[await producer.send(
                        settings.kafka_input_topic, value=v, key=k) for k, v in chunk])).items():
                    ends[partition] = max(ends.get(partition, 0), end)
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
    await service_topics(settings, 1)
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
    async with running_processor(settings) as processor:
        await wait_for_output(settings, len(sent))
    expected = Counter(k.decode() for k, _ in sent)
    assert failures and await output_ids(settings) == expected
    assert processor.stats.transaction_aborts == 1  # streamproc_transaction_aborts_total
    uncommitted = await output_ids(settings, "read_uncommitted")
    assert set(uncommitted) == set(expected) and sum(uncommitted.values()) > len(sent)
    assert await committed(settings) == {0: len(sent)}


# --- never an offset past an unwritten output ----------------------------------------------


async def test_a_transaction_failing_mid_drain_never_commits_past_the_records_it_dropped(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path by which the rebalance storm lost records (issue 19, item 0). A partition
    drains (here on SIGTERM; in the storm on revoke) and a transaction fails for a reason not
    its records' own. The sink drops the partition's buffer, but a DRAINING partition is not
    rewound: its emitter goes on adding the records after the dropped ones, and the next
    transaction (through a new producer) committed the offset past all of them. Whatever
    fails, every record below the committed offset must have its output, and the next owner
    must write each of the others exactly once."""
    settings = eos_settings(kafka_bootstrap, kafka_commit_interval_ms=100)
    await service_topics(settings, 1)
    sent = items(60, "drain")
    await produce(kafka_bootstrap, settings.kafka_input_topic, sent)
    original = AIOKafkaProducer.send_offsets_to_transaction
    draining: list[bool] = []
    injected: list[Any] = []

    async def fail_once_while_draining(self: AIOKafkaProducer, offsets: Any,
                                       group_id: str) -> None:
        if draining and not injected:
            injected.append(offsets)
            raise KafkaError("injected: the transaction fails mid-drain")
        await original(self, offsets, group_id)

    monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction",
                        fail_once_while_draining)
    async with identity_worker(delay_s=0.05, batch_size=2, max_delay_ms=5) as worker:
        processor = StreamProcessor(settings, worker)
        async with running(processor):
            await wait_for(lambda: processor.stats.produced >= 10, "the first answers")
            draining.append(True)
            processor.request_stop()  # every partition goes DRAINING; results keep coming
    assert injected, "the injected failure did not land during the drain"
    position = (await committed(settings)).get(0, 0)
    written = await output_ids(settings)
    unwritten = [k.decode() for k, _ in sent[:position] if written[k.decode()] == 0]
    assert unwritten == [], f"committed {position} past {len(unwritten)} unwritten outputs"

    async with running_processor(settings):  # the next owner writes the rest
        await wait_for_output(settings, len(sent))
    assert await output_ids(settings) == Counter(k.decode() for k, _ in sent)
    assert await committed(settings) == {0: len(sent)}
