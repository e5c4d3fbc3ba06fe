"""The Kafka half of ``streamproc demo``, and ``streamproc produce``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from .demo import print_metrics
from .engine import build_worker, feed_lines, sample_feed
from .errors import BrokerUnavailable
from .kafka_clients import broker_answers, client_options, producer_for, start_with_retry
from .local_broker import KAFKA_SH
from .pipeline import StreamProcessor
from .progress import Progress
from .settings import Settings

__all__ = ["BAD_RECORDS", "produce_file", "run_kafka_demo"]


# Deliberately bad records, one of each kind the dead-letter topic must explain.
BAD_RECORDS: list[tuple[str, bytes]] = [
    ("not JSON", b"<rss><item>not json</item></rss>"),
    ("invalid UTF-8", b'{"id": "bad-utf8", "text": "caf\xe9"}'),
    ("JSON that is not an object", b'["id", "text"]'),
    ("missing text", b'{"id": "bad-no-text"}'),
    ("wrong type", b'{"id": 42, "text": "numbers are not ids"}'),
]


def start_local_broker(settings: Settings) -> bool:
    """Start the packaged single-node broker if nothing answers. True if this call started it."""
    if broker_answers(settings.kafka_bootstrap_servers):
        return False
    port = settings.kafka_bootstrap_servers.split(",")[0].rpartition(":")[2]
    env = {**os.environ, "KAFKA_PORT": port, "KAFKA_CONTROLLER_PORT": str(int(port) + 1)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    print(f"starting a local Kafka broker on 127.0.0.1:{port} ...", file=sys.stderr)
    done = subprocess.run(["bash", str(KAFKA_SH), "start"], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise BrokerUnavailable(f"could not start a local broker ({KAFKA_SH} start); set "
                                f"KAFKA_BOOTSTRAP_SERVERS to a running one:\n{done.stderr}")
    return True


def stop_local_broker(settings: Settings) -> None:
    port = settings.kafka_bootstrap_servers.split(",")[0].rpartition(":")[2]
    env = {**os.environ, "KAFKA_PORT": port, "KAFKA_CONTROLLER_PORT": str(int(port) + 1)}
    subprocess.run(["bash", str(KAFKA_SH), "stop"], env=env, capture_output=True, check=False)


async def produce_values(settings: Settings, topic: str,
                         records: list[tuple[bytes | None, bytes]]) -> int:
    producer = producer_for(settings)
    await start_with_retry("producer", producer.start, settings)
    try:
        deliveries = [await producer.send(topic, value=value, key=key) for key, value in records]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return len(records)


async def produce_file(settings: Settings, path: str, *, topic: str | None = None) -> int:
    """Send a JSON-lines file, one record a line, keyed by the item's id when it has one."""
    records: list[tuple[bytes | None, bytes]] = []
    for line in feed_lines(path):
        try:
            key = str(orjson.loads(line)["id"]).encode()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            key = None
        records.append((key, line))
    return await produce_values(settings, topic or settings.kafka_input_topic, records)


async def collect(settings: Settings, expected: int, progress: Progress) -> dict[str, list[Any]]:
    """Read the output and DLQ topics (read_committed) until ``expected`` answers arrived."""
    consumer = AIOKafkaConsumer(
        settings.kafka_output_topic, settings.kafka_dlq_topic, **client_options(settings),
        group_id=None, auto_offset_reset="earliest", isolation_level="read_committed")
    await consumer.start()
    answers: dict[str, list[Any]] = {"summaries": [], "dead_letters": []}
    try:
        while sum(map(len, answers.values())) < expected:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    if tp.topic == settings.kafka_output_topic:
                        answers["summaries"].append(orjson.loads(record.value))
                    else:
                        answers["dead_letters"].append(
                            {k: v.decode("utf-8", "replace") for k, v in record.headers})
                    progress.advance()
    finally:
        await consumer.stop()
    return answers


async def run_kafka_demo(settings: Settings) -> int:
    run_id = uuid.uuid4().hex[:8]
    settings = settings.model_copy(update={
        "kafka_input_topic": f"demo-{run_id}.raw", "kafka_output_topic": f"demo-{run_id}.summaries",
        "kafka_dlq_topic": f"demo-{run_id}.dlq", "kafka_group_id": f"streamproc-demo-{run_id}",
        "kafka_create_topics": True})
    started = start_local_broker(settings)
    try:
        items = sample_feed()
        good = [(item.id.encode(), orjson.dumps({"id": item.id, "title": item.title,
                                                 "text": item.text})) for item in items]
        bad = [(None, value) for _, value in BAD_RECORDS]
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
    finally:
        if started:
            stop_local_broker(settings)
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
