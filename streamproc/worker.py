"""GPUWorker: model replicas planned from free memory, fed by the micro-batcher.

``GPUWorker(model_loader, config, task)``: ``model_loader(device)`` builds one replica on a
device (``"cuda:0"``, ``"cpu"``); ``task(model, payloads)`` runs one batch on it and returns one
result per payload. Both are blocking and run on the replica's own thread, never on the event
loop. See :mod:`streamproc.planner` for how many replicas each device gets.

Faults: a chunk that raises is retried whole on another healthy replica; if that also fails,
or there is no other replica, it is bisected until the items that fail alone are found, and
only those get an :class:`InferenceFailed`. Out-of-memory halves the chunk and retries; a
single item that still does not fit gets :class:`ItemTooLarge`. A replica is blamed when a
chunk it failed succeeds elsewhere, or when every item of a chunk fails on it alone; after
``replica_max_failures`` blames in a row it leaves the rotation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from .autotune import TuneReport
from .batcher import MicroBatcher
from .errors import InferenceFailed, ItemTooLarge, NoHealthyReplica, StreamprocError, WorkerClosed
from .layout import build_layout
from .metrics import WorkerStats
from .planner import DevicePlan
from .replicas import Replica, is_out_of_memory
from .settings import GPUConfig

__all__ = ["GPUWorker"]

P = TypeVar("P")
R = TypeVar("R")
M = TypeVar("M")
log = logging.getLogger("streamproc.worker")


@dataclass(slots=True)
class _Request(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    enqueued_at: float


class GPUWorker(Generic[M, P, R]):
    def __init__(
        self,
        model_loader: Callable[[str], M],
        config: GPUConfig,
        task: Callable[[M, Any], Sequence[R]],
        *,
        cost: Callable[[P], int] | None = None,
        prepare: Callable[[M, list[P]], Any] | None = None,
    ) -> None:
        self.config = config
        self._loader = model_loader
        self._task = task
        self._prepare = prepare
        self._cost = cost
        self.autotune: TuneReport | None = None
        self.sort_window = 0
        self._prep_executor = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.replicas: list[Replica[M]] = []
        self.plan: list[DevicePlan] = []
        self.stats = WorkerStats()
        self._batcher: MicroBatcher[_Request[P, R]] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._state = "new"  # new -> running -> stopped

    # --- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> GPUWorker[M, P, R]:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        """Plan, load and warm every replica, then start serving. Idempotent."""
        async with self._lock:
            if self._state == "running":
                return
            if self._state == "stopped":
                raise WorkerClosed("a stopped GPUWorker cannot be restarted")
            try:
                layout = await build_layout(self._loader, self.config, self._direct,
                                            self.replicas)
                self.config, self.plan, self.autotune = layout
            except BaseException:
                self._close_replicas()
                raise
            cfg = self.config
            cost_fn = None if self._cost is None else self._request_cost
            window = cfg.length_sort_window
            if window is None:
                window = 4 * cfg.batch_size if self._cost is not None else 0
            # GPU_BATCH_SIZE (and the token budget) is per replica: a batch holds one chunk
            # of that size for each replica, as in the spec's "batch 48 each".
            per_batch = max(1, len(self.replicas))
            self.sort_window = window
            self._batcher = MicroBatcher(
                cfg.batch_size * per_batch, cfg.max_delay_ms / 1000, cfg.queue_size,
                cost=cost_fn, sort_window=window,
                max_cost=None if cfg.max_batch_tokens is None else cfg.max_batch_tokens * per_batch)
            self.stats = WorkerStats()
            self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="gpuworker")
            self._state = "running"
            log.info("replica plan: %s", "; ".join(p.describe() for p in self.plan))

    async def stop(self, drain_s: float | None = None) -> None:
        """Take no new work, finish what is queued (within ``drain_s``), free the replicas."""
        async with self._lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopped"
            assert self._batcher is not None and self._dispatcher is not None
            self._batcher.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._dispatcher), drain_s)
            except TimeoutError:
                self._dispatcher.cancel()
                await asyncio.gather(self._dispatcher, return_exceptions=True)
                while batch := await self._batcher.next_batch():
                    self._fail(batch, WorkerClosed("the worker stopped before this item ran"))
            self._close_replicas()

    def _close_replicas(self) -> None:
        for replica in self.replicas:
            replica.executor.shutdown(wait=False, cancel_futures=True)
        self._prep_executor.shutdown(wait=False, cancel_futures=True)

    def _direct(self, model: M, payloads: list[P]) -> Sequence[R]:
        """One batch start to finish on the calling thread (warm-up, calibration, retries)."""
        return self._task(model, payloads if self._prepare is None
                          else self._prepare(model, payloads))

    # --- requests ----------------------------------------------------------------------------
    def _request_cost(self, request: _Request[P, R]) -> int:
        assert self._cost is not None
        return self._cost(request.payload)

    async def submit(self, payload: P) -> asyncio.Future[R]:
        """Queue one payload (waiting while the queue is full); its future holds the result."""
        return (await self.submit_many((payload,)))[0]

    async def submit_many(self, payloads: Sequence[P]) -> list[asyncio.Future[R]]:
        """Queue payloads in order, each as soon as there is room; one future per payload.
        If the wait is cancelled or the worker closes, the futures are cancelled, so the items
        already queued are skipped."""
        if self._state != "running" or self._batcher is None:
            raise WorkerClosed("the GPUWorker is not running")
        loop, now = asyncio.get_running_loop(), time.monotonic()
        requests = [_Request(p, loop.create_future(), now) for p in payloads]
        try:
            await self._batcher.put_many(requests)
        except BaseException:
            for request in requests:
                request.future.cancel()
            raise
        return [request.future for request in requests]

    async def infer(self, payload: P) -> R:
        """One result, or the typed error raised."""
        return await (await self.submit(payload))

    async def infer_many(self, payloads: Sequence[P]) -> list[R | StreamprocError]:
        """Results in payload order; an item that failed holds its typed error instead."""
        futures = await self.submit_many(payloads)
        try:
            return await asyncio.gather(*futures, return_exceptions=True)  # type: ignore[return-value]
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise

    def queue_full(self) -> bool:
        return self._batcher is not None and self._batcher.full()

    def queue_depth(self) -> int:
        return 0 if self._batcher is None else self._batcher.qsize()

    # --- dispatch ----------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        """Take a batch, split it into one contiguous chunk per healthy replica, run them.
        With a ``prepare`` step, the next batch is prepared (tokenized, padded) on its own
        thread while the replicas run the current one."""
        assert self._batcher is not None
        loop = asyncio.get_running_loop()
        running: asyncio.Future[Any] | None = None
        while batch := await self._batcher.next_batch():
            live = [r for r in batch if not r.future.done()]  # callers may have given up
            if not live:
                continue
            self._observe_batch(live)
            healthy = [r for r in self.replicas if r.healthy]
            if not healthy:
                self._fail(live, NoHealthyReplica("every model replica is out of rotation"))
                continue
            size = -(-len(live) // len(healthy))  # contiguous chunks, one per replica
            chunks = [live[i:i + size] for i in range(0, len(live), size)]
            pairs = list(zip(healthy, chunks, strict=False))  # fewer chunks than replicas: fine
            prepared: list[Any] = [None] * len(pairs)
            if self._prepare is not None:
                prepared = await asyncio.gather(*(loop.run_in_executor(
                    self._prep_executor, self._prepare_chunk, r, c) for r, c in pairs))
            if running is not None:
                await running
            running = asyncio.gather(*(self._run_chunk(r, c, prepared=p)
                                       for (r, c), p in zip(pairs, prepared, strict=True)))
            if self._prepare is None:
                await running
                running = None
        if running is not None:
            await running

    def _prepare_chunk(self, replica: Replica[M], chunk: list[_Request[P, R]]) -> Any:
        assert self._prepare is not None
        try:
            return self._prepare(replica.model, [r.payload for r in chunk])
        except Exception:
            return None

    def _observe_batch(self, batch: list[_Request[P, R]]) -> None:
        now = time.monotonic()
        self.stats.batches += 1
        self.stats.batch_items += len(batch)
        self.stats.batch_size_items.observe(len(batch))
        if self._cost is not None:
            self.stats.batch_size_tokens.observe(sum(self._cost(r.payload) for r in batch))
        self.stats.queue_wait.observe(now - min(r.enqueued_at for r in batch))

    async def _call(self, replica: Replica[M], chunk: list[_Request[P, R]],
                    prepared: Any = None) -> Sequence[R]:
        loop = asyncio.get_running_loop()
        started = replica.busy_since = time.monotonic()
        self.stats.model_calls += 1
        try:
            if prepared is not None:
                results = await loop.run_in_executor(
                    replica.executor, self._task, replica.model, prepared)
            else:
                results = await loop.run_in_executor(
                    replica.executor, self._direct, replica.model, [r.payload for r in chunk])
        finally:
            replica.busy_since = None
            elapsed = time.monotonic() - started
            self.stats.inference_seconds += elapsed
            self.stats.batch_inference.observe(elapsed)
        if len(results) != len(chunk):
            raise InferenceFailed(f"the task returned {len(results)} results for {len(chunk)}")
        return results

    async def _run_chunk(self, replica: Replica[M], chunk: list[_Request[P, R]],
                         retried: bool = False, prepared: Any = None) -> None:
        if not chunk:
            return
        if not replica.healthy:  # left the rotation while this chunk was being prepared
            replica = next((r for r in self.replicas if r.healthy), replica)
            prepared = None
        try:
            results = await self._call(replica, chunk, prepared)
        except Exception as exc:
            if is_out_of_memory(exc):
                await self._split_on_oom(replica, chunk, exc)
                return
            other = next((r for r in self.replicas if r.healthy and r is not replica), None)
            if other is not None and not retried:
                self.stats.chunk_retries += 1
                if await self._try_chunk(other, chunk):
                    replica.blame(exc, self.config.replica_max_failures)
                    return
                replica = other
            failed = await self._isolate(replica, chunk)
            if failed == len(chunk) > 1:
                replica.blame(exc, self.config.replica_max_failures)
            return
        replica.succeeded()
        self._resolve(chunk, results)

    async def _try_chunk(self, replica: Replica[M], chunk: list[_Request[P, R]]) -> bool:
        try:
            results = await self._call(replica, chunk)
        except Exception:
            return False
        replica.succeeded()
        self._resolve(chunk, results)
        return True

    async def _isolate(self, replica: Replica[M], chunk: list[_Request[P, R]]) -> int:
        """Bisect a failing chunk; fail only the items that fail alone. Returns their count."""
        if len(chunk) == 1:
            try:
                self._resolve(chunk, await self._call(replica, chunk))
                return 0
            except Exception as exc:
                if is_out_of_memory(exc):
                    error: StreamprocError = ItemTooLarge(f"out of memory on a single item: {exc}")
                else:
                    error = InferenceFailed(f"{type(exc).__name__}: {exc}")
                self._fail(chunk, error)
                return 1
        half = len(chunk) // 2
        failed = 0
        for part in (chunk[:half], chunk[half:]):
            if not await self._try_chunk(replica, part):
                failed += await self._isolate(replica, part)
        return failed

    async def _split_on_oom(self, replica: Replica[M], chunk: list[_Request[P, R]],
                            exc: BaseException) -> None:
        if len(chunk) == 1:
            self._fail(chunk, ItemTooLarge(f"out of memory on a single item: {exc}"))
            return
        self.stats.oom_splits += 1
        log.warning("%s: out of memory on %d items; splitting", replica.name, len(chunk))
        half = len(chunk) // 2
        for part in (chunk[:half], chunk[half:]):
            await self._run_chunk(replica, part, retried=True)

    def _resolve(self, chunk: list[_Request[P, R]], results: Sequence[R]) -> None:
        for request, result in zip(chunk, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)
                self.stats.total_inferences += 1

    def _fail(self, chunk: list[_Request[P, R]], error: StreamprocError) -> None:
        for request in chunk:
            if not request.future.done():
                request.future.set_exception(error)
                self.stats.failures += 1

    # --- metrics -----------------------------------------------------------------------------
    def longest_running_call_s(self) -> float:
        """How long the oldest model call in progress has run (0 when idle): for liveness."""
        now = time.monotonic()
        return max((now - r.busy_since for r in self.replicas if r.busy_since is not None),
                   default=0.0)

    def get_metrics(self) -> dict[str, Any]:
        per_device: dict[str, int] = {}
        for replica in self.replicas:
            per_device[replica.device] = per_device.get(replica.device, 0) + int(replica.healthy)
        return {
            **self.stats.as_dict(),
            "queue_depth": self.queue_depth(),
            "queue_size": self.config.queue_size,
            "replicas_per_device": per_device,
            "replicas": [r.describe() for r in self.replicas],
            "dead_replicas": sum(not r.healthy for r in self.replicas),
            "plan": [p.as_dict() for p in self.plan],
            "batch_size": self.config.batch_size,
            "length_sort_window": self.sort_window,
            "autotune": None if self.autotune is None else self.autotune.as_dict(),
        }
