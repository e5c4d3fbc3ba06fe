"""Where results go, and how their offsets are committed: one class per guarantee.

``AtLeastOnceSink``  one idempotent producer (``acks=all``). An offset completes when the
                     broker acknowledges its output; the consumer commits the contiguous
                     completed prefix (see :mod:`streamproc.pipeline`).
``ExactlyOnceSink``  one transactional producer per input partition, with the transactional
                     id ``<prefix>-<topic>-<partition>``. The outputs, the dead letters and the
                     consumed offset of a partition's results are written in one transaction.

Why exactly-once is safe without KIP-447 (aiokafka's ``send_offsets_to_transaction`` takes
only the group id, so the broker cannot check the consumer's generation):

1. Only the producer holding ``<prefix>-<topic>-<p>`` can commit offsets of partition p, and
   the broker lets one producer epoch per transactional id commit at a time.
2. A new owner of p first starts that producer (``init_transactions``): this bumps the epoch,
   so the old owner's producer is fenced (``ProducerFenced``) and any transaction it left open
   is aborted or completed before ``start`` returns.
3. Only then does the new owner read p's committed offset and seek to it. Whatever the old
   owner committed is in that offset, and whatever it did not commit was aborted, so each
   record's output is committed exactly once.
4. A transaction that fails for any other reason is aborted, and the partition is rewound to
   its committed offset with a new generation, so the results in hand are dropped and read
   again.
Downstream readers must use ``isolation_level=read_committed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from .kafka_clients import producer_for, start_with_retry
from .metrics import PipelineStats
from .offsets import PartitionState
from .outputs import Outbound
from .settings import Settings

__all__ = ["AtLeastOnceSink", "ExactlyOnceSink", "Sink"]

log = logging.getLogger("streamproc.sinks")


class Sink:
    """Shared parts; subclasses implement one delivery guarantee."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, stats: PipelineStats,
                 on_fatal: Callable[[BaseException], None]) -> None:
        self.settings = settings
        self.consumer = consumer
        self.stats = stats
        self.on_fatal = on_fatal
        self.lock = asyncio.Lock()
        self.commit_due = asyncio.Event()  # set when waiting for the next interval would stall

    def count(self, record: Outbound) -> None:
        """The record is safely written (acknowledged, or its transaction committed)."""
        if record.source_timestamp_ms is not None and record.source_timestamp_ms > 0:
            self.stats.end_to_end.observe(max(time.time() - record.source_timestamp_ms / 1000, 0))
        if record.reason_code is None:
            self.stats.produced += 1
        else:
            self.stats.dead_letter(record.reason_code)

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def assigned(self, tps: dict[TopicPartition, PartitionState]) -> None: ...
    async def revoked(self, tps: set[TopicPartition]) -> None: ...
    async def emit(self, tp: TopicPartition, partition: PartitionState, record: Outbound) -> None:
        raise NotImplementedError

    def settled(self, partition: PartitionState) -> bool:
        """True when :meth:`commit` would cover everything this partition accepted."""
        raise NotImplementedError

    async def flush(self, within_s: float) -> None:
        """Wait (at most ``within_s``) until what was emitted is safely written or failed."""

    async def commit(self, partitions: dict[TopicPartition, PartitionState]) -> None:
        raise NotImplementedError


class AtLeastOnceSink(Sink):
    SEND_RETRY_LIMIT_S = 120.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.producer = producer_for(self.settings)
        self._retries: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Future[object]] = set()

    async def start(self) -> None:
        await start_with_retry("producer", self.producer.start, self.settings)

    async def stop(self) -> None:
        await self.producer.flush()
        await self.producer.stop()

    async def emit(self, tp: TopicPartition, partition: PartitionState, record: Outbound) -> None:
        delivery = await self.producer.send(record.topic, value=record.value, key=record.key,
                                            headers=record.headers)

        def acknowledged(fut: asyncio.Future[object]) -> None:
            self._deliveries.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                task = asyncio.create_task(self._resend(partition, record, fut))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
                return
            partition.tracker.complete(record.offset)
            self.count(record)

        delivery.add_done_callback(acknowledged)  # runs before any waiter added later
        self._deliveries.add(delivery)

    async def flush(self, within_s: float) -> None:
        pending: list[asyncio.Future[Any]] = [*self._deliveries, *self._retries]
        if pending:
            await asyncio.wait(pending, timeout=within_s)

    async def _resend(self, partition: PartitionState, record: Outbound,
                      failed: asyncio.Future[object]) -> None:
        """Retry one send with backoff; its offset stays open until the broker has it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.SEND_RETRY_LIMIT_S
        delay, last = 0.5, (None if failed.cancelled() else failed.exception())
        while loop.time() < deadline:
            self.stats.send_retries += 1
            log.warning("send to %s failed (%r); retrying in %.1f s", record.topic, last, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            try:
                await (await self.producer.send(record.topic, value=record.value,
                                                key=record.key, headers=record.headers))
            except KafkaError as exc:
                last = exc
                continue
            partition.tracker.complete(record.offset)
            self.count(record)
            return
        partition.blocked = True  # its offset stays open for good: no need to wait for it
        self.on_fatal(KafkaError(f"could not write to {record.topic} for "
                                 f"{self.SEND_RETRY_LIMIT_S:.0f} s: {last!r}"))

    def settled(self, partition: PartitionState) -> bool:
        return partition.tracker.in_flight == 0  # every output acknowledged

    async def commit(self, partitions: dict[TopicPartition, PartitionState]) -> None:
        async with self.lock:
            offsets = {tp: pos for tp, p in partitions.items()
                       if (pos := p.tracker.committable()) is not None}
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:
                log.warning("commit of %d partition(s) failed: %r", len(offsets), exc)
                return
            for tp, pos in offsets.items():
                partitions[tp].tracker.mark_committed(pos)
            self.stats.commits += 1


class ExactlyOnceSink(Sink):
    def __init__(self, *args: object,
                 rewind: Callable[[TopicPartition, bool], Awaitable[None]],
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.rewind = rewind
        self.producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.buffers: dict[TopicPartition, list[Outbound]] = {}
        self.locks: dict[TopicPartition, asyncio.Lock] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.settings.kafka_transactional_id_prefix}-{tp.topic}-{tp.partition}"

    async def assigned(self, tps: dict[TopicPartition, PartitionState]) -> None:
        """Fence the previous owner of each partition, then seek to its committed offset."""
        for tp in tps:
            if tp in self.producers:
                continue
            producer = producer_for(self.settings, transactional_id=self.transactional_id(tp))
            await start_with_retry(f"transactional producer {tp.partition}", producer.start,
                                   self.settings)
            self.producers[tp] = producer
            self.buffers[tp] = []
            self.locks[tp] = asyncio.Lock()
            committed = await self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)

    async def revoked(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            producer = self.producers.pop(tp, None)
            self.buffers.pop(tp, None)
            self.locks.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def stop(self) -> None:
        await self.revoked(set(self.producers))

    async def emit(self, tp: TopicPartition, partition: PartitionState, record: Outbound) -> None:
        self.buffers[tp].append(record)
        # Buffered records stay open until their transaction commits, and open records count
        # against backpressure: commit early rather than stall the fetch until the next tick.
        if sum(map(len, self.buffers.values())) >= max(1, self.settings.gpu_queue_size // 2):
            self.commit_due.set()

    def settled(self, partition: PartitionState) -> bool:
        return partition.unemitted == 0  # everything is in the buffer the next commit writes

    async def commit(self, partitions: dict[TopicPartition, PartitionState]) -> None:
        self.commit_due.clear()
        await asyncio.gather(*(self._commit_partition(tp, p) for tp, p in partitions.items()
                               if self.buffers.get(tp)))

    async def _commit_partition(self, tp: TopicPartition, partition: PartitionState) -> None:
        async with self.locks[tp]:
            records, self.buffers[tp] = self.buffers[tp], []
            if not records:
                return
            producer = self.producers[tp]
            position = records[-1].offset + 1
            deliveries: list[asyncio.Future[Any]] = []
            try:
                async with producer.transaction():
                    for r in records:
                        deliveries.append(await producer.send(
                            r.topic, value=r.value, key=r.key, headers=r.headers))
                    await producer.send_offsets_to_transaction(
                        {tp: position}, self.settings.kafka_group_id)
            except ProducerFenced:
                _retrieve(deliveries)
                log.warning("%s: fenced by a newer owner; dropping its uncommitted work", tp)
                self.buffers[tp] = []
                await self.rewind(tp, True)
                return
            except KafkaError as exc:
                _retrieve(deliveries)
                log.warning("%s: transaction failed (%r); aborted and rewound", tp, exc)
                self.buffers[tp] = []
                await self.rewind(tp, False)
                return
            for r in records:
                partition.tracker.complete(r.offset)
                self.count(r)
            partition.tracker.mark_committed(position)
            self.stats.commits += 1


def _retrieve(deliveries: list[asyncio.Future[Any]]) -> None:
    """The sends of an aborted transaction fail too; their errors are the transaction's,
    already handled, so mark them retrieved rather than let asyncio log each one."""
    for fut in deliveries:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
