"""``PROCESSING_GUARANTEE=at_least_once``: one idempotent producer (``acks=all``). An offset
completes when the broker acknowledges its output, and the consumer commits the contiguous
completed prefix (see :mod:`streamproc.kafka.processor`). How a failed write ends is
:mod:`streamproc.kafka.sink`'s cases 1 to 3.

Replacing the producer (case 1 and 2) is one task at a time: new sends wait for it, the sends
in hand settle first, and the failed ones are written again in send order. A replayable
failure that arrives while it runs gets a replacement of its own right after; a send that was
being handed to the old producer as it closed is handed to the new one, in its place; a
replacement that cannot start a producer tries again with backoff and then stops the service
(nothing is ever sent to a producer that did not start).

A commit waits for the group coordinator at most ``KAFKA_COMMIT_INTERVAL_MS`` (and at least
1 s); one that did not finish is tried at the next interval. Offsets that could not be
committed for ``KAFKA_DELIVERY_TIMEOUT_MS`` stop their partitions and the service (the
coordinator is unreachable): the records stay uncommitted, and the next owner writes them
again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from .clients import start_with_retry
from .outbound import Outbound
from .partition import Partition
from .sink import MAX_PRODUCER_RESETS, Sink, closed, refused, replayable

__all__ = ["AtLeastOnceSink"]

log = logging.getLogger("streamproc.sinks")
START_ATTEMPTS = 3  # a replacement tries this many new producers before the service stops
START_BACKOFF_S = 1.0  # first pause between them; doubles


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
        self.producer: AIOKafkaProducer | None = None  # sized to the topics at start
        self._seq = itertools.count()
        self._sends: dict[int, _Send] = {}  # not yet acknowledged, by send order
        self._writable = asyncio.Event()  # cleared while the producer is being replaced
        self._writable.set()
        self._reset: asyncio.Task[None] | None = None
        self._reset_again = False  # a replayable failure arrived while replacing
        self._resets_in_a_row = 0
        self._dead = False  # no producer could be started: nothing more is sent
        self._uncommitted_since: float | None = None  # the first commit that did not go through
        self._owing: list[Partition] = []  # the partitions of the commits that did not

    async def start(self) -> None:
        self.producer = self.new_producer()
        await start_with_retry("producer", self.producer.start, self.settings)

    async def stop(self, within_s: float) -> None:
        if self._reset is not None:
            self._reset.cancel()
            await asyncio.gather(self._reset, return_exceptions=True)
        if self.producer is not None:
            await closed("closing the producer", self.producer.stop(), within_s)

    async def emit(self, partition: Partition, record: Outbound) -> None:
        await self._writable.wait()
        send = _Send(next(self._seq), partition, partition.epoch, record, time.monotonic())
        if self._dead:
            self.give_up(partition, "no producer could be started")
            return
        self._sends[send.seq] = send
        await self._send(send)

    async def _send(self, send: _Send) -> None:
        """Hand the record to the producer. One the producer refused before it left is
        failed (case 3) unless the producer was replaced under it: then it goes to the new
        one, in its place, before anything later of its partition."""
        record = send.record
        while True:
            producer = self.producer
            assert producer is not None, "emit before start"
            try:
                send.future = await producer.send(record.topic, value=record.value,
                                                  key=record.key, headers=record.headers)
                break
            except KafkaError as exc:  # refused before it left (closed, or a size we missed)
                replacing = self._reset is not None and asyncio.current_task() is not self._reset
                if (producer is not self.producer or replacing) and not self._dead:
                    await self._writable.wait()  # closed under it by a replacement
                    continue
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                future.set_exception(exc)
                send.future = future
                break
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
            self._replace_soon()
        else:
            self._sends.pop(send.seq, None)
            self.give_up(send.partition, f"the broker did not take an output for "
                         f"{send.record.topic}: {send.error!r}")

    def _replace_soon(self) -> None:
        if self._reset is not None:
            self._reset_again = True  # the running replacement may have passed it already
            return
        self._writable.clear()
        self._reset = asyncio.create_task(self._replace_producer(), name="reset")
        self._reset.add_done_callback(self._replaced)

    def _replaced(self, task: asyncio.Task[None]) -> None:
        self._reset = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail_all(f"replacing the producer failed: {exc!r}")
        if self._reset_again and not self._dead and not task.cancelled():
            self._reset_again = False
            if any(s.error is not None and replayable(s.error) for s in self._sends.values()):
                self._replace_soon()
                return
        self._writable.set()

    def _fail_all(self, why: str) -> None:
        """No producer: stop every partition with an output in hand, and send nothing more."""
        self._dead = True
        for send in list(self._sends.values()):
            self.give_up(send.partition, why)
        self._sends.clear()
        self._writable.set()  # emits stop their partitions rather than wait

    async def _new_producer(self) -> AIOKafkaProducer:
        """A started producer: ``START_ATTEMPTS`` tries with backoff, each within
        ``KAFKA_CONNECT_TIMEOUT_S``; the last failure raises."""
        delay = START_BACKOFF_S
        for attempt in itertools.count(1):
            producer = self.new_producer()
            try:
                await start_with_retry("producer", producer.start, self.settings)
                return producer
            except Exception as exc:
                await closed("closing the unstarted producer", producer.stop(), 5)
                if attempt >= START_ATTEMPTS:
                    raise
                log.warning("a new producer failed (%r); trying again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _replace_producer(self) -> None:
        """Case 1 and 2: let every send in hand settle, replace the producer, then write the
        failed ones again, in send order: a refused one alone in its batch (or, refused alone
        already, its dead letter), the collateral failures as they were. A failure among
        those arrives while this runs, so the replacement runs again (:meth:`_replaced`), at
        most ``MAX_PRODUCER_RESETS`` times in a row."""
        pending = [s.future for s in self._sends.values()
                   if s.future is not None and not s.future.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.delivery_timeout_s)
            if late:
                self._fail_all("an output was not acknowledged within "
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
        old = self.producer
        if old is not None:
            await closed("closing the failed producer", old.stop(), 5)
        self.producer = await self._new_producer()
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
            again = _Send(next(self._seq), send.partition, send.epoch, record, send.sent_at)
            self._sends[again.seq] = again
            if not record.alone:
                await self._send(again)
            elif not await self._send_alone(again):
                return

    async def _send_alone(self, send: _Send) -> bool:
        """Write ``send`` in a producer batch of its own: everything before it is written
        first, and it is written before anything after it is sent. False when that did not
        happen within ``KAFKA_DELIVERY_TIMEOUT_MS`` (its partition then stopped)."""
        assert self.producer is not None
        try:
            async with asyncio.timeout(self.delivery_timeout_s):
                await self.producer.flush()
                await self._send(send)
                await self.producer.flush()
        except TimeoutError:
            self.give_up(send.partition, "an output written alone was not acknowledged "
                         "within KAFKA_DELIVERY_TIMEOUT_MS")
            return False
        return True

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for send in list(self._sends.values()):
            if now - send.sent_at > self.delivery_timeout_s and not send.partition.finished:
                self.give_up(send.partition, f"an output to {send.record.topic} was not "
                             f"acknowledged within KAFKA_DELIVERY_TIMEOUT_MS")
        since = self._uncommitted_since
        if since is not None and now - since > self.delivery_timeout_s:
            self._uncommitted_since = None
            for partition in self._owing:
                if not partition.finished:
                    self.give_up(partition, "no commit went through within "
                                 "KAFKA_DELIVERY_TIMEOUT_MS (the group coordinator is "
                                 "unreachable)")

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
        partitions = list(partitions)
        offsets = {p.tp: pos for p in partitions
                   if (pos := p.tracker.committable()) is not None}
        if not offsets:
            self._uncommitted_since = None  # nothing is owed
            return
        wait_s = max(self.settings.kafka_commit_interval_ms / 1000, 1.0)
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), wait_s)
        except (KafkaError, TimeoutError) as exc:  # not a member any more, or no coordinator
            log.warning("commit of %d partition(s) failed: %r", len(offsets), exc)
            if self._uncommitted_since is None:
                self._uncommitted_since = time.monotonic()
            self._owing = [p for p in partitions if p.tp in offsets]
            return
        self._uncommitted_since = None
        for p in partitions:
            if p.tp in offsets:
                p.tracker.mark_committed(offsets[p.tp])
        self.stats.commits += 1
