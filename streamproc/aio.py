"""Small asyncio helpers shared by every layer: a bounded wait for the shutdown and clean-up
paths, a wait that an event cuts short, and whether the running task itself is being
cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["cancelling", "unless", "within"]

T = TypeVar("T")

log = logging.getLogger("streamproc")


def cancelling() -> bool:
    """The running task itself is being cancelled (not just a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def within(what: str, awaitable: Awaitable[Any], seconds: float,
                 tolerate: tuple[type[BaseException], ...] = ()) -> bool:
    """A bounded wait on the shutdown and clean-up paths: await for at most ``seconds``.
    False, with a warning, when it timed out, raised one of ``tolerate``, or ended in its own
    cancellation (a client's close may); the caller's own cancellation, and any other error,
    propagate."""
    try:
        await asyncio.wait_for(awaitable, max(seconds, 0.01))
        return True
    except TimeoutError:
        log.warning("%s did not finish within %.1f s", what, seconds)
    except tolerate as exc:
        log.warning("%s did not finish cleanly: %r", what, exc)
    except asyncio.CancelledError:
        if cancelling():
            raise
        log.warning("%s was cancelled", what)
    return False


async def unless(event: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """Await ``awaitable``, unless ``event`` is set first: then cancel it, wait for it to end,
    and return None. Its own errors propagate."""
    task = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()
