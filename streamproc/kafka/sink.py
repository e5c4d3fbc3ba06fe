"""Where results go, and how their offsets are committed: the :class:`Sink` both delivery
guarantees share, and how a failed write is told apart.

``AtLeastOnceSink``  one idempotent producer (``acks=all``). An offset completes when the
                     broker acknowledges its output; the consumer commits the contiguous
                     completed prefix (see :mod:`streamproc.kafka.processor`).
``ExactlyOnceSink``  one transactional producer per input partition, with the transactional
                     id ``<prefix>-<group>-<topic>-<partition>``. A partition's outputs, dead
                     letters and consumed offset are written in one transaction.

How a failed write ends (both sinks)
------------------------------------
1. **Refused for the record's own reason** (too large, ``CORRUPT_MESSAGE``,
   ``INVALID_TIMESTAMP``): the broker judges a whole producer batch, so the record is first
   written again alone in a batch of its own; refused alone, a summary is replaced by a dead
   letter (``output_refused``) and written in its place. Sizes are checked before sending,
   and producer batches are kept within the topics' ``max.message.bytes`` (:mod:`.outbound`,
   :func:`~streamproc.kafka.clients.producer_for`), so this is rare. ``UnknownError`` is not
   a refusal: aiokafka reports ``UNKNOWN_SERVER_ERROR`` and every code it does not know
   (``INVALID_RECORD`` among them) as it, so it says nothing about the record and ends as
   case 3.
2. **Collateral** (``OUT_OF_ORDER_SEQUENCE_NUMBER``, ``UNKNOWN_PRODUCER_ID``): an idempotent
   producer whose batch was refused fails every later batch of that output partition. The
   producer is replaced and the failed records are written again, in their original order,
   after everything else it had in hand has settled. Outputs so keep input order.
3. **Anything else** (the broker unreachable, authorization, timeouts): the producer already
   retried it within its own timeouts; no second retry loop runs on top. If an output is still
   not written after ``KAFKA_DELIVERY_TIMEOUT_MS``, or the producer is replaced more than
   ``MAX_PRODUCER_RESETS`` times in a row without writing anything, its partition stops
   uncommitted and the service exits non-zero (:class:`~streamproc.errors.DeliveryFailed`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
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
    UnknownProducerId,
)

from ..aio import within
from ..errors import DeliveryFailed, StreamprocError
from ..settings import KafkaSettings
from .clients import producer_for
from .outbound import Outbound, Outputs, source_age_s
from .partition import Partition
from .stats import PipelineStats

__all__ = ["FENCED", "MAX_PRODUCER_RESETS", "Sink", "closed", "refused", "replayable"]

log = logging.getLogger("streamproc.sinks")
MAX_PRODUCER_RESETS = 5
_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError,
            CorruptRecordException, InvalidTimestampError)
_COLLATERAL = (OutOfOrderSequenceNumber, UnknownProducerId)
FENCED = (ProducerFenced, InvalidProducerEpoch)


def refused(exc: BaseException | None) -> bool:
    """The broker refused the record for a reason of its own (case 1)."""
    return isinstance(exc, _REFUSED)


def replayable(exc: BaseException | None) -> bool:
    """Writing the record again through a new producer may succeed (case 1 or 2)."""
    return isinstance(exc, _REFUSED + _COLLATERAL)


async def closed(what: str, closing: Awaitable[None], within_s: float) -> None:
    """Close a client within ``within_s``: a close that fails is logged, never raised."""
    await within(what, closing, within_s, tolerate=(KafkaError, OSError))


class Sink:
    """Shared parts; subclasses implement one delivery guarantee. ``on_fatal`` stops the
    service (non-zero exit)."""

    def __init__(self, settings: KafkaSettings, consumer: AIOKafkaConsumer, stats: PipelineStats,
                 outputs: Outputs, on_fatal: Callable[[StreamprocError], None], *,
                 commit_early_at: int) -> None:
        self.settings = settings
        self.consumer = consumer
        self.stats = stats
        self.outputs = outputs
        self.on_fatal = on_fatal
        self.delivery_timeout_s = settings.kafka_delivery_timeout_ms / 1000
        self.commit_due = asyncio.Event()  # set when waiting for the next interval would stall
        self.commit_early_at = commit_early_at  # buffered records that make a commit due

    def count(self, record: Outbound) -> None:
        """The record is safely written (acknowledged, or its transaction committed)."""
        age = source_age_s(record.source)
        if age is not None:
            self.stats.end_to_end.observe(age)
        if record.reason_code is None:
            self.stats.produced += 1
        else:
            self.stats.dead_letter(record.reason_code)

    def new_producer(self, **overrides: Any) -> AIOKafkaProducer:
        """A producer whose batches both the output and the DLQ topic take."""
        limit = min(self.outputs.limit(self.outputs.output_topic),
                    self.outputs.limit(self.outputs.dlq_topic))
        return producer_for(self.settings, record_limit=limit, **overrides)

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
