"""``streamproc run``: the long-running service, with signals, health and a throughput line.

A stop that stops: SIGTERM or SIGINT, in any state, ends the process within
``SHUTDOWN_TIMEOUT_S`` + 5 s, with exit code 0 when everything accepted was committed or
cleanly left uncommitted for the next owner.

- Before anything slow starts, the signals are only remembered (:mod:`streamproc.signals`);
  a signal during the model stack's imports, the model load or the connection to Kafka ends
  start-up there (the load is cancelled, its thread left behind) and exits 0.
- Once the processor runs, a signal stops the fetch (also one waiting out a rebalance), and
  the processor drains, commits and closes within ``SHUTDOWN_TIMEOUT_S``.
- A watchdog thread started by the signal is the backstop for any wait that overruns: it ends
  the process ``SHUTDOWN_TIMEOUT_S`` + ``EXIT_GRACE_S`` after the signal, with exit code 1, or
  with the service's own exit code once it has stopped.
- :func:`serve` does not let a model call still running on a replica's thread hold the
  interpreter's exit (it joins executor threads): the call's result would be dropped anyway.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from . import signals
from .aio import unless
from .errors import StreamprocError
from .kafka.clients import check_client_extras
from .kafka.processor import StreamProcessor
from .ops.http import OpsServer
from .settings import Settings

if TYPE_CHECKING:
    from .summarize.base import SummaryWorker

__all__ = ["EXIT_GRACE_S", "Watchdog", "freeze_heap", "report_loop", "run_service", "serve"]

log = logging.getLogger("streamproc.service")
DLQ_BURST_SHARE = 0.2  # warn when this share of an interval's answers were dead letters
LAG_GROWTH_INTERVALS = 3  # warn when total lag grew this many intervals in a row
EXIT_GRACE_S = 4.5  # past SHUTDOWN_TIMEOUT_S after a signal, the process exits regardless
THREAD_JOIN_S = 0.5  # how long serve() waits for the model's threads before it leaves them
START_THREAD_PREFIX = "streamproc-start-"  # start-up work on a daemon thread of its own
T = TypeVar("T")


class Watchdog:
    """Every wait on the shutdown path is bounded; this is the backstop for one that is not
    (or a model call that never returns): once ``SHUTDOWN_TIMEOUT_S`` + ``EXIT_GRACE_S``
    have passed since :meth:`start`, the process exits with :attr:`exit_code` (1, leaving
    what is open uncommitted, until the service has stopped and set its own)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exit_code = 1
        self._timer = threading.Timer(settings.shutdown_timeout_s + EXIT_GRACE_S, self._force)
        self._timer.daemon = True

    def start(self) -> None:
        if not self._timer.is_alive() and not self._timer.finished.is_set():
            self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _force(self) -> None:
        if self.exit_code:
            log.error("shutdown overran SHUTDOWN_TIMEOUT_S=%.1f by %.1f s; exiting now, "
                      "leaving what is open uncommitted", self.settings.shutdown_timeout_s,
                      EXIT_GRACE_S)
        else:
            log.warning("the process had not exited %.1f s after SHUTDOWN_TIMEOUT_S; "
                        "exiting now", EXIT_GRACE_S)
        logging.shutdown()
        os._exit(self.exit_code)


async def _on_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a daemon thread of its own: awaiting it can be cancelled, and a thread
    left behind (an import of the model stack takes seconds) never holds the exit."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()

    def settle(fut: asyncio.Future[T], value: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, result, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, value, None)

    threading.Thread(target=run, name=f"{START_THREAD_PREFIX}{name}", daemon=True).start()
    return await result


def freeze_heap() -> None:
    """Hide what start-up allocated (torch, transformers, the model's Python objects: some
    250,000 objects) from the garbage collector. They live as long as the process, and every
    full collection would walk them again: about 0.1 s each, 17% of the time of a pipeline
    benchmark run before this (``bench/pipeline.py``). New objects are collected as usual."""
    gc.collect()
    gc.freeze()


async def report_loop(processor: StreamProcessor, worker: SummaryWorker,
                      interval_s: float) -> None:
    """One throughput line per interval; warnings for dead-letter bursts and growing lag."""
    loop = asyncio.get_running_loop()
    last_answered, last_dead, last_time = 0, 0, loop.time()
    last_lag, lag_growth = 0, 0
    while True:
        await asyncio.sleep(interval_s)
        stats = processor.stats
        answered, dead = stats.answered(), sum(stats.dead_letters.values())
        now = loop.time()
        rate = (answered - last_answered) / max(now - last_time, 1e-9)
        new_answers, new_dead = answered - last_answered, dead - last_dead
        last_answered, last_dead, last_time = answered, dead, now
        lag = processor.lag.total()
        lag_growth = lag_growth + 1 if lag > last_lag else 0
        last_lag = lag
        metrics = worker.get_metrics()
        log.info(
            "throughput %.1f items/s consumed=%d produced=%d dead_letters=%d open=%d "
            "queue=%d mean_batch=%.1f partitions=%d lag=%d paused=%s",
            rate, stats.consumed, stats.produced, dead, processor.in_flight(),
            metrics["queue_depth"], metrics["mean_batch_size"], len(processor.assigned), lag,
            processor.intake.paused)
        if new_dead and new_dead >= DLQ_BURST_SHARE * new_answers:
            log.warning("dead-letter burst: %d of the last %d answers went to %s (by reason: "
                        "%s)", new_dead, new_answers, processor.settings.kafka_dlq_topic,
                        stats.dead_letters)
        if lag_growth >= LAG_GROWTH_INTERVALS:
            log.warning("consumer lag has grown for %d intervals (now %d records): add "
                        "processes to the group, or raise GPU_BATCH_SIZE", lag_growth, lag)


async def run_service(settings: Settings, worker: SummaryWorker | None = None, *,
                      watchdog: Watchdog | None = None) -> int:
    """Serve health at once, load and warm the model, join the group, process until SIGTERM
    or SIGINT, then drain, produce, commit and close. Returns the exit code. ``worker``
    replaces the one the settings describe (the fault matrix's breakable model); ``watchdog``
    is :func:`serve`'s, which outlives this call."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    own_watchdog = watchdog is None
    watchdog = watchdog or Watchdog(settings)
    processor: StreamProcessor | None = None

    def on_signal() -> None:
        stopping.set()
        if processor is not None:
            processor.request_stop()
        watchdog.start()

    for sig in signals.STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    if signals.caught():
        on_signal()
    try:
        check_client_extras(settings)  # before the model loads, not at the first assignment
        if worker is None:
            worker = await unless(stopping, _on_daemon_thread(
                lambda: _build_worker(settings), "build-worker"))
            if worker is None:
                log.info("stopped during start-up, before the model was loaded")
                return 0
        processor = StreamProcessor(settings, worker)
        try:
            async with OpsServer(settings, worker, processor):
                await unless(stopping, worker.start())
                if stopping.is_set():
                    log.info("stopped during start-up, while the model loaded")
                    return 0
                freeze_heap()
                log.info("started: plan=[%s] batch_size=%d settings=%s",
                         "; ".join(p.describe() for p in worker.plan), worker.config.batch_size,
                         settings.masked(), extra={"fields": {
                             "plan": [p.as_dict() for p in worker.plan],
                             "settings": settings.masked()}})
                await unless(stopping, processor.start())
                if stopping.is_set() and not processor.running:
                    log.info("stopped during start-up, before joining the group")
                    return 0
                reporter = asyncio.create_task(
                    report_loop(processor, worker, settings.log_interval_s))
                try:
                    await processor.run()  # its errors propagate as they are
                finally:
                    reporter.cancel()
                # What the drain left behind within SHUTDOWN_TIMEOUT_S is not committed and
                # will be read again: fail it now rather than run it past the grace period.
                await worker.stop(drain_s=0)
                log.info("stopped cleanly: %s", processor.stats.as_dict())
        finally:
            await processor.stop()  # a processor that never started closes its unused clients
            await worker.stop(drain_s=0)
    finally:
        if own_watchdog:
            watchdog.cancel()
        for sig in signals.STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        signals.catch()
    return 0


def _build_worker(settings: Settings) -> SummaryWorker:
    from .summarize.factory import build_worker  # the model stack: seconds of imports

    return build_worker(settings)


def serve(settings: Settings, worker: SummaryWorker | None = None) -> int:
    """Run the service in this process (:func:`run_service`) and return its exit code; a
    :class:`StreamprocError` that stops it propagates. Call :func:`signals.catch` first,
    before anything slow is imported. The process is ended here, at once, if a model call is
    still running on a replica's thread: the interpreter would wait for it."""
    watchdog = Watchdog(settings)
    error: StreamprocError | None = None
    try:
        code = asyncio.run(run_service(settings, worker, watchdog=watchdog))
    except StreamprocError as exc:
        error, code = exc, exc.exit_code
    watchdog.exit_code = code
    deadline = time.monotonic() + THREAD_JOIN_S
    # A model call still running on a replica's thread, or the model stack's import still
    # running on the start-up thread (finalizing the interpreter under it can abort the
    # process from C++): neither is waited for, nor run into the interpreter's exit.
    busy = [t for t in threading.enumerate() if t is not threading.main_thread()
            and (not t.daemon or t.name.startswith(START_THREAD_PREFIX)) and t.is_alive()]
    for thread in busy:
        thread.join(max(deadline - time.monotonic(), 0))
    if any(thread.is_alive() for thread in busy):
        if error is not None:
            log.error("%s: %s", type(error).__name__, error.reason)
        log.warning("a model call or the model's import is still running; exiting without "
                    "waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    watchdog.cancel()
    if error is not None:
        raise error
    return code
