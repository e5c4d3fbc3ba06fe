"""``PROCESSING_GUARANTEE=exactly_once``: one transactional producer per input partition,
with the transactional id ``<prefix>-<group>-<topic>-<partition>``. A partition's outputs,
dead letters and consumed offset are written in one transaction. How a failed write ends is
:mod:`streamproc.kafka.sink`'s cases 1 to 3, inside the transaction.

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
4. A transaction commits the offset after its last record only if its records are exactly
   the partition's oldest open records, none skipped (``OffsetTracker.leads``): every record
   read since the seek is registered as open until its transaction commits, so no offset is
   ever committed past an output that was not written in the same or an earlier transaction.
   Every send of a transaction is awaited before the offsets are added and it commits; any
   failure aborts it. A refused record is written alone in its batch in the next
   transaction, and refused alone it becomes a dead letter; the same records are written
   again in a new transaction (case 1 and 2 above).
5. A transaction that fails for any other reason, or is fenced, drops the buffer. A RUNNING
   partition is rewound: it starts a new producer (step 2, so it fences whoever else holds
   the id) and reads its committed offset again (step 3) before it takes records again. A
   partition that is DRAINING (being handed back) cannot be read again, so it stops there:
   its uncommitted records are left to the next owner, and no producer is started for it.
6. Fenced (``PRODUCERFENCED``, ``INVALID_PRODUCER_EPOCH``, or a producer aiokafka failed
   with either): either a new owner exists, or the coordinator aborted a transaction older
   than ``KAFKA_TRANSACTION_TIMEOUT_MS`` (a long broker outage). The partition waits, paused,
   for twice the session timeout. A new owner's rebalance revokes it in that time; if it is
   still ours, the fence came from the timeout, so a new producer is started (fencing nobody)
   and the partition is rewound. Every recovery is one task per partition, bounded, retried
   with backoff and then a clean stop; a revoke cancels it before the member rejoins, so no
   producer is ever started for a partition the member no longer owns. A partition that has
   committed nothing for ``KAFKA_DELIVERY_TIMEOUT_MS`` since its first failure stops too.
Downstream readers must use ``isolation_level=read_committed``.

How the rebalance storm lost records before step 4 and 5's DRAINING rule (issue 19): a
member drained on revoke for longer than the group waited, so the group removed it and gave
its partitions to another member, whose producer fenced it. The drained partition's next
transaction failed (fenced, or through the dead producer it left behind: aiokafka then
raises an ``AssertionError`` for the next ``begin_transaction``), and the sink dropped the
buffer and "rewound" the partition. But a DRAINING partition is not read again: its emitter
went on adding the records after the dropped ones to the empty buffer, and a replacement
producer (started at once for the failure, or two session timeouts after the fence while the
drain still ran) fenced the new owner and committed them, with the offset after the last.
The dropped records' offset was so committed with no output, and the new owner, fenced in
turn, read that offset and went on from there; the records it had already written and then
wrote again were the duplicates. ``tests/test_exactly_once.py`` drives that path on purpose.

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
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from ..aio import within
from .clients import start_with_retry
from .outbound import Outbound
from .partition import Partition
from .sink import FENCED, MAX_PRODUCER_RESETS, Sink, closed, refused, replayable

__all__ = ["ExactlyOnceSink"]

log = logging.getLogger("streamproc.sinks")
ABORT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0  # closing a failed or fenced producer
START_ATTEMPTS = 3  # a recovery tries this many new producers (each within
#                     KAFKA_CONNECT_TIMEOUT_S) before its partition stops
START_BACKOFF_S = 1.0  # first pause between them; doubles


class _Transactional:
    """The exactly-once state of one assigned partition: its producer, its buffer, and the
    one recovery that may be running for it. ``retired`` once revoked: nothing is started,
    written or committed for it after that."""

    def __init__(self, partition: Partition, transactional_id: str) -> None:
        self.partition = partition
        self.transactional_id = transactional_id
        self.producer: AIOKafkaProducer | None = None
        self.buffer: list[Outbound] = []
        self.lock = asyncio.Lock()
        self.failures_in_a_row = 0
        self.unwritten_since: float | None = None  # the oldest buffered record's arrival
        self.failing_since: float | None = None  # the first failure since the last commit
        self.interrupted = False  # a transaction was cancelled mid-way: commit nothing more
        self.recovery: asyncio.Task[None] | None = None
        self.retired = False


class ExactlyOnceSink(Sink):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._states: dict[TopicPartition, _Transactional] = {}
        self._buffered = 0  # records in every partition's buffer

    def buffered(self, tp: TopicPartition) -> int:
        """Records of ``tp`` waiting for their transaction."""
        state = self._states.get(tp)
        return 0 if state is None else len(state.buffer)

    def recovering(self, tp: TopicPartition) -> bool:
        """A recovery (a new producer, then a rewind) is running for ``tp``."""
        state = self._states.get(tp)
        return state is not None and state.recovery is not None

    def transactional_id(self, tp: TopicPartition) -> str:
        return (f"{self.settings.kafka_transactional_id_prefix}-{self.settings.kafka_group_id}"
                f"-{tp.topic}-{tp.partition}")

    def _owns(self, state: _Transactional) -> bool:
        """``state`` is still this member's, and its partition may still write."""
        return (not state.retired and self._states.get(state.partition.tp) is state
                and not state.partition.finished)

    async def _new_producer(self, state: _Transactional) -> None:
        """Start the partition's transactional producer: this fences any other holder of
        its id (step 2). Bounded by ``KAFKA_CONNECT_TIMEOUT_S``; a producer whose start
        failed, or whose partition was handed back meanwhile, is closed, never kept."""
        producer = self.new_producer(transactional_id=state.transactional_id)
        try:
            await start_with_retry(f"transactional producer {state.partition.name}",
                                   producer.start, self.settings)
        except BaseException:
            await closed(f"closing {state.partition.name}'s unstarted producer",
                         producer.stop(), CLOSE_TIMEOUT_S)
            raise
        if state.retired:
            await closed(f"closing {state.partition.name}'s producer", producer.stop(),
                         CLOSE_TIMEOUT_S)
            return
        state.producer = producer

    async def assigned(self, partitions: list[Partition]) -> None:
        """Fence the previous owner of each partition (step 2); the caller then seeks."""
        states = [_Transactional(p, self.transactional_id(p.tp)) for p in partitions]
        for state in states:
            self._states[state.partition.tp] = state
        async with asyncio.TaskGroup() as group:
            for state in states:
                group.create_task(self._new_producer(state))

    async def revoked(self, partitions: list[Partition], within_s: float) -> None:
        """Retire the partitions: their buffers are dropped, their recoveries cancelled (so
        no producer is started for a partition another member may own by now), and their
        producers closed, each within ``within_s``."""
        states = [s for p in partitions if (s := self._states.pop(p.tp, None)) is not None]
        recoveries = []
        for state in states:
            state.retired = True
            self._drop(state, len(state.buffer))
            if state.recovery is not None:
                state.recovery.cancel()
                recoveries.append(state.recovery)
        if recoveries:
            await within("stopping the recoveries of revoked partitions",
                                 asyncio.gather(*recoveries, return_exceptions=True), within_s)
        await asyncio.gather(*(self._close_producer(s, within_s=within_s) for s in states))

    async def stop(self, within_s: float) -> None:
        await self.revoked([s.partition for s in self._states.values()], within_s)

    async def emit(self, partition: Partition, record: Outbound) -> None:
        state = self._states.get(partition.tp)
        if state is None or state.partition is not partition or state.retired:
            return  # revoked meanwhile: nothing of it is written or committed
        if not state.buffer:
            state.unwritten_since = time.monotonic()
        state.buffer.append(record)
        self._buffered += 1
        # Buffered records stay open until their transaction commits, and open records count
        # against backpressure: commit early rather than stall the fetch until the next tick.
        if self._buffered >= self.commit_early_at:
            self.commit_due.set()

    def _drop(self, state: _Transactional, count: int) -> None:
        """Take the first ``count`` records out of ``state``'s buffer (written, or dropped)."""
        count = min(count, len(state.buffer))
        del state.buffer[:count]
        self._buffered -= count
        state.unwritten_since = time.monotonic() if state.buffer else None

    def settled(self, partition: Partition) -> bool:
        return partition.unemitted == 0  # everything is in the buffer the next commit writes

    def check_deadlines(self) -> None:
        """Stop a partition whose buffered work, or whose first failure since its last
        commit (a rewind or a recovery that has not written anything since), is older than
        ``KAFKA_DELIVERY_TIMEOUT_MS``."""
        now = time.monotonic()
        for state in list(self._states.values()):
            if state.partition.finished:
                continue
            since, failing = state.unwritten_since, state.failing_since
            if since is not None and now - since > self.delivery_timeout_s:
                self.give_up(state.partition, "its transaction did not commit within "
                             "KAFKA_DELIVERY_TIMEOUT_MS")
            elif failing is not None and now - failing > self.delivery_timeout_s:
                self.give_up(state.partition, "no transaction committed within "
                             "KAFKA_DELIVERY_TIMEOUT_MS of its first failure")

    async def commit(self, partitions: Iterable[Partition]) -> None:
        self.commit_due.clear()
        await asyncio.gather(*(self._commit(state) for p in partitions
                               if (state := self._states.get(p.tp)) is not None
                               and state.partition is p and state.buffer))

    async def _commit(self, state: _Transactional) -> None:
        async with state.lock:
            partition, producer = state.partition, state.producer
            records = list(state.buffer)
            if (not records or producer is None or state.recovery is not None
                    or state.interrupted or not self._owns(state)
                    or not partition.current(partition.epoch)):
                return
            if not partition.tracker.leads([r.offset for r in records]):  # step 4
                self._failed(state, f"its {len(records)} buffered output(s) from offset "
                             f"{records[0].offset} do not begin at its oldest open record; "
                             "nothing is committed past an unwritten output")
                return
            epoch = partition.epoch
            try:
                async with asyncio.timeout(self.delivery_timeout_s):
                    failed = await self._transaction(producer, partition.tp, records)
            except asyncio.CancelledError:
                state.interrupted = True  # its transaction stays open, not ended
                raise
            except Exception as exc:  # KafkaError, TimeoutError, or aiokafka's own state
                fence = _fence_behind(exc, producer)
                if fence is not None:
                    self._fenced(state, fence)
                else:
                    self._failed(state, f"a transaction failed ({exc!r}); aborted")
                return
            if not partition.current(epoch):
                return  # finished while committing: its outcome is the broker's
            if failed:
                self._replace_refused(state, records, failed)
                return
            self._drop(state, len(records))
            state.failures_in_a_row, state.failing_since = 0, None
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
                if r.alone:  # in a batch of its own: what came before goes out first
                    await producer.flush()
                deliveries.append(await producer.send(r.topic, value=r.value, key=r.key,
                                                      headers=r.headers))
                if r.alone:
                    await producer.flush()
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
            self.stats.transaction_aborts += 1
            await _abort(producer)
            raise
        finally:
            _retrieve(deliveries)
        self.stats.transaction_aborts += 1
        await _abort(producer)
        return failed

    def _replace_refused(self, state: _Transactional, records: list[Outbound],
                         failed: dict[int, BaseException]) -> None:
        """Case 1 and 2 inside a transaction: it aborted; refused records become dead
        letters in the buffer, and the same records go out again in a new transaction,
        through a new producer."""
        fenced = next((e for e in failed.values() if isinstance(e, FENCED)), None)
        if fenced is not None:
            self._fenced(state, fenced)
            return
        other = next((e for e in failed.values() if not replayable(e)), None)
        if other is not None:
            self._failed(state, f"a send failed ({other!r}); aborted")
            return
        for i, exc in failed.items():
            if refused(exc):  # alone in its batch next time; refused alone, a dead letter
                replacement = self.outputs.refused(records[i], exc)
                if replacement is None:
                    self.give_up(state.partition, f"the broker refused a dead letter: {exc!r}")
                    return
                state.buffer[i] = replacement
        if self._failed_again(state, f"{MAX_PRODUCER_RESETS} transactions in a row failed"):
            return
        why = (f"{len(failed)} send(s) failed in a transaction "
               f"({sorted({type(e).__name__ for e in failed.values()})}); aborted")
        if not state.partition.running:
            self._hand_back(state, why)
            return
        log.warning("%s: %s, writing them again through a new producer",
                    state.partition.name, why)
        self._recover(state, rewind=False)

    def _failed_again(self, state: _Transactional, why: str) -> bool:
        """One more failure in a row; past ``MAX_PRODUCER_RESETS`` its partition stops
        (True)."""
        state.failures_in_a_row += 1
        state.failing_since = state.failing_since or time.monotonic()
        if state.failures_in_a_row > MAX_PRODUCER_RESETS:
            self.give_up(state.partition, why)
            return True
        return False

    def _hand_back(self, state: _Transactional, why: str) -> None:
        """Step 5 for a partition that is not RUNNING (DRAINING): it cannot be read again,
        so it writes nothing more and its uncommitted records go to the next owner."""
        self._drop(state, len(state.buffer))
        state.partition.stop(f"{why} while it was being handed back")

    def _failed(self, state: _Transactional, why: str) -> None:
        """Step 5: drop the buffer; a RUNNING partition reads again from its committed
        offset through a new producer (an aborted transaction may leave the old one
        unusable); any other stops there."""
        if not state.partition.running:
            self._hand_back(state, why)
            return
        self._drop(state, len(state.buffer))
        if self._failed_again(state, f"{MAX_PRODUCER_RESETS} transactions in a row failed; "
                              f"last: {why}"):
            return
        log.warning("%s: %s; rewinding to its committed offset", state.partition.name, why)
        state.partition.suspend()
        self._recover(state, rewind=True)

    def _fenced(self, state: _Transactional, exc: BaseException) -> None:
        """Step 6: wait for a rebalance to take the partition away; if none does, the fence
        came from a transaction timeout, and the partition carries on with a new producer."""
        if not state.partition.running:
            self._hand_back(state, f"fenced ({exc!r})")
            return
        log.warning("%s: fenced (%r); dropping its uncommitted work and waiting for a "
                    "rebalance", state.partition.name, exc)
        state.failing_since = state.failing_since or time.monotonic()
        self._drop(state, len(state.buffer))
        state.partition.suspend()
        self._recover(state, rewind=True,
                      wait_s=2 * self.settings.kafka_session_timeout_ms / 1000)

    def _recover(self, state: _Transactional, *, rewind: bool, wait_s: float = 0.0) -> None:
        task = asyncio.create_task(self._recovery(state, rewind, wait_s),
                                   name=f"recover-{state.partition.name}")
        state.recovery = task
        task.add_done_callback(self._recovery_done)

    def _recovery_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a recovery failed unexpectedly: %r", exc)  # _recovery catches all

    async def _recovery(self, state: _Transactional, rewind: bool, wait_s: float) -> None:
        """Close the old producer, wait ``wait_s`` for the partition to be revoked, then start
        a new producer and (``rewind``) read from the committed offset again, or write the
        buffer again. Each try is bounded; ``START_ATTEMPTS`` tries with backoff, then the
        partition stops and the service with it. Does nothing once the partition is not
        this member's (a revoke cancels it)."""
        partition = state.partition
        try:
            await self._close_producer(state)
            if wait_s and await partition.ends_within(wait_s):
                return  # a new owner has it
            if not self._owns(state):
                return
            if wait_s and self._failed_again(state, "fenced again and again with no new "
                                             "owner"):
                return
            if wait_s:
                log.warning("%s: still ours after a fence, so a transaction timed out; "
                            "carrying on with a new producer", partition.name)
            delay = START_BACKOFF_S
            for attempt in itertools.count(1):
                try:
                    await self._new_producer(state)
                    if not self._owns(state):
                        return
                    if rewind:
                        await asyncio.wait_for(partition.seek(),
                                               self.settings.kafka_connect_timeout_s)
                    else:
                        self.commit_due.set()
                    return
                except Exception as exc:
                    await self._close_producer(state)
                    if attempt >= START_ATTEMPTS:
                        self.give_up(partition, f"no new producer after {attempt} tries: "
                                     f"{exc!r}")
                        return
                    log.warning("%s: a new producer failed (%r); trying again in %.0f s",
                                partition.name, exc, delay)
                    await asyncio.sleep(delay)
                    delay *= 2
                    if not self._owns(state):
                        return
        finally:
            if state.recovery is asyncio.current_task():
                state.recovery = None

    async def _close_producer(self, state: _Transactional, *,
                              within_s: float = CLOSE_TIMEOUT_S) -> None:
        old, state.producer = state.producer, None
        if old is not None:
            await closed(f"closing {state.partition.name}'s producer", old.stop(), within_s)
            _retrieve_failures(old)


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


def _fence_behind(exc: BaseException, producer: AIOKafkaProducer) -> BaseException | None:
    """The fence behind a failed transaction, if it was one. A fenced producer's sender
    fails, and aiokafka then answers the next transactional call with its own state error
    (an ``AssertionError`` from an invalid state transition) rather than the fence."""
    causes: list[BaseException | None] = [exc]
    sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if sender is not None and sender.done() and not sender.cancelled():
        causes.append(sender.exception())
    fences = [cause for cause in causes if cause is not None and isinstance(cause, FENCED)]
    return fences[0] if fences else None


def _retrieve_failures(producer: AIOKafkaProducer) -> None:
    """A producer whose sender failed (fenced) sets that error on futures of its own that
    nothing awaits: its transaction's waiter and its batches' drain waiters. Mark them
    retrieved once it is closed, so asyncio does not log "Future exception was never
    retrieved" for an error already handled. (aiokafka internals, read defensively.)"""
    txn = getattr(producer, "_txn_manager", None)
    futures = [getattr(txn, "_transaction_waiter", None), getattr(txn, "_pid_waiter", None)]
    accumulator = getattr(producer, "_message_accumulator", None)
    for batches in [*getattr(accumulator, "_batches", {}).values(),
                    getattr(accumulator, "_pending_batches", ())]:
        for batch in batches:
            futures += [getattr(batch, "future", None), getattr(batch, "_drain_waiter", None)]
    for fut in futures:
        if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
            fut.exception()
