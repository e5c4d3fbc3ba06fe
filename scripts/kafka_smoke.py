#!/usr/bin/env python3
"""Smoke test: aiokafka against a running broker (see scripts/kafka.sh).

Checks, on fresh uniquely named topics:
  1. admin client creates a 3-partition topic (and deletes it at the end);
  2. idempotent producer (acks="all", enable_idempotence=True) writes to all partitions;
  3. consumer with a group id and manual commit reads everything, commits, and a
     second consumer in the same group resumes from the committed offsets;
  4. transactional producer: consume -> produce -> send_offsets_to_transaction ->
     commit, plus one aborted transaction; a read_committed consumer sees only the
     committed records, a read_uncommitted one also sees the aborted ones, and the
     group's committed offsets were advanced by the transaction.

Usage: python scripts/kafka_smoke.py [BOOTSTRAP]   (default: $KAFKA_BOOTSTRAP_SERVERS
or 127.0.0.1:9092). Exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.kafka_broker import read_all

PARTITIONS = 3
N_MESSAGES = 30
TIMEOUT_S = 60.0


def log(msg: str) -> None:
    print(f"[kafka_smoke] {msg}", flush=True)


def group_consumer(topic: str, bootstrap: str, group: str, **extra: str) -> AIOKafkaConsumer:
    """A consumer in ``group`` with manual commits, from the earliest offset."""
    return AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                            enable_auto_commit=False, auto_offset_reset="earliest", **extra)


async def consume_n(consumer: AIOKafkaConsumer, n: int) -> list[ConsumerRecord[bytes, bytes]]:
    out: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(out) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: got {len(out)} of {n} records")
        batch = await consumer.getmany(timeout_ms=1000, max_records=n - len(out))
        for records in batch.values():
            out.extend(records)
    return out


async def run(bootstrap: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    src, dst = f"smoke-src-{suffix}", f"smoke-dst-{suffix}"
    group_plain, group_tx = f"smoke-g1-{suffix}", f"smoke-g2-{suffix}"

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # 1. admin: create topics
        await admin.create_topics(
            [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in (src, dst)]
        )
        desc = await admin.describe_topics([src])
        n_parts = len(desc[0]["partitions"])
        assert n_parts == PARTITIONS, f"expected {PARTITIONS} partitions, got {n_parts}"
        log(f"created topics {src}, {dst} with {PARTITIONS} partitions")

        # 2. idempotent producer
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            seen_parts: set[int] = set()
            for i in range(N_MESSAGES):
                md = await producer.send_and_wait(
                    src,
                    value=f"msg-{i}".encode(),
                    key=f"k{i}".encode(),
                    partition=i % PARTITIONS,
                )
                seen_parts.add(md.partition)
            assert seen_parts == set(range(PARTITIONS)), seen_parts
        finally:
            await producer.stop()
        log(f"idempotent producer wrote {N_MESSAGES} records")

        tps = [TopicPartition(src, p) for p in range(PARTITIONS)]

        # 3. group consumer, manual commit, resume
        c1 = group_consumer(src, bootstrap, group_plain)
        await c1.start()
        try:
            recs = await consume_n(c1, N_MESSAGES)
            assert sorted(r.value for r in recs) == sorted(
                f"msg-{i}".encode() for i in range(N_MESSAGES)
            )
            await c1.commit()
            committed = {tp: await c1.committed(tp) for tp in tps}
        finally:
            await c1.stop()
        assert sum(v or 0 for v in committed.values()) == N_MESSAGES, committed
        log(f"group consumer read {len(recs)} records and committed {committed}")

        c2 = group_consumer(src, bootstrap, group_plain)
        await c2.start()
        try:
            extra = await c2.getmany(timeout_ms=3000)
            assert not any(extra.values()), f"re-read after commit: {extra}"
            positions = {tp: await c2.position(tp) for tp in tps}
        finally:
            await c2.stop()
        assert positions == committed, (positions, committed)
        log("second consumer in the same group resumed at the committed offsets")

        # 4. transactions: consume-transform-produce with offsets in the txn
        txp = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            transactional_id=f"smoke-tx-{suffix}",
            enable_idempotence=True,
            acks="all",
        )
        c3 = group_consumer(src, bootstrap, group_tx, isolation_level="read_committed")
        await txp.start()
        await c3.start()
        try:
            recs = await consume_n(c3, N_MESSAGES)
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            async with txp.transaction():
                for r in recs:
                    await txp.send(dst, value=r.value.upper(), key=r.key, partition=r.partition)
                    tp = TopicPartition(r.topic, r.partition)
                    nxt = r.offset + 1
                    if tp not in offsets or offsets[tp].offset < nxt:
                        offsets[tp] = OffsetAndMetadata(nxt, "")
                await txp.send_offsets_to_transaction(offsets, group_tx)
            log(f"committed a transaction with {len(recs)} records + offsets {offsets}")

            await txp.begin_transaction()
            for i in range(5):
                await txp.send(dst, value=f"aborted-{i}".encode(), partition=i % PARTITIONS)
            await txp.abort_transaction()
            log("aborted a transaction with 5 records")

            committed_tx = {tp: await c3.committed(tp) for tp in tps}
        finally:
            await c3.stop()
            await txp.stop()
        assert committed_tx == {tp: o.offset for tp, o in offsets.items()}, committed_tx

        rc = await read_all(bootstrap, dst, isolation_level="read_committed", timeout_s=TIMEOUT_S)
        ru = await read_all(bootstrap, dst, isolation_level="read_uncommitted",
                            timeout_s=TIMEOUT_S)
        rc_vals = sorted(r.value for r in rc)
        assert rc_vals == sorted(f"MSG-{i}".encode() for i in range(N_MESSAGES)), rc_vals
        assert len(ru) == N_MESSAGES + 5, len(ru)
        assert sum(r.value.startswith(b"aborted-") for r in ru) == 5
        log(
            f"read_committed sees {len(rc)} records, read_uncommitted sees {len(ru)} "
            "(aborted ones filtered)"
        )
    finally:
        try:
            await admin.delete_topics([src, dst])
        except Exception as e:  # best-effort cleanup
            log(f"warning: could not delete topics: {e!r}")
        await admin.close()


def main() -> int:
    bootstrap = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    log(f"bootstrap={bootstrap}")
    t0 = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(run(bootstrap), timeout=180))
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    log(f"OK in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
