"""Consumer lag: how far this member's position is behind each assigned partition's
high-water mark, polled on an interval. Each poll is also the proof that the broker answers,
which readiness reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from ..lifecycle import Lifecycle

__all__ = ["LagMonitor"]

log = logging.getLogger("streamproc.kafka")


class LagMonitor(Lifecycle):
    """Polls ``consumer`` every ``interval_s`` once started (the consumer must be started
    first). :attr:`lag` is by topic-partition; :attr:`last_broker_ok` the monotonic time of
    the last poll the broker answered."""

    def __init__(self, consumer: AIOKafkaConsumer, interval_s: float) -> None:
        super().__init__()
        self.consumer = consumer
        self.interval_s = interval_s
        self.lag: dict[TopicPartition, int] = {}
        self.last_broker_ok: float | None = None
        self._task: asyncio.Task[None] | None = None

    def total(self) -> int:
        return sum(self.lag.values())

    async def _start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="lag")

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            try:
                tps = sorted(self.consumer.assignment())
                if tps:
                    ends = await self.consumer.end_offsets(tps)
                    self.lag = {tp: max(ends[tp] - await self.consumer.position(tp), 0)
                                for tp in tps}
                else:
                    self.lag = {}
                    await self.consumer.topics()  # a metadata round trip proves the broker answers
                self.last_broker_ok = time.monotonic()
            except Exception as exc:
                log.debug("lag poll failed: %r", exc)
            await asyncio.sleep(self.interval_s)
