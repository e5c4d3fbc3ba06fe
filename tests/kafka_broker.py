"""Helpers for tests that need a real Kafka broker (see scripts/kafka.sh).

Meant to be wired into a session-scoped fixture in conftest.py, e.g.::

    @pytest.fixture(scope="session")
    def kafka_bootstrap() -> Iterator[str]:
        try:
            bootstrap, stop = ensure_broker()
        except BrokerUnavailable as e:
            pytest.skip(str(e))
        yield bootstrap
        stop()

If ``KAFKA_BOOTSTRAP_SERVERS`` is set and answers, that broker is used as is.
Otherwise a dedicated test broker is started on 127.0.0.1:19092 (controller
19093, data in .kafka/test-data, wiped first) and stopped by the returned
callable. Not safe for several concurrent pytest processes (e.g. xdist) unless
``KAFKA_BOOTSTRAP_SERVERS`` points at an already running broker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamproc.kafka_clients import broker_answers

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_ROOT / "scripts" / "kafka.sh"

TEST_PORT = int(os.environ.get("KAFKA_TEST_PORT", "19092"))
TEST_CONTROLLER_PORT = int(os.environ.get("KAFKA_TEST_CONTROLLER_PORT", str(TEST_PORT + 1)))
TEST_DATA_DIR = REPO_ROOT / ".kafka" / "test-data"


class BrokerUnavailable(RuntimeError):
    """No usable broker given; the local one failed to start (no Java, port taken)."""


def _kafka_sh(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.update(
        KAFKA_PORT=str(TEST_PORT),
        KAFKA_CONTROLLER_PORT=str(TEST_CONTROLLER_PORT),
        KAFKA_DATA_DIR=str(TEST_DATA_DIR),
    )
    return subprocess.run(
        ["bash", str(KAFKA_SH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def ensure_broker() -> tuple[str, Callable[[], None]]:
    """Return ``(bootstrap, stop)``; ``stop`` only stops a broker started here."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if given and broker_answers(given):
        return given, lambda: None

    _kafka_sh("stop", "--wipe")  # clean state; also reaps a leftover test broker
    res = _kafka_sh("start")
    if res.returncode != 0:
        raise BrokerUnavailable(
            f"scripts/kafka.sh start failed (rc={res.returncode}):\n" + res.stderr[-4000:]
        )
    lines = res.stdout.strip().splitlines()
    if not lines:
        raise BrokerUnavailable(f"scripts/kafka.sh start printed no address:\n{res.stderr}")
    bootstrap = lines[-1].strip()

    def stop() -> None:
        _kafka_sh("stop")

    return bootstrap, stop


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_topic(
    bootstrap: str, name: str, partitions: int = 1, *, timeout_s: float = 30.0
) -> None:
    """Create ``name`` (RF 1) and wait until every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        deadline = time.monotonic() + timeout_s
        while True:
            desc = await admin.describe_topics([name])
            parts = desc[0].get("partitions", []) if desc else []
            if len(parts) == partitions and all(p.get("leader", -1) >= 0 for p in parts):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} not ready after {timeout_s}s: {desc}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    """Partition ids of ``topic`` (ValueError if it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        desc = await admin.describe_topics([topic])
    finally:
        await admin.close()
    parts = sorted(p["partition"] for p in (desc[0].get("partitions") or []))
    if not desc or desc[0].get("error_code", 0) != 0 or not parts:
        raise ValueError(f"topic {topic!r} not found: {desc}")
    return parts


async def read_all(
    bootstrap: str,
    topic: str,
    *,
    isolation_level: str = "read_committed",
    timeout_s: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the beginning up to its current end offsets, then stop.

    Uses a fresh consumer without a group (nothing is committed). With
    ``read_committed`` the end is the last stable offset, so records of open
    transactions are not waited for and aborted ones are skipped.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            if all([await consumer.position(tp) >= end[tp] for tp in tps]):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to {end} took over {timeout_s}s")
            batch = await consumer.getmany(timeout_ms=500)
            for tp in tps:
                out.extend(batch.get(tp, []))
        out.sort(key=lambda r: (r.partition, r.offset))
        return out
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The offsets ``group`` has committed on ``topic``, by partition (none: left out)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await asyncio.wait_for(admin.list_consumer_group_offsets(group), 30)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0}
