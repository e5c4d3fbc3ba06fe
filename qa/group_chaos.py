"""The group chaos suite: several members of one consumer group under a backlog, through
kill -9s, SIGTERMs, a member joining and leaving, a member frozen past the session timeout,
a burst of bad records and a broker restart.

    python -m qa.group_chaos [--n 6000] [--members 3] [--partitions 12] [--kills 3]
        [--sigterms 3] [--joins 2] [--freezes 2] [--bad 40] [--broker-restarts 1]
        [--guarantee at_least_once|exactly_once|both] [--assignor sticky|roundrobin|range]
        [--bootstrap HOST:PORT [--broker-log PATH]] [--seed S] [--timeout-s T]

It starts a broker of its own (on free ports, its data in a temporary directory) unless
``--bootstrap`` is given, and runs ``--members`` members (``python -m qa.harness serve``: the
service over the identity summarizer, slowed to about 100 items/s each) in one group. A
backlog is kept ahead of the answers (at most ``--n / 4`` items, and fewer between close
faults): the faults fire at seeded random points of progress with it in flight, and every
member that a fault ends is started again. At the end every member gets SIGTERM, and an independent
``read_committed`` consumer reads the output and DLQ topics.

The items are ``--n / 10`` keys' sequences; a key's items share an input partition, and
their outputs an output partition. One figures line per mode goes to stdout::

    items=N lost=L duplicated=D order_violations=O dlq=B kills=K sigterms=S joins=J
    freezes=F broker_restarts=R rebalances=G moved=M removed_while_alive=A
    removed_not_rejoined=X session_expiries=E generations=1:1,2:3,... max_sigterm_exit_s=T
    slow_sigterms=W
    [max_in_flight_at_faults=I] mode=... assignor=... unexpected_exits=U elapsed_s=...

- ``removed_not_rejoined``: members the broker removed for not rejoining a rebalance in time
  (the storm's signature); ``session_expiries``: members it removed for silence (the kills
  and freezes); ``generations``: each generation the broker formed, with its member count.
  These need the broker's log: the suite's own broker, or ``--broker-log``.
- ``removed_while_alive``: members told by the group that it no longer knew them (the
  frozen ones, once thawed).
- ``rebalances`` and ``moved``: the generations the members were assigned in, and the
  partitions that changed owner from one generation to the next (the assignor's work).
- ``sigterm_exit_s``: each SIGTERM's time to exit; ``slow_sigterms`` those over 3 s.

Exit 1 when anything is lost, anything is duplicated under exactly_once, the at_least_once
duplicates pass the bound (the answers written but not committed at each kill, freeze and
broker restart), a key's outputs are out of order, a member exits that no fault ended, a
member is removed for not rejoining in time, or more than one SIGTERM takes over 3 s (one
may wait for a drain, bounded by ``SHUTDOWN_TIMEOUT_S`` + 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable
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
from streamproc.testing.kafka import (
    LocalBroker,
    committed_offsets,
    read_to_end,
)

__all__ = ["main"]

SHUTDOWN_S = 10.0
SESSION_MS = 6000
FAST_EXIT_S = 3.0  # a SIGTERM exits within this, unless it waits for a drain
ITEM_DELAY_S = "0.01"  # each member answers about 100 items/s
KEY_ITEMS = 10  # items per key
ASSIGNED = re.compile(r"partitions assigned: \[([^\]]*)\] \(generation (\d+)\)")


class Member:
    """One member process and what was done to it."""

    def __init__(self, env: dict[str, str], logs: Path, slot: int) -> None:
        self.slot = slot
        self.process = Processor(env, logs, "--item-delay-s", ITEM_DELAY_S)
        self.ended_on_purpose = False

    def exited(self) -> bool:
        return self.process.proc.poll() is not None


class Run(SuiteRun):
    """One mode: topics, members, feeder, faults, verification."""

    def __init__(self, args: argparse.Namespace, mode: str, bootstrap: str, logs: Path,
                 broker: LocalBroker | None) -> None:
        name = f"gchaos-{uuid.uuid4().hex[:8]}"
        super().__init__(args, mode, bootstrap, logs, broker, name)
        keys = max(1, args.n // KEY_ITEMS)
        self.items = [(f"{name}-k{k:03d}", seq) for seq in range(KEY_ITEMS) for k in range(keys)]
        self.items = self.items[:args.n]
        self.count = len(self.items)
        self.env = processor_env(
            bootstrap, name, mode, SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
            KAFKA_SESSION_TIMEOUT_MS=str(SESSION_MS), KAFKA_CONNECT_TIMEOUT_S="120",
            KAFKA_ASSIGNOR=args.assignor, GPU_BATCH_SIZE="8", GPU_QUEUE_SIZE="100",
            GPU_MAX_DELAY_MS="10")
        self.members: list[Member] = []
        self.retired: list[Member] = []
        self.counts: Counter[str] = Counter()
        self.sigterm_exits: list[float] = []
        self.broker_history = ""  # the broker's log before its restarts

    def record(self, i: int) -> tuple[bytes, bytes]:
        """Item ``i``: the keys take turns, so each key's items go in sequence."""
        key, seq = self.items[i]
        return key.encode(), orjson.dumps({"id": f"{key}/{seq:03d}",
                                           "text": f"Item {seq} of {key} is news. More text."})

    # --- plumbing ---------------------------------------------------------------------------
    def member(self, slot: int) -> Member:
        return Member(self.env, self.logs, slot)

    def watch(self) -> None:
        """Restart a member that exited though no fault ended it, and count it."""
        for i, member in enumerate(self.members):
            if member.exited() and not member.ended_on_purpose:
                rc = member.process.proc.returncode
                self.failures.append(f"member {member.slot} exited with rc={rc} (log "
                                     f"{member.process.log})")
                say(f"{self.mode}: member {member.slot} exited unexpectedly (rc={rc})")
                self.retired.append(member)
                self.members[i] = self.member(member.slot)

    async def until(self, done: Any, what: str) -> None:
        while not done():
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            self.watch()
            await asyncio.sleep(0.05)

    async def sigterm(self, member: Member) -> None:
        member.ended_on_purpose = True
        rc = await member.process.terminate(SHUTDOWN_S + 60)
        self.sigterm_exits.append(member.process.exit_s)
        if rc != 0:
            self.failures.append(f"member {member.slot} exited rc={rc} on SIGTERM (log "
                                 f"{member.process.log})")

    # --- faults -----------------------------------------------------------------------------
    async def fault(self, kind: str, rng: random.Random, tracker: Tracker) -> None:
        say(f"{self.mode}: {kind} at {len(tracker.ids)}/{len(self.items)} answered, "
            f"{self.sent - len(tracker.ids)} in flight")
        self.counts[kind] += 1
        i = rng.randrange(len(self.members))
        victim = self.members[i]
        if kind == "kill":
            victim.ended_on_purpose = True
            victim.process.kill()
            if self.mode == "at_least_once":
                self.bound += await uncommitted_answers(self.bootstrap, self.group, self.topic,
                                                        tracker)
            self.retired.append(victim)
            self.members[i] = self.member(victim.slot)
        elif kind == "sigterm":
            await self.sigterm(victim)
            self.retired.append(victim)
            self.members[i] = self.member(victim.slot)
        elif kind == "join":
            extra = self.member(len(self.members) + self.counts["join"] * 10)
            self.members.append(extra)
            await self.until(extra.process.assigned_or_exited, "the joining member's partitions")
            await asyncio.sleep(3)
            self.members.remove(extra)
            await self.sigterm(extra)
            self.retired.append(extra)
        elif kind == "freeze":
            since = await committed_offsets(self.bootstrap, self.group, self.topic)
            victim.process.freeze()
            await asyncio.sleep(SESSION_MS / 1000 + 2)  # past the session timeout
            victim.process.thaw()
            await asyncio.sleep(3)  # what it held goes out, or is fenced
            if self.mode == "at_least_once":
                self.bound += await uncommitted_answers(self.bootstrap, self.group, self.topic,
                                                        tracker, since)
        elif kind == "broker":
            assert self.broker is not None
            if self.mode == "at_least_once":
                self.bound += await uncommitted_answers(self.bootstrap, self.group, self.topic,
                                                        tracker)
            await asyncio.to_thread(self.broker.stop)
            self.broker_history += self.broker_log() or ""  # a start begins a new log
            await asyncio.sleep(2)
            await asyncio.to_thread(self.broker.start)
        elif kind == "bad":
            await self.send_bad()

    # --- the run ----------------------------------------------------------------------------
    async def run(self, rng: random.Random) -> dict[str, Any]:
        args, total = self.args, len(self.items)
        faults = (["kill"] * args.kills + ["sigterm"] * args.sigterms + ["join"] * args.joins
                  + ["freeze"] * args.freezes + ["broker"] * args.broker_restarts
                  + ["bad"] * (args.bad > 0))
        rng.shuffle(faults)
        at = [int(args.n * (0.1 + 0.75 * (j + rng.uniform(0.2, 0.8)) / len(faults)))
              for j in range(len(faults))]
        say(f"{self.mode}: faults {list(zip(faults, at, strict=True))}")
        await self.setup()
        progress = Progress(args.n + args.bad * (args.bad > 0), f"{self.mode} answered")
        tracker = Tracker(self.bootstrap, self.out + self.dlq, progress)
        window = max(50, min(args.n // 4, args.n // (len(faults) + 1)))
        self.cap = at[0] + window if at else args.n
        tasks = [asyncio.create_task(tracker.run()),
                 asyncio.create_task(self.feed(tracker, window))]
        started = time.monotonic()
        self.members = [self.member(slot) for slot in range(args.members)]
        try:
            last = 0
            for j, (kind, point) in enumerate(zip(faults, at, strict=True)):
                def reached(p: int = point, s: int = last + window // 2) -> bool:
                    return len(tracker.ids) >= min(max(p, s), total)  # and progress since
                await self.until(reached, f"{point} answers")
                self.cap = at[j + 1] if j + 1 < len(at) else args.n  # items flow meanwhile
                await self.fault(kind, rng, tracker)
                last = len(tracker.ids)  # the next fault waits for progress past this
                self.cap = min(max(self.cap, last) + window, total)
            await self.until(lambda: len(tracker.ids) == args.n
                             and len(tracker.bad) >= self.bad_sent, "every answer")
        except TimeoutError as exc:
            self.failures.append(str(exc))
        finally:
            elapsed = time.monotonic() - started
            progress.__exit__(None, None, None)
            self.watch()
            for member in self.members:
                await self.sigterm(member)
            self.retired += self.members
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.producer.stop()
        records = await read_to_end(self.bootstrap, self.out + self.dlq, timeout_s=300)
        return self.verify(records, elapsed)

    # --- verification -----------------------------------------------------------------------
    def group_figures(self) -> dict[str, int | str]:
        """Rebalances and moved partitions from the members' logs; removals from the
        broker's log, when there is one."""
        owners: dict[int, dict[str, int]] = defaultdict(dict)  # generation -> partition -> slot
        for n, member in enumerate(self.retired):
            for names, generation in ASSIGNED.findall(member.process.log_text()):
                for partition in filter(None, (p.strip(" '") for p in names.split(","))):
                    owners[int(generation)][partition] = n
        moved, last = 0, dict[str, int]()  # partition -> the member that last held it
        for generation in sorted(owners):
            for partition, holder in owners[generation].items():
                moved += partition in last and last[partition] != holder
                last[partition] = holder
        figures: dict[str, int | str] = {"rebalances": len(owners), "moved": moved,
                   "removed_while_alive": sum(m.process.log_text().count(
                       "member_id was not recognized") for m in self.retired)}
        log = self.broker_log()
        if log is not None:
            lines = [line for line in (self.broker_history + log).splitlines()
                     if self.group in line]
            figures["removed_not_rejoined"] = sum("haven't joined" in line for line in lines)
            figures["session_expiries"] = sum("has failed, removing it" in line
                                              for line in lines)
            stable = re.findall(rf"Stabilized group {re.escape(self.group)} generation (\d+) "
                                r"with (\d+) members", "\n".join(lines))
            figures["generations"] = ",".join(f"{g}:{m}" for g, m in stable)
        return figures

    def broker_log(self) -> str | None:
        """The broker's log since its last start (with the files it rolled over), if known."""
        path = (Path(self.args.broker_log) if self.args.broker_log
                else None if self.broker is None or self.broker.data_dir is None
                else self.broker.data_dir / str(self.broker.port) / "server.log")
        if path is None or not path.exists():
            return None
        rolled = [path.with_name(f"{path.name}.{i}") for i in (3, 2, 1)]
        return "".join(p.read_text(errors="replace") for p in [*rolled, path] if p.exists())

    def verify(self, records: list[Any], elapsed: float) -> dict[str, Any]:
        outputs: Counter[str] = Counter()
        firsts: dict[str, list[int]] = defaultdict(list)  # key -> sequence, first occurrences
        dead: Counter[tuple[str, str]] = Counter()
        for r in records:
            if r.topic == self.out[0].topic:
                item_id = orjson.loads(r.value)["id"]
                outputs[item_id] += 1
                if outputs[item_id] == 1:
                    key, _, seq = item_id.rpartition("/")
                    firsts[key].append(int(seq))
            else:
                headers = {k: v.decode() for k, v in r.headers}
                dead[(headers["streamproc.source.partition"],
                      headers["streamproc.source.offset"])] += 1
        expected = {f"{key}/{seq:03d}" for key, seq in self.items}
        lost = len(expected - set(outputs)) + max(0, self.bad_sent - len(dead))
        duplicated = sum(n - 1 for n in [*outputs.values(), *dead.values()])
        disorder = sum(seqs != sorted(seqs) for seqs in firsts.values())
        if foreign := set(outputs) - expected:
            self.failures.append(f"{len(foreign)} output ids that were never sent")
        group = self.group_figures()
        slow = [s for s in self.sigterm_exits if s > FAST_EXIT_S]
        if len(slow) > 1 or any(s > SHUTDOWN_S + 5 for s in slow):
            self.failures.append(f"SIGTERM exits over {FAST_EXIT_S:.0f} s: {slow}")
        if group.get("removed_not_rejoined"):
            self.failures.append(f"{group['removed_not_rejoined']} member(s) removed for not "
                                 "rejoining a rebalance in time")
        if disorder:
            self.failures.append(f"{disorder} key(s) with outputs out of order")
        line = (f"items={len(self.items)} lost={lost} duplicated={duplicated} "
                f"order_violations={disorder} dlq={len(dead)} kills={self.counts['kill']} "
                f"sigterms={self.counts['sigterm']} joins={self.counts['join']} "
                f"freezes={self.counts['freeze']} broker_restarts={self.counts['broker']} "
                + " ".join(f"{k}={v}" for k, v in group.items())
                + f" max_sigterm_exit_s={max(self.sigterm_exits, default=0):.1f} "
                f"slow_sigterms={len(slow)}")
        if self.mode == "at_least_once":
            line += f" max_in_flight_at_faults={self.bound}"
        unexpected = sum("exited with rc" in f for f in self.failures)
        line += (f" mode={self.mode} assignor={self.args.assignor} "
                 f"unexpected_exits={unexpected} elapsed_s={elapsed:.1f}")
        ok = holds(self.mode, lost, duplicated, self.bound, self.failures)
        return {"line": line, "ok": ok, "failures": self.failures, "logs": self.logs,
                "sigterm_exits": self.sigterm_exits}


async def main_async(args: argparse.Namespace) -> int:
    def run_one(mode: str, bootstrap: str, logs: Path, broker: LocalBroker | None,
                rng: random.Random) -> Awaitable[dict[str, Any]]:
        return Run(args, mode, bootstrap, logs, broker).run(rng)

    return await each_guarantee(
        args, "group-chaos", run_one,
        lambda r: f"SIGTERM exits {[round(s, 1) for s in r['sigterm_exits']]} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa.group_chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6000, help="good items to feed")
    parser.add_argument("--members", type=int, default=3, help="members of the group")
    parser.add_argument("--partitions", type=int, default=12, help="input topic partitions")
    parser.add_argument("--kills", type=int, default=3, help="kill -9 of a member")
    parser.add_argument("--sigterms", type=int, default=3, help="SIGTERM of a member")
    parser.add_argument("--joins", type=int, default=2, help="a member joins, then leaves")
    parser.add_argument("--freezes", type=int, default=2,
                        help="a member frozen (SIGSTOP) past the session timeout")
    parser.add_argument("--broker-restarts", type=int, default=1)
    parser.add_argument("--bad", type=int, default=40, help="bad records in one burst")
    parser.add_argument("--guarantee", default="both",
                        choices=["at_least_once", "exactly_once", "both"])
    parser.add_argument("--assignor", default="sticky", choices=["sticky", "roundrobin", "range"])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--broker-log", help="that broker's server.log (for the removals)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout-s", type=float, default=1800, help="per mode")
    args = parser.parse_args(argv)
    if args.bootstrap and args.broker_restarts:
        parser.error("--bootstrap needs --broker-restarts 0 (only our own broker restarts)")
    if args.n < 100 or args.members < 2 or args.partitions < args.members:
        parser.error("need --n >= 100, --members >= 2 and --partitions >= --members")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
