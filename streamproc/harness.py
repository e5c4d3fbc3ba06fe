"""The moving parts of the crash suite (:mod:`streamproc.chaos`) and the fault matrix
(:mod:`streamproc.matrix`): the harness's own broker, the processor as a subprocess, a model
that can be slowed down or broken, and the independent ``read_committed`` readers that check
the answers.

``python -m streamproc.harness serve [--item-delay-s S] [--break-on MARKER]`` is
``streamproc run`` with the identity summarizer behind a :class:`BreakableModel`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .errors import StreamprocError
from .local_broker import KAFKA_SH
from .progress import Progress
from .settings import GPUConfig, Settings, load_settings
from .summarizers import IdentitySummarizer, summarize_batch
from .worker import GPUWorker

if TYPE_CHECKING:
    from .engine import SummaryWorker

__all__ = ["BAD", "PORT", "BreakableModel", "Processor", "Tracker", "breakable_worker", "broker",
           "create_topics", "processor_env", "read_committed", "reader", "say"]

# Not 39092: ports from 32768 up are Linux's ephemeral range, and a client that reconnects to
# a stopped broker there soon gets the broker's port as its own (a TCP self-connect); the
# socket's TIME_WAIT then keeps the broker from binding again, so it could not be restarted.
PORT, CONTROLLER_PORT, DATA_DIR = 31092, 31093, ".kafka/chaos-data"
BAD = [b"<rss><item>not json</item></rss>", b'{"id": "bad-utf8", "text": "caf\xe9"}',
       b'["id", "text"]', b'{"id": "bad-no-text"}', b'{"id": 42, "text": "not an id"}']


def say(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


def broker(action: str, *extra: str, properties: str = "") -> None:
    """Run scripts/kafka.sh for the harness's own broker (PORT, DATA_DIR); ``properties``
    are extra server.properties lines."""
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(KAFKA_PORT=str(PORT), KAFKA_CONTROLLER_PORT=str(CONTROLLER_PORT),
               KAFKA_DATA_DIR=DATA_DIR, KAFKA_EXTRA_PROPERTIES=properties)
    for attempt in range(3):
        done = subprocess.run(["bash", str(KAFKA_SH), action, *extra], env=env, text=True,
                              capture_output=True, timeout=240, check=False)
        if done.returncode == 0:
            return
        say(f"kafka.sh {action} failed (attempt {attempt + 1}); retrying in 5 s")
        time.sleep(5)
    raise RuntimeError(f"kafka.sh {action} failed:\n{done.stderr[-2000:]}")


def processor_env(bootstrap: str, name: str, mode: str, **overrides: str) -> dict[str, str]:
    """A harness processor's environment: this one's without any streamproc setting, then the
    topics ``<name>.in``, ``.out`` and ``.dlq``, the group ``<name>-group``, the identity
    summarizer on the CPU, 300 ms commits, no metrics server, and ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_INPUT_TOPIC=f"{name}.in",
        KAFKA_OUTPUT_TOPIC=f"{name}.out", KAFKA_DLQ_TOPIC=f"{name}.dlq",
        KAFKA_GROUP_ID=f"{name}-group", PROCESSING_GUARANTEE=mode, SUMMARIZER="identity",
        GPU_DEVICE_IDS="cpu", GPU_ENABLE_WARMUP="false", GPU_USE_FP16="false",
        KAFKA_COMMIT_INTERVAL_MS="300", LOG_LEVEL="INFO", LOG_INTERVAL_S="5",
        KAFKA_TRANSACTIONAL_ID_PREFIX=name, METRICS_PORT="0")
    env.update(overrides)
    return env


class BreakableModel:
    """The identity summarizer, ``item_delay_s`` slower per item; after a batch holding
    ``break_on`` it fails every call, as a GPU does after a device-side assert."""

    def __init__(self, device: str, item_delay_s: float, break_on: str | None) -> None:
        self.inner = IdentitySummarizer(device)
        self.item_delay_s = item_delay_s
        self.break_on = break_on
        self.broken = False

    def __call__(self, texts: list[str]) -> list[str]:
        if self.item_delay_s:
            time.sleep(self.item_delay_s * len(texts))
        if self.break_on is not None and any(self.break_on in text for text in texts):
            self.broken = True
        if self.broken:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return summarize_batch(self.inner, texts)


def breakable_worker(settings: Settings, item_delay_s: float = 0.0,
                     break_on: str | None = None) -> SummaryWorker:
    """A GPUWorker over :class:`BreakableModel` replicas, configured by ``settings``; its
    probe payload is a plain sentence."""
    config = GPUConfig.from_settings(settings, warmup_payloads=("A known good sentence.",))

    def load(device: str) -> BreakableModel:
        return BreakableModel(device, item_delay_s, break_on)

    return GPUWorker(load, config, BreakableModel.__call__)  # type: ignore[arg-type]


class Processor:
    """One ``python -m streamproc run`` subprocess, or, with ``serve_args``, ``python -m
    streamproc.harness serve`` (the same service over a :class:`BreakableModel`); stdout and
    stderr go to a log file."""

    started = 0

    def __init__(self, env: dict[str, str], logs: Path, *serve_args: str) -> None:
        Processor.started += 1
        self.log = logs / f"processor-{Processor.started:02d}.log"
        with self.log.open("wb") as out:
            command = (["streamproc.harness", "serve", *serve_args] if serve_args
                       else ["streamproc", "run"])
            self.proc = subprocess.Popen([sys.executable, "-m", *command], cwd=logs, env=env,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def has_partitions(self) -> bool:
        return "partitions assigned: ['" in self.log_text()

    def assigned_or_exited(self) -> bool:
        """Its partitions were assigned, or it exited: waiting for an assignment is over."""
        return self.has_partitions() or self.proc.poll() is not None

    async def terminate(self, timeout_s: float = 60) -> int | None:
        """SIGTERM and wait; the exit code, or None (and kill -9) if it did not exit in time.
        :attr:`exit_s` is how long the exit took."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self.exit_s = time.monotonic() - started


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


async def create_topics(bootstrap: str, topic: str, partitions: int, out: list[TopicPartition],
                        dlq: list[TopicPartition],
                        output_config: dict[str, str] | None = None) -> None:
    """The input topic, and the output and dead-letter topics with as many partitions as
    ``out`` and ``dlq`` list (``output_config``: the output topic's own settings)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(topic, partitions, 1),
            NewTopic(out[0].topic, len(out), 1, topic_configs=dict(output_config or {})),
            NewTopic(dlq[0].topic, len(dlq), 1)])
    finally:
        await admin.close()


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


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .logs import configure_logging
    from .service import run_service

    parser = argparse.ArgumentParser(prog="python -m streamproc.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="streamproc run, with a breakable identity model")
    serve.add_argument("--item-delay-s", type=float, default=0.0)
    serve.add_argument("--break-on", default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings)
        worker = breakable_worker(settings, args.item_delay_s, args.break_on)
        return asyncio.run(run_service(settings, worker))
    except StreamprocError as exc:
        logging.getLogger("streamproc.harness").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
