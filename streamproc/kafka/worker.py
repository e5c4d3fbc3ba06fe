"""What the Kafka layer needs of the engine: the few methods of a
:class:`~streamproc.inference.worker.GPUWorker` that it calls, and nothing else of it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

__all__ = ["TextWorker"]


class TextWorker(Protocol):
    """Takes texts and answers each with its summary (or the typed error in the future)."""

    @property
    def queue_size(self) -> int:
        """How many items its queue holds."""
        ...

    def queue_depth(self) -> int:
        """How many items wait in its queue now."""
        ...

    async def submit_many(self, payloads: Sequence[str]) -> list[asyncio.Future[str]]:
        """Queue payloads in order, waiting for room; one future per payload."""
        ...
