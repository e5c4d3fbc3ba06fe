"""``/metrics``, ``/healthz`` and ``/readyz`` on ``METRICS_PORT``: one plain asyncio HTTP
server, with no web framework."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import ConfigError
from ..lifecycle import Lifecycle
from ..settings import Settings
from .prometheus import registry

if TYPE_CHECKING:
    from ..kafka.processor import StreamProcessor
    from ..summarize.base import SummaryWorker

__all__ = ["OpsServer"]

log = logging.getLogger("streamproc.ops")


class OpsServer(Lifecycle):
    """The HTTP endpoints over ``worker`` and, in a service, its ``processor``.
    ``METRICS_PORT=0`` serves nothing (health is still computed for the logs)."""

    def __init__(self, settings: Settings, worker: SummaryWorker,
                 processor: StreamProcessor | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.worker = worker
        self.processor = processor
        self.registry = registry(worker, processor)
        self.port: int | None = None
        self._server: asyncio.Server | None = None

    async def _start(self) -> None:
        if not self.settings.metrics_port:
            return
        host, port = self.settings.metrics_host, self.settings.metrics_port
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError("METRICS_PORT", port, f"cannot listen on {host}:{port} "
                              f"({why}); pick a free port, or 0 for none") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%d/metrics", host, self.port)

    async def _stop(self) -> None:
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
            lag = self.processor.lag
            horizon = 3 * lag.interval_s + self.settings.kafka_connect_timeout_s
            if lag.last_broker_ok is None or time.monotonic() - lag.last_broker_ok > horizon:
                problems.append("broker not reachable")
        return (not problems), ("ready" if not problems else "; ".join(problems))

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
