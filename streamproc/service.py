"""``streamproc run``: the long-running service, with signals and a throughput line."""

from __future__ import annotations

import asyncio
import logging
import signal

from .engine import build_worker
from .pipeline import StreamProcessor
from .settings import Settings

__all__ = ["report_loop", "run_service"]

log = logging.getLogger("streamproc.service")


async def report_loop(processor: StreamProcessor, interval_s: float) -> None:
    """One throughput line per interval."""
    last_answered, last_time = 0, asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(interval_s)
        stats = processor.stats
        answered = stats.produced + sum(stats.dead_letters.values())
        now = asyncio.get_running_loop().time()
        rate = (answered - last_answered) / max(now - last_time, 1e-9)
        last_answered, last_time = answered, now
        worker = processor.worker.get_metrics()
        log.info(
            "throughput %.1f items/s consumed=%d produced=%d dead_letters=%d open=%d "
            "queue=%d mean_batch=%.1f partitions=%d paused=%s",
            rate, stats.consumed, stats.produced, sum(stats.dead_letters.values()),
            processor.in_flight(), worker["queue_depth"], worker["mean_batch_size"],
            len(processor.assigned), stats.paused)


async def run_service(settings: Settings) -> int:
    """Load and warm the model, join the group, process until SIGTERM/SIGINT, then drain,
    produce, commit and close. Returns the exit code."""
    log.info("starting: %s", {k: v for k, v in settings.masked().items()
                              if k.startswith(("KAFKA_", "GPU_", "MODEL_", "SUMMARIZER"))})
    async with build_worker(settings) as worker, StreamProcessor(settings, worker) as processor:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, processor.request_stop)
        reporter = asyncio.create_task(report_loop(processor, settings.log_interval_s))
        try:
            await processor.run()
        finally:
            reporter.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped cleanly: %s", processor.stats.as_dict())
    return 0
