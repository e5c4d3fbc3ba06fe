"""Fetching: records from the consumer, registered, decoded and handed to the worker.

Each ``getmany`` returns at most as many records as the worker's queue has room for (and at
most ``KAFKA_MAX_POLL_RECORDS``), so handing them to the worker never waits. Each partition's
records go to its :class:`~streamproc.partition.Partition`, which registers the fresh ones
(and drops stale ones); they are decoded, the valid ones submitted to the worker in one call,
and all of them queued, in offset order, for that partition's emitter. A record that is not a
feed item carries its error instead.

Backpressure: fetching waits while the worker's queue is full or too many records are open
(see :meth:`Intake._wait_for_room`). The intake owns that state: it holds every partition
paused in a long wait, and keeps calling ``getmany`` so the group never counts the member
as stuck (``KAFKA_MAX_POLL_INTERVAL_MS``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from .errors import InvalidRecord
from .messages import decode_feed_item
from .metrics import PipelineStats
from .partition import Entry, Partition
from .settings import Settings

if TYPE_CHECKING:
    from .engine import SummaryWorker

__all__ = ["BACKPRESSURE_CHECK_S", "OPEN_RECORDS_PER_QUEUE_SLOT", "PAUSE_AFTER_S", "Intake"]

log = logging.getLogger("streamproc.intake")
OPEN_RECORDS_PER_QUEUE_SLOT = 4
BACKPRESSURE_CHECK_S = 0.005
PAUSE_AFTER_S = 5.0
HOLD = "backpressure"


class Intake:
    """The fetch side of a :class:`~streamproc.pipeline.StreamProcessor`. ``partitions`` is a
    read-only view of the processor's assigned partitions, by topic-partition (it owns
    them)."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, worker: SummaryWorker,
                 stats: PipelineStats, partitions: Mapping[TopicPartition, Partition],
                 stop: asyncio.Event) -> None:
        self.settings = settings
        self.consumer = consumer
        self.worker = worker
        self.stats = stats
        self.partitions = partitions
        self.stop = stop
        self.paused = False  # every partition held by backpressure
        # pause well before the group would count the member as stuck
        self.pause_after_s = min(PAUSE_AFTER_S, settings.kafka_max_poll_interval_ms / 4000)

    def in_flight(self) -> int:
        """Records fetched and not yet settled, over every assigned partition."""
        return sum(p.tracker.in_flight for p in self.partitions.values())

    def adopt(self, partition: Partition) -> None:
        """A newly assigned partition follows the backpressure in force."""
        if self.paused:
            partition.hold(HOLD)

    async def run(self) -> None:
        """Fetch until ``stop`` is set."""
        while not self.stop.is_set():
            if self._busy():
                await self._wait_for_room()
                continue
            await self._fetch(timeout_ms=200)

    def _room(self) -> int:
        return self.settings.gpu_queue_size - self.worker.queue_depth()

    async def _fetch(self, timeout_ms: int) -> None:
        max_records = max(1, min(self.settings.kafka_max_poll_records, self._room()))
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if not batches:
            return
        for tp, records in batches.items():
            partition = self.partitions.get(tp)
            if partition is not None:
                await self._accept(partition, records)

    def _busy(self) -> bool:
        """The worker's queue is full, or more than ``OPEN_RECORDS_PER_QUEUE_SLOT x
        GPU_QUEUE_SIZE`` records are open (results and acks in flight)."""
        limit = OPEN_RECORDS_PER_QUEUE_SLOT * self.settings.gpu_queue_size
        return self._room() <= 0 or self.in_flight() >= limit

    def _has_room(self) -> bool:
        """Both the queue and the open records are down to half their limits."""
        queue = self.settings.gpu_queue_size
        return (self.worker.queue_depth() <= queue // 2
                and self.in_flight() <= OPEN_RECORDS_PER_QUEUE_SLOT * queue // 2)

    async def _wait_for_room(self) -> None:
        """Backpressure: stop fetching until :meth:`_has_room`, checking every
        ``BACKPRESSURE_CHECK_S``. A short wait needs no more: aiokafka heartbeats on its own
        task and holds what it prefetched. Past ``pause_after_s`` every partition is held
        paused and ``getmany`` keeps being called (it returns nothing), so the group does not
        count the consumer as stuck. Pausing is kept for long waits because it costs: aiokafka
        drops what it prefetched and fetches it again on resume."""
        since = time.monotonic()
        while not self.stop.is_set() and not self._has_room():
            if not self.paused and time.monotonic() - since >= self.pause_after_s:
                self.paused = True
                for partition in self.partitions.values():
                    partition.hold(HOLD)
                self.stats.pauses += 1
                log.info("backpressure: pausing fetch (%d records open, %d queued)",
                         self.in_flight(), self.worker.queue_depth())
            if self.paused:
                await self._fetch(timeout_ms=int(BACKPRESSURE_CHECK_S * 1000))  # returns none
            else:
                await asyncio.sleep(BACKPRESSURE_CHECK_S)
        self.stats.backpressure_seconds += time.monotonic() - since
        if self.paused:
            self.paused = False
            for partition in self.partitions.values():
                partition.release(HOLD)
            log.info("backpressure: resuming fetch")

    async def _accept(self, partition: Partition,
                      records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Register one partition's fresh records, decode them, submit the valid ones to the
        worker in one call, and queue all of them for the partition's emitter."""
        fresh = partition.accept(records)
        if not fresh:
            return
        fetched_at, epoch = time.monotonic(), partition.epoch
        entries: list[Entry] = []
        for record in fresh:
            entry = Entry(epoch, record, fetched_at)
            try:
                entry.item = decode_feed_item(record.value,
                                              max_input_bytes=self.settings.max_input_bytes)
            except InvalidRecord as exc:
                entry.error = exc
            entries.append(entry)
        self.stats.consumed += len(entries)
        valid = [entry for entry in entries if entry.item is not None]
        futures = await self.worker.submit_many([entry.item.text for entry in valid
                                                 if entry.item is not None])
        for entry, future in zip(valid, futures, strict=True):
            entry.outcome = future
        partition.enqueue(entries)
