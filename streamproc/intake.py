"""Fetching: records from the consumer, registered, decoded and handed to the worker.

Each ``getmany`` returns up to ``KAFKA_MAX_POLL_RECORDS`` records. A partition's records are
registered as open in fetch order, decoded, and the valid ones submitted to the worker in one
call; every record then waits, in fetch order, in :attr:`Intake.pending` for the emitter of
:mod:`streamproc.pipeline`. A record that is not a feed item carries its error instead.

Backpressure: fetching waits while the worker's queue is full or too many records are open
(see :meth:`Intake._wait_for_room`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from .errors import InvalidRecord, StreamprocError
from .messages import FeedItem, decode_feed_item
from .metrics import PipelineStats
from .offsets import PartitionState
from .settings import Settings

if TYPE_CHECKING:
    from .engine import SummaryWorker

__all__ = ["BACKPRESSURE_CHECK_S", "OPEN_RECORDS_PER_QUEUE_SLOT", "PAUSE_AFTER_S", "Entry",
           "Intake"]

log = logging.getLogger("streamproc.intake")
OPEN_RECORDS_PER_QUEUE_SLOT = 4
BACKPRESSURE_CHECK_S = 0.005
PAUSE_AFTER_S = 5.0


@dataclass(slots=True)
class Entry:
    """One fetched record on its way to the emitter."""

    tp: TopicPartition
    generation: int
    record: ConsumerRecord[bytes, bytes]
    fetched_at: float
    item: FeedItem | None = None
    outcome: asyncio.Future[str] | None = None
    error: StreamprocError | None = None


class Intake:
    """The fetch side of a :class:`~streamproc.pipeline.StreamProcessor`. ``partitions`` is
    the processor's own map of assigned partitions (shared, never copied)."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, worker: SummaryWorker,
                 stats: PipelineStats, partitions: dict[TopicPartition, PartitionState],
                 stop: asyncio.Event) -> None:
        self.settings = settings
        self.consumer = consumer
        self.worker = worker
        self.stats = stats
        self.partitions = partitions
        self.stop = stop
        self.pending: collections.deque[Entry | None] = collections.deque()  # fetch order
        self.ready = asyncio.Event()

    def in_flight(self) -> int:
        """Records fetched and not yet settled, over every assigned partition."""
        return sum(p.tracker.in_flight for p in self.partitions.values())

    def close(self) -> None:
        """No more entries: the emitter stops after the ones pending."""
        self.pending.append(None)
        self.ready.set()

    def cancel_pending(self) -> None:
        """Cancel the results not in yet; the worker then skips their items."""
        for entry in self.pending:
            if entry is not None and entry.outcome is not None:
                entry.outcome.cancel()

    async def next(self) -> Entry | None:
        """The next entry in fetch order; ``None`` once closed and emptied."""
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        return self.pending.popleft()

    async def run(self) -> None:
        """Fetch until ``stop`` is set."""
        while not self.stop.is_set():
            if self._busy():
                await self._wait_for_room()
                continue
            await self._fetch(timeout_ms=200)

    async def _fetch(self, timeout_ms: int) -> None:
        batches = await self.consumer.getmany(
            timeout_ms=timeout_ms, max_records=self.settings.kafka_max_poll_records)
        for tp, records in batches.items():
            partition = self.partitions.get(tp)
            if partition is not None and partition.accepting:  # else revoked or rewound
                await self._accept(tp, partition, records)

    def _busy(self) -> bool:
        """The worker's queue is full, or more than ``OPEN_RECORDS_PER_QUEUE_SLOT x
        GPU_QUEUE_SIZE`` records are open (results and acks in flight)."""
        limit = OPEN_RECORDS_PER_QUEUE_SLOT * self.settings.gpu_queue_size
        return self.worker.queue_full() or self.in_flight() >= limit

    def _has_room(self) -> bool:
        """Both the queue and the open records are down to half their limits."""
        queue = self.settings.gpu_queue_size
        return (self.worker.queue_depth() <= queue // 2
                and self.in_flight() <= OPEN_RECORDS_PER_QUEUE_SLOT * queue // 2)

    async def _wait_for_room(self) -> None:
        """Backpressure: stop fetching until :meth:`_has_room`, checking every
        ``BACKPRESSURE_CHECK_S``. A short wait needs no more: aiokafka heartbeats on its own
        task and holds what it prefetched. Past ``PAUSE_AFTER_S`` the partitions are paused
        and ``getmany`` keeps being called (it returns nothing), so the group does not count
        the consumer as stuck (``max.poll.interval.ms``). Pausing is kept for long waits
        because it costs: aiokafka drops what it prefetched and fetches it again on resume."""
        since = time.monotonic()
        while not self.stop.is_set() and not self._has_room():
            if not self.stats.paused and time.monotonic() - since >= PAUSE_AFTER_S:
                self.consumer.pause(*self.consumer.assignment())
                self.stats.paused = True
                self.stats.pauses += 1
                log.info("backpressure: pausing fetch (%d records open, %d queued)",
                         self.in_flight(), self.worker.queue_depth())
            if self.stats.paused:
                await self._fetch(timeout_ms=int(BACKPRESSURE_CHECK_S * 1000))  # returns none
            else:
                await asyncio.sleep(BACKPRESSURE_CHECK_S)
        self.stats.backpressure_seconds += time.monotonic() - since
        if self.stats.paused:
            self.consumer.resume(*self.partitions)
            self.stats.paused = False
            log.info("backpressure: resuming fetch")

    async def _accept(self, tp: TopicPartition, partition: PartitionState,
                      records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Register one partition's fetched records as open, decode them, and submit the
        valid ones to the worker in one call; all of them then wait for the emitter."""
        fetched_at, generation = time.monotonic(), partition.generation
        entries: list[Entry] = []
        for record in records:
            partition.tracker.add(record.offset)
            entry = Entry(tp, generation, record, fetched_at)
            try:
                entry.item = decode_feed_item(record.value,
                                              max_input_bytes=self.settings.max_input_bytes)
            except InvalidRecord as exc:
                entry.error = exc
            entries.append(entry)
        partition.unemitted += len(entries)
        self.stats.consumed += len(entries)
        valid = [entry for entry in entries if entry.item is not None]
        futures = await self.worker.submit_many([entry.item.text for entry in valid
                                                 if entry.item is not None])
        for entry, future in zip(valid, futures, strict=True):
            entry.outcome = future
        self.pending.extend(entries)
        self.ready.set()
