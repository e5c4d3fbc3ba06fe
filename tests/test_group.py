"""The consumer group under a backlog, against the real broker, in process (issue 19): a
member that joins while another drains a full queue, the old rebalance timing forced on
purpose, and a stop that lands in a rebalance.

Two processors in one event loop, each with its own worker around the identity summarizer: a
slow one (a full queue is seconds of work, so its revoke drains for longer than the session
timeout) and a fast one. A member the group removes must rejoin in a new generation, so
``stats.rebalances`` and ``stats.generation`` show every removal.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from streamproc.errors import ConsumerFailed
from streamproc.kafka.processor import StreamProcessor
from streamproc.settings import Settings
from tests.helpers import (
    committed,
    end_offsets,
    identity_worker,
    items,
    output_ids,
    produce,
    running,
    running_processor,
    service_topics,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.kafka

SESSION_MS = 6000  # the broker's least; the old rebalance timeout equalled it


async def wait_committed(settings: Settings, ends: dict[int, int], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while (now := await committed(settings)) != ends:
        if time.monotonic() > deadline:
            raise AssertionError(f"committed {now}, not {ends}, after {timeout_s:.0f} s")
        await asyncio.sleep(0.3)


async def check_outputs(settings: Settings, sent: list[tuple[bytes, bytes]]) -> None:
    """Nothing lost; under exactly_once nothing repeated either (read_committed)."""
    expected = Counter(k.decode() for k, _ in sent)
    got = await output_ids(settings)
    lost = sorted(set(expected) - set(got))
    assert lost == [], f"{len(lost)} lost, e.g. {lost[:5]}"
    if settings.processing_guarantee == "exactly_once":
        repeated = {k: n for k, n in got.items() if n > 1}
        assert repeated == {}, f"{len(repeated)} duplicated under exactly_once"


def draining(processor: StreamProcessor) -> bool:
    """Its partitions are being handed back."""
    return any(p is not None and not p.running
               for p in map(processor.partition, processor.assigned))


async def join_under_a_backlog(bootstrap: str, guarantee: str) -> None:
    settings = settings_for(bootstrap, guarantee, kafka_session_timeout_ms=SESSION_MS,
                            shutdown_timeout_s=30, kafka_commit_interval_ms=500)
    await service_topics(settings, 4)
    sent = items(500, "join")
    ends = end_offsets(await produce(bootstrap, settings.kafka_input_topic, sent))
    slow = identity_worker(delay_s=0.1, batch_size=5, queue_size=450, max_delay_ms=5)
    async with running_processor(settings, slow) as first:
        await wait_for(lambda: first.stats.consumed >= 450, "the first member's full queue")
        joined_at = first.stats.generation
        async with running_processor(settings) as second:
            await wait_committed(settings, ends)
            seen = [(p.stats.rebalances, p.stats.generation) for p in (first, second)]
    assert seen == [(2, joined_at + 1), (1, joined_at + 1)], (
        f"{guarantee}: (rebalances, generation) of each member: {seen}, not one new "
        f"generation {joined_at + 1} with both: the group removed a member or rebalanced "
        "again")
    await check_outputs(settings, sent)


async def test_a_member_joining_a_backlog_makes_one_generation_and_nobody_is_removed(
        kafka_bootstrap: str) -> None:
    """The first member holds a full queue (about 9 s of work) when the second joins. Its
    revoke drains all of it, longer than the session timeout, which aiokafka used to send as
    the rebalance timeout: the group removed it, gave everything to the newcomer, and the
    storm began. With the default rebalance timing the group waits for the drain: one new
    generation with both members, nobody removed, nothing lost. Both guarantees, side by
    side, each in a group of its own."""
    await asyncio.gather(join_under_a_backlog(kafka_bootstrap, "at_least_once"),
                         join_under_a_backlog(kafka_bootstrap, "exactly_once"))


async def test_the_old_rebalance_timing_forced_storms_and_exactly_once_loses_nothing(
        kafka_bootstrap: str) -> None:
    """The storm of issue 19, forced through the settings: the group waits only the session
    timeout (6 s) for a member to rejoin, while the slow member's revoke would drain its full
    queue for 20 s. The group removes it and gives its partitions to the fast member, whose
    producers fence it. The removed member's drained partitions must not write or commit
    anything more (before the fix they committed past records whose outputs they had dropped,
    through a new producer that fenced the new owner in turn); the removed member rejoins
    and the two share the rest. The storm happens (the fast member is assigned twice), and a
    read_committed reader sees every record exactly once."""
    settings = settings_for(kafka_bootstrap, "exactly_once", kafka_session_timeout_ms=SESSION_MS,
                            kafka_rebalance_timeout_ms=SESSION_MS, shutdown_timeout_s=30,
                            kafka_commit_interval_ms=300)
    await service_topics(settings, 4)
    sent = items(1100, "storm")
    ends = end_offsets(await produce(kafka_bootstrap, settings.kafka_input_topic, sent))
    delay = [0.1]  # 50 items/s: a full queue of 1,000 is 20 s of work
    slow = identity_worker(delay_s=lambda: delay[0], batch_size=5, queue_size=1000,
                           max_delay_ms=5)
    async with running_processor(settings, slow) as first:
        await wait_for(lambda: first.stats.consumed >= 1000, "the slow member's full queue")
        async with running_processor(settings) as second:
            await wait_for(lambda: second.stats.rebalances >= 2, "the removed member's return",
                           timeout_s=90)
            delay[0] = 0.0  # the storm happened: let the slow member finish its share
            await wait_committed(settings, ends)
    await check_outputs(settings, sent)


async def test_a_stop_in_a_rebalance_ends_at_once_and_sets_up_nothing(
        kafka_bootstrap: str) -> None:
    """A member that joins while the first drains waits in ``getmany`` for the whole
    rebalance (aiokafka's fetcher does). A stop must wake it: the member returns at once,
    takes no partition and fences nobody, rather than wait out the drain and then set up
    partitions it will hand back."""
    settings = settings_for(kafka_bootstrap, "exactly_once", kafka_session_timeout_ms=SESSION_MS,
                            shutdown_timeout_s=30)
    await service_topics(settings, 2)
    await produce(kafka_bootstrap, settings.kafka_input_topic, items(300, "stop"))
    delay = [0.1]
    slow = identity_worker(delay_s=lambda: delay[0], batch_size=5, queue_size=300,
                           max_delay_ms=5)
    async with running_processor(settings, slow) as first:  # 6 s of work in its queue
        await wait_for(lambda: first.stats.consumed >= 300, "the first member's full queue")
        async with identity_worker(max_delay_ms=5) as worker:
            second = StreamProcessor(settings, worker)
            async with running(second) as run:
                await wait_for(lambda: draining(first), "the first member's revoke")
                await asyncio.sleep(0.5)  # the newcomer waits in getmany for the rebalance
                assert not run.done() and second.stats.rebalances == 0
                stopped_at = time.monotonic()
                second.request_stop()
                await asyncio.wait_for(asyncio.shield(run), 10)
                took = time.monotonic() - stopped_at
            await asyncio.sleep(1)  # were it to set partitions up, it would do so now
        assert took < 2.0, f"run() took {took:.1f} s after the stop (the drain takes seconds)"
        assert second.stats.consumed == 0 and not second.joined.is_set()
        delay[0] = 0.0  # the first member's own drain need not take its time


async def test_static_members_restart_without_a_rebalance_and_never_share_an_id(
        kafka_bootstrap: str) -> None:
    """With ``KAFKA_GROUP_INSTANCE_ID``, a member that stops and comes back under the same id
    within the session timeout gets its partitions back in the same generation: the other
    member is not disturbed. A second process that takes an id already in use would take the
    partitions back and forth with the first for as long as both run; each one that sees its
    assignment handed out again stops instead, naming the setting: the first always, the
    second too when the first took the id back before it stopped."""
    base = settings_for(kafka_bootstrap, "exactly_once", kafka_session_timeout_ms=10_000)
    await service_topics(base, 2)

    def member(instance: str) -> Settings:
        return base.model_copy(update={"kafka_group_instance_id": instance})

    async with running_processor(member("b")) as other:
        async with running_processor(member("a")) as first:
            # Under load the group can take more than one rebalance to hold both members.
            await wait_for(lambda: first.joined.is_set()
                           and other.stats.generation == first.stats.generation,
                           "both members in one generation")
            generation, rebalances = first.stats.generation, other.stats.rebalances
        async with identity_worker(max_delay_ms=5) as worker:
            again = StreamProcessor(member("a"), worker)
            await asyncio.wait_for(again.start(), 60)
            run = asyncio.create_task(again.run())
            try:
                await wait_for(again.joined.is_set, "the restarted member's partitions")
                assert (again.stats.generation, other.stats.rebalances) == (generation, rebalances)
                try:
                    async with running_processor(member("a")):
                        await wait_for(run.done, "the member whose id was taken to stop", 30)
                        with pytest.raises(ConsumerFailed,
                                           match="KAFKA_GROUP_INSTANCE_ID='a'"):
                            run.result()
                except ConsumerFailed as exc:
                    # The first one took the id back (rejoining) before it stopped, so the
                    # second rejoins to the same generation's assignment too and stops alike.
                    assert "KAFKA_GROUP_INSTANCE_ID='a'" in str(exc)
            finally:
                await again.stop()
