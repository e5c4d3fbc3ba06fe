"""Per-partition offset bookkeeping: commit only the contiguous completed prefix.

Offsets are registered in fetch order (Kafka hands out one partition's records in offset
order) and completed in any order, as the broker acknowledges their outputs. The committable
position is the first offset not yet completed, or one past the last seen when none is open.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import islice

__all__ = ["OffsetTracker"]


class OffsetTracker:
    """``committed`` is the partition's committed position when tracking starts (if any)."""

    def __init__(self, committed: int | None = None) -> None:
        self._open: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None  # position to commit: every offset below it is complete
        self.committed = committed

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def add(self, offset: int) -> None:
        if self._open and offset <= self._open[-1]:
            raise ValueError(f"offset {offset} registered out of order after {self._open[-1]}")
        self._open.append(offset)

    def complete(self, offset: int) -> None:
        self._done.add(offset)
        while self._open and self._open[0] in self._done:
            head = self._open.popleft()
            self._done.discard(head)
            self._next = head + 1

    def leads(self, offsets: Sequence[int]) -> bool:
        """``offsets`` (ascending) are the oldest open offsets, with none skipped: completing
        them moves the committable position to ``offsets[-1] + 1`` and past nothing still
        open. exactly_once checks this before each transaction commits its offset."""
        return 0 < len(offsets) <= len(self._open) and all(
            a == b for a, b in zip(offsets, islice(self._open, len(offsets)), strict=True))

    def committable(self) -> int | None:
        """The position to commit now, or ``None`` when nothing new is complete."""
        if self._next is None or self._next == self.committed:
            return None
        return self._next

    def mark_committed(self, position: int) -> None:
        self.committed = position
