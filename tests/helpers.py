"""The tests' own helpers (the broker chores are :mod:`streamproc.testing.kafka`'s): where the
repository and the test broker are, unique topic names, settings for an in-process processor,
feed items, what a ``read_committed`` reader sees, a worker around the identity summarizer (a
pure-logic stand-in for the model), a running ``processor.run()`` that is always stopped,
drained and closed, and Debian's Prometheus tools for the monitoring tests."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from streamproc.inference.config import GPUConfig
from streamproc.inference.worker import GPUWorker
from streamproc.kafka.processor import StreamProcessor
from streamproc.settings import KafkaSettings, Settings
from streamproc.summarize.base import Summarizer, SummaryWorker, summarize_batch
from streamproc.summarize.identity import IdentitySummarizer
from streamproc.testing.kafka import committed_offsets, create_topics, read_to_end

REPO_ROOT = Path(__file__).resolve().parent.parent
# The test session's own broker (conftest.py), unless KAFKA_BOOTSTRAP_SERVERS answers.
TEST_PORT = int(os.environ.get("KAFKA_TEST_PORT", "19092"))


def copy_project(dest: Path) -> Path:
    """The files a clone has (tracked, plus new ones git does not ignore), copied to ``dest``:
    nothing a local build or run left behind comes along."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO_ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, dest / name)
    return dest


def build_wheel(dest: Path) -> Path:
    """The package's wheel, built from :func:`copy_project`."""
    source = copy_project(dest / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(dest), str(source)],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    return next(dest.glob("streamproc-*.whl"))


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settings_for(bootstrap: str, guarantee: str = "at_least_once", **overrides: Any) -> Settings:
    """An in-process processor's settings: its own topics, group and transactional-id
    prefix, the identity summarizer on the CPU, 200 ms commits, no ``.env`` and no metrics
    server; then ``overrides``."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_input_topic": unique_topic("in"),
        "kafka_output_topic": unique_topic("out"),
        "kafka_dlq_topic": unique_topic("dlq"),
        "kafka_group_id": unique_topic("group"),
        "kafka_transactional_id_prefix": unique_topic("txn"),
        "processing_guarantee": guarantee,
        "kafka_commit_interval_ms": 200,
        "kafka_max_poll_records": 100,
        "kafka_connect_timeout_s": 15,
        "shutdown_timeout_s": 20,
        "summarizer": "identity",
        "gpu_device_ids": "cpu",
        "gpu_enable_warmup": False,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def items(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    """``n`` feed items as ``(key, value)``, keyed by their ids ``<prefix>-0000`` on."""
    return [(f"{prefix}-{i:04d}".encode(),
             orjson.dumps({"id": f"{prefix}-{i:04d}", "text": f"Story {i} happened. Then more."}))
            for i in range(n)]


def end_offsets(metadata: Sequence[RecordMetadata]) -> dict[int, int]:
    """The end offset of every partition the records were written to."""
    ends: dict[int, int] = {}
    for m in metadata:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    return ends


async def committed(settings: KafkaSettings) -> dict[int, int]:
    """The group's committed offsets on the input topic, by partition."""
    return await committed_offsets(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                                   settings.kafka_input_topic)


async def output_ids(settings: KafkaSettings,
                     isolation_level: str = "read_committed") -> Counter[str]:
    """How many times each id is in the output topic, as such a reader sees it."""
    records = await read_to_end(settings.kafka_bootstrap_servers, settings.kafka_output_topic,
                                isolation_level=isolation_level)
    return Counter(orjson.loads(r.value)["id"] for r in records)


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for_output(settings: KafkaSettings, n: int, timeout_s: float = 90) -> None:
    """Until a read_committed reader sees ``n`` outputs."""
    deadline = time.monotonic() + timeout_s
    while sum((await output_ids(settings)).values()) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {n} committed outputs")
        await asyncio.sleep(0.3)


async def service_topics(settings: KafkaSettings, input_partitions: int = 3) -> None:
    """The settings' input topic with ``input_partitions``; output and DLQ with ONE partition
    each, so the order in which the processor produced its answers is the order they are
    read in."""
    await create_topics(settings.kafka_bootstrap_servers, {
        settings.kafka_input_topic: input_partitions, settings.kafka_output_topic: 1,
        settings.kafka_dlq_topic: 1})


async def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]],
                  headers: Sequence[tuple[str, bytes]] = ()) -> list[RecordMetadata]:
    """Send ``(key, value)`` pairs in order, each with ``headers``, and wait for every
    acknowledgement; each record's metadata (partition, offset). A key spreads records over
    partitions by hash; no key picks one at random."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=v, key=k, headers=list(headers) or None)
                for k, v in records]
        return list(await asyncio.wait_for(asyncio.gather(*sent), 30))
    finally:
        await producer.stop()


def identity_worker(*, delay_s: float | Callable[[], float] = 0.0, poison: str | None = None,
                    batch_size: int = 8, queue_size: int = 1000,
                    max_delay_ms: float = 20) -> SummaryWorker:
    """A GPUWorker around the identity summarizer. ``delay_s`` slows every batch (a callable:
    read before each batch, so a test can change it); a text containing ``poison`` makes the
    batch holding it raise (the worker then isolates that item)."""

    def task(model: Summarizer, texts: list[str]) -> list[str]:
        if delay := (delay_s() if callable(delay_s) else delay_s):
            time.sleep(delay)
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


@asynccontextmanager
async def running_processor(settings: Settings, worker: SummaryWorker | None = None
                            ) -> AsyncIterator[StreamProcessor]:
    """A started processor (its worker started too) with ``run()`` in a task; on exit: stop,
    drain, commit, close."""
    async with worker or identity_worker(max_delay_ms=10) as started_worker:
        processor = StreamProcessor(settings, started_worker)
        async with running(processor):
            yield processor


def never_retrieved(records: Sequence[logging.LogRecord]) -> list[str]:
    """asyncio's "... exception was never retrieved" in ``records`` (caplog's), once the
    garbage collector has had its say."""
    gc.collect()
    return [r.getMessage() for r in records if "never retrieved" in r.getMessage()]


def prometheus_tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool`` (Debian's ``prometheus`` package). Missing, the
    test skips, except under CI (``CI`` set), where ``.ci/run`` installs it: there it fails."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
