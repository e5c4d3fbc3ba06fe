"""The micro-batcher, with real asyncio timing kept short."""

from __future__ import annotations

import asyncio
import time

import pytest

from streamproc.errors import WorkerClosed
from streamproc.inference.batcher import MicroBatcher


async def test_flushes_at_max_items_without_waiting_for_the_delay() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=4, max_delay_s=10, maxsize=100)
    for i in range(10):
        await batcher.put(i)
    started = time.monotonic()
    assert await batcher.next_batch() == [0, 1, 2, 3]
    assert await batcher.next_batch() == [4, 5, 6, 7]
    assert time.monotonic() - started < 1.0


async def test_flushes_after_the_delay_counted_from_the_first_item() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=100, max_delay_s=0.2, maxsize=100)
    await batcher.put(1)
    await asyncio.sleep(0.15)
    started = time.monotonic()
    await batcher.put(2)
    batch = await batcher.next_batch()
    waited = time.monotonic() - started
    assert batch == [1, 2]
    assert waited < 0.15  # only the rest of the first item's 0.2 s, not a fresh 0.2 s


async def test_delay_collects_items_that_arrive_during_it() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=100, max_delay_s=0.3, maxsize=100)

    async def trickle() -> None:
        for i in range(5):
            await batcher.put(i)
            await asyncio.sleep(0.02)

    feeder = asyncio.create_task(trickle())
    batch = await batcher.next_batch()
    await feeder
    assert batch == [0, 1, 2, 3, 4]


async def test_put_waits_while_full_and_nothing_is_dropped() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=2, max_delay_s=0, maxsize=3)
    for i in range(3):
        await batcher.put(i)
    assert batcher.full()
    blocked = asyncio.create_task(batcher.put(99))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # backpressure: the caller waits
    assert await batcher.next_batch() == [0, 1]
    await asyncio.wait_for(blocked, 1)
    seen = []
    while batcher.qsize():
        seen += await batcher.next_batch()
    assert seen == [2, 99]


async def test_put_many_fills_what_room_there_is_and_waits_for_the_rest_in_order() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=2, max_delay_s=0, maxsize=3)
    blocked = asyncio.create_task(batcher.put_many(range(7)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not blocked.done() and batcher.qsize() == 3  # the first three went in at once
    seen: list[int] = []
    while len(seen) < 7:
        seen += await asyncio.wait_for(batcher.next_batch(), 1)
    await asyncio.wait_for(blocked, 1)
    assert seen == list(range(7))


async def test_put_many_raises_once_closed_and_keeps_what_went_in() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=10, max_delay_s=0, maxsize=2)
    blocked = asyncio.create_task(batcher.put_many([1, 2, 3]))
    await asyncio.sleep(0.05)
    batcher.close()
    with pytest.raises(WorkerClosed):
        await asyncio.wait_for(blocked, 1)
    assert await batcher.next_batch() == [1, 2]
    assert await batcher.next_batch() == []


async def test_padded_token_budget_closes_a_batch_and_carries_the_item_over() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(
        max_items=100, max_delay_s=0, maxsize=100, cost=lambda n: n, max_cost=12)
    for n in (4, 5, 3, 20, 1, 2):
        await batcher.put(n)
    assert await batcher.next_batch() == [4, 5]  # 3 x 5 = 15 padded tokens would exceed 12
    assert await batcher.next_batch() == [3]  # 2 x 20 would exceed
    assert await batcher.next_batch() == [20]  # over budget alone still runs alone
    assert await batcher.next_batch() == [1, 2]


async def test_backlog_is_batched_by_similar_length_and_the_oldest_always_goes() -> None:
    lengths = [500, 10, 490, 12, 480, 11, 470, 9]
    batcher: MicroBatcher[int] = MicroBatcher(
        max_items=4, max_delay_s=0, maxsize=100, cost=lambda n: n, sort_window=16)
    for n in lengths:
        await batcher.put(n)
    first = await batcher.next_batch()
    assert first == [500, 490, 480, 470]  # the oldest (500) and its neighbours in length
    assert await batcher.next_batch() == [10, 12, 11, 9]  # arrival order kept within a batch


async def test_sorted_batches_respect_the_padded_budget() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(
        max_items=8, max_delay_s=0, maxsize=100, cost=lambda n: n, max_cost=40, sort_window=32)
    for n in [10, 10, 10, 10, 10, 30, 9, 9, 9, 9, 9]:
        await batcher.put(n)
    batch = await batcher.next_batch()
    assert batch[0] == 10 and len(batch) * max(batch) <= 40


async def test_a_backlog_over_the_budget_is_batched_by_length_below_the_item_cap() -> None:
    # Fewer items than max_items, but more padded tokens than one batch holds: FIFO would pad
    # the short ones to 100; selection by length keeps the long ones together.
    batcher: MicroBatcher[int] = MicroBatcher(
        max_items=64, max_delay_s=0.05, maxsize=100, cost=lambda n: n, max_cost=300,
        sort_window=100)
    for n in [100, 5, 100, 6, 100, 7, 5]:
        await batcher.put(n)
    assert await asyncio.wait_for(batcher.next_batch(), 1) == [100, 100, 100]
    assert await asyncio.wait_for(batcher.next_batch(), 1) == [5, 6, 7, 5]  # fits: the delay


async def test_sorted_selection_loses_and_duplicates_nothing() -> None:
    import random

    rng = random.Random(7)
    items = [rng.randint(1, 1000) * 1000 + i for i in range(300)]  # unique, varied lengths
    batcher: MicroBatcher[int] = MicroBatcher(
        max_items=16, max_delay_s=0, maxsize=1000, cost=lambda n: n // 1000, sort_window=64)
    for n in items:
        await batcher.put(n)
    batcher.close()
    seen: list[int] = []
    while batch := await batcher.next_batch():
        assert len(batch) <= 16
        seen += batch
    assert sorted(seen) == sorted(items)


async def test_close_drains_then_returns_empty_and_rejects_puts() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=2, max_delay_s=10, maxsize=10)
    await batcher.put(1)
    batcher.close()
    assert await asyncio.wait_for(batcher.next_batch(), 1) == [1]
    assert await batcher.next_batch() == []
    with pytest.raises(WorkerClosed):
        await batcher.put(2)


async def test_close_wakes_a_waiting_consumer() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_items=2, max_delay_s=10, maxsize=10)
    waiter = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.01)
    batcher.close()
    assert await asyncio.wait_for(waiter, 1) == []
