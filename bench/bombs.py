"""What one fetch of decompression bombs costs in memory: aiokafka's consumer as it is, the
same consumer inside streamproc's guard, and the whole service.

A bomb is a gzip (or ``--codec``) batch of one record of ``--bomb-mb`` MB of zeros: some
50 KB on the wire. ``--bombs`` of them are written to a topic of their own, then each reader
runs in a fresh process that reads them all, holding what ``getmany`` returned as the service
holds its open records, and reports its peak resident memory above what it had before
fetching (``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

    python -m bench.bombs                       # 8 gzip bombs of 50 MB: the issue's case
    python -m bench.bombs --codec zstd --bombs 4 --bomb-mb 100

``plain``    ``AIOKafkaConsumer.getmany`` as aiokafka does it: every batch expanded in full.
``guarded``  the same inside :func:`streamproc.kafka.fetched.guarded` with the service's
             default limits: a batch that could expand past
             ``KAFKA_MAX_DECOMPRESSED_BATCH_BYTES`` is not decompressed.
``service``  ``StreamProcessor`` with the identity summarizer until every bomb is answered
             (dead-lettered as ``undecodable``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import git_commit, load_average
from streamproc.kafka.fetched import FetchLimits, guarded
from streamproc.settings import Settings
from streamproc.testing.kafka import LocalBroker, create_topics


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


async def write_bombs(bootstrap: str, topic: str, codec: str, bombs: int, size: int) -> None:
    await create_topics(bootstrap, {topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec,
                                max_request_size=size + (1 << 20), acks="all")
    await producer.start()
    try:
        value = b'{"id": "bomb", "text": "' + b"0" * size + b'"}'
        for i in range(bombs):
            await (await producer.send(topic, key=f"bomb-{i}".encode(), value=value))
    finally:
        await producer.stop()


async def read(mode: str, bootstrap: str, topic: str, bombs: int) -> dict[str, object]:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    if mode == "service":
        return await read_service(settings, bootstrap, topic, bombs)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    limits = FetchLimits(settings.kafka_max_decompressed_batch_bytes,
                         max(settings.kafka_max_request_size, settings.max_input_bytes + 1),
                         settings.kafka_max_request_size, settings.kafka_max_request_size)
    held: list[object] = []
    before = rss_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    try:
        while len(held) < bombs:
            if mode == "guarded":
                with guarded(limits):
                    batches = await consumer.getmany(timeout_ms=1000)
            else:
                batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                held.extend(records)
    finally:
        await consumer.stop()
    return {"mode": mode, "records": len(held), "seconds": time.perf_counter() - started,
            "peak_mb": rss_mb("VmHWM") - before, "after_mb": rss_mb("VmRSS") - before}


async def read_service(settings: Settings, bootstrap: str, topic: str,
                       bombs: int) -> dict[str, object]:
    from streamproc.kafka.processor import StreamProcessor
    from streamproc.summarize.factory import build_worker

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, kafka_bootstrap_servers=bootstrap, kafka_input_topic=topic,
        kafka_output_topic=f"{topic}.out", kafka_dlq_topic=f"{topic}.dlq",
        kafka_group_id=f"{topic}-group", kafka_create_topics=True, summarizer="identity",
        gpu_device_ids="cpu", gpu_enable_warmup=False, metrics_port=0)
    async with build_worker(settings) as worker, StreamProcessor(settings, worker) as processor:
        before = rss_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        runner = asyncio.create_task(processor.run())
        while not runner.done():
            if processor.stats.answered() >= bombs:
                break
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        processor.request_stop()
        await runner
        return {"mode": "service", "records": processor.stats.answered(), "seconds": seconds,
                "dead_letters": processor.stats.dead_letters,
                "peak_mb": rss_mb("VmHWM") - before, "after_mb": rss_mb("VmRSS") - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=None, help="a broker (default: one of its own)")
    parser.add_argument("--codec", default="gzip", choices=["gzip", "snappy", "lz4", "zstd"])
    parser.add_argument("--bombs", type=int, default=8)
    parser.add_argument("--bomb-mb", type=int, default=50)
    parser.add_argument("--read", choices=["plain", "guarded", "service"], help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read:  # one reader, in a process of its own
        print(json.dumps(asyncio.run(read(args.read, args.bootstrap, args.topic, args.bombs))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.bootstrap:
            return run(args, args.bootstrap)
        with LocalBroker.on_free_ports(Path(tmp) / "kafka") as broker:
            return run(args, broker.bootstrap)


def run(args: argparse.Namespace, bootstrap: str) -> int:
    topic = f"bombs-{int(time.time())}"
    asyncio.run(write_bombs(bootstrap, topic, args.codec, args.bombs, args.bomb_mb << 20))
    print(f"commit {git_commit()}, load average {load_average()}: {args.bombs} {args.codec} "
          f"bombs of {args.bomb_mb} MB")
    results = {}
    for mode in ("plain", "guarded", "service"):
        done = subprocess.run([sys.executable, "-m", "bench.bombs", "--read", mode,
                               "--bootstrap", bootstrap, "--topic", topic,
                               "--bombs", str(args.bombs)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-3000:]}")
            return 1
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:8} records={r['records']} peak=+{r['peak_mb']:.0f} MB "
              f"after=+{r['after_mb']:.0f} MB in {r['seconds']:.2f} s"
              + (f" dead_letters={r['dead_letters']}" if "dead_letters" in r else ""))
    plain = max(results["plain"]["peak_mb"], 1e-9)
    print(f"peak guarded/plain = {results['guarded']['peak_mb'] / plain:.3f}, "
          f"service/plain = {results['service']['peak_mb'] / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
