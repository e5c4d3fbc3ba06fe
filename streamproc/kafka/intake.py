"""Fetching: records from the consumer, registered, decoded and handed to the worker.

Each ``getmany`` returns at most as many records as the worker's queue has room for (and at
most ``KAFKA_MAX_POLL_RECORDS``), so handing them to the worker never waits. Each partition's
records go to its :class:`~streamproc.kafka.partition.Partition`, which registers the fresh ones
(and drops stale ones); they are decoded, the valid ones submitted to the worker in one call,
and all of them queued, in offset order, for that partition's emitter. A record that is not a
feed item carries its error instead.

Inside each ``getmany`` the consumer's batches are guarded (:mod:`.fetched`): a record the
client cannot decode arrives with its problem and becomes a dead letter (``undecodable``),
and no batch expands past ``KAFKA_MAX_DECOMPRESSED_BATCH_BYTES``. Any error ``getmany``
still raises is not a record's own: the service stops cleanly (:class:`FetchFailed`), with
the reason on ``/healthz``, and its records are left uncommitted.

Backpressure: fetching waits while the worker's queue is full or too many records are open
(see :meth:`Intake._wait_for_room`). The intake owns that state: it holds every partition
paused in a long wait, and keeps calling ``getmany`` so the group never counts the member
as stuck (``KAFKA_MAX_POLL_INTERVAL_MS``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from ..aio import unless
from ..errors import FetchFailed, InvalidRecord, StreamprocError
from ..records import decode_feed_item
from ..settings import KafkaSettings
from .fetched import FetchedRecord, FetchLimits, guarded
from .partition import Entry, Partition
from .stats import PipelineStats
from .tracing import record_trace
from .worker import TextWorker

__all__ = ["BACKPRESSURE_CHECK_S", "OPEN_RECORDS_PER_QUEUE_SLOT", "PAUSE_AFTER_S", "Intake"]

log = logging.getLogger("streamproc.intake")
OPEN_RECORDS_PER_QUEUE_SLOT = 4
BACKPRESSURE_CHECK_S = 0.005
PAUSE_AFTER_S = 5.0
HOLD = "backpressure"


class Intake:
    """The fetch side of a :class:`~streamproc.kafka.processor.StreamProcessor`. ``partitions`` is a
    read-only view of the processor's assigned partitions, by topic-partition (it owns
    them). ``stop`` ends :meth:`run`, and wakes a ``getmany`` that waits (aiokafka's waits
    out a whole rebalance); ``on_fatal`` gets a consumer that cannot go on."""

    def __init__(self, settings: KafkaSettings, consumer: AIOKafkaConsumer, worker: TextWorker,
                 stats: PipelineStats, partitions: Mapping[TopicPartition, Partition],
                 stop: asyncio.Event, on_fatal: Callable[[StreamprocError], None]) -> None:
        self.settings = settings
        self.fields = settings.input_fields
        self.on_fatal = on_fatal
        self.limits = FetchLimits(
            max_batch_bytes=settings.kafka_max_decompressed_batch_bytes,
            max_value_bytes=max(settings.kafka_max_request_size, settings.max_input_bytes + 1),
            max_key_bytes=settings.kafka_max_request_size,
            max_header_bytes=settings.kafka_max_request_size)
        self.consumer = consumer
        self.worker = worker
        self.stats = stats
        self.partitions = partitions
        self.stop = stop
        self.on_fatal = on_fatal
        self.paused = False  # every partition held by backpressure
        # pause well before the group would count the member as stuck
        self.pause_after_s = min(PAUSE_AFTER_S, settings.kafka_max_poll_interval_ms / 4000)

    def in_flight(self) -> int:
        """Records fetched and not yet settled, over every assigned partition."""
        return sum(p.open_records for p in self.partitions.values())

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
        return self.worker.queue_size - self.worker.queue_depth()

    async def _fetch(self, timeout_ms: int) -> None:
        max_records = max(1, min(self.settings.kafka_max_poll_records, self._room()))
        try:
            with guarded(self.limits):  # the fetch task copies the guard's context
                batches = await unless(self.stop, self.consumer.getmany(
                    timeout_ms=timeout_ms, max_records=max_records))
        except Exception as exc:  # never a record's own: those arrive as FetchedRecords
            # (aiokafka also hands the group's fatal errors to getmany)
            self.on_fatal(FetchFailed(f"fetching from {self.settings.kafka_input_topic} "
                                      f"failed: {type(exc).__name__}: {exc}"))
            return
        if not batches:
            return
        for tp, records in batches.items():
            partition = self.partitions.get(tp)
            if partition is not None:
                await self._accept(partition, records)

    def _busy(self) -> bool:
        """The worker's queue is full, or more than ``OPEN_RECORDS_PER_QUEUE_SLOT x
        GPU_QUEUE_SIZE`` records are open (results and acks in flight)."""
        limit = OPEN_RECORDS_PER_QUEUE_SLOT * self.worker.queue_size
        return self._room() <= 0 or self.in_flight() >= limit

    def _has_room(self) -> bool:
        """Both the queue and the open records are down to half their limits."""
        queue = self.worker.queue_size
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
        fetched_at, fetched_ns, epoch = time.monotonic(), time.time_ns(), partition.epoch
        entries: list[Entry] = []
        for record in fresh:
            entry = Entry(epoch, record, fetched_at, trace=record_trace(record, fetched_ns))
            problem = record.problem if isinstance(record, FetchedRecord) else None
            try:
                if problem is not None:
                    raise InvalidRecord(problem, "undecodable")
                entry.item = decode_feed_item(record.value,
                                              max_input_bytes=self.settings.max_input_bytes,
                                              size=record.serialized_value_size,
                                              fields=self.fields)
            except InvalidRecord as exc:
                entry.error = exc
            entries.append(entry)
        self.stats.consumed += len(entries)
        valid = [entry for entry in entries if entry.item is not None]
        futures = await self.worker.submit_many([entry.item.text for entry in valid
                                                 if entry.item is not None])
        for entry, future in zip(valid, futures, strict=True):
            entry.outcome = future
        for entry in entries:
            if (trace := entry.trace) is not None:
                trace.stage("consume")
                if entry.outcome is not None:
                    entry.outcome.add_done_callback(trace.inferred)
        partition.enqueue(entries)
