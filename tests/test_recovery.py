"""Every recovery path ends (issue 19), against the real broker, in process.

The faults are injected at the client call where a broker would show them: a producer whose
start raises aiokafka's plain ``KafkaError`` (what a connection dropped during a coordinator
lookup becomes) or never returns (a coordinator lookup and ``InitProducerId`` retry forever),
an output the broker refuses as collateral (``UNKNOWN_PRODUCER_ID``), a send caught by the
close of the producer it went to, and a group coordinator that never answers a commit (what
``AIOKafkaConsumer.commit`` does in an outage: it retries forever). Each must end in a write,
a retry with backoff, or a clean stop with its reason, never a wedged partition, an
``ExceptionGroup`` or a wait past the deadlines.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, UnknownProducerId

from streamproc.errors import DeliveryFailed
from streamproc.kafka import at_least_once, exactly_once
from streamproc.kafka.processor import StreamProcessor
from streamproc.ops.http import OpsServer
from streamproc.settings import Settings
from tests.helpers import (
    committed,
    end_offsets,
    identity_worker,
    items,
    never_retrieved,
    output_ids,
    produce,
    running_processor,
    service_topics,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.kafka


def ours(producer: AIOKafkaProducer) -> bool:
    """A producer of the service's (client id ``streamproc``), not the test's own."""
    return getattr(producer.client, "_client_id", None) == "streamproc"


class Faults:
    """Faults armed by a test, patched into aiokafka's producer and consumer classes; the
    producer faults hit the service's producers only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.start: str | None = None  # every producer start from now: "raises" a plain
        #                                KafkaError, "hangs", or finds the broker "unreachable"
        self.start_delay_s = 0.0  # every producer start from now waits this long first
        self.starts = 0  # producer starts that reached the broker after arming
        self.transaction_fails = 0  # that many transactions fail before their offsets
        self.sends: dict[bytes, list[str]] = {}  # per output key, what its next sends do
        self.commit_hangs = False
        start, send = AIOKafkaProducer.start, AIOKafkaProducer.send
        offsets, commit = (AIOKafkaProducer.send_offsets_to_transaction,
                           AIOKafkaConsumer.commit)

        async def start_(producer: AIOKafkaProducer) -> None:
            if not ours(producer):
                return await start(producer)
            if self.start == "raises":
                raise KafkaError("injected: the connection dropped during FindCoordinator")
            if self.start == "hangs":
                await asyncio.Event().wait()
            if self.start == "unreachable":
                raise KafkaConnectionError("injected: no route to the broker")
            if self.start_delay_s:
                await asyncio.sleep(self.start_delay_s)
                self.starts += 1
            await start(producer)

        async def send_(producer: AIOKafkaProducer, topic: str, value: Any = None,
                        key: Any = None, **kwargs: Any) -> Any:
            plan = (self.sends.get(key) or []) if ours(producer) else []
            action = plan.pop(0) if plan else "send"
            if action.startswith("slow"):  # still being handed over half a second later
                await asyncio.sleep(0.5)
            if action.endswith("collateral"):  # the broker refused it for another's sake
                failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                failed.set_exception(UnknownProducerId())
                return failed
            return await send(producer, topic, value=value, key=key, **kwargs)

        async def offsets_(producer: AIOKafkaProducer, *args: Any) -> None:
            if self.transaction_fails and ours(producer):
                self.transaction_fails -= 1
                raise KafkaError("injected: the transaction failed")
            await offsets(producer, *args)

        async def commit_(consumer: AIOKafkaConsumer, *args: Any) -> None:
            if self.commit_hangs:
                await asyncio.Event().wait()
            await commit(consumer, *args)

        monkeypatch.setattr(AIOKafkaProducer, "start", start_)
        monkeypatch.setattr(AIOKafkaProducer, "send", send_)
        monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", offsets_)
        monkeypatch.setattr(AIOKafkaConsumer, "commit", commit_)
        for module in (exactly_once, at_least_once):
            monkeypatch.setattr(module, "START_BACKOFF_S", 0.05)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    gc.collect()  # what earlier tests left to the garbage collector is logged now, not later
    return Faults(monkeypatch)


async def stops_with(processor: StreamProcessor, within_s: float) -> DeliveryFailed:
    """The fatal error ``run()`` ends with, within ``within_s``."""
    with pytest.raises(DeliveryFailed) as raised:
        await asyncio.wait_for(processor.run(), within_s)
    return raised.value


# --- exactly_once ----------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["raises", "hangs"])
async def test_a_recovery_whose_producer_cannot_start_retries_then_stops_cleanly(
        kafka_bootstrap: str, faults: Faults, caplog: pytest.LogCaptureFixture,
        start: str) -> None:
    """A transaction fails, so the partition rewinds through a new producer; that producer's
    start raises a plain ``KafkaError`` or never returns. Each try is bounded, the tries back
    off, and then the partition stops and the service with it, with the reason in /healthz:
    not a partition paused forever behind a healthy /healthz, and not an ``ExceptionGroup``
    out of the commit task."""
    settings = settings_for(kafka_bootstrap, "exactly_once", kafka_connect_timeout_s=1)
    await service_topics(settings, 1)
    sent = items(20, "recover")
    await produce(kafka_bootstrap, settings.kafka_input_topic, sent)
    async with identity_worker(max_delay_ms=5) as worker:
        processor = StreamProcessor(settings, worker)
        await asyncio.wait_for(processor.start(), 60)
        try:
            run = asyncio.create_task(processor.run())
            await wait_for(lambda: processor.stats.produced > 0 or run.done(), "an answer")
            faults.start, faults.transaction_fails = start, 1
            await produce(kafka_bootstrap, settings.kafka_input_topic, items(5, "more"))
            with pytest.raises(DeliveryFailed, match="no new producer after 3 tries"):
                await asyncio.wait_for(run, 30)
            alive, why = OpsServer(settings, worker, processor).liveness()
            assert not alive and "no new producer" in why
        finally:
            await processor.stop()
    assert sum((await committed(settings)).values()) <= sum((await output_ids(settings)).values())
    assert never_retrieved(caplog.records) == []


async def test_a_recovery_stops_at_the_delivery_deadline_whatever_its_tries_take(
        kafka_bootstrap: str, faults: Faults) -> None:
    """The new producer's start hangs, and each try may take ``KAFKA_CONNECT_TIMEOUT_S``
    (10 s here); the partition has committed nothing since its failure, and
    ``KAFKA_DELIVERY_TIMEOUT_MS`` (2 s here) is the promise: it stops then."""
    settings = settings_for(kafka_bootstrap, "exactly_once", kafka_connect_timeout_s=10,
                            kafka_delivery_timeout_ms=2000)
    await service_topics(settings, 1)
    await produce(kafka_bootstrap, settings.kafka_input_topic, items(10, "deadline"))
    async with identity_worker(max_delay_ms=5) as worker:
        processor = StreamProcessor(settings, worker)
        await asyncio.wait_for(processor.start(), 60)
        try:
            run = asyncio.create_task(processor.run())
            await wait_for(lambda: processor.stats.produced > 0 or run.done(), "an answer")
            faults.start, faults.transaction_fails = "hangs", 1
            await produce(kafka_bootstrap, settings.kafka_input_topic, items(5, "late"))
            failed_at = asyncio.get_running_loop().time()
            with pytest.raises(DeliveryFailed, match="of its first failure"):
                await asyncio.wait_for(run, 20)
            assert asyncio.get_running_loop().time() - failed_at < 6
        finally:
            await processor.stop()


async def test_a_recovery_that_outlives_its_revoke_starts_no_producer(
        kafka_bootstrap: str, faults: Faults, caplog: pytest.LogCaptureFixture) -> None:
    """Both partitions' transactions fail, and their new producers take 6 s to start;
    meanwhile a second member joins and one partition moves to it. The revoke cancels the
    recoveries: no producer is started for a partition once it may be another member's, so
    nobody is fenced (before, the stray producers fenced the new owners, and were never
    closed)."""
    settings = settings_for(kafka_bootstrap, "exactly_once", shutdown_timeout_s=2,
                            kafka_session_timeout_ms=6000)
    await service_topics(settings, 2)
    sent = items(60, "outlive")
    ends = end_offsets(await produce(kafka_bootstrap, settings.kafka_input_topic, sent[:20]))
    async with running_processor(settings) as first:
        await wait_for(lambda: first.stats.produced == 20, "the first answers")
        faults.start_delay_s, faults.transaction_fails = 6.0, 2
        await produce(kafka_bootstrap, settings.kafka_input_topic, sent[20:40])
        sink = first.sink
        assert isinstance(sink, exactly_once.ExactlyOnceSink)
        await wait_for(lambda: all(map(sink.recovering, first.assigned)), "the recoveries")
        started = asyncio.get_running_loop().time()
        faults.start_delay_s = 0.0  # the second member's producers start at once
        async with running_processor(settings) as second:
            await wait_for(lambda: second.joined.is_set(), "the second member's partition")
            ends = end_offsets(await produce(kafka_bootstrap, settings.kafka_input_topic,
                                             sent[40:]))
            await wait_for(lambda: second.stats.produced > 0, "the new owner's answers")
            await asyncio.sleep(max(started + 7 - asyncio.get_running_loop().time(), 0))
            fenced = [r.getMessage() for r in caplog.records if "fenced" in r.getMessage()]
            assert faults.starts == 0 and fenced == [], (faults.starts, fenced)
            await wait_for(lambda: first.stats.produced + second.stats.produced >= len(sent),
                           "every answer")
    assert await committed(settings) == ends
    assert await output_ids(settings) == Counter(k.decode() for k, _ in sent)


# --- at_least_once: replacing the producer ---------------------------------------------------


async def alo_run(settings: Settings, sent: list[tuple[bytes, bytes]]) -> None:
    """Process ``sent`` through one partition; every id answered and committed in 15 s."""
    await service_topics(settings, 1)
    ends = end_offsets(await produce(settings.kafka_bootstrap_servers,
                                     settings.kafka_input_topic, sent))
    async with running_processor(settings, identity_worker(batch_size=4, max_delay_ms=5)) \
            as processor:
        for _ in range(150):
            if await committed(settings) == ends or processor.fatal is not None:
                break
            await asyncio.sleep(0.1)
        assert processor.fatal is None, processor.fatal
    assert await committed(settings) == ends
    assert set(await output_ids(settings)) == {k.decode() for k, _ in sent}


async def test_a_replayable_failure_during_a_replacement_is_written_again(
        kafka_bootstrap: str, faults: Faults, caplog: pytest.LogCaptureFixture) -> None:
    """An output refused as collateral makes the sink replace its producer (whose start takes
    a second here). The next output, handed over as the replacement began, is refused as
    collateral too, while the replacement still runs. It gets a replacement of its own and
    is written, rather than wait, ignored, until the delivery deadline stops the service."""
    sent = items(12, "again")
    faults.sends[sent[5][0]] = ["collateral"]
    faults.sends[sent[6][0]] = ["slow collateral"]
    faults.start_delay_s = 1.0
    await alo_run(settings_for(kafka_bootstrap, kafka_delivery_timeout_ms=30_000), sent)
    assert never_retrieved(caplog.records) == []
    replaced = [r.getMessage() for r in caplog.records if "producer replaced" in r.getMessage()]
    assert len(replaced) == 2, replaced


async def test_a_send_caught_by_the_replacement_goes_to_the_new_producer(
        kafka_bootstrap: str, faults: Faults, caplog: pytest.LogCaptureFixture) -> None:
    """The next record is still being handed to the producer when a collateral failure
    closes it: it gets ``ProducerClosed``. It goes to the new producer, in its place, rather
    than stop the service as a write the broker refused."""
    sent = items(12, "caught")
    faults.sends[sent[5][0]] = ["collateral"]
    faults.sends[sent[6][0]] = ["slow"]
    await alo_run(settings_for(kafka_bootstrap), sent)
    assert never_retrieved(caplog.records) == []
    records = [r.getMessage() for r in caplog.records]
    assert any("producer replaced after 1 failed send" in m for m in records), records


async def test_a_replacement_that_cannot_start_a_producer_stops_cleanly(
        kafka_bootstrap: str, faults: Faults, caplog: pytest.LogCaptureFixture) -> None:
    """The replacement's new producer cannot connect. It tries again with backoff, then the
    service stops with the reason, at once: nothing is sent to a producer that never
    started, so nothing waits for the delivery deadline (30 s here)."""
    settings = settings_for(kafka_bootstrap, kafka_connect_timeout_s=1,
                            kafka_delivery_timeout_ms=30_000)
    await service_topics(settings, 1)
    sent = items(12, "nostart")
    await produce(kafka_bootstrap, settings.kafka_input_topic, sent[:2])
    async with identity_worker(max_delay_ms=5) as worker:
        processor = StreamProcessor(settings, worker)
        await asyncio.wait_for(processor.start(), 60)
        try:
            run = asyncio.create_task(processor.run())
            await wait_for(lambda: processor.stats.produced == 2, "the first answers")

            faults.sends[sent[5][0]] = ["collateral"]
            faults.start = "unreachable"
            await produce(kafka_bootstrap, settings.kafka_input_topic, sent[2:])
            with pytest.raises(DeliveryFailed, match="replacing the producer failed"):
                await asyncio.wait_for(run, 15)
        finally:
            await processor.stop()
    assert never_retrieved(caplog.records) == []


async def test_commits_the_coordinator_never_answers_stop_at_the_delivery_deadline(
        kafka_bootstrap: str, faults: Faults) -> None:
    """The group coordinator stops answering commits (aiokafka's ``commit`` then retries
    forever). Each commit waits a bounded time, so the deadlines are still checked: after
    ``KAFKA_DELIVERY_TIMEOUT_MS`` (2 s here) of failed commits the service stops, leaving the
    records uncommitted, rather than run on with nothing committed."""
    settings = settings_for(kafka_bootstrap, kafka_delivery_timeout_ms=2000)
    await service_topics(settings, 1)
    sent = items(12, "coordinator")
    await produce(kafka_bootstrap, settings.kafka_input_topic, sent[:4])
    async with identity_worker(max_delay_ms=5) as worker:
        processor = StreamProcessor(settings, worker)
        await asyncio.wait_for(processor.start(), 60)
        try:
            run = asyncio.create_task(processor.run())
            for _ in range(300):
                if await committed(settings) == {0: 4}:
                    break
                await asyncio.sleep(0.1)
            faults.commit_hangs = True
            await produce(kafka_bootstrap, settings.kafka_input_topic, sent[4:])
            with pytest.raises(DeliveryFailed, match="no commit went through"):
                await asyncio.wait_for(run, 10)
        finally:
            await processor.stop()
    assert await committed(settings) == {0: 4}
