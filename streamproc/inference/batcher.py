"""A micro-batcher: pure asyncio, no Kafka, no torch.

Items wait in a bounded buffer. :meth:`MicroBatcher.next_batch` returns a batch as soon as
``max_items`` are waiting, or ``max_delay_s`` after the *first* item of the batch arrived
(monotonic clock), whichever comes first. An optional ``cost`` (for example tokens) and
``max_cost`` budget also close a batch when ``items x longest cost`` (the padded size) would
exceed it; the item that would overflow opens the next one. With a ``sort_window`` and a
backlog that one batch cannot hold (more than ``max_items``, or past ``max_cost`` padded),
the batch is chosen by length instead (see :meth:`_take_similar`). :meth:`put` and
:meth:`put_many` wait while the buffer is full: nothing is dropped.

After :meth:`close`, ``put`` and ``put_many`` raise, and ``next_batch`` hands out what is left
without waiting, then returns an empty list.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ..errors import WorkerClosed

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
        sort_window: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_items < 1 or maxsize < 1 or max_delay_s < 0:
            raise ValueError("max_items and maxsize must be >= 1, max_delay_s >= 0")
        self.max_items = max_items
        self.max_delay_s = max_delay_s
        self.maxsize = maxsize
        self._cost = cost
        self._max_cost = max_cost
        self._window = sort_window
        self._clock = clock
        self._items: deque[tuple[float, int, T]] = deque()  # (arrival, cost, item)
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()
        self._closed = False

    def qsize(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    async def put(self, item: T) -> None:
        """Add one item, waiting while the buffer is full."""
        await self.put_many((item,))

    async def put_many(self, items: Sequence[T]) -> None:
        """Add items in order, each as soon as there is room (waiting while full)."""
        start = 0
        while start < len(items):
            while self.full():
                if self._closed:
                    raise WorkerClosed("batcher is closed")
                self._not_full.clear()
                await self._not_full.wait()
            room = self.maxsize - len(self._items)
            self._append(items[start:start + room])
            start += room

    def _append(self, items: Sequence[T]) -> None:
        """Enqueue items that fit, stamped with one arrival time; each cost is computed here,
        once, not on every look at the window."""
        if self._closed:
            raise WorkerClosed("batcher is closed")
        now, cost = self._clock(), self._cost
        self._items.extend((now, 0 if cost is None else cost(item), item) for item in items)
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
        if self._cost is not None and self._window and self._backlog():
            return self._take_similar()
        deadline = self._items[0][0] + self.max_delay_s
        batch: list[T] = []
        longest = 0
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
            _, cost, item = self._items[0]
            if self._cost is not None:
                longest = max(longest, cost)
                if batch and not self._fits(len(batch) + 1, longest):
                    break
            self._items.popleft()
            batch.append(item)
            self._not_full.set()
        return batch

    def _backlog(self) -> bool:
        """More is waiting than one batch can hold: in items, or in padded tokens."""
        if len(self._items) > self.max_items:
            return True
        if self._max_cost is None or len(self._items) < 2:
            return False
        return not self._fits(len(self._items), max(cost for _, cost, _ in self._items))

    def _fits(self, count: int, longest: int) -> bool:
        """The padded size (items x longest) stays within the budget."""
        return self._max_cost is None or count * longest <= self._max_cost

    def _take_similar(self) -> list[T]:
        """With a backlog, batch the oldest item with the waiting items closest to it in
        length (within the look-ahead window), so padding stays small. The oldest item always
        goes, so nothing starves; the batch keeps arrival order."""
        assert self._cost is not None
        window = list(itertools.islice(self._items, self._window))
        costs = [cost for _, cost, _ in window]
        order = sorted(range(len(window)), key=costs.__getitem__)  # stable: ties keep arrival
        lo = hi = order.index(0)
        longest = costs[0]
        while hi - lo + 1 < self.max_items:
            below = order[lo - 1] if lo > 0 else None
            above = order[hi + 1] if hi + 1 < len(order) else None
            options = [i for i in (below, above) if i is not None
                       and self._fits(hi - lo + 2, max(longest, costs[i]))]
            if not options:
                break
            pick = min(options, key=lambda i: abs(costs[i] - costs[0]))
            longest = max(longest, costs[pick])
            lo, hi = (lo - 1, hi) if pick == below else (lo, hi + 1)
        chosen = set(order[lo:hi + 1])
        kept = [entry for i, entry in enumerate(window) if i not in chosen]
        for _ in range(len(window)):
            self._items.popleft()
        self._items.extendleft(reversed(kept))
        self._not_full.set()
        return [window[i][2] for i in sorted(chosen)]
