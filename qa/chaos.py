"""The crash suite: the service under ``kill -9``, broker restarts, rebalances and bad records.

    python -m qa.chaos [--n 20000] [--kills 20] [--partitions 6] [--bad 50]
        [--guarantee at_least_once|exactly_once|both] [--broker-restarts 1]
        [--rebalance/--no-rebalance] [--bootstrap HOST:PORT] [--seed S] [--timeout-s T]

It starts a broker of its own (on free ports, its data in a temporary directory) unless
``--bootstrap`` is given, and runs ``python -m streamproc run`` (identity summarizer) as
subprocesses. A feeder keeps at most a window of items ahead of the answers, so every
event fires while items are in flight; events fire at seeded random points of progress.
At the end an independent ``read_committed`` consumer reads the output and DLQ topics, and
one figures line per mode goes to stdout. Exit 1 when an item was lost, on any duplicate
under exactly_once, on more duplicates than the at-least-once bound, or when a processor
exited that the harness did not kill. The faults beyond kill -9 (outputs too large, a broken
replica, a long outage, failed rebalances, a slow model) are :mod:`qa.matrix`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from qa.harness import (
    Processor,
    SuiteRun,
    Tracker,
    each_guarantee,
    holds,
    processor_env,
    say,
    uncommitted_answers,
)
from streamproc.demo.progress import Progress
from streamproc.testing.kafka import LocalBroker, read_to_end

__all__ = ["main"]


class Run(SuiteRun):
    """One mode: topics, processors, feeder, events, verification."""

    def __init__(self, args: argparse.Namespace, mode: str, bootstrap: str, logs: Path,
                 broker: LocalBroker | None) -> None:
        name = f"chaos-{uuid.uuid4().hex[:8]}"
        super().__init__(args, mode, bootstrap, logs, broker, name)
        self.ids = [f"{name}-{i:06d}" for i in range(args.n)]
        self.count = len(self.ids)
        self.env = processor_env(bootstrap, name, mode, KAFKA_CREATE_TOPICS="true",
                                 SHUTDOWN_TIMEOUT_S="10", KAFKA_CONNECT_TIMEOUT_S="120")
        self.kills = self.restarts = self.exits = 0
        self.in_flight_at_events: list[int] = []

    def record(self, i: int) -> tuple[bytes, bytes]:
        item_id = self.ids[i]
        return item_id.encode(), orjson.dumps({"id": item_id, "text": f"Item {item_id} is "
                                               "news. More text follows here."})

    async def until(self, done: Callable[[], bool], what: str,
                    primary: Processor | None = None) -> Processor | None:
        """Wait for ``done``; restart the primary processor (and report it) if it exited."""
        while not done():
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            if primary is not None and primary.proc.poll() is not None:
                self.exits += 1
                self.failures.append(f"processor exited with rc={primary.proc.returncode} "
                                     "without being killed")
                say(f"processor exited unexpectedly (rc={primary.proc.returncode}, log "
                    f"{primary.log}); restarting it")
                primary = Processor(self.env, self.logs)
            await asyncio.sleep(0.05)
        return primary

    async def event(self, kind: str, primary: Processor, tracker: Tracker) -> Processor:
        say(f"{self.mode}: {kind} at {len(tracker.ids)}/{len(self.ids)} answered, "
            f"{self.sent - len(tracker.ids)} in flight")
        self.in_flight_at_events.append(self.sent - len(tracker.ids))
        if kind == "kill":
            primary.kill()
            self.kills += 1
            if self.mode == "at_least_once":
                self.bound += await uncommitted_answers(self.bootstrap, self.group,
                                                        self.topic, tracker)
            return Processor(self.env, self.logs)
        if kind == "broker":
            assert self.broker is not None
            await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(2)
            await asyncio.to_thread(self.broker.start)
            self.restarts += 1
        elif kind == "rebalance":
            second = Processor(self.env, self.logs)
            try:
                for _ in range(600):  # a minute at most to join and get partitions
                    if second.assigned_or_exited():
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(3)
            finally:
                if (rc := await second.terminate()) != 0:
                    self.failures.append(f"second processor exited with rc={rc}")
        elif kind == "bad":
            await self.send_bad()
        return primary

    async def run(self, rng: random.Random, chaos: bool = True) -> dict[str, Any]:
        args = self.args
        events = ["kill"] * args.kills + ["broker"] * args.broker_restarts
        events += ["rebalance"] * args.rebalance + ["bad"] * (args.bad > 0)
        events = events if chaos else []
        rng.shuffle(events)
        at = [int(args.n * (0.05 + 0.85 * (j + rng.uniform(0.2, 0.8)) / len(events)))
              for j in range(len(events))] + [args.n]
        say(f"{self.mode}: events {list(zip(events, at, strict=False))}")
        # each event fires once ``at`` items are answered and with about ``window`` in flight
        window = max(50, min(1000, args.n // max(len(events), 1) * 4 // 5)) if chaos else args.n
        self.cap = at[0] + window
        await self.setup()
        total = args.n + args.bad * (args.bad > 0 and chaos)
        progress = Progress(total, f"{self.mode}{'' if chaos else ' (clean)'} answered")
        tracker = Tracker(self.bootstrap, self.out + self.dlq, progress)
        tasks = [asyncio.create_task(tracker.run()),
                 asyncio.create_task(self.feed(tracker, window))]
        started = time.monotonic()
        primary: Processor | None = Processor(self.env, self.logs)
        try:
            last = -1
            for j, kind in enumerate(events):
                def reached(t: int = at[j], s: int = last) -> bool:
                    return len(tracker.ids) >= t and len(tracker.ids) > s  # progress since
                primary = await self.until(reached, f"{at[j]} answers", primary)
                assert primary is not None
                self.cap = max(self.cap, at[j + 1])  # items keep flowing during the event
                primary = await self.event(kind, primary, tracker)
                self.cap, last = at[j + 1] + window, len(tracker.ids)
            primary = await self.until(lambda: len(tracker.ids) == args.n and len(tracker.bad)
                                       >= self.bad_sent, "every answer", primary)
        except TimeoutError as exc:
            self.failures.append(str(exc))
        finally:
            elapsed = time.monotonic() - started
            progress.__exit__(None, None, None)
            if primary is not None and (rc := await primary.terminate()) != 0:
                self.failures.append(f"processor exited with rc={rc} on SIGTERM")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.producer.stop()
        records = await read_to_end(self.bootstrap, self.out + self.dlq, timeout_s=300)
        return self.verify(records, elapsed, tracker)

    def verify(self, records: list[Any], elapsed: float, tracker: Tracker) -> dict[str, Any]:
        outputs = Counter(orjson.loads(r.value)["id"] for r in records
                          if r.topic == self.out[0].topic)
        dead = Counter((h["streamproc.source.partition"], h["streamproc.source.offset"])
                       for r in records if r.topic == self.dlq[0].topic
                       for h in [{k: v.decode() for k, v in r.headers}])
        lost = sum(outputs[i] == 0 for i in self.ids) + max(0, self.bad_sent - len(dead))
        duplicated = sum(n - 1 for n in [*outputs.values(), *dead.values()])
        if foreign := set(outputs) - set(self.ids):
            self.failures.append(f"{len(foreign)} output ids that were never sent")
        line = (f"items={len(self.ids)} kills={self.kills} broker_restarts={self.restarts} "
                f"lost={lost} duplicated={duplicated} dlq={len(dead)}")
        if self.mode == "at_least_once":
            line += f" max_in_flight_at_kills={self.bound}"
        line += (f" mode={self.mode} processor_exits={self.exits} elapsed_s={elapsed:.1f} "
                 f"throughput={len(self.ids) / elapsed:.1f}/s")
        ok = holds(self.mode, lost, duplicated, self.bound, self.failures)
        busy = tracker.last_at - tracker.first_at
        return {"line": line, "ok": ok, "failures": self.failures, "logs": self.logs,
                "rate": (len(tracker.ids) - 1) / busy if busy > 0 else 0.0,
                "in_flight": min(self.in_flight_at_events, default=None)}


async def main_async(args: argparse.Namespace) -> int:
    def run_one(mode: str, bootstrap: str, logs: Path, broker: LocalBroker | None,
                rng: random.Random) -> Awaitable[dict[str, Any]]:
        return Run(args, mode, bootstrap, logs, broker).run(rng)

    async def clean_rates(bootstrap: str, logs: Path, broker: LocalBroker | None,
                          seed: int) -> bool:
        rates = {m: (await Run(args, m, bootstrap, logs, broker).run(random.Random(seed),
                                                                      False))
                 for m in ("at_least_once", "exactly_once")}
        alo, eos = rates["at_least_once"]["rate"], rates["exactly_once"]["rate"]
        print(f"clean runs of {args.n} items: at_least_once {alo:.0f}/s, "
              f"exactly_once {eos:.0f}/s", flush=True)
        print(f"throughput exactly_once/at_least_once = {eos / max(alo, 1e-9):.2f}",
              flush=True)
        return all(r["ok"] for r in rates.values())

    return await each_guarantee(
        args, "chaos", run_one,
        lambda r: f"events landed with at least {r['in_flight']} items in flight", clean_rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="good items to feed")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 of the processor")
    parser.add_argument("--partitions", type=int, default=6, help="input topic partitions")
    parser.add_argument("--guarantee", default="both",
                        choices=["at_least_once", "exactly_once", "both"])
    parser.add_argument("--broker-restarts", type=int, default=1)
    parser.add_argument("--rebalance", action=argparse.BooleanOptionalAction, default=True,
                        help="a second processor joins the group for a while, then leaves")
    parser.add_argument("--bad", type=int, default=50, help="bad records in one burst")
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout-s", type=float, default=1800, help="per run")
    args = parser.parse_args(argv)
    if args.bootstrap and args.broker_restarts:
        parser.error("--bootstrap needs --broker-restarts 0 (only our own broker restarts)")
    if args.n < 100 or min(args.kills, args.broker_restarts, args.bad, args.partitions - 1) < 0:
        parser.error("need --n >= 100, --partitions >= 1 and no negative counts")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
