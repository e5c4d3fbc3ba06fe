"""GPUWorker: model replicas planned from free memory, fed by the micro-batcher.

``GPUWorker(model_loader, config, task)``: ``model_loader(device)`` builds one replica on a
device (``"cuda:0"``, ``"cpu"``), or ``model_loader()`` returns a model the worker places
itself; ``task(model, payloads)`` runs one batch on it and returns one result per payload, or
``task`` names a built-in task such as ``TaskEnums.SUMMARIZER`` (see
:mod:`streamproc.inference.tasks`). Both are blocking and run on the replica's own thread,
never on the event loop. See :mod:`streamproc.inference.planner` for how many replicas each
device gets.

Faults are isolated per item (see :mod:`streamproc.inference.chunks`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from ..errors import NoHealthyReplica, StreamprocError, WorkerClosed
from ..lifecycle import Lifecycle
from .batcher import MicroBatcher
from .calibration import TuneReport
from .chunks import ChunkRunner, Request
from .config import GPUConfig
from .layout import build_layout
from .planner import DevicePlan
from .replicas import Replica
from .stats import WorkerStats
from .tasks import TaskEnums, bind_task

__all__ = ["GPUWorker"]

P = TypeVar("P")
R = TypeVar("R")
M = TypeVar("M")
log = logging.getLogger("streamproc.worker")


class GPUWorker(Lifecycle, Generic[M, P, R]):
    """See the module docstring. ``start`` plans, loads and warms every replica; ``stop``
    drains the queue and frees them (both idempotent; or ``async with``)."""

    def __init__(
        self,
        model_loader: Callable[[str], M] | Callable[[], M],
        config: GPUConfig,
        task: Callable[[M, Any], Sequence[R]] | TaskEnums,
        *,
        cost: Callable[[P], int] | None = None,
        prepare: Callable[[M, list[P]], Any] | None = None,
    ) -> None:
        super().__init__()
        bound = bind_task(model_loader, config, task, prepare=prepare, cost=cost)
        self.config = bound.config
        self._loader = bound.loader
        self._task = bound.task
        self._prepare = bound.prepare
        self._cost = bound.cost
        self.autotune: TuneReport | None = None
        self.sort_window = 0
        self._prep_executor = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.replicas: list[Replica[M]] = []
        self.plan: list[DevicePlan] = []
        self.stats = WorkerStats()
        self._runner: ChunkRunner[M, P, R] | None = None  # built by start(), with its stats
        self._batcher: MicroBatcher[Request[P, R]] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._drain_s: float | None = None

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def models(self) -> list[M]:
        """The loaded replicas' models, one per replica (what the task runs on: for
        ``TaskEnums.SUMMARIZER``, a summarizer whose ``.model`` is the loader's model)."""
        return [replica.model for replica in self.replicas]

    _models = models  # the seed document's name, as its monitoring snippet reads it

    @property
    def queue_size(self) -> int:
        return self.config.queue_size

    def _restart_error(self) -> Exception:
        return WorkerClosed("a stopped GPUWorker cannot be restarted")

    async def _start(self) -> None:
        """Plan, load and warm every replica (a failure frees those loaded), then serve."""
        self.config, self.plan, self.autotune = await build_layout(
            self._loader, self.config, self._direct, self.replicas, self._cost)
        cfg = self.config
        cost_fn = None if self._cost is None else self._request_cost
        window = cfg.length_sort_window
        if window is None:  # the whole queue: length selection works at any batch size
            window = cfg.queue_size if self._cost is not None else 0
        # GPU_BATCH_SIZE (and the token budget) is per replica: a batch holds one chunk
        # of that size for each replica, as in the seed document's "batch 48 each".
        per_batch = max(1, len(self.replicas))
        self.sort_window = window
        self._batcher = MicroBatcher(
            cfg.batch_size * per_batch, cfg.max_delay_ms / 1000, cfg.queue_size,
            cost=cost_fn, sort_window=window,
            max_cost=None if cfg.max_batch_tokens is None else cfg.max_batch_tokens * per_batch)
        self.stats = WorkerStats()
        self._runner = ChunkRunner(self.replicas, self._task, self._direct, self.stats,
                                   cfg.replica_max_failures,
                                   probe=next(iter(cfg.warmup_payloads), None))
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="gpuworker")
        log.info("replica plan: %s", "; ".join(p.describe() for p in self.plan))

    async def stop(self, drain_s: float | None = None) -> None:
        """Take no new work, finish what is queued (within ``drain_s``), free the replicas.
        Idempotent."""
        self._drain_s = drain_s
        await super().stop()

    async def _stop(self) -> None:
        if self._batcher is not None and self._dispatcher is not None:
            assert self._runner is not None
            self._batcher.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._dispatcher), self._drain_s)
            except TimeoutError:
                self._dispatcher.cancel()
                await asyncio.gather(self._dispatcher, return_exceptions=True)
                closed = WorkerClosed("the worker stopped before this item ran")
                while batch := await self._batcher.next_batch():
                    self._runner.fail(batch, closed)
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
    def _request_cost(self, request: Request[P, R]) -> int:
        assert self._cost is not None
        return self._cost(request.payload)

    async def submit(self, payload: P) -> asyncio.Future[R]:
        """Queue one payload (waiting while the queue is full); its future holds the result."""
        return (await self.submit_many((payload,)))[0]

    async def submit_many(self, payloads: Sequence[P]) -> list[asyncio.Future[R]]:
        """Queue payloads in order, each as soon as there is room; one future per payload.
        If the wait is cancelled or the worker closes, the futures are cancelled, so the items
        already queued are skipped."""
        if not self.running or self._batcher is None:
            raise WorkerClosed("the GPUWorker is not running")
        loop, now = asyncio.get_running_loop(), time.monotonic()
        requests = [Request(p, loop.create_future(), now) for p in payloads]
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
        assert self._batcher is not None and self._runner is not None
        runner, loop = self._runner, asyncio.get_running_loop()
        running: asyncio.Future[Any] | None = None
        while batch := await self._batcher.next_batch():
            live = [r for r in batch if not r.future.done()]  # callers may have given up
            if not live:
                continue
            self._observe_batch(live)
            healthy = [r for r in self.replicas if r.healthy]
            if not healthy:
                runner.fail(live, NoHealthyReplica("every model replica is out of rotation"))
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
            running = asyncio.gather(*(runner.run(r, c, prepared=p)
                                       for (r, c), p in zip(pairs, prepared, strict=True)))
            if self._prepare is None:
                await running
                running = None
        if running is not None:
            await running

    def _prepare_chunk(self, replica: Replica[M], chunk: list[Request[P, R]]) -> Any:
        assert self._prepare is not None
        try:
            return self._prepare(replica.model, [r.payload for r in chunk])
        except Exception:
            return None

    def _observe_batch(self, batch: list[Request[P, R]]) -> None:
        now = time.monotonic()
        self.stats.batches += 1
        self.stats.batch_items += len(batch)
        self.stats.batch_size_items.observe(len(batch))
        if self._cost is not None:
            self.stats.batch_size_tokens.observe(sum(self._cost(r.payload) for r in batch))
        self.stats.queue_wait.observe(now - min(r.enqueued_at for r in batch))

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
