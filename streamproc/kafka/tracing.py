"""Tracing each record with OpenTelemetry, when the ``otel`` extra is installed.

A record gets a span, ``<input topic> process`` (kind CONSUMER), that continues the trace of
the input's ``traceparent`` header (W3C Trace Context; ``tracestate`` too), from the moment it
was fetched until its output or dead letter is handed to the producer. Its children are the
stages it went through:

- ``consume``: decoded and queued for the engine;
- ``infer``: waiting in the engine's batcher and summarized in a batch (a record that is
  not a feed item has none);
- ``produce``: its output or dead letter built and handed to the producer. Its context is
  what the output carries as ``traceparent``, in place of the input's.

The spans go to the global tracer provider: install ``streamproc[otel]`` and configure one
(``opentelemetry-instrument streamproc run``, from ``opentelemetry-distro``, does it from the
``OTEL_*`` variables). Without the extra, or with no provider set, :func:`record_trace`
returns None and a record costs a check or two; the input's headers, ``traceparent`` among
them, are still carried as they are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from aiokafka import ConsumerRecord

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    ENABLED = True
except ImportError:  # the otel extra is not installed
    ENABLED = False

__all__ = ["ENABLED", "TRACE_HEADERS", "RecordTrace", "record_trace"]

Header = tuple[str, bytes | None]
# The headers a trace's context travels in (W3C Trace Context): with tracing on, an output
# carries its own in place of the input's.
TRACE_HEADERS = ("traceparent", "tracestate")
TRACER_NAME = "streamproc"


def _carrier(headers: Sequence[Header]) -> dict[str, str]:
    return {name: content.decode("latin-1") for name, content in headers
            if name in TRACE_HEADERS and content is not None}


class RecordTrace:
    """One record's spans (see the module docstring). Every method is cheap and never
    raises for the record's own reasons."""

    __slots__ = ("_last_ns", "_produce", "_root", "_tracer")

    def __init__(self, record: ConsumerRecord[bytes, bytes], fetched_ns: int) -> None:
        self._tracer = trace.get_tracer(TRACER_NAME)
        parent = propagate.extract(_carrier(record.headers or ()))
        self._root = self._tracer.start_span(
            f"{record.topic} process", context=parent, kind=SpanKind.CONSUMER,
            start_time=fetched_ns, attributes={
                "messaging.system": "kafka", "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset})
        self._last_ns = fetched_ns
        self._produce: trace.Span | None = None

    def stage(self, name: str) -> None:
        """The stage ``name`` ended now; it began when the one before it ended."""
        now = time.time_ns()
        context = trace.set_span_in_context(self._root)
        self._tracer.start_span(name, context=context, start_time=self._last_ns).end(now)
        self._last_ns = now

    def inferred(self, _: object) -> None:
        """The ``infer`` stage ended (a done callback of the record's result)."""
        self.stage("infer")

    def produce(self) -> list[Header]:
        """Begin the ``produce`` stage; the headers that carry its context."""
        context = trace.set_span_in_context(self._root)
        self._produce = self._tracer.start_span("produce", context=context,
                                                kind=SpanKind.PRODUCER)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self._produce))
        return [(name, carrier[name].encode("latin-1")) for name in TRACE_HEADERS
                if name in carrier]

    def finish(self, outcome: str, error: str | None = None) -> None:
        """End the record's spans: ``outcome`` is ``summary``, ``dead_letter`` or why the
        record left unwritten (``stale``, ``stopped``)."""
        if self._produce is not None:
            self._produce.end()
        self._root.set_attribute("streamproc.outcome", outcome)
        if error is not None:
            self._root.set_status(Status(StatusCode.ERROR, error))
        self._root.end()


def record_trace(record: ConsumerRecord[bytes, bytes], fetched_ns: int) -> RecordTrace | None:
    """The record's trace; None without the ``otel`` extra, or while no tracer provider is
    set (OpenTelemetry's API alone records nothing: the record is then handled as without
    the extra)."""
    if not ENABLED or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    return RecordTrace(record, fetched_ns)
