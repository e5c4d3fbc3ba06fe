"""Kafka chores for tests, benchmarks and the demo, each written once: a real single-node
broker, topics that are ready when created, and an independent reader that reads topics to
their end.

:class:`LocalBroker` runs the script the package ships (``data/kafka/kafka.sh``: Apache Kafka
in KRaft mode, from Maven Central jars; it needs Java 17+, and Maven once to fetch the jars).
Run from a checkout, it keeps its jars and data in the checkout's ``.kafka/``; from an
installed package, in ``${XDG_CACHE_HOME:-~/.cache}/streamproc`` (``STREAMPROC_STATE_DIR``
chooses another place)::

    with LocalBroker.on_free_ports(tmp_path / "kafka") as broker:
        await create_topics(broker.bootstrap, {"in": 3, "out": 3})
        ...
        records = await read_to_end(broker.bootstrap, ["out"])
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ..errors import BrokerUnavailable
from ..kafka.topics import create_and_wait
from ..lifecycle import Lifecycle

__all__ = ["KAFKA_SH", "LocalBroker", "TopicReader", "committed_offsets", "create_topics",
           "free_port_pair", "partitions_of", "read_to_end"]

KAFKA_SH = Path(str(resources.files(__package__).joinpath("data/kafka/kafka.sh")))
Client = str | Mapping[str, Any]  # a bootstrap address, or aiokafka client options


def _options(client: Client) -> dict[str, Any]:
    return {"bootstrap_servers": client} if isinstance(client, str) else dict(client)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(low: int = 20000, high: int = 32000) -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free, below Linux's ephemeral range (32768 up):
    a client that keeps reconnecting to a stopped broker on an ephemeral port soon gets that
    port as its own (a TCP self-connect), and the broker could not bind it again."""
    for _ in range(200):
        port = random.randrange(low, high)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise BrokerUnavailable(f"no two free adjacent ports between {low} and {high}")


@dataclass
class LocalBroker:
    """A real single-node broker on ``127.0.0.1:port`` (its controller on ``port + 1``),
    with its data under ``data_dir`` (default: the script's ``.kafka/data``) and
    ``properties`` appended to its ``server.properties``. ``listeners`` adds listeners, by
    security protocol (``{"SASL_PLAINTEXT": 9094}``; their ``listener.name.<protocol>.*``
    settings go in ``properties``), and ``scram_users`` (user: password) get SCRAM-SHA-256
    and -512 credentials. ``with`` starts and stops it."""

    port: int
    data_dir: Path | None = None
    properties: str = ""
    attempts: int = 1  # tries of each start or stop (a busy machine may need more)
    listeners: Mapping[str, int] = field(default_factory=dict)
    scram_users: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, data_dir: Path, **kwargs: Any) -> LocalBroker:
        return cls(free_port_pair(), Path(data_dir), **kwargs)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _script(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
        env.update(KAFKA_PORT=str(self.port), KAFKA_CONTROLLER_PORT=str(self.port + 1),
                   KAFKA_EXTRA_PROPERTIES=self.properties,
                   KAFKA_EXTRA_LISTENERS=" ".join(f"{name}:{port}"
                                                  for name, port in self.listeners.items()),
                   KAFKA_SCRAM_USERS=" ".join(f"{user}:{password}"
                                              for user, password in self.scram_users.items()))
        if self.data_dir is not None:
            env["KAFKA_DATA_DIR"] = str(self.data_dir)
        for attempt in range(self.attempts):
            done = subprocess.run(["bash", str(KAFKA_SH), *args], env=env, text=True,
                                  capture_output=True, timeout=timeout_s, check=False)
            if done.returncode == 0 or attempt + 1 == self.attempts:
                return done
            time.sleep(5)
        raise AssertionError("unreachable")

    def start(self) -> str:
        """Start it (or find it running); its bootstrap address. Raises
        :class:`BrokerUnavailable` with the script's last words."""
        done = self._script("start")
        if done.returncode != 0:
            raise BrokerUnavailable(f"{KAFKA_SH} start on port {self.port} failed "
                                    f"(rc={done.returncode}):\n{done.stderr[-4000:]}")
        return self.bootstrap

    def stop(self, *, wipe: bool = False) -> None:
        """Stop it if it runs; ``wipe`` deletes its data too."""
        self._script("stop", *(["--wipe"] if wipe else []))

    def running(self) -> bool:
        return self._script("status", timeout_s=30).returncode == 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(wipe=self.data_dir is not None)


async def create_topics(client: Client, topics: Mapping[str, int] | Iterable[NewTopic], *,
                        timeout_s: float = 30.0) -> None:
    """Create ``topics`` (by name, with a partition count, replication factor 1; or as
    ``NewTopic``s) and wait until every partition has a leader, so the first sends do not
    bounce off ``NotLeaderForPartition``. A topic that exists already is left as it is."""
    new = ([NewTopic(name, count, 1) for name, count in topics.items()]
           if isinstance(topics, Mapping) else list(topics))
    admin = AIOKafkaAdminClient(**_options(client))
    await admin.start()
    try:
        await create_and_wait(admin, new, timeout_s)
    finally:
        await admin.close()


async def partitions_of(client: Client, topic: str) -> list[int]:
    """The partition ids of ``topic`` (ValueError if it does not exist)."""
    admin = AIOKafkaAdminClient(**_options(client))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = described[0] if described else {}
    parts = sorted(p["partition"] for p in found.get("partitions") or [])
    if found.get("error_code", 0) != 0 or not parts:
        raise ValueError(f"topic {topic!r} not found: {described}")
    return parts


async def committed_offsets(client: Client, group: str, topic: str) -> dict[int, int]:
    """The offsets ``group`` has committed on ``topic``, by partition (none: left out)."""
    admin = AIOKafkaAdminClient(**_options(client))
    await admin.start()
    try:
        offsets = await asyncio.wait_for(admin.list_consumer_group_offsets(group), 30)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0}


class TopicReader(Lifecycle):
    """An independent reader of whole topics: no group, nothing committed, from the
    beginning of every partition. ``read_committed`` by default, as downstream consumers of
    an exactly-once service must read."""

    def __init__(self, client: Client, topics: str | Sequence[str | TopicPartition], *,
                 isolation_level: str = "read_committed") -> None:
        super().__init__()
        self.client = client
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.partitions: list[TopicPartition] = []
        self.consumer = AIOKafkaConsumer(**_options(client), enable_auto_commit=False,
                                         auto_offset_reset="earliest",
                                         isolation_level=isolation_level)

    async def _start(self) -> None:
        await self.consumer.start()
        for topic in self.topics:
            if isinstance(topic, TopicPartition):
                self.partitions.append(topic)
                continue
            found = await partitions_of(self.client, topic)
            self.partitions.extend(TopicPartition(topic, p) for p in found)
        self.consumer.assign(self.partitions)
        await self.consumer.seek_to_beginning(*self.partitions)

    async def _stop(self) -> None:
        await asyncio.shield(self.consumer.stop())

    async def poll(self, timeout_ms: int = 200) -> list[ConsumerRecord[bytes, bytes]]:
        """What arrived, in partition order."""
        batches = await self.consumer.getmany(timeout_ms=timeout_ms)
        return [record for tp in self.partitions for record in batches.get(tp, [])]

    async def at_end(self, end: Mapping[TopicPartition, int] | None = None) -> bool:
        """Whether every partition has been read up to ``end`` (default: its end now; with
        ``read_committed``, the last stable offset)."""
        end = end or await self.consumer.end_offsets(self.partitions)
        return all([await self.consumer.position(tp) >= end[tp] for tp in self.partitions])

    async def to_end(self, timeout_s: float = 60.0) -> list[ConsumerRecord[bytes, bytes]]:
        """Every record up to the end offsets as they are now, by partition and offset."""
        end = await self.consumer.end_offsets(self.partitions)
        out: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while not await self.at_end(end):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {self.topics} to {end} took over {timeout_s:.0f} s")
            out.extend(await self.poll(500))
        out.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return out


async def read_to_end(client: Client, topics: str | Sequence[str | TopicPartition], *,
                      isolation_level: str = "read_committed",
                      timeout_s: float = 60.0) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topics`` from the beginning to their end offsets as they are now, with a fresh
    reader of no group (see :class:`TopicReader`)."""
    async with TopicReader(client, topics, isolation_level=isolation_level) as reader:
        return await reader.to_end(timeout_s)
