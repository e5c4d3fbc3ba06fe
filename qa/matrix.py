"""Fault matrix: the faults a production service meets, each in both delivery guarantees.

    python -m qa.matrix [--cases NAME,...] [--guarantee at_least_once|exactly_once|both]
        [--n 300] [--timeout-s T]

It starts a broker of its own (on free ports, its data in a temporary directory, with a
one-second transaction-timeout check), and runs the service as subprocesses (``python -m
qa.harness serve``: ``streamproc run`` over a model that can be slowed down or broken).
Each case feeds ``--n`` good feed items and its bad records into a 3-partition topic, causes
its fault while items are in flight, sends SIGTERM to a processor during the fault, and then
reads the output and DLQ topics with an independent ``read_committed`` consumer. A case passes when:

- lost = 0: every good item has an output, and every bad record a dead letter;
- duplicated = 0 under exactly_once;
- every bad record is in the DLQ exactly once (under exactly_once), with the expected reason,
  and no good item is;
- each output partition holds each input partition's records in input order (first
  occurrences, so at-least-once replays do not count);
- no processor exited that the case did not stop, and each SIGTERM exited within
  ``SHUTDOWN_TIMEOUT_S`` + 5 s.

One line per case and mode goes to stdout, then a summary line; exit 1 if any case failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic

from qa.harness import Processor, Tracker, processor_env, say, suite_broker
from streamproc.demo.progress import Progress
from streamproc.testing.kafka import LocalBroker, create_topics, read_to_end
from streamproc.testing.records import BAD_RECORDS

__all__ = ["CASES", "Case", "main"]

PARTITIONS = 3
EXIT_BOUND_S = 5.0  # a SIGTERM'd processor exits within SHUTDOWN_TIMEOUT_S + this
POISON = "POISON-PILL"
BROKER_PROPERTIES = "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000"


@dataclass(frozen=True)
class Bad:
    """A record that must end as exactly one dead letter, with ``reason`` when given."""

    value: bytes
    reason: str | None


def too_large_output(k: int) -> Bad:
    """0.9 MB of input whose summary record grows to 3.4 MB: orjson writes each 1E15 back as
    1000000000000000.0, past the producer's 1 MiB request size."""
    nums = b",".join([b"1E15"] * 180_000)
    return Bad(b'{"id": "big-%d", "text": "Big news today. More follows.", "nums": [%s]}'
               % (k, nums), "output_too_large")


def over_topic_limit(k: int) -> Bad:
    """A 100 KB feed item whose summary record passes the 100 KB field through: over an
    output topic with max.message.bytes=65536."""
    return Bad(orjson.dumps({"id": f"wide-{k}", "text": "Wide news today. More follows.",
                             "body": "x" * 100_000}), "output_too_large")


def poison(k: int) -> Bad:
    return Bad(orjson.dumps({"id": f"poison-{k}", "text": f"{POISON} breaks the model."}),
               "replica_broken")


def invalid(k: int) -> Bad:
    return Bad(BAD_RECORDS[k % len(BAD_RECORDS)].value, None)


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    bad: Callable[[int], Bad]
    fault: str  # the name of a CaseRun.fault_* method
    env: dict[str, str] = field(default_factory=dict)
    serve: tuple[str, ...] = ("--item-delay-s", "0.02")  # items stay in flight for a while
    output_config: dict[str, str] = field(default_factory=dict)
    exits: bool = False  # the fault itself stops processors: their exits are expected
    items: int | None = None  # good items, when not --n
    bad_count: int = 3


CASES = [
    Case("output_too_large", "a valid record whose summary is over KAFKA_MAX_REQUEST_SIZE",
         too_large_output, "sigterm"),
    Case("topic_max_message_bytes", "the output topic takes 64 KiB; a 100 KB summary",
         over_topic_limit, "sigterm", output_config={"max.message.bytes": "65536"}),
    Case("poison_replica", "an item after which its replica fails every call (3 replicas)",
         poison, "sigterm", bad_count=1, serve=("--item-delay-s", "0.02", "--break-on", POISON),
         env={"MODEL_POOL_MAX_INSTANCES": "3"}),
    Case("broker_outage", "the broker down for 12 s, past a 3 s transaction timeout",
         invalid, "outage", env={"KAFKA_TRANSACTION_TIMEOUT_MS": "3000"}, items=150,
         serve=("--item-delay-s", "0.1")),  # work in hand through the outage
    Case("revoke_drain_timeout", "a second member joins and leaves while a slow model "
         "cannot drain within SHUTDOWN_TIMEOUT_S=2", invalid, "rebalance",
         serve=("--item-delay-s", "0.02"),
         env={"SHUTDOWN_TIMEOUT_S": "2", "GPU_BATCH_SIZE": "20", "GPU_QUEUE_SIZE": "100"}),
    Case("rebalance_broker_down", "the broker stops as soon as a second member's join starts "
         "a rebalance", invalid, "rebalance_outage", exits=True,
         serve=("--item-delay-s", "0.01"), env={"KAFKA_CONNECT_TIMEOUT_S": "6"}),
    Case("slow_model", "1 item/s against KAFKA_MAX_POLL_INTERVAL_MS=3000", invalid, "slow",
         serve=("--item-delay-s", "1.0"), items=8,
         env={"KAFKA_MAX_POLL_INTERVAL_MS": "3000", "GPU_BATCH_SIZE": "1",
              "GPU_QUEUE_SIZE": "2", "GPU_MAX_DELAY_MS": "0", "SHUTDOWN_TIMEOUT_S": "3"}),
]


class CaseRun:
    """One case in one mode: topics, processors, feed, fault, verification."""

    def __init__(self, case: Case, mode: str, args: argparse.Namespace, broker: LocalBroker,
                 logs: Path) -> None:
        self.case, self.mode, self.args, self.broker = case, mode, args, broker
        bootstrap = self.bootstrap = broker.bootstrap
        name = f"m-{case.name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        self.topic = f"{name}.in"
        self.out = [TopicPartition(f"{name}.out", p) for p in range(PARTITIONS)]
        self.dlq = [TopicPartition(f"{name}.dlq", 0)]
        self.logs = logs / f"{case.name}-{mode}"
        self.logs.mkdir(parents=True)
        defaults = {"KAFKA_CREATE_TOPICS": "false", "SHUTDOWN_TIMEOUT_S": "5",
                    "KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_CONNECT_TIMEOUT_S": "60"}
        self.env = processor_env(bootstrap, name, mode, **{**defaults, **case.env})
        self.shutdown_s = float(self.env["SHUTDOWN_TIMEOUT_S"])
        self.n = case.items or args.n
        self.ids = [f"{name}-{i:05d}" for i in range(self.n)]
        self.bad = [case.bad(k) for k in range(case.bad_count)]
        self.where: dict[tuple[int, int], str | Bad] = {}  # source position -> id or Bad
        self.failures: list[str] = []
        self.unexpected_exits = self.expected_exits = 0
        self.sigterms: list[tuple[float, int | None]] = []  # (seconds to exit, rc)
        self.deadline = time.monotonic() + args.timeout_s
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                         enable_idempotence=True, max_request_size=2 << 20,
                                         request_timeout_ms=60_000)
        self.primary: Processor | None = None

    # --- plumbing ---------------------------------------------------------------------------
    def processor(self) -> Processor:
        return Processor(self.env, self.logs, *self.case.serve)

    async def setup(self) -> None:
        await create_topics(self.bootstrap, [
            NewTopic(self.topic, PARTITIONS, 1),
            NewTopic(self.out[0].topic, len(self.out), 1,
                     topic_configs=dict(self.case.output_config)),
            NewTopic(self.dlq[0].topic, len(self.dlq), 1)])
        await self.producer.start()

    async def send(self, values: list[tuple[str | Bad, bytes]]) -> None:
        futures = [await self.producer.send(self.topic, value=value,
                                            key=what.encode() if isinstance(what, str) else None)
                   for what, value in values]
        for (what, _), meta in zip(values, await asyncio.gather(*futures), strict=True):
            self.where[(meta.partition, meta.offset)] = what

    def good(self, ids: list[str]) -> list[tuple[str | Bad, bytes]]:
        return [(i, orjson.dumps({"id": i, "text": f"Item {i} is news. More text follows."}))
                for i in ids]

    async def sigterm(self, proc: Processor, during: str) -> None:
        """SIGTERM during the fault; record how long the exit took."""
        rc = await proc.terminate(self.shutdown_s + 60)
        self.sigterms.append((proc.exit_s, rc))
        say(f"{self.case.name}/{self.mode}: SIGTERM {during}: rc={rc} in {proc.exit_s:.1f} s")
        if rc is None or proc.exit_s > self.shutdown_s + EXIT_BOUND_S:
            self.failures.append(f"SIGTERM {during} took {proc.exit_s:.1f} s (rc={rc}), over "
                                 f"SHUTDOWN_TIMEOUT_S + {EXIT_BOUND_S:.0f}")

    def check_primary(self) -> None:
        """Restart the primary processor if it exited, counting the exit."""
        if self.primary is not None and self.primary.proc.poll() is not None:
            rc = self.primary.proc.returncode
            if self.case.exits:
                self.expected_exits += 1
            else:
                self.unexpected_exits += 1
                self.failures.append(f"a processor exited with rc={rc} (log "
                                     f"{self.primary.log})")
            say(f"{self.case.name}/{self.mode}: processor exited rc={rc}; restarting it")
            self.primary = self.processor()

    async def until(self, done: Callable[[], bool], what: str) -> None:
        while not done():
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            self.check_primary()
            await asyncio.sleep(0.05)

    async def pause(self, seconds: float) -> None:
        """Sleep, restarting the primary processor if it exits meanwhile."""
        until = time.monotonic() + seconds
        await self.until(lambda: time.monotonic() >= until, f"{seconds} s")

    # --- faults: each runs while items are in flight, and SIGTERMs a processor during it ---
    async def fault_sigterm(self) -> None:
        assert self.primary is not None
        await self.sigterm(self.primary, "mid-stream")
        self.primary = self.processor()

    async def fault_outage(self) -> None:
        """The primary rides out the outage (under exactly_once the coordinator aborts its
        open transaction past KAFKA_TRANSACTION_TIMEOUT_MS, which fences its producer); a
        second member gets SIGTERM during it."""
        second = self.processor()
        await self.until(second.assigned_or_exited,
                         "the second member's assignment")
        await asyncio.to_thread(self.broker.stop)
        try:
            outage = asyncio.create_task(asyncio.sleep(12))
            await asyncio.sleep(2)
            await self.sigterm(second, "during the broker outage")
            await outage
        finally:
            await asyncio.to_thread(self.broker.start)

    async def _second_member(self, hold_s: float, during: Callable[[Processor],
                             Awaitable[None]] | None = None) -> None:
        second = self.processor()
        try:
            await self.until(second.assigned_or_exited,
                             "the second member's assignment")
            if during is not None:
                await during(second)
            await self.pause(hold_s)
        finally:
            if second.proc.poll() is None:
                await self.sigterm(second, "while the second member drains its partitions")
            elif second.proc.returncode != 0 and not self.case.exits:
                self.failures.append(f"the second member exited with rc="
                                     f"{second.proc.returncode}")

    async def fault_rebalance(self) -> None:
        await self._second_member(4)

    async def fault_rebalance_outage(self) -> None:
        assert self.primary is not None
        revoked = self.primary.log_text().count("partitions revoked")
        second = self.processor()
        try:
            primary = self.primary
            await self.until(lambda: primary.log_text().count("partitions revoked") > revoked
                             or primary.proc.poll() is not None, "the rebalance")
            await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(10)  # past KAFKA_CONNECT_TIMEOUT_S: set-up fails
            await self.sigterm(second, "during the outage in the rebalance")
        finally:
            await asyncio.to_thread(self.broker.start)
            if second.proc.poll() is None:
                second.kill()

    async def fault_slow(self) -> None:
        await self.pause(6)  # well past KAFKA_MAX_POLL_INTERVAL_MS while the model crawls
        assert self.primary is not None
        await self.sigterm(self.primary, "while the slow model works")
        self.primary = self.processor()

    # --- the run ----------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        await self.setup()
        total = self.n + len(self.bad)
        progress = Progress(total, f"{self.case.name}/{self.mode} answered")
        tracker = Tracker(self.bootstrap, self.out + self.dlq, progress)
        watching = asyncio.create_task(tracker.run())
        started = time.monotonic()
        half = self.n // 2
        try:
            self.primary = self.processor()
            await self.send(self.good(self.ids[:half]))
            await self.send([(bad, bad.value) for bad in self.bad])
            await self.until(lambda: len(tracker.ids) >= 1, "the first answer")
            fault = asyncio.create_task(getattr(self, f"fault_{self.case.fault}")())
            await self.send(self.good(self.ids[half:]))
            await fault
            await self.until(lambda: len(tracker.ids) >= self.n
                             and len(tracker.bad) >= len(self.bad), "every answer")
        except TimeoutError as exc:
            self.failures.append(str(exc))
        finally:
            elapsed = time.monotonic() - started
            progress.__exit__(None, None, None)
            if self.primary is not None:
                primary = self.primary
                with contextlib.suppress(TimeoutError):  # a SIGTERM before the model loads
                    await self.until(primary.assigned_or_exited, "the assignment")
                rc = await primary.terminate(self.shutdown_s + 60)
                if rc != 0:
                    self.failures.append(f"the last processor exited with rc={rc} on SIGTERM "
                                         f"(log {primary.log})")
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await self.producer.stop()
        if self.case.fault == "slow":
            self.check_stayed_in_group()
        records = await read_to_end(self.bootstrap, self.out + self.dlq, timeout_s=300)
        return self.verify(records, elapsed)

    def check_stayed_in_group(self) -> None:
        """The slow model never made a member leave: each processor got its partitions
        once and lost them only to its own shutdown."""
        for log in sorted(self.logs.glob("processor-*.log")):
            text = log.read_text(errors="replace")
            if text.count("partitions assigned") > 1 or "Heartbeat session expired" in text:
                self.failures.append(f"a slow model made the member leave the group ({log})")

    def verify(self, records: list[Any], elapsed: float) -> dict[str, Any]:
        outputs: Counter[str] = Counter()
        first: dict[tuple[int, int], int] = {}  # (output partition, source partition) -> offset
        disorder = 0
        for r in sorted((r for r in records if r.topic == self.out[0].topic),
                        key=lambda r: (r.partition, r.offset)):
            doc = orjson.loads(r.value)
            outputs[doc["id"]] += 1
            if outputs[doc["id"]] > 1:
                continue
            key, offset = (r.partition, doc["source"]["partition"]), doc["source"]["offset"]
            disorder += first.get(key, -1) > offset
            first[key] = offset
        dead: Counter[tuple[int, int]] = Counter()
        reasons: dict[tuple[int, int], str] = {}
        for r in records:
            if r.topic == self.dlq[0].topic:
                h = {k: v.decode() for k, v in r.headers}
                where = (int(h["streamproc.source.partition"]),
                         int(h["streamproc.source.offset"]))
                dead[where] += 1
                reasons[where] = h["streamproc.error.code"]
        bad = {w: b for w, b in self.where.items() if isinstance(b, Bad)}
        lost = sum(outputs[i] == 0 for i in self.ids) + sum(dead[w] == 0 for w in bad)
        duplicated = sum(n - 1 for n in outputs.values()) + sum(n - 1 for n in dead.values())
        good_dead = sum(1 for w in dead if not isinstance(self.where.get(w), Bad))
        wrong_reason = sum(1 for w, b in bad.items()
                           if dead[w] and b.reason is not None and reasons[w] != b.reason)
        if lost:
            self.failures.append(f"{lost} record(s) lost")
        if duplicated and self.mode == "exactly_once":
            self.failures.append(f"{duplicated} duplicate(s) under exactly_once")
        if disorder:
            self.failures.append(f"{disorder} output(s) out of input order")
        if good_dead:
            self.failures.append(f"{good_dead} good item(s) dead-lettered")
        if wrong_reason:
            self.failures.append(f"{wrong_reason} dead letter(s) with the wrong reason")
        exit_s = max((s for s, _ in self.sigterms), default=0.0)
        line = (f"case={self.case.name} mode={self.mode} items={self.n} bad={len(bad)} "
                f"lost={lost} duplicated={duplicated} dlq={len(dead)} disorder={disorder} "
                f"good_dead_lettered={good_dead} wrong_reason={wrong_reason} "
                f"unexpected_exits={self.unexpected_exits} "
                f"expected_exits={self.expected_exits} sigterm_exit_s={exit_s:.1f} "
                f"elapsed_s={elapsed:.1f} ok={'yes' if not self.failures else 'no'}")
        return {"line": line, "ok": not self.failures, "failures": self.failures,
                "logs": self.logs}


async def main_async(args: argparse.Namespace) -> int:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # reconnect noise; we report
    modes = ["at_least_once", "exactly_once"] if args.guarantee == "both" else [args.guarantee]
    names = args.cases.split(",") if args.cases else [c.name for c in CASES]
    cases = [c for c in CASES if c.name in names]
    if unknown := set(names) - {c.name for c in cases}:
        raise SystemExit(f"unknown case(s): {sorted(unknown)}; known: "
                         f"{[c.name for c in CASES]}")
    logs = Path(tempfile.mkdtemp(prefix="streamproc-matrix-"))
    passed = failed = 0
    broker = suite_broker(BROKER_PROPERTIES)
    try:
        await asyncio.to_thread(broker.start)
        for case in cases:
            for mode in modes:
                say(f"{case.name}/{mode}: {case.what}")
                result = await CaseRun(case, mode, args, broker, logs).run()
                print(result["line"], flush=True)
                for failure in result["failures"]:
                    say(f"{case.name}/{mode}: FAILED: {failure} (logs in {result['logs']})")
                passed, failed = passed + result["ok"], failed + (not result["ok"])
    finally:
        await asyncio.to_thread(broker.stop, wipe=True)
    print(f"fault-matrix: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--guarantee", default="both",
                        choices=["at_least_once", "exactly_once", "both"])
    parser.add_argument("--n", type=int, default=300, help="good items per case")
    parser.add_argument("--timeout-s", type=float, default=240, help="per case and mode")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
