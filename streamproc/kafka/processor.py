"""The stream processor: consume → micro-batch → summarize → produce → commit.

Every record ends in exactly one of three ways: its summary is written, its dead letter is
written (with the reason and the source offset), or, for a fault that is not its own, its
partition stops with the record uncommitted, for the next owner, and the service exits
non-zero. Each assigned partition is a :class:`~streamproc.kafka.partition.Partition`, the one owner
of its state (see its state machine); this module runs the protocol over them.

Commit protocol (at-least-once)
-------------------------------
1. **Fetch.** ``getmany`` returns records of the RUNNING, unpaused partitions, at most as many
   as the worker's queue has room for, decoded under the guard of ``kafka/fetched.py``: a record
   the client cannot decode comes with its problem, and a compressed batch that could expand
   past ``KAFKA_MAX_DECOMPRESSED_BATCH_BYTES`` is not decompressed. An error ``getmany`` still
   raises is not a record's own: the processor stops (``FetchFailed``), committing nothing past
   what was written. Each partition registers its fresh records' offsets, in order, as *open*,
   and drops stale ones (fetched before its current epoch). A stop request wakes a waiting
   ``getmany``, even one that waits out a rebalance.
2. **Decode.** A record that is not a valid feed item, or could not be decoded, becomes a
   dead letter right away. The valid ones are submitted to the GPUWorker, which batches by
   size and delay. Every record then waits in its partition's own queue, in offset order.
3. **Emit in order.** One emitter per partition takes its records in offset order, waits for
   each result, and sends the summary to ``KAFKA_OUTPUT_TOPIC``, or a dead letter to
   ``KAFKA_DLQ_TOPIC`` (bad input, an item that failed for good, an output too large for its
   topic). A result that failed for a reason not the record's own (no healthy replica) stops
   the partition there: nothing after it is written.
4. **Acknowledge.** When the broker acknowledges a send (``acks=all``), its source offset is
   *complete*. How a failed send ends is written down in :mod:`streamproc.kafka.sink`: a dead
   letter for a refusal of its own, a new producer for collateral failures, and otherwise a
   stop of its partition, uncommitted, after ``KAFKA_DELIVERY_TIMEOUT_MS`` at most.
5. **Commit.** Every ``KAFKA_COMMIT_INTERVAL_MS``, on revoke and at shutdown, each partition
   commits the first offset that is not complete (the highest contiguous completed offset
   + 1). So a committed offset means every record before it has an acknowledged output. A
   commit waits at most ``KAFKA_COMMIT_INTERVAL_MS`` (and at least 1 s) for the group
   coordinator; one that did not finish is tried again at the next interval, so a
   coordinator outage never holds up the delivery deadlines of step 4.
6. **Rebalance** (the timing: :mod:`streamproc.kafka.group`). On revoke, a partition goes
   DRAINING: it takes nothing new and finishes its open work until 80% of
   ``SHUTDOWN_TIMEOUT_S``, commits until 100%, and is REVOKED; results that arrive later are
   dropped, never written. A set-up still running is cancelled first. On assign, the callback
   only registers the new partitions, paused (aiokafka sends no heartbeats while it runs);
   their set-up runs after it, and each stays paused until the sink has set it up and it
   has sought its committed offset. A member that is stopping sets up no new partition. A
   set-up or hand-back that fails stops the service (non-zero): it never stays a member with
   partitions it does not serve.
7. **Shutdown.** Stop fetching, drain (until 80% of ``SHUTDOWN_TIMEOUT_S``), let a commit in
   flight finish and flush the producer (until 90%), commit (until 100%), close the clients:
   every wait is bounded, and what did not finish in time is left uncommitted for the next
   owner.

A crash between 4 and 5 replays the records after the last commit: outputs may repeat, none
is lost.

With ``PROCESSING_GUARANTEE=exactly_once``, steps 4 and 5 become one Kafka transaction per
partition and commit interval: the outputs, the dead letters and the consumed offset together
(see :mod:`streamproc.kafka.exactly_once` for the fencing argument, and for why a transaction
never commits an offset past an output it did not write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from ..aio import cancelling, within
from ..errors import (
    ConsumerFailed,
    InvalidRecord,
    RebalanceFailed,
    StreamprocError,
    WorkerClosed,
)
from ..lifecycle import Lifecycle
from ..settings import Settings
from .at_least_once import AtLeastOnceSink
from .clients import consumer_for, start_with_retry
from .exactly_once import ExactlyOnceSink
from .group import (
    DRAIN_SHARE,
    REVOKE_CLOSE_S,
    note_generation,
    rebalance_problems,
    revoke_deadlines,
)
from .intake import Intake
from .lag import LagMonitor
from .outbound import Header, Outbound, Outputs
from .partition import Entry, Partition
from .sink import Sink
from .stats import PipelineStats
from .topics import ensure_topics
from .worker import TextWorker

__all__ = ["StreamProcessor"]

log = logging.getLogger("streamproc.processor")
FLUSH_SHARE = 0.9  # of SHUTDOWN_TIMEOUT_S: step 7's commit in flight and flush end here
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


class StreamProcessor(Lifecycle):
    """Runs the commit protocol above for one consumer in ``KAFKA_GROUP_ID``. ``start``
    checks the topics, connects and joins the group; :meth:`run` processes until
    :meth:`request_stop`; ``stop`` closes the clients."""

    def __init__(self, settings: Settings, worker: TextWorker) -> None:
        super().__init__()
        self.settings = settings
        self.worker = worker
        self.stats = PipelineStats()
        self.consumer = consumer_for(settings)
        self.outputs = Outputs(settings, settings.resolved_model_name)
        sink_type = (ExactlyOnceSink if settings.processing_guarantee == "exactly_once"
                     else AtLeastOnceSink)
        self.sink: Sink = sink_type(settings, self.consumer, self.stats, self.outputs,
                                    self._fail, commit_early_at=max(1, worker.queue_size // 2))
        self._partitions: dict[TopicPartition, Partition] = {}
        self._emitters: dict[TopicPartition, asyncio.Task[None]] = {}
        self._setups: set[asyncio.Task[None]] = set()  # step 6's set-ups still running
        self._stop_requested = asyncio.Event()
        self._stop_requested_at: float | None = None
        self.intake = Intake(settings, self.consumer, worker, self.stats,
                             self._partitions, self._stop_requested, self._fail)
        self._closing = asyncio.Event()
        self.joined = asyncio.Event()  # set once the group has handed out an assignment
        self.fatal: StreamprocError | None = None
        self.lag = LagMonitor(self.consumer, min(settings.log_interval_s, 5.0))

    # --- lifecycle --------------------------------------------------------------------------
    async def _start(self) -> None:
        """Check topics and their size limits, connect the producer(s) and the consumer, join
        the group."""
        for problem in rebalance_problems(self.settings):
            log.warning("rebalance timing: %s", problem)
        self.outputs.limits.update(await ensure_topics(self.settings))
        await self.sink.start()
        await start_with_retry("consumer", self.consumer.start, self.settings)
        self.consumer.subscribe([self.settings.kafka_input_topic], listener=_Listener(self))
        await self.lag.start()

    async def _stop(self) -> None:
        """Close the clients (after :meth:`run` drained and committed), each within
        ``CLOSE_TIMEOUT_S``."""
        self.request_stop()
        await self._cancel_setups()
        for task in self._emitters.values():
            task.cancel()
        await self.lag.stop()
        await within("leaving the group", self.consumer.stop(), CLOSE_TIMEOUT_S)
        await self.sink.stop(CLOSE_TIMEOUT_S)

    def request_stop(self) -> None:
        """Stop fetching; :meth:`run` then drains, commits and returns (signal-safe)."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stop_requested.set()

    @property
    def started(self) -> bool:
        return self.running

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

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
            await self._cancel_setups()  # a stopping member sets up no new partition
            partitions = list(self._partitions.values())
            for partition in partitions:
                partition.drain()
            if not await self._settle(partitions, started + DRAIN_SHARE * budget):
                self._abandon(partitions)
            # Let a commit in flight finish (an open transaction would hold back
            # read_committed readers until the next owner starts), and start no other.
            self._closing.set()
            self.sink.commit_due.set()
            await asyncio.wait({committing},
                               timeout=max(started + FLUSH_SHARE * budget - time.monotonic(), 0))
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
        trace = entry.trace
        if not partition.current(entry.epoch):
            self.stats.dropped_stale += 1
            if trace is not None:
                trace.finish("stale")
            return
        if error is not None and not error.dead_letter:
            partition.stop(f"{error.reason_code}: {error}")
            self._fail(error)
            if trace is not None:
                trace.finish("stopped", f"{error.reason_code}: {error}")
            return
        out = self._outbound(entry, summary, error, trace.produce() if trace else [])
        try:
            await self.sink.emit(partition, out)
        except (KafkaError, StreamprocError) as exc:
            self.sink.give_up(partition, f"its output could not be sent: {exc!r}")
        finally:
            if trace is not None:
                trace.finish("summary" if out.reason_code is None else "dead_letter",
                             out.reason_code)

    def _outbound(self, entry: Entry, summary: str | None, error: StreamprocError | None,
                  trace: list[Header]) -> Outbound:
        try:
            if error is None:
                assert entry.item is not None and summary is not None
                return self.outputs.summary(entry.record, entry.item, summary,
                                            entry.fetched_at, trace)
        except Exception as exc:
            error = InvalidRecord(f"the output could not be built: {type(exc).__name__}: "
                                  f"{exc}", "output_failed")
        assert error is not None
        return self.outputs.dead_letter(entry.record, error, trace)

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

    async def _cancel_setups(self) -> None:
        """Cancel the set-ups still running (step 6), and wait for them to end: a revoked
        partition's producer must not start after its revoke returned."""
        setups = [task for task in self._setups if not task.done()]
        for task in setups:
            task.cancel()
        if setups:
            await within("cancelling the partitions' set-up",
                         asyncio.gather(*setups, return_exceptions=True), CLOSE_TIMEOUT_S)

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        """Step 6, revoke, within ``SHUTDOWN_TIMEOUT_S`` + 1 s. Catches everything: aiokafka
        would swallow it."""
        started = time.monotonic()
        await self._cancel_setups()
        mine = [p for tp in sorted(revoked) if (p := self._partitions.get(tp)) is not None]
        if not mine:
            return
        drain_until, commit_until = revoke_deadlines(self.settings, started)
        try:
            for partition in mine:
                partition.drain()
            if not await self._settle(mine, drain_until):
                log.warning("revoke: records still open after %.1f s; they will be read again "
                            "by the next owner", drain_until - started)
            for partition in mine:
                self._cancel_emitter(partition)
            await within("the commit on revoke", self.sink.commit(mine),
                         commit_until - time.monotonic())
            await self.sink.revoked(mine, REVOKE_CLOSE_S)
        except Exception as exc:
            self._fail(RebalanceFailed(f"handing back {_names(mine)} failed: {exc!r}"))
        finally:
            for partition in mine:
                self._cancel_emitter(partition)
                partition.revoke()
                del self._partitions[partition.tp]
            log.info("partitions revoked: %s", _names(mine))

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        """Step 6, assign: register the new partitions, paused, and return at once (aiokafka
        sends no heartbeats until this returns); :meth:`_set_up` does the rest."""
        generation = note_generation(self.consumer)
        if (self.settings.kafka_group_instance_id and self.stats.rebalances
                and generation == self.stats.generation):
            # The group handed the same generation's assignment out again: another process
            # took this instance id in between, and the two would take it from each other
            # (and share the partitions) for as long as both run.
            self._fail(ConsumerFailed(
                f"KAFKA_GROUP_INSTANCE_ID={self.settings.kafka_group_instance_id!r} is used "
                "by another member of the group too; each process needs an id of its own"))
            return
        self.stats.rebalances += 1
        self.stats.generation = generation
        new = [Partition(tp, self.consumer, self.settings.kafka_auto_offset_reset)
               for tp in sorted(assigned)
               if tp not in self._partitions]
        for partition in new:
            self._partitions[partition.tp] = partition
            self.intake.adopt(partition)
        if not new:
            return
        if self.stopping:
            log.info("stopping: not setting up %s; they are left to the next owner",
                     _names(new))
            return
        task = asyncio.create_task(self._set_up(new, generation), name="set-up")
        self._setups.add(task)
        task.add_done_callback(self._setups.discard)

    async def _set_up(self, new: list[Partition], generation: int) -> None:
        """The sink sets the partitions up (exactly-once: a transactional producer that
        fences the previous owner), then they seek their committed offsets; each step within
        ``KAFKA_CONNECT_TIMEOUT_S``. A member that cannot set up its partitions stops."""
        try:
            await self.sink.assigned(new)
            async with asyncio.timeout(self.settings.kafka_connect_timeout_s):
                await asyncio.gather(*(partition.seek() for partition in new))
        except Exception as exc:
            for partition in new:
                partition.stop("its set-up failed")
            self._fail(RebalanceFailed(f"setting up {_names(new)} failed: {exc!r}"))
            return
        for partition in new:
            if partition.running:
                self._start_emitter(partition)
        self.joined.set()
        log.info("partitions assigned: %s (generation %d)", _names(new), generation)
