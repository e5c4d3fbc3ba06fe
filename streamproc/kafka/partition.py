"""One assigned input partition: the single owner of its lifecycle, offsets and pending work.

Every other part of the pipeline calls a :class:`Partition`'s methods; none of them keeps a
flag or a counter of its own about a partition.

State machine
-------------
::

    ASSIGNED ──seek()──▶ SEEKING ──seek done──▶ RUNNING ──drain()──▶ DRAINING ──revoke()──▶ REVOKED
                            ▲                      │
                            └────suspend(), seek()─┘        (any state) ──stop()──▶ STOPPED

1. **ASSIGNED.** The group gave us the partition. It is paused: nothing is fetched until the
   sink has set it up (exactly-once: a transactional producer that fences the previous owner).
   The set-up runs after the group's assignment callback has returned (aiokafka sends no
   heartbeats during it), and a member that is stopping does not set partitions up at all.
2. **SEEKING.** Still paused. The committed offset is read and the consumer seeks to it; the
   fetch *epoch* goes up by one. A partition with no committed offset (a new group) starts
   where ``KAFKA_AUTO_OFFSET_RESET`` says: ``earliest``, its first record, or ``latest``,
   its end as it is now. The start chosen for ``latest`` is committed at once, so an owner
   that takes the partition over before the first record is committed starts there too,
   never at a later end (which would skip what came in between), and a rewind of this
   owner goes back to it (the start is kept here too, for a commit that failed). A commit
   the broker refuses because the partition is leaving is logged, not a crash, and nothing
   is committed for a partition revoked while its end was read. aiokafka drops what it
   prefetched for a paused or re-seeked partition, and :meth:`accept` drops whatever a
   fetch that began before the seek returns.
3. **RUNNING.** Unpaused (unless the intake's backpressure holds every partition paused).
   :meth:`accept` registers each new record's offset, in order, with the
   :class:`~streamproc.kafka.offsets.OffsetTracker`; an offset at or below one already seen is stale
   (a fetch from an older epoch) and is dropped, never a crash. Accepted entries wait, in
   offset order, in this partition's own pending queue for the emitter, so a slow result here
   never holds back another partition's outputs.
4. **Rewind** (exactly-once: a transaction that failed for a reason not its records' own, or
   a fence): :meth:`suspend` goes back to SEEKING with a new epoch; the entries pending are
   dropped, their results cancelled, and the tracker emptied (nothing it held counts against
   backpressure any more). :meth:`seek` then reads them again from the committed offset. Only
   a RUNNING partition is rewound: a DRAINING one cannot be read again, and stops (7).
5. **DRAINING.** The group is taking the partition away (or the service stops). Nothing new
   is accepted; the entries already accepted are still emitted until 80% of
   ``SHUTDOWN_TIMEOUT_S``, then committed.
6. **REVOKED.** Terminal. Results that arrive later are dropped, never written or committed.
7. **STOPPED.** Terminal. Nothing more is accepted or written, so nothing past the first
   unwritten record is ever committed and the next owner reads it again. Either a fault not
   its records' own (no healthy replica, a write the broker would not take within
   ``KAFKA_DELIVERY_TIMEOUT_MS``, a failed set-up; the processor stops with a non-zero exit),
   or a drain that cannot finish: past its deadline, or, exactly-once, a transaction that
   failed or was fenced while DRAINING (the partition is being handed back, so no producer is
   started for it).

Only RUNNING accepts records, and only RUNNING and DRAINING emit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from .offsets import OffsetTracker

if TYPE_CHECKING:
    from ..errors import StreamprocError
    from ..records import FeedItem
    from .tracing import RecordTrace

__all__ = ["Entry", "Partition", "Phase"]

log = logging.getLogger("streamproc.partition")


class Phase(enum.Enum):
    ASSIGNED = "assigned"
    SEEKING = "seeking"
    RUNNING = "running"
    DRAINING = "draining"
    REVOKED = "revoked"
    STOPPED = "stopped"


_EMITTING = (Phase.RUNNING, Phase.DRAINING)
_DONE = (Phase.REVOKED, Phase.STOPPED)


@dataclass(slots=True)
class Entry:
    """One accepted record on its way to the emitter, stamped with the epoch it was read in."""

    epoch: int
    record: ConsumerRecord[bytes, bytes]
    fetched_at: float
    item: FeedItem | None = None
    outcome: asyncio.Future[str] | None = None
    error: StreamprocError | None = None
    trace: RecordTrace | None = None  # with the otel extra


class Partition:
    """See the module docstring. Created in ASSIGNED and paused."""

    def __init__(self, tp: TopicPartition, consumer: AIOKafkaConsumer,
                 reset: Literal["earliest", "latest"] = "earliest") -> None:
        self.tp = tp
        self._reset = reset
        self.name = f"{tp.topic}-{tp.partition}"
        self._consumer = consumer
        self.phase = Phase.ASSIGNED
        self.epoch = 0
        self.tracker = OffsetTracker()
        self._next_offset: int | None = None  # the lowest offset not seen yet in this epoch
        self._start: int | None = None  # latest: the end this owner chose to start at
        self._pending: deque[Entry] = deque()
        self._ready = asyncio.Event()
        self._unemitted = 0  # accepted, not yet handed to the sink (or dropped)
        self._holds: set[str] = {"phase"}  # why the consumer keeps it paused
        self._ended = asyncio.Event()  # set on REVOKED or STOPPED
        consumer.pause(tp)

    def __repr__(self) -> str:
        return f"Partition({self.name}, {self.phase.value}, epoch={self.epoch})"

    # --- queries ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def finished(self) -> bool:
        """REVOKED or STOPPED: it will accept and write nothing more."""
        return self.phase in _DONE

    async def ends_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the partition to be REVOKED or STOPPED."""
        try:
            await asyncio.wait_for(self._ended.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def current(self, epoch: int) -> bool:
        """Work stamped with ``epoch`` may still be written."""
        return epoch == self.epoch and self.phase in _EMITTING

    @property
    def open_records(self) -> int:
        """Records accepted in this epoch and not yet complete; none once finished."""
        return 0 if self.finished else self.tracker.in_flight

    @property
    def unemitted(self) -> int:
        """Accepted records whose result has not reached the sink yet."""
        return self._unemitted

    # --- pausing ---------------------------------------------------------------------------
    def hold(self, reason: str) -> None:
        """Keep the consumer from fetching this partition, for ``reason``."""
        if not self._holds:
            self._consumer.pause(self.tp)
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        self._holds.discard(reason)
        if not self._holds and not self.finished:
            self._consumer.resume(self.tp)

    # --- transitions -----------------------------------------------------------------------
    def suspend(self) -> None:
        """RUNNING (or ASSIGNED) → SEEKING: pause, start a new epoch, drop the work in hand
        (step 4). :meth:`seek` then reads the partition again from its committed offset.
        A DRAINING or finished partition is left as it is."""
        if self.phase not in (Phase.ASSIGNED, Phase.SEEKING, Phase.RUNNING):
            return
        self.phase = Phase.SEEKING
        self.hold("phase")
        self.epoch += 1
        self.tracker = OffsetTracker(self.tracker.committed)  # what was open is read again
        self._drop_pending()

    async def seek(self) -> None:
        """→ SEEKING → RUNNING: read the committed offset, seek to it, start a new epoch, then
        let the fetch take the partition's records again (steps 2-4)."""
        self.suspend()
        if self.phase is not Phase.SEEKING:
            return
        epoch = self.epoch
        committed = await self._consumer.committed(self.tp)
        if self.phase is not Phase.SEEKING or self.epoch != epoch:
            return  # revoked, stopped or suspended again while we asked
        if committed is None and self._reset == "latest":
            committed = self._start if self._start is not None else await self._start_at_end()
            if self.phase is not Phase.SEEKING or self.epoch != epoch:
                return
        if committed is None:
            await self._consumer.seek_to_beginning(self.tp)
            if self.phase is not Phase.SEEKING or self.epoch != epoch:
                return
        else:
            self._consumer.seek(self.tp, committed)
        self._next_offset = committed
        self.tracker = OffsetTracker(committed)
        self.phase = Phase.RUNNING
        self.release("phase")

    async def _start_at_end(self) -> int:
        """``latest`` with no committed offset: the partition's end now, kept as this owner's
        start (a rewind before anything is committed goes back to it, never to a later end)
        and committed as the group's (see step 2). A commit that fails (the partition is
        leaving, or the broker did not answer) is logged; the caller checks the phase."""
        epoch = self.epoch
        end = int((await self._consumer.end_offsets([self.tp]))[self.tp])
        if self._start is None and not self.finished:
            self._start = end
        if self.phase is not Phase.SEEKING or self.epoch != epoch:
            return end  # revoked, stopped or suspended while we asked: commit nothing
        try:
            await self._consumer.commit({self.tp: end})
        except KafkaError as exc:  # CommitFailedError, IllegalStateError (not assigned any more)
            log.warning("%s: could not commit the start %d (%s)", self.name, end, exc)
        log.info("%s: no committed offset; KAFKA_AUTO_OFFSET_RESET=latest starts at %d",
                 self.name, end)
        return end

    def drain(self) -> None:
        """→ DRAINING: accept nothing new, keep emitting what was accepted."""
        if self.phase in (Phase.ASSIGNED, Phase.SEEKING, Phase.RUNNING):
            self.phase = Phase.DRAINING
            self.hold("phase")
            self._ready.set()  # wake the emitter, so it ends once nothing is pending

    def revoke(self) -> None:
        """→ REVOKED (terminal): whatever is still pending is dropped."""
        if self.phase is not Phase.STOPPED:
            self.phase = Phase.REVOKED
        self._ended.set()
        self._drop_pending()

    def stop(self, reason: str) -> None:
        """→ STOPPED (terminal): a fault not its records' own. Nothing more is written, so
        the first unwritten record and everything after it stay uncommitted."""
        if self.finished:
            return
        self.phase = Phase.STOPPED
        self._ended.set()
        log.warning("%s stopped: %s; its uncommitted records are left for the next owner",
                    self.name, reason)
        self.hold("phase")
        self._drop_pending()

    # --- records ---------------------------------------------------------------------------
    def accept(self, records: list[ConsumerRecord[bytes, bytes]]) -> list[
            ConsumerRecord[bytes, bytes]]:
        """Register the records this epoch has not seen, in order; return them. Anything
        else (not RUNNING, or an offset already seen) is stale and dropped."""
        if self.phase is not Phase.RUNNING:
            return []
        fresh: list[ConsumerRecord[bytes, bytes]] = []
        for record in records:
            if self._next_offset is not None and record.offset < self._next_offset:
                continue
            self.tracker.add(record.offset)
            self._next_offset = record.offset + 1
            fresh.append(record)
        return fresh

    def enqueue(self, entries: list[Entry]) -> bool:
        """Hand accepted entries to the emitter. False (and their results cancelled) when the
        partition moved on while they were being submitted."""
        if not entries:
            return True
        if not (self.phase is Phase.RUNNING and entries[0].epoch == self.epoch):
            _cancel(entries)
            return False
        self._pending.extend(entries)
        self._unemitted += len(entries)
        self._ready.set()
        return True

    async def next_entry(self) -> Entry | None:
        """The oldest pending entry, waiting for one; ``None`` once the partition is finished
        or draining with nothing left."""
        while not self._pending:
            if self.finished or self.phase is Phase.DRAINING:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()

    def emitted(self, entry: Entry) -> None:
        """An entry taken by :meth:`next_entry` reached the sink, or was dropped."""
        if entry.epoch == self.epoch and not self.finished:
            self._unemitted = max(self._unemitted - 1, 0)

    def _drop_pending(self) -> None:
        _cancel(self._pending)
        self._pending.clear()
        self._unemitted = 0
        self._ready.set()  # wake the emitter, so it sees the new phase


def _cancel(entries: deque[Entry] | list[Entry]) -> None:
    for entry in entries:
        if entry.outcome is not None:
            entry.outcome.cancel()
