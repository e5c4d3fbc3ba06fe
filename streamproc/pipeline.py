"""The stream processor: consume → micro-batch → summarize → produce → commit.

Every record ends in exactly one of three ways: its summary is written, its dead letter is
written (with the reason and the source offset), or, for a fault that is not its own, its
partition stops with the record uncommitted, for the next owner, and the service exits
non-zero. Each assigned partition is a :class:`~streamproc.partition.Partition`, the one owner
of its state (see its state machine); this module runs the protocol over them.

Commit protocol (at-least-once)
-------------------------------
1. **Fetch.** ``getmany`` returns records of the RUNNING, unpaused partitions, at most as many
   as the worker's queue has room for. Each partition registers its fresh records' offsets, in
   order, as *open*, and drops stale ones (fetched before its current epoch).
2. **Decode.** A record that is not a valid feed item becomes a dead letter right away. The
   valid ones are submitted to the GPUWorker, which batches by size and delay. Every record
   then waits in its partition's own queue, in offset order.
3. **Emit in order.** One emitter per partition takes its records in offset order, waits for
   each result, and sends the summary to ``KAFKA_OUTPUT_TOPIC``, or a dead letter to
   ``KAFKA_DLQ_TOPIC`` (bad input, an item that failed for good, an output too large for its
   topic). A result that failed for a reason not the record's own (no healthy replica) stops
   the partition there: nothing after it is written.
4. **Acknowledge.** When the broker acknowledges a send (``acks=all``), its source offset is
   *complete*. How a failed send ends is written down in :mod:`streamproc.sinks`: a dead
   letter for a refusal of its own, a new producer for collateral failures, and otherwise a
   stop of its partition, uncommitted, after ``KAFKA_DELIVERY_TIMEOUT_MS`` at most.
5. **Commit.** Every ``KAFKA_COMMIT_INTERVAL_MS``, on revoke and at shutdown, each partition
   commits the first offset that is not complete (the highest contiguous completed offset
   + 1). So a committed offset means every record before it has an acknowledged output.
6. **Rebalance.** On revoke, a partition goes DRAINING: it takes nothing new and finishes its
   open work for at most ``SHUTDOWN_TIMEOUT_S`` (and half ``KAFKA_MAX_POLL_INTERVAL_MS``),
   commits, and is REVOKED; results that arrive later are dropped, never written. On assign,
   a partition stays paused until the sink has set it up and it has sought its committed
   offset. A rebalance callback that fails stops the service (non-zero): it never stays a
   member with partitions it does not serve.
7. **Shutdown.** Stop fetching, drain (until 80% of ``SHUTDOWN_TIMEOUT_S``), flush the
   producer (until 90%), commit (until 100%), close the clients: every wait is bounded, and
   what did not finish in time is left uncommitted for the next owner.

A crash between 4 and 5 replays the records after the last commit: outputs may repeat, none
is lost.

With ``PROCESSING_GUARANTEE=exactly_once``, steps 4 and 5 become one Kafka transaction per
partition and commit interval: the outputs, the dead letters and the consumed offset together
(see :mod:`streamproc.sinks` for the fencing argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from .errors import InvalidRecord, RebalanceFailed, StreamprocError, WorkerClosed
from .intake import Intake
from .kafka_clients import cancelling, consumer_for, ensure_topics, start_with_retry, within
from .metrics import PipelineStats
from .outputs import Outbound, Outputs
from .partition import Entry, Partition
from .settings import Settings
from .sinks import AtLeastOnceSink, ExactlyOnceSink, Sink

if TYPE_CHECKING:
    from .engine import SummaryWorker

__all__ = ["StreamProcessor"]

log = logging.getLogger("streamproc.pipeline")
DRAIN_SHARE, FLUSH_SHARE = 0.8, 0.9  # of SHUTDOWN_TIMEOUT_S, for steps 7's waits
CLOSE_TIMEOUT_S = 1.0  # each client's close, after the final commit


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: StreamProcessor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor._revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor._assign(assigned)


def _names(partitions: list[Partition]) -> list[str]:
    return sorted(p.name for p in partitions)


class StreamProcessor:
    """Runs the commit protocol above for one consumer in ``KAFKA_GROUP_ID``."""

    def __init__(self, settings: Settings, worker: SummaryWorker) -> None:
        self.settings = settings
        self.worker = worker
        self.stats = PipelineStats()
        self.consumer = consumer_for(settings)
        self.outputs = Outputs(settings, {})
        sink_type = (ExactlyOnceSink if settings.processing_guarantee == "exactly_once"
                     else AtLeastOnceSink)
        self.sink: Sink = sink_type(settings, self.consumer, self.stats, self.outputs,
                                    self._fail)
        self._partitions: dict[TopicPartition, Partition] = {}
        self._emitters: dict[TopicPartition, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._stop_requested_at: float | None = None
        self.intake = Intake(settings, self.consumer, worker, self.stats,
                             self._partitions, self._stop)
        self._closing = asyncio.Event()
        self.joined = asyncio.Event()  # set once the group has handed out an assignment
        self.fatal: StreamprocError | None = None
        self._state = "new"

    # --- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> StreamProcessor:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Check topics and their size limits, connect the producer(s) and the consumer, join
        the group. Idempotent."""
        if self._state != "new":
            return
        self._state = "starting"
        self.outputs.limits.update(await ensure_topics(self.settings))
        await self.sink.start()
        await start_with_retry("consumer", self.consumer.start, self.settings)
        self.consumer.subscribe([self.settings.kafka_input_topic], listener=_Listener(self))
        self._state = "started"

    async def stop(self) -> None:
        """Close the clients (after :meth:`run` drained and committed), each within
        ``CLOSE_TIMEOUT_S``. Idempotent."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        self._state = "stopped"
        self.request_stop()
        for task in self._emitters.values():
            task.cancel()
        await within("leaving the group", self.consumer.stop(), CLOSE_TIMEOUT_S)
        await self.sink.stop(CLOSE_TIMEOUT_S)

    def request_stop(self) -> None:
        """Stop fetching; :meth:`run` then drains, commits and returns (signal-safe)."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
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

    def partition(self, tp: TopicPartition) -> Partition | None:
        return self._partitions.get(tp)

    def in_flight(self) -> int:
        return self.intake.in_flight()

    async def run(self) -> None:
        """Process until :meth:`request_stop`, then drain, flush, commit (step 7). Raises the
        fatal error (a fault not a record's own) after committing what is safe."""
        async with asyncio.TaskGroup() as group:
            committing = group.create_task(self._commit_loop(), name="commit")
            await self.intake.run()
            assert self._stop_requested_at is not None
            started, budget = self._stop_requested_at, self.settings.shutdown_timeout_s
            partitions = list(self._partitions.values())
            for partition in partitions:
                partition.drain()
            if not await self._settle(partitions, started + DRAIN_SHARE * budget):
                self._abandon(partitions)
            self._closing.set()
            committing.cancel()  # a transaction stuck on an unreachable broker must not wait
        await self.sink.flush(started + FLUSH_SHARE * budget - time.monotonic())
        await within("the final commit", self.commit(), started + budget - time.monotonic())
        if self.fatal is not None:
            raise self.fatal

    async def commit(self) -> None:
        await self.sink.commit(list(self._partitions.values()))

    def _abandon(self, partitions: list[Partition]) -> None:
        """Past the drain deadline: give up on the results not in yet. Their partitions stop
        there, so nothing past them is written or committed."""
        log.warning("%d record(s) still open after the drain; they will be read again by "
                    "the next owner", self.in_flight())
        for partition in partitions:
            if not self.sink.settled(partition):
                self._cancel_emitter(partition)
                partition.stop("shutdown: its results were not in within SHUTDOWN_TIMEOUT_S")

    def _fail(self, error: StreamprocError) -> None:
        if self.fatal is None:
            log.error("stopping: %s", error)
            self.fatal = error
        self.request_stop()

    # --- emit -------------------------------------------------------------------------------
    def _start_emitter(self, partition: Partition) -> None:
        task = asyncio.create_task(self._emit_loop(partition), name=f"emit-{partition.name}")
        task.add_done_callback(self._emitter_done)
        self._emitters[partition.tp] = task

    def _emitter_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail(StreamprocError(f"{task.get_name()} failed: {exc!r}"))

    def _cancel_emitter(self, partition: Partition) -> None:
        task = self._emitters.pop(partition.tp, None)
        if task is not None:
            task.cancel()

    async def _emit_loop(self, partition: Partition) -> None:
        while (entry := await partition.next_entry()) is not None:
            try:
                await self._emit(partition, entry)
            finally:
                partition.emitted(entry)

    async def _emit(self, partition: Partition, entry: Entry) -> None:
        error, summary = entry.error, None
        if entry.outcome is not None:
            try:
                summary = await entry.outcome
            except StreamprocError as exc:
                error = exc
            except asyncio.CancelledError:
                if not entry.outcome.cancelled() or cancelling():
                    raise
                error = WorkerClosed("its inference was cancelled")  # dropped, if not current
        if not partition.current(entry.epoch):
            self.stats.dropped_stale += 1
            return
        if error is not None and not error.dead_letter:
            partition.stop(f"{error.reason_code}: {error}")
            self._fail(error)
            return
        try:
            await self.sink.emit(partition, self._outbound(entry, summary, error))
        except (KafkaError, StreamprocError) as exc:
            self.sink.give_up(partition, f"its output could not be sent: {exc!r}")

    def _outbound(self, entry: Entry, summary: str | None,
                  error: StreamprocError | None) -> Outbound:
        try:
            if error is None:
                assert entry.item is not None and summary is not None
                return self.outputs.summary(entry.record, entry.item, summary,
                                            entry.fetched_at)
        except Exception as exc:
            error = InvalidRecord(f"the output could not be built: {type(exc).__name__}: "
                                  f"{exc}", "output_failed")
        assert error is not None
        return self.outputs.dead_letter(entry.record, error)

    # --- commit and rebalance ---------------------------------------------------------------
    async def _commit_loop(self) -> None:
        interval = self.settings.kafka_commit_interval_ms / 1000
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sink.commit_due.wait(), interval)
            if not self._closing.is_set():
                self.sink.check_deadlines()
                await self.commit()

    async def _settle(self, partitions: list[Partition], deadline: float) -> bool:
        """Wait until each partition's emitter has emitted everything it accepted and the
        sink holds it safely: acknowledged (at-least-once) or buffered for the next
        transaction (exactly-once). False at ``deadline``."""
        def settled(p: Partition) -> bool:
            emitter = self._emitters.get(p.tp)
            return p.finished or ((emitter is None or emitter.done()) and self.sink.settled(p))

        while not all(settled(p) for p in partitions):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        """Step 6, revoke. Catches everything: aiokafka would swallow it."""
        mine = [p for tp in sorted(revoked) if (p := self._partitions.get(tp)) is not None]
        if not mine:
            return
        try:
            for partition in mine:
                partition.drain()
            limit = min(self.settings.shutdown_timeout_s,
                        self.settings.kafka_max_poll_interval_ms / 2000)
            if not await self._settle(mine, time.monotonic() + limit):
                log.warning("revoke: records still open after %.1f s; they will be read again "
                            "by the next owner", limit)
            for partition in mine:
                self._cancel_emitter(partition)
            await within("the commit on revoke", self.sink.commit(mine), limit)
            await self.sink.revoked(mine, CLOSE_TIMEOUT_S)
        except Exception as exc:
            self._fail(RebalanceFailed(f"handing back {_names(mine)} failed: {exc!r}"))
        finally:
            for partition in mine:
                self._cancel_emitter(partition)
                partition.revoke()
                del self._partitions[partition.tp]
            log.info("partitions revoked: %s", _names(mine))

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        """Step 6, assign: new partitions stay paused until the sink has set them up (and,
        exactly-once, fenced the previous owner) and they have sought their committed
        offsets. Catches everything: a member that cannot set up its partitions stops."""
        new = [Partition(tp, self.consumer) for tp in sorted(assigned)
               if tp not in self._partitions]
        for partition in new:
            self._partitions[partition.tp] = partition
            self.intake.adopt(partition)
        try:
            async with asyncio.timeout(self.settings.kafka_connect_timeout_s):
                await self.sink.assigned(new)
                await asyncio.gather(*(partition.seek() for partition in new))
        except Exception as exc:
            for partition in new:
                partition.stop("its set-up failed")
            self._fail(RebalanceFailed(f"setting up {_names(new)} failed: {exc!r}"))
            return
        for partition in new:
            self._start_emitter(partition)
        self.joined.set()
        log.info("partitions assigned: %s", _names(new))
