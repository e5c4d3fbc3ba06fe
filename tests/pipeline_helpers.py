"""In-process helpers for the tests that run a StreamProcessor against the real broker: a
worker around the identity summarizer (a pure-logic stand-in for the model) and a running
``processor.run()`` that is always stopped, drained and closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from streamproc.engine import SummaryWorker
from streamproc.pipeline import StreamProcessor
from streamproc.settings import GPUConfig
from streamproc.summarizers import IdentitySummarizer, Summarizer, summarize_batch
from streamproc.worker import GPUWorker


def identity_worker(*, delay_s: float = 0.0, poison: str | None = None, batch_size: int = 8,
                    queue_size: int = 1000, max_delay_ms: float = 20) -> SummaryWorker:
    """A GPUWorker around the identity summarizer. ``delay_s`` slows every batch; a text
    containing ``poison`` makes the batch holding it raise (the worker then isolates that
    item)."""

    def task(model: Summarizer, texts: list[str]) -> list[str]:
        if delay_s:
            time.sleep(delay_s)
        if poison is not None and any(poison in text for text in texts):
            raise RuntimeError(f"the model chokes on {poison}")
        return summarize_batch(model, texts)

    config = GPUConfig(device_ids="cpu", batch_size=batch_size, max_delay_ms=max_delay_ms,
                       queue_size=queue_size, enable_warmup=False, use_fp16=False)
    return GPUWorker(IdentitySummarizer, config, task)


@asynccontextmanager
async def running(processor: StreamProcessor, timeout_s: float = 60) -> AsyncIterator[
        asyncio.Task[None]]:
    """Start ``processor.run()``; on exit request a stop and wait (bounded) for it to return."""
    await asyncio.wait_for(processor.start(), 60)
    task = asyncio.create_task(processor.run())
    try:
        yield task
    finally:
        processor.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await asyncio.wait_for(processor.stop(), 30)
