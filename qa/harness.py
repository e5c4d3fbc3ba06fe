"""The moving parts of the crash suite (:mod:`qa.chaos`), the group chaos suite
(:mod:`qa.group_chaos`) and the fault matrix
(:mod:`qa.matrix`): a broker of their own, the processor as a subprocess, and an independent
``read_committed`` reader that follows the answers.

``python -m qa.harness serve [--item-delay-s S] [--break-on MARKER] [--stall-on MARKER
--stall-s S]`` is ``streamproc run`` with the identity summarizer behind a
:class:`~streamproc.testing.breakable.BreakableModel`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic

from streamproc.demo.progress import Progress
from streamproc.errors import StreamprocError
from streamproc.settings import Settings, load_settings
from streamproc.testing.kafka import LocalBroker, TopicReader, committed_offsets, create_topics
from streamproc.testing.records import BAD_RECORDS

__all__ = ["REPO_ROOT", "Processor", "RunOne", "SuiteRun", "Tracker", "each_guarantee", "holds",
           "processor_env", "say", "suite_broker", "uncommitted_answers"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def say(message: str) -> None:
    print(f"qa: {message}", file=sys.stderr, flush=True)


def suite_broker(properties: str = "") -> LocalBroker:
    """A broker of the suite's own, on free ports, with its data in a new temporary
    directory; it restarts (``stop``, ``start``) keeping its data."""
    data = Path(tempfile.mkdtemp(prefix="streamproc-qa-kafka-"))
    return LocalBroker.on_free_ports(data, properties=properties, attempts=3)


def holds(mode: str, lost: int, duplicated: int, bound: int, failures: list[str]) -> bool:
    """A suite run's verdict: nothing lost, no failure, and duplicates within ``bound`` (the
    answers in flight at the faults) under at_least_once, none under exactly_once."""
    return lost == 0 and not failures and (
        duplicated <= bound if mode == "at_least_once" else duplicated == 0)


class SuiteRun:
    """What a run of the crash suite and of the group chaos suite share, for one guarantee:
    the topics ``<name>.in`` and ``.out`` (``args.partitions`` partitions each) and ``.dlq``
    (2), the group ``<name>-group``, a log folder, an idempotent producer, a feeder that keeps
    the items a window ahead of the answers, and the burst of bad records. A subclass says
    how many items there are (``count``) and what each is (:meth:`record`)."""

    count = 0  # the good items a run feeds

    def __init__(self, args: argparse.Namespace, mode: str, bootstrap: str, logs: Path,
                 broker: LocalBroker | None, name: str) -> None:
        self.args, self.mode, self.bootstrap, self.broker = args, mode, bootstrap, broker
        self.topic, self.group = f"{name}.in", f"{name}-group"
        self.out = [TopicPartition(f"{name}.out", p) for p in range(args.partitions)]
        self.dlq = [TopicPartition(f"{name}.dlq", p) for p in range(2)]
        self.logs = logs / f"{mode}-{name}"
        self.logs.mkdir(parents=True)
        self.sent = self.bad_sent = 0
        self.cap = 0  # the feeder sends no item past this one
        self.bound = 0  # at-least-once: the duplicates the faults may cause, at most
        self.failures: list[str] = []
        self.deadline = time.monotonic() + args.timeout_s
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                         enable_idempotence=True, request_timeout_ms=120_000)

    def record(self, i: int) -> tuple[bytes, bytes]:
        """Item ``i`` as ``(key, value)``."""
        raise NotImplementedError

    async def setup(self) -> None:
        await create_topics(self.bootstrap, [
            NewTopic(self.topic, self.args.partitions, 1),
            NewTopic(self.out[0].topic, len(self.out), 1),
            NewTopic(self.dlq[0].topic, len(self.dlq), 1)])
        await self.producer.start()

    async def send(self, records: list[tuple[bytes | None, bytes]]) -> None:
        await asyncio.gather(*[await self.producer.send(self.topic, value=v, key=k)
                               for k, v in records])

    async def feed(self, tracker: Tracker, window: int) -> None:
        """Produce the items in order, up to ``window`` ahead of the answers and never past
        ``self.cap``, so that each fault lands with about a window of items in flight and
        the answers cannot run past its moment."""
        while self.sent < self.count:
            size = min(100, window - (self.sent - len(tracker.ids)), self.cap - self.sent)
            if size <= 0:
                await asyncio.sleep(0.02)
                continue
            chunk = range(self.sent, min(self.sent + size, self.count))
            await self.send([self.record(i) for i in chunk])
            self.sent += len(chunk)

    async def send_bad(self) -> None:
        """``args.bad`` bad records in one burst, unkeyed."""
        await self.send([(None, BAD_RECORDS[i % len(BAD_RECORDS)].value)
                         for i in range(self.args.bad)])
        self.bad_sent += self.args.bad


# (mode, bootstrap, logs, the suite's broker or None, rng) -> a run's result: "line", "ok",
# "failures" and "logs" at least.
RunOne = Callable[[str, str, Path, "LocalBroker | None", random.Random],
                  Awaitable[dict[str, Any]]]


async def each_guarantee(args: argparse.Namespace, name: str, run_one: RunOne,
                         describe: Callable[[dict[str, Any]], str],
                         then: Callable[[str, Path, LocalBroker | None, int],
                                        Awaitable[bool]] | None = None) -> int:
    """Run a suite once for each guarantee ``args.guarantee`` names, on ``args.bootstrap`` or
    a broker of the suite's own (wiped at the end): print each run's line, tell its
    ``describe``-d figures and failures, then ``then(bootstrap, logs, broker, seed)`` when
    both guarantees ran. Exit status 0 when every run held."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # reconnect noise; we report
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    say(f"seed {seed}")
    modes = ["at_least_once", "exactly_once"] if args.guarantee == "both" else [args.guarantee]
    logs = Path(tempfile.mkdtemp(prefix=f"streamproc-{name}-"))
    broker = None if args.bootstrap else suite_broker()
    ok = True
    try:
        bootstrap = args.bootstrap or await asyncio.to_thread(broker.start)  # type: ignore[union-attr]
        for i, mode in enumerate(modes):
            result = await run_one(mode, bootstrap, logs, broker, random.Random(seed + i))
            print(result["line"], flush=True)
            say(f"{mode}: {describe(result)}; logs in {result['logs']}")
            for failure in result["failures"]:
                say(f"{mode}: FAILED: {failure}")
            ok = ok and result["ok"]
        if then is not None and len(modes) == 2:
            ok = await then(bootstrap, logs, broker, seed) and ok
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop, wipe=True)
    return 0 if ok else 1


def processor_env(bootstrap: str, name: str, mode: str, **overrides: str) -> dict[str, str]:
    """A harness processor's environment: this one's without any streamproc setting, then the
    topics ``<name>.in``, ``.out`` and ``.dlq``, the group ``<name>-group``, the identity
    summarizer on the CPU, 300 ms commits, no metrics server, and ``overrides``. The
    repository comes first on the path, so the processor runs this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_INPUT_TOPIC=f"{name}.in",
        KAFKA_OUTPUT_TOPIC=f"{name}.out", KAFKA_DLQ_TOPIC=f"{name}.dlq",
        KAFKA_GROUP_ID=f"{name}-group", PROCESSING_GUARANTEE=mode, SUMMARIZER="identity",
        GPU_DEVICE_IDS="cpu", GPU_ENABLE_WARMUP="false", GPU_USE_FP16="false",
        KAFKA_COMMIT_INTERVAL_MS="300", LOG_LEVEL="INFO", LOG_INTERVAL_S="5",
        KAFKA_TRANSACTIONAL_ID_PREFIX=name, METRICS_PORT="0")
    env.update(overrides)
    return env


class Processor:
    """One ``python -m streamproc run`` subprocess, or, with ``serve_args``, ``python -m
    qa.harness serve`` (the same service over a breakable model); stdout and stderr go to a
    log file."""

    started = 0

    def __init__(self, env: dict[str, str], logs: Path, *serve_args: str) -> None:
        Processor.started += 1
        self.log = logs / f"processor-{Processor.started:02d}.log"
        with self.log.open("wb") as out:
            command = (["qa.harness", "serve", *serve_args] if serve_args
                       else ["streamproc", "run"])
            self.proc = subprocess.Popen([sys.executable, "-m", *command], cwd=logs, env=env,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP: the process stops answering anyone, as a long pause would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

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
        self.reader = TopicReader(bootstrap, tps)

    async def run(self) -> None:
        async with self.reader:
            while True:
                for record in await self.reader.poll(100):
                    self._see(record)

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
        end = await self.reader.consumer.end_offsets(self.tps)
        for _ in range(1200):  # a minute at most
            if await self.reader.at_end(end):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the tracker did not catch up with the answers in a minute")


async def uncommitted_answers(bootstrap: str, group: str, topic: str, tracker: Tracker,
                              since: dict[int, int] | None = None) -> int:
    """Input records with an answer written but not committed, now: a bound on the
    duplicates a kill -9 (or a member frozen out of the group) can cause under at-least-once.

    Read the answers up to the end of the topics, then the group's committed offsets (or
    ``since``, the ones taken when the fault began). In partition p every record the next
    owner reads again and had already answered lies between the committed offset c_p and the
    highest answered offset h_p, so it re-answers at most h_p + 1 - c_p records."""
    await tracker.caught_up()
    if since is None:
        since = await committed_offsets(bootstrap, group, topic)
    return sum(max(0, high + 1 - max(since.get(p, 0), 0))
               for p, high in tracker.max_source.items())


def main(argv: list[str] | None = None) -> int:
    import argparse

    from streamproc import signals

    parser = argparse.ArgumentParser(prog="python -m qa.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="streamproc run, with a breakable identity model")
    serve.add_argument("--item-delay-s", type=float, default=0.0)
    serve.add_argument("--break-on", default=None)
    serve.add_argument("--stall-on", default=None)
    serve.add_argument("--stall-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    signals.catch()  # as streamproc run does, before the service's imports
    from streamproc.ops.logs import configure_logging
    from streamproc.service import serve as serve_service
    from streamproc.testing.breakable import breakable_worker

    try:
        settings = load_settings()
        configure_logging(settings)
        return serve_service(settings, breakable_worker(
            settings, args.item_delay_s, args.break_on, args.stall_on, args.stall_s))
    except StreamprocError as exc:
        logging.getLogger("qa.harness").error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
