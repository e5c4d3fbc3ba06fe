"""Where results go, and how their offsets are committed: one class per guarantee.

``AtLeastOnceSink``  one idempotent producer (``acks=all``). An offset completes when the
                     broker acknowledges its output; the consumer commits the contiguous
                     completed prefix (see :mod:`streamproc.pipeline`).
``ExactlyOnceSink``  one transactional producer per input partition, with the transactional
                     id ``<prefix>-<group>-<topic>-<partition>``. A partition's outputs, dead
                     letters and consumed offset are written in one transaction.

How a failed write ends (both sinks)
------------------------------------
1. **Refused for the record's own reason** (too large, ``CORRUPT_MESSAGE``,
   ``INVALID_TIMESTAMP``, and ``INVALID_RECORD``, which aiokafka reports as ``UNKNOWN``): the
   output is replaced by a dead letter (``output_refused``) and written again, in its place.
   Sizes are checked before sending (:mod:`streamproc.outputs`), so this is rare.
2. **Collateral** (``OUT_OF_ORDER_SEQUENCE_NUMBER``, ``UNKNOWN_PRODUCER_ID``): an idempotent
   producer whose batch was refused fails every later batch of that output partition. The
   producer is replaced and the failed records are written again, in their original order,
   after everything else it had in hand has settled. Outputs so keep input order.
3. **Anything else** (the broker unreachable, authorization, timeouts): the producer already
   retried it within its own timeouts; no second retry loop runs on top. If an output is still
   not written after ``KAFKA_DELIVERY_TIMEOUT_MS``, or the producer is replaced more than
   ``MAX_PRODUCER_RESETS`` times in a row without writing anything, its partition stops
   uncommitted and the service exits non-zero (:class:`~streamproc.errors.DeliveryFailed`).

Why exactly-once is safe without KIP-447 (aiokafka's ``send_offsets_to_transaction`` takes
only the group id, so the broker cannot check the consumer's generation):

1. Only the producer holding ``<prefix>-<group>-<topic>-<p>`` can commit offsets of partition
   p for this group, and the broker lets one producer epoch per transactional id commit at a
   time. (The group id is in the id, so two groups reading one topic never fence each other.)
2. A new owner of p first starts that producer (``init_transactions``): this bumps the epoch,
   so the old owner's producer is fenced and any transaction it left open is aborted or
   completed before ``start`` returns.
3. Only then does the new owner read p's committed offset and seek to it (the partition's
   SEEKING state). Whatever the old owner committed is in that offset, and whatever it did not
   commit was aborted, so each record's output is committed exactly once.
4. Every send of a transaction is awaited before its offsets are added and it commits; any
   failure aborts it. Refused records become dead letters and the same records are written
   again in a new transaction (case 1 and 2 above). A transaction that fails for any other
   reason is aborted and the partition rewound to its committed offset.
5. Fenced (``PRODUCER_FENCED``, ``INVALID_PRODUCER_EPOCH``): either a new owner exists, or the
   coordinator aborted a transaction older than ``KAFKA_TRANSACTION_TIMEOUT_MS`` (a long broker
   outage). The work in hand is dropped and the partition waits, paused, for twice the session
   timeout. A new owner's rebalance revokes it in that time; if it is still ours, the fence
   came from the timeout, so a new producer is started (fencing nobody) and the partition is
   rewound.
Downstream readers must use ``isolation_level=read_committed``.

One producer per process (Kafka Streams' ``exactly_once_v2``, KIP-447) would make the cost of
exactly-once independent of the partition count: the transaction would carry the consumer's
group metadata (generation, member id) in ``TxnOffsetCommit``, and the broker would fence a
zombie by its generation instead of by a transactional id per partition. aiokafka 0.14 sends
only the group id, so this sink keeps one producer per partition; switching needs a client
that sends ``ConsumerGroupMetadata`` and one transaction for all partitions per interval.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    InvalidProducerEpoch,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownError,
    UnknownProducerId,
)

from .errors import DeliveryFailed, StreamprocError
from .kafka_clients import producer_for, start_with_retry, within
from .metrics import PipelineStats
from .outputs import Outbound, Outputs
from .partition import Partition
from .settings import Settings

__all__ = ["AtLeastOnceSink", "ExactlyOnceSink", "MAX_PRODUCER_RESETS", "Sink"]

log = logging.getLogger("streamproc.sinks")
MAX_PRODUCER_RESETS = 5
ABORT_TIMEOUT_S = 5.0
_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError,
            CorruptRecordException, InvalidTimestampError, UnknownError)
_COLLATERAL = (OutOfOrderSequenceNumber, UnknownProducerId)
_FENCED = (ProducerFenced, InvalidProducerEpoch)


def refused(exc: BaseException | None) -> bool:
    """The broker refused the record for a reason of its own (case 1)."""
    return isinstance(exc, _REFUSED)


def replayable(exc: BaseException | None) -> bool:
    """Writing the record again through a new producer may succeed (case 1 or 2)."""
    return isinstance(exc, _REFUSED + _COLLATERAL)


async def _closed(what: str, closing: Awaitable[None], within_s: float) -> None:
    """Close a client within ``within_s``: a close that fails is logged, never raised."""
    await within(what, closing, within_s, tolerate=(KafkaError, OSError))


class Sink:
    """Shared parts; subclasses implement one delivery guarantee. ``on_fatal`` stops the
    service (non-zero exit)."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, stats: PipelineStats,
                 outputs: Outputs, on_fatal: Callable[[StreamprocError], None]) -> None:
        self.settings = settings
        self.consumer = consumer
        self.stats = stats
        self.outputs = outputs
        self.on_fatal = on_fatal
        self.delivery_timeout_s = settings.kafka_delivery_timeout_ms / 1000
        self.commit_due = asyncio.Event()  # set when waiting for the next interval would stall

    def count(self, record: Outbound) -> None:
        """The record is safely written (acknowledged, or its transaction committed)."""
        timestamp = record.source.timestamp
        if timestamp is not None and timestamp > 0:
            self.stats.end_to_end.observe(max(time.time() - timestamp / 1000, 0))
        if record.reason_code is None:
            self.stats.produced += 1
        else:
            self.stats.dead_letter(record.reason_code)

    def give_up(self, partition: Partition, reason: str) -> None:
        """A write failed for a reason not its record's own: stop the partition, uncommitted,
        and the service with it."""
        partition.stop(reason)
        self.on_fatal(DeliveryFailed(f"{partition.name}: {reason}"))

    async def start(self) -> None: ...
    async def stop(self, within_s: float) -> None: ...
    async def assigned(self, partitions: list[Partition]) -> None: ...
    async def revoked(self, partitions: list[Partition], within_s: float) -> None: ...

    async def emit(self, partition: Partition, record: Outbound) -> None:
        raise NotImplementedError

    def settled(self, partition: Partition) -> bool:
        """True when :meth:`commit` would cover everything this partition accepted."""
        raise NotImplementedError

    async def flush(self, within_s: float) -> None:
        """Wait (at most ``within_s``) until what was emitted is safely written or failed."""

    async def commit(self, partitions: Iterable[Partition]) -> None:
        raise NotImplementedError

    def check_deadlines(self) -> None:
        """Stop the partitions with an output unwritten for ``KAFKA_DELIVERY_TIMEOUT_MS``."""


@dataclass(slots=True, eq=False)
class _Send:
    seq: int
    partition: Partition
    epoch: int
    record: Outbound
    sent_at: float
    future: asyncio.Future[Any] | None = None
    error: BaseException | None = None


class AtLeastOnceSink(Sink):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.producer = producer_for(self.settings)
        self._seq = itertools.count()
        self._sends: dict[int, _Send] = {}  # not yet acknowledged, by send order
        self._writable = asyncio.Event()  # cleared while the producer is being replaced
        self._writable.set()
        self._reset: asyncio.Task[None] | None = None
        self._resets_in_a_row = 0

    async def start(self) -> None:
        await start_with_retry("producer", self.producer.start, self.settings)

    async def stop(self, within_s: float) -> None:
        if self._reset is not None:
            self._reset.cancel()
        await _closed("closing the producer", self.producer.stop(), within_s)

    async def emit(self, partition: Partition, record: Outbound) -> None:
        await self._writable.wait()
        send = _Send(next(self._seq), partition, partition.epoch, record, time.monotonic())
        self._sends[send.seq] = send
        await self._send(send)

    async def _send(self, send: _Send) -> None:
        record = send.record
        try:
            send.future = await self.producer.send(record.topic, value=record.value,
                                                   key=record.key, headers=record.headers)
        except KafkaError as exc:  # refused before it left (closed, or a size we missed)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            send.future = future
        send.future.add_done_callback(lambda fut: self._delivered(send, fut))

    def _delivered(self, send: _Send, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return  # the producer was closed under it: shutdown, its offset stays open
        send.error = fut.exception()
        if send.error is not None and send.partition.finished:
            self._sends.pop(send.seq, None)  # revoked or stopped: its offset stays open
            return
        if send.error is None:
            self._sends.pop(send.seq, None)
            self._resets_in_a_row = 0
            send.partition.tracker.complete(send.record.offset)
            self.count(send.record)
        elif replayable(send.error):
            if self._reset is None:
                self._writable.clear()
                self._reset = asyncio.create_task(self._replace_producer(), name="reset")
        else:
            self._sends.pop(send.seq, None)
            self.give_up(send.partition, f"the broker did not take an output for "
                         f"{send.record.topic}: {send.error!r}")

    async def _replace_producer(self) -> None:
        """Case 1 and 2: let every send in hand settle, replace the producer, then write the
        refused ones' dead letters and the collateral failures again, in send order."""
        try:
            pending = [s.future for s in self._sends.values()
                       if s.future is not None and not s.future.done()]
            if pending:
                _, late = await asyncio.wait(pending, timeout=self.delivery_timeout_s)
                if late:
                    for send in self._sends.values():
                        self.give_up(send.partition, "an output was not acknowledged within "
                                     "KAFKA_DELIVERY_TIMEOUT_MS")
                    return
            self._resets_in_a_row += 1
            failed = sorted((s for s in self._sends.values() if s.error is not None),
                            key=lambda s: s.seq)
            if self._resets_in_a_row > MAX_PRODUCER_RESETS:
                for send in failed:
                    self.give_up(send.partition, f"the producer failed {MAX_PRODUCER_RESETS} "
                                 f"times in a row: {send.error!r}")
                return
            old, self.producer = self.producer, producer_for(self.settings)
            await _closed("closing the failed producer", old.stop(), 5)
            await start_with_retry("producer", self.producer.start, self.settings)
            log.warning("producer replaced after %d failed send(s); writing them again in "
                        "order", len(failed))
            for send in failed:
                del self._sends[send.seq]
                if not send.partition.current(send.epoch):
                    continue
                record = send.record
                if refused(send.error):
                    assert send.error is not None
                    replacement = self.outputs.refused(record, send.error)
                    if replacement is None:
                        self.give_up(send.partition, f"the broker refused a dead letter: "
                                     f"{send.error!r}")
                        continue
                    record = replacement
                again = _Send(next(self._seq), send.partition, send.epoch, record,
                              send.sent_at)
                self._sends[again.seq] = again
                await self._send(again)
        finally:
            self._reset = None
            self._writable.set()

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for send in list(self._sends.values()):
            if now - send.sent_at > self.delivery_timeout_s and not send.partition.finished:
                self.give_up(send.partition, f"an output to {send.record.topic} was not "
                             f"acknowledged within KAFKA_DELIVERY_TIMEOUT_MS")

    async def flush(self, within_s: float) -> None:
        pending: list[asyncio.Future[Any]] = [
            s.future for s in self._sends.values() if s.future is not None]
        if self._reset is not None:
            pending.append(self._reset)
        if pending:
            await asyncio.wait(pending, timeout=max(within_s, 0.01))

    def settled(self, partition: Partition) -> bool:
        return partition.tracker.in_flight == 0  # every output acknowledged

    async def commit(self, partitions: Iterable[Partition]) -> None:
        offsets = {p.tp: pos for p in partitions
                   if (pos := p.tracker.committable()) is not None}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # not a member any more, or the coordinator moved: later
            log.warning("commit of %d partition(s) failed: %r", len(offsets), exc)
            return
        for p in partitions:
            if p.tp in offsets:
                p.tracker.mark_committed(offsets[p.tp])
        self.stats.commits += 1


class _Transactional:
    """The exactly-once state of one assigned partition: its producer and its buffer."""

    def __init__(self, partition: Partition, transactional_id: str) -> None:
        self.partition = partition
        self.transactional_id = transactional_id
        self.producer: AIOKafkaProducer | None = None
        self.buffer: list[Outbound] = []
        self.lock = asyncio.Lock()
        self.failures_in_a_row = 0
        self.unwritten_since: float | None = None  # the oldest buffered record's arrival
        self.interrupted = False  # a transaction was cancelled mid-way: commit nothing more


class ExactlyOnceSink(Sink):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._states: dict[TopicPartition, _Transactional] = {}
        self._recoveries: set[asyncio.Task[None]] = set()
        self._buffered = 0  # records in every partition's buffer

    def buffered(self, tp: TopicPartition) -> int:
        """Records of ``tp`` waiting for their transaction."""
        state = self._states.get(tp)
        return 0 if state is None else len(state.buffer)

    def transactional_id(self, tp: TopicPartition) -> str:
        return (f"{self.settings.kafka_transactional_id_prefix}-{self.settings.kafka_group_id}"
                f"-{tp.topic}-{tp.partition}")

    async def _new_producer(self, state: _Transactional) -> None:
        producer = producer_for(self.settings, transactional_id=state.transactional_id)
        await start_with_retry(f"transactional producer {state.partition.name}",
                               producer.start, self.settings)
        state.producer = producer

    async def assigned(self, partitions: list[Partition]) -> None:
        """Fence the previous owner of each partition (step 2); the caller then seeks."""
        states = [_Transactional(p, self.transactional_id(p.tp)) for p in partitions]
        for state in states:
            self._states[state.partition.tp] = state
        await asyncio.gather(*(self._new_producer(state) for state in states))

    async def revoked(self, partitions: list[Partition], within_s: float) -> None:
        states = [s for p in partitions if (s := self._states.pop(p.tp, None)) is not None]
        for state in states:
            self._drop(state, len(state.buffer))
        await asyncio.gather(*(_closed(f"closing {s.partition.name}'s producer",
                                       s.producer.stop(), within_s)
                               for s in states if s.producer is not None))

    async def stop(self, within_s: float) -> None:
        for task in self._recoveries:
            task.cancel()
        await self.revoked([s.partition for s in self._states.values()], within_s)

    async def emit(self, partition: Partition, record: Outbound) -> None:
        state = self._states.get(partition.tp)
        if state is None or state.partition is not partition:
            return  # revoked meanwhile: nothing of it is written or committed
        if not state.buffer:
            state.unwritten_since = time.monotonic()
        state.buffer.append(record)
        self._buffered += 1
        # Buffered records stay open until their transaction commits, and open records count
        # against backpressure: commit early rather than stall the fetch until the next tick.
        if self._buffered >= max(1, self.settings.gpu_queue_size // 2):
            self.commit_due.set()

    def _drop(self, state: _Transactional, count: int) -> None:
        """Take the first ``count`` records out of ``state``'s buffer (written, or dropped)."""
        del state.buffer[:count]
        self._buffered -= count
        state.unwritten_since = time.monotonic() if state.buffer else None

    def settled(self, partition: Partition) -> bool:
        return partition.unemitted == 0  # everything is in the buffer the next commit writes

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for state in list(self._states.values()):
            since = state.unwritten_since
            if (since is not None and now - since > self.delivery_timeout_s
                    and not state.partition.finished):
                self.give_up(state.partition, "its transaction did not commit within "
                             "KAFKA_DELIVERY_TIMEOUT_MS")

    async def commit(self, partitions: Iterable[Partition]) -> None:
        self.commit_due.clear()
        await asyncio.gather(*(self._commit(state) for p in partitions
                               if (state := self._states.get(p.tp)) is not None
                               and state.partition is p and state.buffer))

    async def _commit(self, state: _Transactional) -> None:
        async with state.lock:
            partition, producer = state.partition, state.producer
            records = list(state.buffer)
            if not records or producer is None or partition.finished or state.interrupted:
                return
            epoch = partition.epoch
            try:
                async with asyncio.timeout(self.delivery_timeout_s):
                    failed = await self._transaction(producer, partition.tp, records)
            except asyncio.CancelledError:
                state.interrupted = True  # shutdown: its transaction stays open, not ended
                raise
            except _FENCED as exc:
                self._fenced(state, exc)
                return
            except Exception as exc:  # KafkaError, TimeoutError, or aiokafka's own state
                await self._failed(state, f"transaction failed ({exc!r}); aborted, rewinding")
                return
            if not partition.current(epoch):
                return  # rewound or revoked while committing: its outcome is the broker's
            if failed:
                await self._replace_refused(state, records, failed)
                return
            self._drop(state, len(records))
            state.failures_in_a_row = 0
            for r in records:
                partition.tracker.complete(r.offset)
                self.count(r)
            partition.tracker.mark_committed(records[-1].offset + 1)
            self.stats.commits += 1

    async def _transaction(self, producer: AIOKafkaProducer, tp: TopicPartition,
                           records: list[Outbound]) -> dict[int, BaseException]:
        """One transaction: every send awaited before the offsets and the commit. Returns
        the failed sends by index (the transaction then aborted).

        Written out rather than with aiokafka's ``transaction()`` context: on the way out of a
        cancellation that context awaits the abort with no bound, so a broker outage would
        hold the shutdown. Here a failed transaction is aborted within ``ABORT_TIMEOUT_S``,
        and a cancelled one not at all (its producer is replaced or closed next)."""
        deliveries: list[asyncio.Future[Any]] = []
        await producer.begin_transaction()
        try:
            for r in records:
                deliveries.append(await producer.send(r.topic, value=r.value, key=r.key,
                                                      headers=r.headers))
            results = await asyncio.shield(asyncio.gather(*deliveries, return_exceptions=True))
            failed = {i: e for i, e in enumerate(results) if isinstance(e, BaseException)}
            if not failed:
                await producer.send_offsets_to_transaction(
                    {tp: records[-1].offset + 1}, self.settings.kafka_group_id)
                await producer.commit_transaction()
                return {}
        except asyncio.CancelledError:
            raise
        except BaseException:
            await _abort(producer)
            raise
        finally:
            _retrieve(deliveries)
        await _abort(producer)
        return failed

    async def _replace_refused(self, state: _Transactional, records: list[Outbound],
                               failed: dict[int, BaseException]) -> None:
        """Case 1 and 2 inside a transaction: it aborted; refused records become dead
        letters in the buffer, and the same records go out again in a new transaction."""
        fenced = next((e for e in failed.values() if isinstance(e, _FENCED)), None)
        if fenced is not None:
            self._fenced(state, fenced)
            return
        other = next((e for e in failed.values() if not replayable(e)), None)
        if other is not None:
            await self._failed(state, f"a send failed ({other!r}); aborted, rewinding")
            return
        for i, exc in failed.items():
            if refused(exc):
                replacement = self.outputs.refused(records[i], exc)
                if replacement is None:
                    self.give_up(state.partition, f"the broker refused a dead letter: {exc!r}")
                    return
                state.buffer[i] = replacement
        if self._failed_again(state, f"{MAX_PRODUCER_RESETS} transactions in a row failed"):
            return
        log.warning("%s: %d send(s) failed in a transaction (%s); aborted, writing again",
                    state.partition.name, len(failed), sorted({type(e).__name__
                                                               for e in failed.values()}))
        await self._replace_producer(state)
        self.commit_due.set()

    def _failed_again(self, state: _Transactional, why: str) -> bool:
        """One more failure in a row; past ``MAX_PRODUCER_RESETS`` its partition stops
        (True)."""
        state.failures_in_a_row += 1
        if state.failures_in_a_row > MAX_PRODUCER_RESETS:
            self.give_up(state.partition, why)
            return True
        return False

    async def _close_producer(self, state: _Transactional, which: str = "producer") -> None:
        old, state.producer = state.producer, None
        if old is not None:
            await _closed(f"closing {state.partition.name}'s {which}", old.stop(), 5)

    async def _replace_producer(self, state: _Transactional) -> None:
        await self._close_producer(state)
        await self._new_producer(state)

    async def _failed(self, state: _Transactional, why: str) -> None:
        """Step 4's other reasons: drop the buffer and read again from the committed offset,
        through a new producer (an aborted transaction may leave the old one unusable)."""
        self._drop(state, len(state.buffer))
        if self._failed_again(state, f"{MAX_PRODUCER_RESETS} transactions in a row failed; "
                              f"last: {why}"):
            return
        log.warning("%s: %s", state.partition.name, why)
        state.partition.suspend()
        try:
            await self._replace_producer(state)
        except StreamprocError as exc:
            self.give_up(state.partition, f"no new producer: {exc}")
            return
        await state.partition.seek()

    def _fenced(self, state: _Transactional, exc: BaseException) -> None:
        """Step 5: wait for a rebalance to take the partition away; if none does, the fence
        came from a transaction timeout, and the partition carries on with a new producer."""
        log.warning("%s: fenced (%r); dropping its uncommitted work and waiting for a "
                    "rebalance", state.partition.name, exc)
        self._drop(state, len(state.buffer))
        state.partition.suspend()
        task = asyncio.create_task(self._recover(state), name=f"recover-{state.partition.name}")
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover(self, state: _Transactional) -> None:
        partition = state.partition
        await self._close_producer(state, "fenced producer")
        await partition.ends_within(2 * self.settings.kafka_session_timeout_ms / 1000)
        if partition.finished or self._states.get(partition.tp) is not state:
            return  # a new owner has it
        if self._failed_again(state, "fenced again and again with no new owner"):
            return
        log.warning("%s: still ours after a fence, so a transaction timed out; carrying on "
                    "with a new producer", partition.name)
        try:
            await self._new_producer(state)
        except StreamprocError as exc:
            self.give_up(partition, f"no new producer after a fence: {exc}")
            return
        await partition.seek()


async def _abort(producer: AIOKafkaProducer) -> None:
    """Abort the open transaction, best effort, within ``ABORT_TIMEOUT_S``."""
    try:
        await asyncio.wait_for(producer.abort_transaction(), ABORT_TIMEOUT_S)
    except Exception as exc:  # the producer is replaced next either way
        log.debug("abort failed: %r", exc)


def _retrieve(deliveries: list[asyncio.Future[Any]]) -> None:
    """The sends of an aborted transaction fail too; their errors are the transaction's,
    already handled, so mark them retrieved rather than let asyncio log each one."""
    for fut in deliveries:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
