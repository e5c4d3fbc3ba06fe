"""Running a chunk of requests on a replica, and isolating the faults.

A chunk that raises is retried whole on another healthy replica; if that also fails, or
there is no other replica, it is bisected until the items that fail alone are found, and
only those get an :class:`InferenceFailed`. Out-of-memory halves the chunk and retries; a
single item that still does not fit gets :class:`ItemTooLarge`. A replica is blamed when a
chunk it failed succeeds elsewhere, or when every item of a chunk fails on it alone; after
``replica_max_failures`` blames in a row it leaves the rotation.

A failure may also break the replica itself (a CUDA device-side assert makes every later
call on it fail). So after a chunk or an item fails, its replica runs a known-good *probe*
payload (the first warm-up payload). A replica that fails the probe leaves the rotation at
once, and the chunk that broke it is *suspect*: its items run again one at a time on the
healthy replicas. An item after which a replica fails the probe is dead-lettered as
:class:`ReplicaBroken`, so a poison item breaks at most two replicas and never loops; with no
healthy replica left for a suspect, it is dead-lettered the same way. Items queued later get
:class:`~streamproc.errors.NoHealthyReplica`, which is not a dead letter: the pipeline stops
with them uncommitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import InferenceFailed, ItemTooLarge, OutOfMemory, ReplicaBroken, StreamprocError
from .replicas import Replica
from .stats import WorkerStats

__all__ = ["ChunkRunner", "Request"]

P = TypeVar("P")
R = TypeVar("R")
M = TypeVar("M")
log = logging.getLogger("streamproc.worker")


@dataclass(slots=True)
class Request(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    enqueued_at: float


class ChunkRunner(Generic[M, P, R]):
    """Runs chunks on the worker's ``replicas`` (the same list, healthy or not): ``task`` on
    a prepared chunk, ``direct`` (prepare and task on the replica's thread) otherwise."""

    def __init__(self, replicas: list[Replica[M]], task: Callable[[M, Any], Sequence[R]],
                 direct: Callable[[M, list[P]], Sequence[R]], stats: WorkerStats,
                 max_failures: int, probe: P | None = None) -> None:
        self.replicas = replicas
        self.task = task
        self.direct = direct
        self.stats = stats
        self.max_failures = max_failures
        self.probe_payload = probe

    async def call(self, replica: Replica[M], chunk: list[Request[P, R]],
                   prepared: Any = None) -> Sequence[R]:
        loop = asyncio.get_running_loop()
        started = replica.busy_since = time.monotonic()
        self.stats.model_calls += 1
        try:
            if prepared is not None:
                results = await loop.run_in_executor(
                    replica.executor, self.task, replica.model, prepared)
            else:
                results = await loop.run_in_executor(
                    replica.executor, self.direct, replica.model, [r.payload for r in chunk])
        finally:
            replica.busy_since = None
            elapsed = time.monotonic() - started
            self.stats.inference_seconds += elapsed
            self.stats.batch_inference.observe(elapsed)
        if len(results) != len(chunk):
            raise InferenceFailed(f"the task returned {len(results)} results for {len(chunk)}")
        return results

    async def run(self, replica: Replica[M], chunk: list[Request[P, R]],
                  retried: bool = False, prepared: Any = None) -> None:
        if not chunk:
            return
        if not replica.healthy:  # left the rotation while this chunk was being prepared
            replica = next((r for r in self.replicas if r.healthy), replica)
            prepared = None
        try:
            results = await self.call(replica, chunk, prepared)
        except Exception as exc:
            if OutOfMemory.describes(exc):
                await self._split_on_oom(replica, chunk, exc)
                return
            if not await self.probe(replica):
                await self._suspects(chunk)
                return
            other = next((r for r in self.replicas if r.healthy and r is not replica), None)
            if other is not None and not retried:
                self.stats.chunk_retries += 1
                if await self._try(other, chunk):
                    replica.blame(exc, self.max_failures)
                    return
                replica = other
            failed = await self._isolate(replica, chunk)
            if failed == len(chunk) > 1:
                replica.blame(exc, self.max_failures)
            return
        replica.succeeded()
        self.resolve(chunk, results)

    async def _try(self, replica: Replica[M], chunk: list[Request[P, R]]) -> bool:
        try:
            results = await self.call(replica, chunk)
        except Exception:
            return False
        replica.succeeded()
        self.resolve(chunk, results)
        return True

    async def _isolate(self, replica: Replica[M], chunk: list[Request[P, R]]) -> int:
        """Bisect a failing chunk; fail only the items that fail alone. Returns their count."""
        if not replica.healthy:
            await self._suspects(chunk)
            return len(chunk)
        if len(chunk) == 1:
            return await self._single(replica, chunk)
        half = len(chunk) // 2
        failed = 0
        for part in (chunk[:half], chunk[half:]):
            if not await self._try(replica, part):
                failed += await self._isolate(replica, part)
        return failed

    async def _single(self, replica: Replica[M], chunk: list[Request[P, R]]) -> int:
        """Run one item alone; on failure, probe the replica to tell whose fault it was."""
        try:
            self.resolve(chunk, await self.call(replica, chunk))
            return 0
        except Exception as exc:
            error: StreamprocError
            if OutOfMemory.describes(exc):
                error = ItemTooLarge(f"out of memory on a single item: {exc}")
            elif await self.probe(replica):
                error = InferenceFailed(f"{type(exc).__name__}: {exc}")
            else:
                error = ReplicaBroken(f"{type(exc).__name__}: {exc}; then {replica.name} "
                                      "failed a health probe and left the rotation")
            self.fail(chunk, error)
            return 1

    async def probe(self, replica: Replica[M]) -> bool:
        """Run the known-good payload on ``replica``; False (and it leaves the rotation) when
        it fails. True without a probe payload."""
        if self.probe_payload is None or not replica.healthy:
            return replica.healthy
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(replica.executor, self.direct, replica.model,
                                       [self.probe_payload])
        except Exception as exc:
            replica.broken(exc)
            return False
        return True

    async def _suspects(self, chunk: list[Request[P, R]]) -> None:
        """Items of a chunk that broke a replica: one at a time on the healthy replicas."""
        for request in chunk:
            replica = next((r for r in self.replicas if r.healthy), None)
            if replica is None:
                self.fail([request], ReplicaBroken("its batch broke the last healthy replica"))
            else:
                await self._single(replica, [request])

    async def _split_on_oom(self, replica: Replica[M], chunk: list[Request[P, R]],
                            exc: BaseException) -> None:
        if len(chunk) == 1:
            self.fail(chunk, ItemTooLarge(f"out of memory on a single item: {exc}"))
            return
        self.stats.oom_splits += 1
        log.warning("%s: out of memory on %d items; splitting", replica.name, len(chunk))
        await replica.release_memory()
        half = len(chunk) // 2
        for part in (chunk[:half], chunk[half:]):
            await self.run(replica, part, retried=True)

    def resolve(self, chunk: list[Request[P, R]], results: Sequence[R]) -> None:
        for request, result in zip(chunk, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)
                self.stats.total_inferences += 1

    def fail(self, chunk: list[Request[P, R]], error: StreamprocError) -> None:
        for request in chunk:
            if not request.future.done():
                request.future.set_exception(error)
                self.stats.failures += 1
