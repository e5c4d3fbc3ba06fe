"""The partition state machine (pure logic): a recording stand-in for the consumer's pause,
resume, committed and seek calls; the Kafka behaviour itself is in the Kafka tests."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaConnectionError

from streamproc.kafka.partition import Entry, Partition, Phase

TP = TopicPartition("in", 0)


class Consumer:
    """Records what the partition asks of the consumer; ``committed`` answers ``position``."""

    def __init__(self, position: int | None = 10, delay_s: float = 0.0) -> None:
        self.position, self.delay_s = position, delay_s
        self.paused: set[TopicPartition] = set()
        self.seeks: list[int | str] = []

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    async def committed(self, tp: TopicPartition) -> int | None:
        await asyncio.sleep(self.delay_s)
        return self.position

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks.append("beginning")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)


def records(*offsets: int) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord("in", 0, o, 0, 0, None, b"{}", None, 0, 2, []) for o in offsets]


def partition(consumer: Consumer) -> Partition:
    return Partition(TP, consumer)  # type: ignore[arg-type]


async def test_paused_until_the_seek_is_done_then_running_at_the_committed_offset() -> None:
    consumer = Consumer(position=10)
    p = partition(consumer)
    assert p.phase is Phase.ASSIGNED and TP in consumer.paused
    assert p.accept(records(10)) == []  # nothing is taken before the seek
    await p.seek()
    assert p.phase is Phase.RUNNING and TP not in consumer.paused and consumer.seeks == [10]
    assert [r.offset for r in p.accept(records(9, 10, 11))] == [10, 11]  # 9 is stale
    assert p.tracker.in_flight == 2


async def test_no_committed_offset_seeks_to_the_beginning() -> None:
    consumer = Consumer(position=None)
    p = partition(consumer)
    await p.seek()
    assert consumer.seeks == ["beginning"] and p.running


async def test_records_seen_twice_are_stale_not_a_crash() -> None:
    p = partition(Consumer())
    await p.seek()
    assert len(p.accept(records(10, 11))) == 2
    assert p.accept(records(11, 12)) == records(12)  # a refetch after a rebalance race
    assert p.tracker.in_flight == 3


async def test_a_rewind_drops_the_pending_work_and_starts_a_new_epoch() -> None:
    consumer = Consumer(position=10, delay_s=0.05)
    p = partition(consumer)
    await p.seek()
    loop = asyncio.get_running_loop()
    entry = Entry(p.epoch, records(10)[0], 0.0, outcome=loop.create_future())
    p.accept(records(10))
    assert p.enqueue([entry])
    old_epoch = p.epoch
    seeking = asyncio.create_task(p.seek())
    await asyncio.sleep(0)
    # while the committed offset is being read: paused, nothing accepted, old work cancelled
    assert p.phase is Phase.SEEKING and TP in consumer.paused
    assert entry.outcome is not None and entry.outcome.cancelled()
    assert p.accept(records(10)) == [] and not p.current(old_epoch)
    late = Entry(old_epoch, records(11)[0], 0.0, outcome=loop.create_future())
    assert not p.enqueue([late]) and late.outcome is not None and late.outcome.cancelled()
    await seeking
    assert p.running and p.epoch > old_epoch and p.unemitted == 0
    assert [r.offset for r in p.accept(records(10))] == [10]  # read again in the new epoch


async def test_revoked_while_seeking_stays_revoked() -> None:
    consumer = Consumer(delay_s=0.05)
    p = partition(consumer)
    seeking = asyncio.create_task(p.seek())
    await asyncio.sleep(0)
    p.drain()
    p.revoke()
    await seeking
    assert p.phase is Phase.REVOKED and consumer.seeks == [] and TP in consumer.paused


async def test_draining_emits_what_was_accepted_then_ends() -> None:
    p = partition(Consumer())
    await p.seek()
    p.accept(records(10, 11))
    entries = [Entry(p.epoch, r, 0.0) for r in records(10, 11)]
    p.enqueue(entries)
    p.drain()
    assert p.accept(records(12)) == []
    assert p.current(p.epoch)  # draining still writes what it accepted
    first = await p.next_entry()
    assert first is entries[0]
    p.emitted(first)
    second = await p.next_entry()
    assert second is entries[1]
    assert p.unemitted == 1
    p.emitted(second)
    assert await asyncio.wait_for(p.next_entry(), 1) is None and p.unemitted == 0


async def test_a_waiting_emitter_wakes_when_the_partition_drains() -> None:
    p = partition(Consumer())
    await p.seek()
    waiting = asyncio.create_task(p.next_entry())
    await asyncio.sleep(0)
    p.drain()
    assert await asyncio.wait_for(waiting, 1) is None


@pytest.mark.parametrize("end", ["stop", "revoke"])
async def test_a_finished_partition_accepts_writes_and_resumes_nothing(end: str) -> None:
    consumer = Consumer()
    p = partition(consumer)
    await p.seek()
    p.accept(records(10))
    p.enqueue([Entry(p.epoch, records(10)[0], 0.0)])
    if end == "stop":
        p.stop("no healthy replica")
    else:
        p.drain()
        p.revoke()
    assert p.finished and not p.current(p.epoch) and p.accept(records(11)) == []
    p.release("backpressure")
    assert TP in consumer.paused
    assert await p.ends_within(0.01)
    assert await p.next_entry() is None
    await p.seek()  # a late seek changes nothing
    assert p.finished and consumer.seeks == [10]


async def test_pause_holds_stack_by_reason() -> None:
    consumer = Consumer()
    p = partition(consumer)
    await p.seek()
    p.hold("backpressure")
    assert TP in consumer.paused
    await p.seek()  # a rewind while backpressure holds it keeps it paused
    assert TP in consumer.paused
    p.release("backpressure")
    assert TP not in consumer.paused



async def test_latest_with_no_committed_offset_commits_the_end_and_rewinds_to_it() -> None:
    consumer = Consumer(position=None)
    ends: list[dict[TopicPartition, int]] = []

    async def end_offsets(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 42 for tp in tps}

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        ends.append(offsets)
        consumer.position = offsets[TP]

    consumer.end_offsets, consumer.commit = end_offsets, commit  # type: ignore[attr-defined]
    p = Partition(TP, consumer, "latest")  # type: ignore[arg-type]
    await p.seek()
    assert ends == [{TP: 42}] and consumer.seeks == [42] and p.running
    await p.seek()  # a rewind: back to the committed start, not to a later end
    assert ends == [{TP: 42}] and consumer.seeks == [42, 42]


@pytest.mark.parametrize("refusal", [CommitFailedError("rebalancing"),
                                     IllegalStateError("Partition in-0 is not assigned"),
                                     KafkaConnectionError("connection lost")])
async def test_latest_start_not_committed_is_logged_and_kept_for_a_rewind(
        refusal: Exception, caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer(position=None)
    ends = iter([42, 50])

    async def end_offsets(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: next(ends) for tp in tps}

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        raise refusal

    consumer.end_offsets, consumer.commit = end_offsets, commit  # type: ignore[attr-defined]
    p = Partition(TP, consumer, "latest")  # type: ignore[arg-type]
    await p.seek()
    assert p.running and consumer.seeks == [42]
    assert "could not commit the start 42" in caplog.text
    await p.seek()  # a rewind with nothing committed: the start chosen, not a later end
    assert p.running and consumer.seeks == [42, 42]


async def test_latest_start_revoked_while_the_end_is_read_commits_nothing() -> None:
    consumer = Consumer(position=None)
    asked, answer = asyncio.Event(), asyncio.Event()
    commits: list[dict[TopicPartition, int]] = []

    async def end_offsets(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        asked.set()
        await answer.wait()
        return {tp: 42 for tp in tps}

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        commits.append(offsets)

    consumer.end_offsets, consumer.commit = end_offsets, commit  # type: ignore[attr-defined]
    p = Partition(TP, consumer, "latest")  # type: ignore[arg-type]
    seek = asyncio.create_task(p.seek())
    await asyncio.wait_for(asked.wait(), 1)
    p.drain()
    p.revoke()
    answer.set()
    await asyncio.wait_for(seek, 1)
    assert commits == [] and consumer.seeks == [] and p.phase is Phase.REVOKED
