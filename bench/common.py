"""Shared helpers for the benchmarks: a local broker of their own, feed records, topics,
and the machine/commit line every benchmark prints."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiokafka
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from streamproc.demo.progress import Progress
from streamproc.errors import BrokerUnavailable
from streamproc.kafka.clients import broker_answers, client_options, producer_for, start_with_retry
from streamproc.settings import Settings
from streamproc.testing import kafka as testing_kafka
from streamproc.testing.kafka import LocalBroker

__all__ = [
    "BENCH_BOOTSTRAP", "ROOT", "bench_broker", "broker_pid", "create_topics", "delete_topics",
    "feed_records", "git_commit", "kafka_version", "load_average", "machine_line",
    "process_cpu_seconds", "produce", "read_topic",
]

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks' own broker: tests use 19092 and people 9092, so never those.
BENCH_PORT = 29092
BENCH_BOOTSTRAP = f"127.0.0.1:{BENCH_PORT}"
BENCH_DATA_DIR = ROOT / ".kafka" / "bench-data"


@contextlib.contextmanager
def bench_broker(bootstrap: str | None) -> Iterator[str]:
    """The broker to use: ``bootstrap`` as given (it must answer), else the benchmarks' own
    broker on 127.0.0.1:29092, started (and stopped at the end) if it is not running."""
    if bootstrap:
        if not broker_answers(bootstrap):
            raise SystemExit(f"no Kafka broker answers at --bootstrap {bootstrap}")
        yield bootstrap
        return
    if broker_answers(BENCH_BOOTSTRAP):
        print(f"using the running broker at {BENCH_BOOTSTRAP}", file=sys.stderr)
        yield BENCH_BOOTSTRAP
        return
    print(f"starting a local Kafka broker on {BENCH_BOOTSTRAP} ({BENCH_DATA_DIR}) ...",
          file=sys.stderr)
    broker = LocalBroker(BENCH_PORT, BENCH_DATA_DIR)
    try:
        broker.start()
    except BrokerUnavailable as exc:
        raise SystemExit(str(exc)) from None
    try:
        yield BENCH_BOOTSTRAP
    finally:
        print(f"stopping the broker on {BENCH_BOOTSTRAP}", file=sys.stderr)
        broker.stop()


# --- records ---------------------------------------------------------------------------------

_SUBJECTS = ("The city council", "A regional bank", "The national weather service",
             "Researchers at the university", "The transport authority", "A local startup",
             "The health ministry", "Farmers in the valley")
_VERBS = ("announced", "reported", "confirmed", "proposed", "warned about", "celebrated")
_OBJECTS = ("a new budget for public transport", "record rainfall over the weekend",
            "a study on sleep and memory", "delays on the northern line",
            "a funding round of twelve million", "changes to the school calendar",
            "a shortage of seasonal workers", "the reopening of the harbour bridge")
_FOLLOW = ("Officials said more details would follow next week.",
           "Critics questioned the timing of the decision.",
           "The measure takes effect at the start of next month.",
           "Residents were invited to comment online until Friday.",
           "Analysts expect the figures to be revised later this year.",
           "A spokesperson declined to comment on the remaining open questions.",
           "Similar plans were discussed in two neighbouring districts last spring.")


def feed_records(n: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """``n`` feed items as (key, value): JSON ``{"id", "text"}`` of about 300 bytes, the text
    three or four sentences. Deterministic for a given seed."""
    rng = random.Random(seed)
    records: list[tuple[bytes, bytes]] = []
    for i in range(n):
        item_id = f"item-{i:07d}"
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                     f"on day {i % 365 + 1}.",
                     *rng.sample(_FOLLOW, rng.randint(3, 4))]
        records.append((item_id.encode(), orjson.dumps({"id": item_id,
                                                        "text": " ".join(sentences)})))
    return records


# --- topics ----------------------------------------------------------------------------------

async def create_topics(settings: Settings, names: Sequence[str], partitions: int) -> None:
    """Create the topics, each with ``partitions``, and wait for their leaders."""
    await testing_kafka.create_topics(client_options(settings),
                                      dict.fromkeys(names, partitions))


async def delete_topics(settings: Settings, names: Sequence[str]) -> None:
    """Best effort: a benchmark leaves no topics behind."""
    if not names:
        return
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        mine = [name for name in names if name in existing]
        if mine:
            await admin.delete_topics(mine)
    except KafkaError as exc:
        print(f"could not delete the benchmark topics: {exc!r}", file=sys.stderr)
    finally:
        await admin.close()


async def produce(settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]],
                  label: str) -> None:
    """Send every record with streamproc's producer settings; wait for all acks."""
    producer = producer_for(settings)
    await start_with_retry("producer", producer.start, settings)
    try:
        with Progress(len(records), label) as progress:
            step = 1000
            for start in range(0, len(records), step):
                chunk = records[start:start + step]
                deliveries = [await producer.send(topic, value=value, key=key)
                              for key, value in chunk]
                await asyncio.gather(*deliveries)
                progress.advance(len(chunk))
    finally:
        await producer.stop()


async def read_topic(settings: Settings, topic: str) -> list[bytes]:
    """Every committed record value of ``topic`` (read_committed), to its end."""
    records = await testing_kafka.read_to_end(client_options(settings), topic, timeout_s=300)
    return [record.value or b"" for record in records]


# --- machine and commit ----------------------------------------------------------------------

def broker_pid(bootstrap: str) -> int | None:
    """The pid of the benchmarks' own broker when ``bootstrap`` is it, else None."""
    if bootstrap != BENCH_BOOTSTRAP:
        return None
    try:
        pid = int((BENCH_DATA_DIR / str(BENCH_PORT) / "kafka.pid").read_text().strip())
        process_cpu_seconds(pid)
    except (OSError, ValueError):
        return None
    return pid


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kafka_version() -> str:
    """The broker version of scripts/kafka.sh's jars (the local brokers run these)."""
    jars = sorted((ROOT / ".kafka" / "lib").glob("kafka-server-[0-9]*.jar"))
    if not jars:
        return "unknown"
    return jars[-1].name.removeprefix("kafka-server-").removesuffix(".jar")


def git_commit() -> str:
    """``git rev-parse --short HEAD``, plus ``-dirty`` when tracked files differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if dirty else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews the numbers."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line(bootstrap: str) -> str:
    return (f"machine: cpus={os.cpu_count()} load={load_average()} "
            f"python={platform.python_version()} "
            f"aiokafka={aiokafka.__version__} kafka={kafka_version()} broker={bootstrap} "
            f"platform={platform.machine()}-{platform.system().lower()} commit={git_commit()}")
