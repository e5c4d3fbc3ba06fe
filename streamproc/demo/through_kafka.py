"""``streamproc demo``: the sample feed and bad records through a real broker (a local one
started when nothing answers at ``KAFKA_BOOTSTRAP_SERVERS``), summarized by the service's
processor, read back by an independent reader."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from ..kafka.clients import broker_answers, client_options
from ..kafka.processor import StreamProcessor
from ..kafka.produce import produce_values
from ..settings import Settings
from ..summarize.factory import build_worker
from ..summarize.workload import sample_feed
from ..testing.kafka import LocalBroker, TopicReader
from ..testing.records import BAD_RECORDS
from .engine_only import print_metrics
from .progress import Progress

__all__ = ["run_kafka_demo"]


@contextlib.contextmanager
def local_broker(settings: Settings) -> Iterator[None]:
    """A local broker on ``KAFKA_BOOTSTRAP_SERVERS``'s port for the demo's run, unless
    something answers there already."""
    if broker_answers(settings.kafka_bootstrap_servers):
        yield
        return
    port = int(settings.kafka_bootstrap_servers.split(",")[0].rpartition(":")[2])
    print(f"starting a local Kafka broker on 127.0.0.1:{port} ...", file=sys.stderr)
    broker = LocalBroker(port)
    broker.start()
    try:
        yield
    finally:
        broker.stop()


async def collect(settings: Settings, expected: int, progress: Progress) -> dict[str, list[Any]]:
    """Read the output and DLQ topics (read_committed) until ``expected`` answers arrived."""
    answers: dict[str, list[Any]] = {"summaries": [], "dead_letters": []}
    async with TopicReader(client_options(settings),
                           [settings.kafka_output_topic, settings.kafka_dlq_topic]) as reader:
        while sum(map(len, answers.values())) < expected:
            for record in await reader.poll(500):
                if record.topic == settings.kafka_output_topic:
                    answers["summaries"].append(orjson.loads(record.value))
                else:
                    answers["dead_letters"].append(
                        {k: v.decode("utf-8", "replace") for k, v in record.headers})
                progress.advance()
    return answers


async def run_kafka_demo(settings: Settings) -> int:
    run_id = uuid.uuid4().hex[:8]
    settings = settings.model_copy(update={
        "kafka_input_topic": f"demo-{run_id}.raw", "kafka_output_topic": f"demo-{run_id}.summaries",
        "kafka_dlq_topic": f"demo-{run_id}.dlq", "kafka_group_id": f"streamproc-demo-{run_id}",
        "kafka_create_topics": True})
    with local_broker(settings):
        items = sample_feed()
        good = [(item.id.encode(), orjson.dumps({"id": item.id, "title": item.title,
                                                 "text": item.text})) for item in items]
        bad = [(None, bad.value) for bad in BAD_RECORDS]
        big = (b"big", orjson.dumps({"id": "too-big", "text": "x" * settings.max_input_bytes}))
        async with build_worker(settings) as worker, \
                StreamProcessor(settings, worker) as processor:
            await produce_values(settings, settings.kafka_input_topic, [*good, *bad, big])
            print(f"produced {len(good)} feed items and {len(bad) + 1} bad records to "
                  f"{settings.kafka_input_topic}", file=sys.stderr)
            total = len(good) + len(bad) + 1
            runner = asyncio.create_task(processor.run())
            with Progress(total, "answered") as progress:
                answers = await collect(settings, total, progress)
            processor.request_stop()
            await runner
            report = {"worker": worker.get_metrics(), "pipeline": processor.stats.as_dict()}
    print(f"\n== {len(answers['summaries'])} summaries ({settings.resolved_model_name}) ==")
    for summary in answers["summaries"]:
        print(f"\n[{summary['id']}] {summary.get('title', '')}\n  {summary['summary']}")
    print(f"\n== {len(answers['dead_letters'])} dead letters ==")
    for headers in answers["dead_letters"]:
        print(f"  partition {headers['streamproc.source.partition']} "
              f"offset {headers['streamproc.source.offset']:>3} "
              f"{headers['streamproc.error.code']:<14} {headers['streamproc.error.reason'][:90]}")
    report["worker"].pop("replicas", None)
    print_metrics("metrics", report)
    ok = (len(answers["summaries"]), len(answers["dead_letters"])) == (len(good), total - len(good))
    return 0 if ok else 1
