"""``streamproc produce FILE``: send a JSON-lines file of feed items to a topic."""

from __future__ import annotations

import asyncio

import orjson

from ..settings import KafkaSettings
from .clients import producer_for, start_with_retry

__all__ = ["feed_lines", "produce_file", "produce_values"]


def feed_lines(path: str) -> list[bytes]:
    """Non-empty lines of a JSON-lines file, as bytes."""
    with open(path, "rb") as handle:
        return [line.rstrip(b"\r\n") for line in handle if line.strip()]


async def produce_values(settings: KafkaSettings, topic: str,
                         records: list[tuple[bytes | None, bytes]]) -> int:
    """Send ``(key, value)`` records to ``topic`` and wait for every acknowledgement."""
    producer = producer_for(settings)
    await start_with_retry("producer", producer.start, settings)
    try:
        deliveries = [await producer.send(topic, value=value, key=key) for key, value in records]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return len(records)


async def produce_file(settings: KafkaSettings, path: str, *, topic: str | None = None) -> int:
    """Send a JSON-lines file, one record a line, keyed by the item's id when it has one."""
    records: list[tuple[bytes | None, bytes]] = []
    for line in feed_lines(path):
        try:
            key = str(orjson.loads(line)["id"]).encode()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            key = None
        records.append((key, line))
    return await produce_values(settings, topic or settings.kafka_input_topic, records)
