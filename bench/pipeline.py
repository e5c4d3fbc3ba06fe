"""Pipeline overhead on the CPU, against a real local Kafka broker.

    .venv/bin/python bench/pipeline.py [--n 20000] [--partitions 3] [--batch 500]
        [--rounds 2] [--guarantee at_least_once|exactly_once|both] [--bootstrap HOST:PORT]

The same N feed items (JSON ``{"id", "text"}``, ~300 bytes, a few sentences) are produced
once per run into a fresh input topic (same partition count for every run). Then:

* ``bare``: a bare aiokafka loop with streamproc's client settings (``consumer_for`` /
  ``producer_for``: read_committed, no auto-commit, the same ``max_poll_records``; acks=all,
  idempotence, the same linger): ``getmany`` -> one output per record (``{"id", "summary"}``,
  the first sentence by ``split_sentences``) -> wait for the batch's acks -> commit -> repeat.
* ``streamproc``: :class:`StreamProcessor` with ``SUMMARIZER=identity`` (first sentence, no
  model), ``GPU_DEVICE_IDS=cpu``, ``GPU_BATCH_SIZE = KAFKA_MAX_POLL_RECORDS = --batch``,
  ``GPU_QUEUE_SIZE = 4 x --batch``, no warm-up; run until ``stats.produced`` reaches N.

Clock: from the first consumed record to the last acknowledged output, so topic creation,
production, client start and the group join are excluded. ``bare`` reads the clock exactly
(when the first non-empty ``getmany`` returns, when the last batch's acks are in);
``streamproc`` is sampled every 10 ms (``stats.consumed > 0`` starts it, ``stats.produced >=
N`` stops it). Over the same interval: CPU seconds of this process (every thread) and, when
the broker is the benchmark's own, of the broker process (from /proc), per item.

Both variants run on a frozen heap (:func:`streamproc.service.freeze_heap`, which ``streamproc
run`` calls once its model is loaded), so neither pays for the garbage collector walking the
objects torch and transformers allocated at import.

A warm-up run of every variant (``--warmup`` records, not counted) comes first; then the
variants alternate (the order flips each round) and each one's median items/s is reported.
Every streamproc output topic is read back (read_committed) and must hold each id exactly
once. ``--guarantee both`` runs at_least_once and exactly_once streamproc variants side by
side and prints the EOS/ALO ratio. A variant that fails is reported and left out of the
following rounds; the exit status is then 1. Topics are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import statistics
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    bench_broker,
    broker_pid,
    create_topics,
    delete_topics,
    feed_records,
    load_average,
    machine_line,
    process_cpu_seconds,
    produce,
    read_topic,
)
from streamproc.demo.progress import Progress
from streamproc.kafka.clients import consumer_for, producer_for, start_with_retry
from streamproc.kafka.processor import StreamProcessor
from streamproc.service import freeze_heap
from streamproc.settings import Settings, load_settings
from streamproc.summarize.factory import build_worker
from streamproc.summarize.sentences import split_sentences

ALO, EOS = "at_least_once", "exactly_once"
POLL_S = 0.010
HAS_GUARANTEE = "processing_guarantee" in Settings.model_fields


@dataclass(frozen=True, slots=True)
class Mark:
    """One reading of the clocks: wall, this process's CPU, the broker's CPU (if known)."""

    wall: float
    cpu: float
    broker_cpu: float | None

    @classmethod
    def now(cls, broker: int | None) -> Mark:
        return cls(time.perf_counter(), time.process_time(),
                   None if broker is None else process_cpu_seconds(broker))


@dataclass(slots=True)
class Result:
    variant: str  # "bare" or "streamproc[<guarantee>]"
    round: int
    items: int
    start: Mark
    end: Mark
    verified: int | None = None  # unique ids read back, when checked

    @property
    def seconds(self) -> float:
        return self.end.wall - self.start.wall

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def cpu_us(self) -> float:
        """CPU of this process (every thread) per item, in microseconds."""
        return (self.end.cpu - self.start.cpu) / self.items * 1e6

    @property
    def broker_cpu_us(self) -> float | None:
        if self.start.broker_cpu is None or self.end.broker_cpu is None:
            return None
        return (self.end.broker_cpu - self.start.broker_cpu) / self.items * 1e6

    def line(self) -> str:
        broker = "" if self.broker_cpu_us is None else f", broker {self.broker_cpu_us:5.1f} us"
        check = "" if self.verified is None else f", verified={self.verified}"
        return (f"round {self.round} {self.variant:<26} {self.items} items in "
                f"{self.seconds:7.3f} s = {self.rate:9.1f} items/s; CPU/item: "
                f"python {self.cpu_us:5.1f} us{broker}{check}")


@dataclass(slots=True)
class Topics:
    input: str
    output: str
    dlq: str

    def all(self) -> list[str]:
        return [self.input, self.output, self.dlq]


def make_settings(args: argparse.Namespace, bootstrap: str, guarantee: str | None,
                  topics: Topics, group: str) -> Settings:
    fields: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_input_topic": topics.input,
        "kafka_output_topic": topics.output,
        "kafka_dlq_topic": topics.dlq,
        "kafka_group_id": group,
        "kafka_client_id": "streamproc-bench",
        "kafka_create_topics": True,
        "kafka_topic_partitions": args.partitions,
        "kafka_max_poll_records": args.batch,
        "summarizer": "identity",
        "gpu_device_ids": "cpu",
        "gpu_batch_size": args.batch,
        "gpu_queue_size": args.queue_size or 4 * args.batch,
        "gpu_enable_warmup": False,
        "log_level": "WARNING",
    }
    if args.commit_interval_ms is not None:
        fields["kafka_commit_interval_ms"] = args.commit_interval_ms
    if guarantee is not None and HAS_GUARANTEE:
        fields["processing_guarantee"] = guarantee
    return load_settings(env_file=None, **fields)


# --- the variants ----------------------------------------------------------------------------

def first_sentence_output(value: bytes | None) -> bytes:
    item = orjson.loads(value or b"{}")
    summary = next(iter(split_sentences(item["text"])), "")
    return orjson.dumps({"id": item["id"], "summary": summary})


class Stalled(RuntimeError):
    """No output for ``--stall-s`` seconds."""


class VerificationFailed(RuntimeError):
    """The output topic does not hold every id exactly once."""


def check_stall(progressed_at: float, done: int, n: int, stall_s: float) -> None:
    if time.monotonic() - progressed_at > stall_s:
        raise Stalled(f"no progress for {stall_s:.0f} s at {done} of {n} outputs")


async def run_bare(settings: Settings, n: int, label: str, broker: int | None,
                   stall_s: float) -> tuple[Mark, Mark]:
    """The clocks at the first consumed record and at the last ack."""
    consumer = consumer_for(settings)
    producer = producer_for(settings)
    await start_with_retry("producer", producer.start, settings)
    await start_with_retry("consumer", consumer.start, settings)
    try:
        consumer.subscribe([settings.kafka_input_topic])
        acked = 0
        start = end = None
        progressed_at = time.monotonic()
        with Progress(n, label) as progress:
            while acked < n:
                batches = await consumer.getmany(timeout_ms=200,
                                                 max_records=settings.kafka_max_poll_records)
                if not batches:
                    check_stall(progressed_at, acked, n, stall_s)
                    continue
                progressed_at = time.monotonic()
                if start is None:
                    start = Mark.now(broker)
                deliveries = []
                for records in batches.values():
                    for record in records:
                        deliveries.append(await producer.send(
                            settings.kafka_output_topic, value=first_sentence_output(record.value),
                            key=record.key))
                await asyncio.gather(*deliveries)
                acked += len(deliveries)
                progress.advance(len(deliveries))
                if acked >= n:
                    end = Mark.now(broker)
                await consumer.commit({tp: records[-1].offset + 1
                                       for tp, records in batches.items() if records})
    finally:
        await consumer.stop()
        await producer.stop()
    assert start is not None and end is not None
    return start, end


async def run_streamproc(settings: Settings, n: int, label: str, broker: int | None,
                         stall_s: float, profiler: cProfile.Profile | None = None
                         ) -> tuple[Mark, Mark]:
    """The clocks when ``stats.consumed > 0`` and when ``stats.produced >= n``, both sampled
    every 10 ms."""
    async with build_worker(settings) as worker, StreamProcessor(settings, worker) as processor:
        freeze_heap()  # as ``streamproc run`` does once the model is loaded
        runner = asyncio.create_task(processor.run(), name="streamproc")
        stats = processor.stats
        start = end = None
        progressed_at, last = time.monotonic(), 0
        try:
            with Progress(n, label) as progress:
                while stats.produced < n:
                    if runner.done():
                        runner.result()  # raises what stopped it
                        raise RuntimeError(f"run() returned after {stats.produced} of {n}")
                    if stats.produced != last:
                        progressed_at, last = time.monotonic(), stats.produced
                    check_stall(progressed_at, last, n, stall_s)
                    await asyncio.sleep(POLL_S)
                    if start is None and stats.consumed:
                        start = Mark.now(broker)
                        if profiler is not None:
                            profiler.enable()
                    progress.advance(min(stats.produced, n) - progress.done)
                end = Mark.now(broker)
                if profiler is not None:
                    profiler.disable()
        finally:
            processor.request_stop()
            await runner
        if sum(stats.dead_letters.values()):
            raise RuntimeError(f"unexpected dead letters: {stats.dead_letters}")
    assert start is not None and end is not None
    return start, end


def verify(values: list[bytes], records: list[tuple[bytes, bytes]], topic: str) -> int:
    """Every input id answered exactly once in ``values``; returns the number of unique ids."""
    ids = [orjson.loads(value)["id"] for value in values]
    unique = set(ids)
    expected = {key.decode() for key, _ in records}
    problems = []
    if len(ids) != len(unique):
        problems.append(f"{len(ids) - len(unique)} duplicate output(s)")
    if missing := expected - unique:
        problems.append(f"{len(missing)} id(s) never answered, e.g. {sorted(missing)[:3]}")
    if extra := unique - expected:
        problems.append(f"{len(extra)} unknown id(s), e.g. {sorted(extra)[:3]}")
    if problems:
        raise VerificationFailed(f"{topic}: {'; '.join(problems)}")
    return len(unique)


# --- the rounds ------------------------------------------------------------------------------

async def one_run(args: argparse.Namespace, bootstrap: str, variant: str, round_: int,
                  run_id: str, records: list[tuple[bytes, bytes]], created: list[str],
                  profiler: cProfile.Profile | None = None) -> Result:
    guarantee = variant.partition("[")[2].rstrip("]") or None
    # Short names: the topic is part of every streamproc output (its "source" field).
    slug = {None: "bare", ALO: "alo", EOS: "eos"}[guarantee]
    base = f"bench-{run_id}-{round_}{slug}"
    topics = Topics(f"{base}.in", f"{base}.out", f"{base}.dlq")
    settings = make_settings(args, bootstrap, guarantee, topics, f"{base}-group")
    await create_topics(settings, topics.all(), args.partitions)
    created.extend(topics.all())
    await produce(settings, topics.input, records, f"round {round_} produce for {variant}")
    label = f"round {round_} {variant}"
    broker = broker_pid(bootstrap)
    if variant == "bare":
        start, end = await run_bare(settings, len(records), label, broker, args.stall_s)
        return Result(variant, round_, len(records), start, end)
    start, end = await run_streamproc(settings, len(records), label, broker, args.stall_s,
                                      profiler)
    values = await read_topic(settings, topics.output)
    unique = verify(values, records, topics.output)
    print(f"verified: {unique} unique outputs ({topics.output})", file=sys.stderr)
    return Result(variant, round_, len(records), start, end, unique)


def guarantees(choice: str) -> list[str] | None:
    """The streamproc guarantees to run, or None (with a message) when unsupported."""
    wanted = [ALO, EOS] if choice == "both" else [choice]
    if EOS in wanted and not HAS_GUARANTEE:
        print("exactly_once is not supported by this streamproc: Settings has no "
              "processing_guarantee field (PROCESSING_GUARANTEE); only at_least_once can run",
              file=sys.stderr)
        if choice == EOS:
            return None
        wanted = [ALO]
    return wanted


async def bench(args: argparse.Namespace, bootstrap: str) -> int:
    wanted = guarantees(args.guarantee)
    if wanted is None:
        return 2
    streamproc_variants = [f"streamproc[{g}]" for g in wanted]
    variants = ["bare", *streamproc_variants]
    records = feed_records(args.n)
    mean_bytes = sum(len(value) for _, value in records) / len(records)
    print(f"pipeline bench: {args.n} records of {mean_bytes:.0f} bytes on average, "
          f"{args.partitions} partitions, batch {args.batch}, {args.rounds} round(s), "
          f"variants {', '.join(variants)}; clock: first consumed record -> last ack "
          f"(bare: exact; streamproc: stats sampled every {POLL_S * 1000:.0f} ms)",
          file=sys.stderr)
    busy = os.getloadavg()[0]
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_average()} on {os.cpu_count()} CPUs before the "
              "start; other work competes with the broker and this process, so expect noise "
              "(more --rounds help)", file=sys.stderr)
    freeze_heap()  # the bare loop gets the same frozen heap as streamproc (see run_streamproc)
    run_id = uuid.uuid4().hex[:8]
    results: list[Result] = []
    created: list[str] = []
    failed: dict[str, str] = {}

    async def attempt(variant: str, round_: int, batch: list[tuple[bytes, bytes]],
                      profiler: cProfile.Profile | None = None) -> Result | None:
        try:
            return await one_run(args, bootstrap, variant, round_, run_id, batch, created,
                                 profiler)
        except (Exception, VerificationFailed) as exc:
            failed[variant] = describe(exc)
            print(f"round {round_} {variant} FAILED: {failed[variant]}", flush=True)
            if args.verbose:
                traceback.print_exception(exc)
            return None

    try:
        if args.warmup:
            for variant in variants:
                if result := await attempt(variant, 0, records[:args.warmup]):
                    print(f"warm-up (not counted): {result.line()}", file=sys.stderr)
        for round_ in range(1, args.rounds + 1):
            order = variants if round_ % 2 else variants[::-1]
            for variant in order:
                if variant not in failed and (result := await attempt(variant, round_,
                                                                      records)):
                    results.append(result)
                    print(result.line(), flush=True)
        main_ok = [v for v in streamproc_variants if v not in failed]
        if args.profile and main_ok:
            profiler = cProfile.Profile()
            if result := await attempt(main_ok[0], 99, records, profiler):
                print(f"profiled (not counted): {result.line()}", file=sys.stderr)
                report_profile(profiler, args.profile)
    finally:
        if args.keep_topics:
            print(f"kept topics bench-{run_id}-*", file=sys.stderr)
        else:
            await delete_topics(make_settings(args, bootstrap, None, Topics("", "", ""), ""),
                                created)

    status = summarize(args, results, failed, streamproc_variants)
    print(machine_line(bootstrap) + f" partitions={args.partitions} batch={args.batch} "
          f"queue={args.queue_size or 4 * args.batch} rounds={args.rounds}")
    return status


def describe(exc: BaseException) -> str:
    """The innermost error of an exception (group), as one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def summarize(args: argparse.Namespace, results: list[Result], failed: dict[str, str],
              streamproc_variants: list[str]) -> int:
    """Print the medians and the summary line(s); the exit status."""
    variants = [v for v in ["bare", *streamproc_variants]
                if any(r.variant == v for r in results)]
    for variant, error in failed.items():
        print(f"pipeline bench: {variant} FAILED: {error}")
    if "bare" not in variants or not set(streamproc_variants) & set(variants):
        print(f"pipeline bench: n={args.n} no comparison (a variant failed every round)")
        return 1
    median = {v: statistics.median(r.rate for r in results if r.variant == v) for v in variants}
    cpu_us = {v: statistics.median(r.cpu_us for r in results if r.variant == v)
              for v in variants}
    broker_us = {v: statistics.median(us) for v in variants
                 if (us := [r.broker_cpu_us for r in results
                            if r.variant == v and r.broker_cpu_us is not None])}
    bare = median["bare"]
    ours_variants = [v for v in streamproc_variants if v in median]
    for variant in ours_variants:
        verified = min(r.verified or 0 for r in results if r.variant == variant)
        print(f"verified: {verified} unique outputs ({variant}, every round)")
    main_variant = ours_variants[0]
    ours = median[main_variant]
    line = (f"pipeline bench: n={args.n} bare={bare:.1f} items/s "
            f"streamproc={ours:.1f} items/s ratio={ours / bare:.3f}")
    guarantee = main_variant.partition("[")[2].rstrip("]")
    if guarantee != ALO or not HAS_GUARANTEE:
        line += f" guarantee={guarantee}" + ("" if HAS_GUARANTEE else " (built in)")
    print(line)
    if len(ours_variants) == 2:
        eos = median[f"streamproc[{EOS}]"]
        print(f"pipeline bench: n={args.n} streamproc_eos={eos:.1f} items/s "
              f"eos/bare={eos / bare:.3f} EOS/ALO ratio={eos / ours:.3f}")
    print("cpu per item (median; python = this process, all threads): "
          + "; ".join(f"{v}: python={cpu_us[v]:.1f}us"
                      + (f" broker={broker_us[v]:.1f}us" if v in broker_us else "")
                      for v in variants))
    return 1 if failed else 0


def report_profile(profiler: cProfile.Profile, path: str) -> None:
    """Dump the profile (event-loop thread only) and print its top functions."""
    profiler.dump_stats(path)
    stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime")
    stats.print_stats(25)
    print(f"cProfile stats written to {path}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="records per run (default 20000)")
    parser.add_argument("--partitions", type=int, default=3, help="partitions per topic")
    parser.add_argument("--batch", type=int, default=500,
                        help="max_poll_records and GPU_BATCH_SIZE (default 500)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant")
    parser.add_argument("--guarantee", choices=[ALO, EOS, "both"], default=ALO,
                        help="streamproc's PROCESSING_GUARANTEE; 'both' runs each and prints "
                        "the EOS/ALO ratio")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="use this broker (default: own broker on 127.0.0.1:29092, "
                        "started and stopped here if not running)")
    parser.add_argument("--queue-size", type=int, metavar="N",
                        help="streamproc's GPU_QUEUE_SIZE (default 4 x --batch); it also caps "
                        "the records open (not yet acknowledged / committed)")
    parser.add_argument("--commit-interval-ms", type=int, metavar="MS",
                        help="streamproc's KAFKA_COMMIT_INTERVAL_MS (default: the setting's "
                        "default); with exactly_once, one transaction per interval")
    parser.add_argument("--warmup", type=int, default=2000, metavar="N",
                        help="first run every variant once on N records, not counted "
                        "(default 2000; 0: none)")
    parser.add_argument("--stall-s", type=float, default=60.0, metavar="S",
                        help="fail a run that produces nothing for S seconds (default 60)")
    parser.add_argument("--keep-topics", action="store_true",
                        help="leave the benchmark topics on the broker")
    parser.add_argument("--profile", metavar="FILE",
                        help="after the rounds, one extra streamproc run under cProfile")
    parser.add_argument("-v", "--verbose", action="store_true", help="streamproc INFO logs")
    args = parser.parse_args(argv)
    if args.n < 1 or args.partitions < 1 or args.batch < 1 or args.rounds < 1:
        parser.error("--n, --partitions, --batch and --rounds must be >= 1")
    args.warmup = max(0, min(args.warmup, args.n))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with bench_broker(args.bootstrap) as bootstrap:
        return asyncio.run(bench(args, bootstrap))


if __name__ == "__main__":
    sys.exit(main())
