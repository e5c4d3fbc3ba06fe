"""The stream processor: consume → micro-batch → summarize → produce → commit.

Commit protocol (at-least-once)
-------------------------------
1. **Fetch.** ``getmany`` returns records of the assigned, unpaused partitions. Each record's
   offset is registered, in fetch order, as *open* in its partition's :class:`OffsetTracker`.
   While the worker's queue is full, or too many records are open, fetching waits.
2. **Decode.** A record that is not a valid feed item becomes a dead letter right away. A
   valid one is submitted to the GPUWorker, which batches by size and delay.
3. **Emit in order.** One emitter takes the records in fetch order, waits for each result,
   and sends the summary to ``KAFKA_OUTPUT_TOPIC``, or the original bytes with error
   headers to ``KAFKA_DLQ_TOPIC`` (items that failed for good). Sends are issued in input
   order, so each partition's outputs keep input order (the producer is idempotent).
4. **Acknowledge.** When the broker acknowledges a send (``acks=all``), its source offset is
   *complete*. A failed send is retried with backoff; one that never succeeds stops the
   service without committing it.
5. **Commit.** Every ``KAFKA_COMMIT_INTERVAL_MS``, on revoke and at shutdown, each partition
   commits the first offset that is not complete (the highest contiguous completed offset
   + 1). So a committed offset means every record before it has an acknowledged output.
6. **Rebalance.** On revoke, the processor stops taking that partition's records, waits (up to
   ``SHUTDOWN_TIMEOUT_S``) for its open offsets to complete, commits, and forgets the
   partition; results that arrive later are dropped, never committed. A partition lost to a
   fenced generation fails its commit and is dropped the same way.
7. **Shutdown.** Stop fetching, drain the open work (within ``SHUTDOWN_TIMEOUT_S``), flush the
   producer, commit, close the clients.

A crash between 4 and 5 replays the records after the last commit: outputs may repeat, none
is lost.

With ``PROCESSING_GUARANTEE=exactly_once``, steps 4 and 5 become one Kafka transaction per
partition and commit interval: the outputs, the dead letters and the consumed offset together
(see :mod:`streamproc.sinks` for the fencing argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from . import outputs
from .errors import InvalidRecord, StreamprocError
from .intake import Entry, Intake
from .kafka_clients import consumer_for, ensure_topics, start_with_retry
from .metrics import PipelineStats
from .offsets import PartitionState
from .outputs import Outbound
from .settings import Settings
from .sinks import AtLeastOnceSink, ExactlyOnceSink, Sink

if TYPE_CHECKING:
    from .engine import SummaryWorker

__all__ = ["StreamProcessor"]

log = logging.getLogger("streamproc.pipeline")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: StreamProcessor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor._revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor._assign(assigned)


def _names(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}-{tp.partition}" for tp in tps)


class StreamProcessor:
    """Runs the commit protocol above for one consumer in ``KAFKA_GROUP_ID``."""

    def __init__(self, settings: Settings, worker: SummaryWorker) -> None:
        self.settings = settings
        self.worker = worker
        self.stats = PipelineStats()
        self.consumer = consumer_for(settings)
        self.sink: Sink
        if settings.processing_guarantee == "exactly_once":
            self.sink = ExactlyOnceSink(settings, self.consumer, self.stats, self._fail,
                                        rewind=self._rewind)
        else:
            self.sink = AtLeastOnceSink(settings, self.consumer, self.stats, self._fail)
        self._partitions: dict[TopicPartition, PartitionState] = {}
        self._generations = itertools.count()
        self._stop = asyncio.Event()
        self.intake = Intake(settings, self.consumer, worker, self.stats, self._partitions,
                             self._stop)
        self._closing = asyncio.Event()
        self._abandoned = False
        self.joined = asyncio.Event()  # set once the group has handed out an assignment
        self._fatal: BaseException | None = None
        self._state = "new"

    # --- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> StreamProcessor:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Check topics, connect the producer(s) and the consumer, join the group. Idempotent."""
        if self._state != "new":
            return
        self._state = "starting"
        await ensure_topics(self.settings)
        await self.sink.start()
        await start_with_retry("consumer", self.consumer.start, self.settings)
        self.consumer.subscribe([self.settings.kafka_input_topic], listener=_Listener(self))
        self._state = "started"

    async def stop(self) -> None:
        """Close the clients (after :meth:`run` drained and committed). Idempotent."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        self._state = "stopped"
        self.request_stop()
        await self.consumer.stop()
        await self.sink.stop()

    def request_stop(self) -> None:
        """Stop fetching; :meth:`run` then drains, commits and returns (signal-safe)."""
        self._stop.set()

    @property
    def started(self) -> bool:
        return self._state == "started"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def assigned(self) -> list[TopicPartition]:
        return sorted(self._partitions)

    def in_flight(self) -> int:
        return self.intake.in_flight()

    async def run(self) -> None:
        """Process until :meth:`request_stop`, then drain, flush, commit. Raises a fatal error
        (a send that never succeeded, no healthy replica) after committing what is safe."""
        async with asyncio.TaskGroup() as group:
            emitter = group.create_task(self._emit_loop(), name="emit")
            group.create_task(self._commit_loop(), name="commit")
            await self.intake.run()
            if not await self._drain(self.settings.shutdown_timeout_s):
                self._abandon()
            self.intake.close()
            await emitter
            self._closing.set()
            self.sink.commit_due.set()  # wake the commit loop so it sees the closing
        await self.sink.flush(self.settings.shutdown_timeout_s)
        await self.commit()
        if self._fatal is not None:
            raise self._fatal

    async def commit(self) -> None:
        await self.sink.commit(dict(self._partitions))

    def _abandon(self) -> None:
        """Past the drain deadline: give up on the results not in yet. The worker skips their
        items; their partitions write nothing more, so nothing past them is committed."""
        self._abandoned = True
        self.intake.cancel_pending()

    # --- emit -------------------------------------------------------------------------------
    async def _emit_loop(self) -> None:
        while (entry := await self.intake.next()) is not None:
            error = entry.error
            summary: str | None = None
            abandoned = False
            if entry.outcome is not None:
                try:
                    summary = await entry.outcome
                except StreamprocError as exc:
                    error = exc
                except asyncio.CancelledError:
                    if not (self._abandoned and entry.outcome.cancelled()):
                        raise
                    abandoned = True
            partition = self._partitions.get(entry.tp)
            if partition is None or partition.generation != entry.generation:
                self.stats.dropped_after_revoke += 1
                continue
            partition.unemitted -= 1
            if abandoned:
                partition.blocked = True
            if partition.blocked:
                continue
            if error is not None and not error.dead_letter:
                # Not this record's fault (no healthy replica, worker closed): nothing after
                # it in this partition may be written, so nothing past it is ever committed.
                partition.blocked = True
                self._fail(error)
                continue
            try:
                outbound = self._outbound(entry, summary, error)
            except Exception as exc:
                outbound = self._outbound(entry, None, InvalidRecord(
                    f"the output could not be built: {type(exc).__name__}: {exc}",
                    "output_failed"))
            try:
                await self.sink.emit(entry.tp, partition, outbound)
            except KafkaError as exc:  # refused before any retry could help (closed, too big)
                partition.blocked = True
                self._fail(exc)

    def _outbound(self, entry: Entry, summary: str | None,
                  error: StreamprocError | None) -> Outbound:
        if error is not None:
            return outputs.dead_letter(entry.record, error, self.settings.kafka_dlq_topic)
        assert entry.item is not None and summary is not None
        return outputs.summary(entry.record, entry.item, summary,
                               self.settings.resolved_model_name,
                               self.settings.kafka_output_topic, entry.fetched_at)

    def _fail(self, error: BaseException) -> None:
        if self._fatal is None:
            log.error("stopping: %s", error)
            self._fatal = error
        self.request_stop()

    # --- commit and rebalance ---------------------------------------------------------------
    async def _commit_loop(self) -> None:
        interval = self.settings.kafka_commit_interval_ms / 1000
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sink.commit_due.wait(), interval)
            if not self._closing.is_set():
                await self.commit()

    async def _drain(self, within_s: float, only: set[TopicPartition] | None = None) -> bool:
        """Wait until every accepted record (of ``only``, or of all partitions) is settled:
        acknowledged (at-least-once) or buffered for the next transaction (exactly-once)."""
        deadline = time.monotonic() + within_s
        while not all(self.sink.settled(p) or p.blocked for tp, p in self._partitions.items()
                      if only is None or tp in only):
            if time.monotonic() > deadline:
                log.warning("%d record(s) still open after %.1f s; they will be read again "
                            "by the next owner", self.in_flight(), within_s)
                return False
            await asyncio.sleep(0.02)
        return True

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        mine = {tp for tp in revoked if tp in self._partitions}
        for tp in mine:
            self._partitions[tp].accepting = False
        if mine:
            await self._drain(self.settings.shutdown_timeout_s, only=mine)
            await self.sink.commit({tp: self._partitions[tp] for tp in mine})
            await self.sink.revoked(mine)
        for tp in mine:
            del self._partitions[tp]
        log.info("partitions revoked: %s", _names(mine))

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        """aiokafka may hand out records of a new assignment while this listener still runs,
        so new partitions stay paused until the sink has set them up (and, exactly-once,
        fenced the previous owner and sought to the committed offset)."""
        new = {tp: PartitionState(next(self._generations)) for tp in assigned
               if tp not in self._partitions}
        self.consumer.pause(*new)
        await self.sink.assigned(new)
        self._partitions.update(new)
        if not self.stats.paused:
            self.consumer.resume(*new)
        self.joined.set()
        log.info("partitions assigned: %s", _names(assigned))

    async def _rewind(self, tp: TopicPartition, fenced: bool) -> None:
        """Forget the partition's work in hand; read again from its committed offset, or,
        when fenced, take nothing more until the rebalance takes it away."""
        partition = PartitionState(next(self._generations))
        partition.accepting = not fenced
        self._partitions[tp] = partition
        if fenced:
            return
        committed = await self.consumer.committed(tp)
        if committed is None:
            await self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek(tp, committed)
