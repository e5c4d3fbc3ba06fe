"""Headers and trace context end to end, against the real broker: an input's headers reach
its output and its dead letter (never streamproc's own names), and with OpenTelemetry's SDK
each record's spans continue the input's ``traceparent`` and the output carries the new
context. The spans are read from the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from streamproc.kafka import tracing
from streamproc.testing.kafka import read_to_end
from tests.helpers import produce, running_processor, service_topics, settings_for, wait_for_output

pytestmark = pytest.mark.kafka

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The SDK as the global tracer provider, spans kept in memory; afterwards no provider
    again, so the tests after these run untraced. (The API sets the global provider once
    per process; its own test utilities reset it the same way.)"""
    assert tracing.ENABLED
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def traceparent(header: bytes) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent."""
    _, trace_id, span_id, _ = header.decode().split("-")
    return trace_id, span_id


async def test_headers_and_traceparent_reach_outputs_and_dead_letters_with_spans(
        kafka_bootstrap: str, exporter: InMemorySpanExporter) -> None:
    settings = settings_for(kafka_bootstrap)
    await service_topics(settings, input_partitions=1)
    headers = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode()),
               ("correlation-id", b"c-42"), ("streamproc.error.code", b"forged")]
    await produce(kafka_bootstrap, settings.kafka_input_topic, [
        (b"good", orjson.dumps({"id": "good", "text": "A story. It happened."})),
        (b"bad", b"not json")], headers)
    async with running_processor(settings):
        await wait_for_output(settings, 1, timeout_s=30)
    letters = await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic)
    [output] = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    [letter] = letters

    spans = [s for s in exporter.get_finished_spans()
             if s.context is not None and f"{s.context.trace_id:032x}" == TRACE_ID]
    roots = {s.attributes["messaging.kafka.offset"]: s for s in spans
             if s.name == f"{settings.kafka_input_topic} process" and s.attributes}
    assert sorted(roots) == [0, 1]
    for offset, record in ((0, output), (1, letter)):
        root = roots[offset]
        assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
        children = {s.name: s for s in spans
                    if s.parent is not None and root.context is not None
                    and s.parent.span_id == root.context.span_id}
        stages = ["consume", "infer", "produce"] if offset == 0 else ["consume", "produce"]
        assert sorted(children) == sorted(stages)
        assert root.attributes is not None
        assert root.attributes["streamproc.outcome"] == ("summary" if offset == 0
                                                          else "dead_letter")
        carried = dict(record.headers)
        assert carried["correlation-id"] == b"c-42"
        assert carried.get("streamproc.error.code") != b"forged"
        produced: ReadableSpan = children["produce"]
        assert produced.context is not None
        assert traceparent(carried["traceparent"]) == (TRACE_ID,
                                                       f"{produced.context.span_id:016x}")
    assert dict(letter.headers)["streamproc.error.code"] == b"not_json"
