"""``/metrics``, ``/healthz`` and ``/readyz`` on ``METRICS_PORT``: one plain asyncio HTTP server.

Metric names live in the ``streamproc_`` namespace, with units in their names. Counters and
gauges are read at scrape time from the same objects ``get_metrics()`` reads; histograms are
the worker's and the processor's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from aiokafka import TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import ConfigError
from .settings import Settings

if TYPE_CHECKING:
    from .engine import SummaryWorker
    from .pipeline import StreamProcessor

__all__ = ["Observability"]

log = logging.getLogger("streamproc.observability")


class _Collector(Collector):
    def __init__(self, owner: Observability) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        worker, processor = self.owner.worker, self.owner.processor
        ws = worker.stats
        yield CounterMetricFamily("streamproc_inferences", "Items the model answered.",
                                  value=ws.total_inferences)
        yield CounterMetricFamily("streamproc_inference_failures", "Items that failed in the "
                                  "model for good.", value=ws.failures)
        yield CounterMetricFamily("streamproc_oom_splits", "Batches split after running out "
                                  "of device memory.", value=ws.oom_splits)
        yield GaugeMetricFamily("streamproc_queue_depth_items", "Items waiting in the worker's "
                                "queue.", value=worker.queue_depth())
        replicas = GaugeMetricFamily("streamproc_replicas", "Healthy model replicas.",
                                     labels=["device"])
        for device, count in worker.get_metrics()["replicas_per_device"].items():
            replicas.add_metric([device], count)
        yield replicas
        yield from self._gpu_memory()
        for histogram in (ws.queue_wait, ws.batch_size_items, ws.batch_size_tokens,
                          ws.batch_inference):
            yield from histogram.collect()
        if processor is None:
            return
        ps = processor.stats
        yield CounterMetricFamily("streamproc_items_consumed", "Records read from the input "
                                  "topic.", value=ps.consumed)
        yield CounterMetricFamily("streamproc_summaries_produced", "Summaries safely written.",
                                  value=ps.produced)
        dead = CounterMetricFamily("streamproc_dead_letters", "Records written to the "
                                   "dead-letter topic.", labels=["reason"])
        for reason, count in sorted(ps.dead_letters.items()):
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily("streamproc_commits", "Offset commits (or committed "
                                  "transactions).", value=ps.commits)
        yield CounterMetricFamily("streamproc_backpressure_seconds", "Time the fetch waited "
                                  "for room in the worker's queue.",
                                  value=ps.backpressure_seconds)
        yield from ps.end_to_end.collect()
        lag = GaugeMetricFamily("streamproc_consumer_lag_records", "High-water mark minus the "
                                "consumer's position.", labels=["topic", "partition"])
        for tp, value in sorted(self.owner.lag.items()):
            lag.add_metric([tp.topic, str(tp.partition)], value)
        yield lag
        yield GaugeMetricFamily("streamproc_assigned_partitions", "Input partitions assigned "
                                "to this process.", value=len(processor.assigned))

    def _gpu_memory(self) -> Iterator[Metric]:
        devices = sorted({r.device for r in self.owner.worker.replicas if r.device != "cpu"})
        if not devices:
            return
        import torch

        used = GaugeMetricFamily("streamproc_gpu_memory_used_bytes", "Memory allocated by "
                                 "tensors of this process.", labels=["device"])
        reserved = GaugeMetricFamily("streamproc_gpu_memory_reserved_bytes", "Memory held by "
                                     "this process's caching allocator.", labels=["device"])
        for device in devices:
            used.add_metric([device], torch.cuda.memory_allocated(device))
            reserved.add_metric([device], torch.cuda.memory_reserved(device))
        yield used
        yield reserved


class Observability:
    """The HTTP endpoints and the lag poller. An async context manager; start and stop are
    idempotent. ``METRICS_PORT=0`` disables the server (the lag poller still runs)."""

    def __init__(self, settings: Settings, worker: SummaryWorker,
                 processor: StreamProcessor | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.processor = processor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.lag: dict[TopicPartition, int] = {}
        self.last_broker_ok: float | None = None
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._poller: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observability:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is None and self.settings.metrics_port:
            host, port = self.settings.metrics_host, self.settings.metrics_port
            try:
                self._server = await asyncio.start_server(self._handle, host, port)
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ConfigError("METRICS_PORT", port, f"cannot listen on {host}:{port} "
                                  f"({why}); pick a free port, or 0 for none") from None
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("metrics and health on http://%s:%d/metrics", self.settings.metrics_host,
                     self.port)
        if self._poller is None and self.processor is not None:
            self._poller = asyncio.create_task(self._poll_lag(), name="lag")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # --- health -----------------------------------------------------------------------------
    def liveness(self) -> tuple[bool, str]:
        """The loop answers (we are running this), no model call is wedged, a healthy
        replica is left, and no fault has stopped the processor."""
        if self.processor is not None and self.processor.fatal is not None:
            return False, f"stopping: {self.processor.fatal}"
        if self.worker.replicas and not any(r.healthy for r in self.worker.replicas):
            return False, "no healthy model replica"
        running = self.worker.longest_running_call_s()
        if running > self.settings.health_batch_deadline_s:
            return False, f"a model call has run {running:.0f} s (HEALTH_BATCH_DEADLINE_S)"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        problems = []
        if not self.worker.running:
            problems.append("models not loaded and warm")
        if self.processor is not None:
            if self.processor.stopping:
                problems.append("shutting down")
            if not self.processor.joined.is_set():
                problems.append("consumer has not joined its group")
            horizon = 3 * self.lag_interval_s + self.settings.kafka_connect_timeout_s
            if self.last_broker_ok is None or time.monotonic() - self.last_broker_ok > horizon:
                problems.append("broker not reachable")
        return (not problems), ("ready" if not problems else "; ".join(problems))

    @property
    def lag_interval_s(self) -> float:
        return min(self.settings.log_interval_s, 5.0)

    async def _poll_lag(self) -> None:
        assert self.processor is not None
        consumer = self.processor.consumer
        while True:
            if not self.processor.started:  # the model is still loading: nothing to ask yet
                await asyncio.sleep(self.lag_interval_s)
                continue
            try:
                tps = sorted(consumer.assignment())
                if tps:
                    ends = await consumer.end_offsets(tps)
                    self.lag = {tp: max(ends[tp] - await consumer.position(tp), 0) for tp in tps}
                else:
                    self.lag = {}
                    await consumer.topics()  # a metadata round trip proves the broker answers
                self.last_broker_ok = time.monotonic()
            except Exception as exc:
                log.debug("lag poll failed: %r", exc)
            await asyncio.sleep(self.lag_interval_s)

    # --- HTTP -------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            method, path = [*line.split(" "), ""][:2]
            status, body, ctype = self._route(method, path.split("?", 1)[0])
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET only\n", text
        if path == "/metrics":
            return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path in ("/healthz", "/readyz"):
            ok, why = self.liveness() if path == "/healthz" else self.readiness()
            return ("200 OK" if ok else "503 Service Unavailable"), f"{why}\n".encode(), text
        return "404 Not Found", b"try /metrics, /healthz or /readyz\n", text
