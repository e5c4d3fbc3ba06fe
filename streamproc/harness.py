"""The crash suite's moving parts: the harness's own broker, the processor as a subprocess,
and the independent ``read_committed`` readers that check the answers
(see :mod:`streamproc.chaos`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from .local_broker import KAFKA_SH
from .progress import Progress

__all__ = ["BAD", "PORT", "Processor", "Tracker", "broker", "read_committed", "reader", "say"]

# Not 39092: ports from 32768 up are Linux's ephemeral range, and a client that reconnects to
# a stopped broker there soon gets the broker's port as its own (a TCP self-connect); the
# socket's TIME_WAIT then keeps the broker from binding again, so it could not be restarted.
PORT, CONTROLLER_PORT, DATA_DIR = 31092, 31093, ".kafka/chaos-data"
BAD = [b"<rss><item>not json</item></rss>", b'{"id": "bad-utf8", "text": "caf\xe9"}',
       b'["id", "text"]', b'{"id": "bad-no-text"}', b'{"id": 42, "text": "not an id"}']


def say(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


def broker(action: str, *extra: str) -> None:
    """Run scripts/kafka.sh for the harness's own broker (PORT, DATA_DIR)."""
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(KAFKA_PORT=str(PORT), KAFKA_CONTROLLER_PORT=str(CONTROLLER_PORT),
               KAFKA_DATA_DIR=DATA_DIR)
    for attempt in range(3):
        done = subprocess.run(["bash", str(KAFKA_SH), action, *extra], env=env, text=True,
                              capture_output=True, timeout=240, check=False)
        if done.returncode == 0:
            return
        say(f"kafka.sh {action} failed (attempt {attempt + 1}); retrying in 5 s")
        time.sleep(5)
    raise RuntimeError(f"kafka.sh {action} failed:\n{done.stderr[-2000:]}")


class Processor:
    """One ``python -m streamproc run`` subprocess; stdout and stderr go to a log file."""

    started = 0

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        Processor.started += 1
        self.log = logs / f"processor-{Processor.started:02d}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "streamproc", "run"], cwd=logs,
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def has_partitions(self) -> bool:
        return "partitions assigned: ['" in self.log.read_text(errors="replace")

    async def terminate(self, timeout_s: float = 60) -> int | None:
        """SIGTERM and wait; the exit code, or None (and kill -9) if it did not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


class Tracker:
    """Follows the output and DLQ topics (read_committed): the answers so far."""

    def __init__(self, bootstrap: str, tps: list[TopicPartition], progress: Progress) -> None:
        self.tps, self.progress, self.output = tps, progress, tps[0].topic
        self.ids: set[str] = set()
        self.bad: set[tuple[int, int]] = set()  # (partition, offset) of answered bad records
        self.max_source: dict[int, int] = {}  # highest answered input offset per partition
        self.first_at = self.last_at = 0.0
        self.consumer = reader(bootstrap)

    async def run(self) -> None:
        await self.consumer.start()
        try:
            self.consumer.assign(self.tps)
            await self.consumer.seek_to_beginning(*self.tps)
            while True:
                for records in (await self.consumer.getmany(timeout_ms=100)).values():
                    for record in records:
                        self._see(record)
        finally:
            await asyncio.shield(self.consumer.stop())

    def _see(self, record: Any) -> None:
        if record.topic == self.output:
            doc = orjson.loads(record.value)
            where = (doc["source"]["partition"], doc["source"]["offset"])
            new, key = doc["id"] not in self.ids, doc["id"]
            self.ids.add(key)
        else:
            headers = {k: v.decode() for k, v in record.headers}
            where = (int(headers["streamproc.source.partition"]),
                     int(headers["streamproc.source.offset"]))
            new = where not in self.bad
            self.bad.add(where)
        self.max_source[where[0]] = max(self.max_source.get(where[0], -1), where[1])
        if new:
            self.last_at = time.monotonic()
            self.first_at = self.first_at or self.last_at
            self.progress.advance()

    async def caught_up(self) -> None:
        """Wait until everything written to the topics so far has been seen."""
        end = await self.consumer.end_offsets(self.tps)
        for _ in range(1200):  # a minute at most
            if all([await self.consumer.position(tp) >= end[tp] for tp in self.tps]):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the tracker did not catch up with the answers in a minute")


def reader(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                            auto_offset_reset="earliest", isolation_level="read_committed")


async def read_committed(bootstrap: str, tps: list[TopicPartition]) -> list[Any]:
    """An independent reader: a fresh consumer, no group, from the beginning to the end."""
    consumer = reader(bootstrap)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end, out = await consumer.end_offsets(tps), []
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()
