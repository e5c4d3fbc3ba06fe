"""``streamproc run``: the long-running service, with signals, health and a throughput line."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading

from .engine import SummaryWorker, build_worker
from .observability import Observability
from .pipeline import StreamProcessor
from .settings import Settings

__all__ = ["EXIT_GRACE_S", "freeze_heap", "report_loop", "run_service"]

log = logging.getLogger("streamproc.service")
DLQ_BURST_SHARE = 0.2  # warn when this share of an interval's answers were dead letters
LAG_GROWTH_INTERVALS = 3  # warn when total lag grew this many intervals in a row
EXIT_GRACE_S = 4.5  # past SHUTDOWN_TIMEOUT_S after a signal, the process exits regardless


def _exit_watchdog(settings: Settings) -> threading.Timer:
    """Every wait on the shutdown path is bounded; this is the backstop for one that is not
    (or a model call that never returns): exit 1 once ``SHUTDOWN_TIMEOUT_S`` +
    ``EXIT_GRACE_S`` have passed since the signal, leaving what is open uncommitted."""
    def force() -> None:
        log.error("shutdown overran SHUTDOWN_TIMEOUT_S=%.1f by %.1f s; exiting now, leaving "
                  "what is open uncommitted", settings.shutdown_timeout_s, EXIT_GRACE_S)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(settings.shutdown_timeout_s + EXIT_GRACE_S, force)
    timer.daemon = True
    return timer


def freeze_heap() -> None:
    """Hide what start-up allocated (torch, transformers, the model's Python objects: some
    250,000 objects) from the garbage collector. They live as long as the process, and every
    full collection would walk them again: about 0.1 s each, 17% of the time of a pipeline
    benchmark run before this (``bench/pipeline.py``). New objects are collected as usual."""
    gc.collect()
    gc.freeze()


async def report_loop(processor: StreamProcessor, observability: Observability,
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
        lag = sum(observability.lag.values())
        lag_growth = lag_growth + 1 if lag > last_lag else 0
        last_lag = lag
        worker = processor.worker.get_metrics()
        log.info(
            "throughput %.1f items/s consumed=%d produced=%d dead_letters=%d open=%d "
            "queue=%d mean_batch=%.1f partitions=%d lag=%d paused=%s",
            rate, stats.consumed, stats.produced, dead, processor.in_flight(),
            worker["queue_depth"], worker["mean_batch_size"], len(processor.assigned), lag,
            processor.intake.paused)
        if new_dead and new_dead >= DLQ_BURST_SHARE * new_answers:
            log.warning("dead-letter burst: %d of the last %d answers went to %s (by reason: "
                        "%s)", new_dead, new_answers, processor.settings.kafka_dlq_topic,
                        stats.dead_letters)
        if lag_growth >= LAG_GROWTH_INTERVALS:
            log.warning("consumer lag has grown for %d intervals (now %d records): add "
                        "processes to the group, or raise GPU_BATCH_SIZE", lag_growth, lag)


async def run_service(settings: Settings, worker: SummaryWorker | None = None) -> int:
    """Serve health at once, load and warm the model, join the group, process until SIGTERM
    or SIGINT, then drain, produce, commit and close. Returns the exit code. ``worker``
    replaces the one the settings describe (the fault matrix's breakable model)."""
    worker = worker or build_worker(settings)
    processor = StreamProcessor(settings, worker)
    loop = asyncio.get_running_loop()
    watchdog = _exit_watchdog(settings)

    def on_signal() -> None:
        processor.request_stop()
        if not watchdog.is_alive():
            watchdog.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with Observability(settings, worker, processor) as observability, worker:
            if processor.stopping:  # a signal arrived while the model loaded
                return 0
            freeze_heap()
            log.info("started: plan=[%s] batch_size=%d settings=%s",
                     "; ".join(p.describe() for p in worker.plan), worker.config.batch_size,
                     settings.masked(), extra={"fields": {
                         "plan": [p.as_dict() for p in worker.plan],
                         "settings": settings.masked()}})
            async with processor:
                reporter = asyncio.create_task(
                    report_loop(processor, observability, settings.log_interval_s))
                try:
                    await processor.run()  # its errors propagate as they are
                finally:
                    reporter.cancel()
            # What the drain left behind within SHUTDOWN_TIMEOUT_S is not committed and will
            # be read again: fail it now rather than run it past the grace period.
            await worker.stop(drain_s=0)
            log.info("stopped cleanly: %s", processor.stats.as_dict())
    except BaseException:
        if not processor.started:  # failed before Kafka: close the unused clients quietly
            await processor.consumer.stop()
            await processor.sink.stop(within_s=2.0)
        raise
    finally:
        watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
