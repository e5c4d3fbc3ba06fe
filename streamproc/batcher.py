"""A micro-batcher: pure asyncio, no Kafka, no torch.

Items wait in a bounded buffer. :meth:`MicroBatcher.next_batch` returns a batch as soon as
``max_items`` are waiting, or ``max_delay_s`` after the *first* item of the batch arrived
(monotonic clock), whichever comes first. An optional ``cost`` function and ``max_cost``
budget (for example tokens) also close a batch; the item that would overflow it opens the
next one. :meth:`put` waits while the buffer is full: nothing is dropped.

After :meth:`close`, ``put`` raises and ``next_batch`` hands out what is left without
waiting, then returns an empty list.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import WorkerClosed

__all__ = ["MicroBatcher"]

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        max_items: int,
        max_delay_s: float,
        maxsize: int,
        *,
        cost: Callable[[T], int] | None = None,
        max_cost: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_items < 1 or maxsize < 1 or max_delay_s < 0:
            raise ValueError("max_items and maxsize must be >= 1, max_delay_s >= 0")
        self.max_items = max_items
        self.max_delay_s = max_delay_s
        self.maxsize = maxsize
        self._cost = cost
        self._max_cost = max_cost
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()
        self._closed = False

    def qsize(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: T) -> None:
        """Add one item, waiting while the buffer is full."""
        while self.full():
            if self._closed:
                raise WorkerClosed("batcher is closed")
            self._not_full.clear()
            await self._not_full.wait()
        self.put_nowait(item)

    def put_nowait(self, item: T) -> None:
        if self._closed:
            raise WorkerClosed("batcher is closed")
        if self.full():
            raise asyncio.QueueFull
        self._items.append((self._clock(), item))
        self._not_empty.set()

    def close(self) -> None:
        """Take no more items; wake every waiter."""
        self._closed = True
        self._not_empty.set()
        self._not_full.set()

    async def next_batch(self) -> list[T]:
        """The next batch; an empty list only once closed and drained."""
        while not self._items:
            if self._closed:
                return []
            self._not_empty.clear()
            await self._not_empty.wait()
        deadline = self._items[0][0] + self.max_delay_s
        batch: list[T] = []
        spent = 0
        while len(batch) < self.max_items:
            if not self._items:
                remaining = deadline - self._clock()
                if self._closed or remaining <= 0:
                    break
                self._not_empty.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._not_empty.wait()
                except TimeoutError:
                    break
                continue
            item = self._items[0][1]
            if self._cost is not None and self._max_cost is not None:
                item_cost = self._cost(item)
                if batch and spent + item_cost > self._max_cost:
                    break
                spent += item_cost
            self._items.popleft()
            batch.append(item)
            self._not_full.set()
        return batch
