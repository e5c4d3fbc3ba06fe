"""One lifecycle for every resource: an explicit state, idempotent ``start`` and ``stop``,
and ``async with``.

::

    NEW ──start()──▶ STARTING ──▶ RUNNING ──stop()──▶ STOPPING ──▶ STOPPED
     │                  │ (start failed: what it set up is released)   ▲
     └──────stop()──────┴──────────────────────────────────────────────┘

``start`` on a RUNNING resource returns at once; on a STOPPED one it raises (a resource is
not restarted). ``stop`` runs the subclass's :meth:`Lifecycle._stop` exactly once, from any
state but STOPPED, so a resource that failed half-way through its start, or never started,
still releases what it holds. Both are serialized by one lock.
"""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType
from typing import Self

__all__ = ["Lifecycle", "State"]


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Lifecycle:
    """Subclasses implement :meth:`_start` and :meth:`_stop`."""

    def __init__(self) -> None:
        self._state = State.NEW
        self._lifecycle_lock = asyncio.Lock()

    @property
    def state(self) -> State:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is State.RUNNING

    async def start(self) -> None:
        """Start; idempotent. A failed start releases what it set up and re-raises."""
        async with self._lifecycle_lock:
            if self._state is State.RUNNING:
                return
            if self._state is not State.NEW:
                raise self._restart_error()
            self._state = State.STARTING
            try:
                await self._start()
            except BaseException:
                self._state = State.STOPPING
                try:
                    await self._stop()
                finally:
                    self._state = State.STOPPED
                raise
            self._state = State.RUNNING

    async def stop(self) -> None:
        """Stop and release everything; idempotent."""
        async with self._lifecycle_lock:
            if self._state is State.STOPPED:
                return
            self._state = State.STOPPING
            try:
                await self._stop()
            finally:
                self._state = State.STOPPED

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def _restart_error(self) -> Exception:
        return RuntimeError(f"a stopped {type(self).__name__} cannot be started again")
