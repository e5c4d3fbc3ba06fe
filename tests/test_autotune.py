"""Calibration logic, with models whose speed is known (pure logic, no GPU)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from streamproc.errors import OutOfMemory
from streamproc.inference.calibration import (
    TuneReport,
    group_by_budget,
    tune_batch_size,
    tune_replicas,
)
from streamproc.inference.replicas import Replica


def replica(index: int, model: object) -> Replica[object]:
    return Replica(index, "cpu", model, ThreadPoolExecutor(1))


def sleepy(model: object, batch: list[str]) -> list[str]:
    """Fixed cost per call plus a little per item: bigger batches win, until 'OOM' past 64."""
    if len(batch) > 64:
        raise OutOfMemory("too big")
    time.sleep(0.01 + 0.0001 * len(batch))
    return batch


async def test_picks_the_fastest_batch_and_stops_at_out_of_memory() -> None:
    report = await tune_batch_size(replica(0, None), sleepy, ["x"], budget_s=30,
                                   candidates=(8, 16, 32, 64, 128))
    assert report.batch_size == 64
    assert list(report.items_per_second) == [8, 16, 32, 64]
    assert "out of memory" in report.stopped_because
    assert report.as_dict()["items_per_second_by_batch"]["64"] > 0


async def test_stops_growing_once_past_the_knee() -> None:
    def knee(model: object, batch: list[str]) -> list[str]:
        time.sleep(0.002 * len(batch) if len(batch) > 16 else 0.02)  # flat, then per item
        return batch

    report = await tune_batch_size(replica(0, None), knee, ["x"], budget_s=30,
                                   candidates=(4, 8, 16, 64, 128))
    assert report.batch_size == 16
    assert 128 not in report.items_per_second  # stopped after 64 was slower


async def test_replicas_that_release_the_gil_earn_their_place() -> None:
    group = [replica(i, None) for i in range(2)]
    report = TuneReport()
    keep = await tune_replicas(group, sleepy, [["x"] * 8] * 2, report)  # sleep frees the GIL
    assert keep == 2 and report.replicas == 2


async def test_replicas_that_serialize_do_not() -> None:
    gil = threading.Lock()  # stands in for the GIL: one replica at a time does its work

    def serialized(model: object, batch: list[str]) -> list[str]:
        with gil:
            time.sleep(0.02)
        return batch

    group = [replica(i, None) for i in range(2)]
    report = TuneReport()
    keep = await tune_replicas(group, serialized, [["x"] * 8] * 2, report)
    assert keep == 1, report.replicas_items_per_second


async def test_a_first_size_predicted_past_the_budget_is_not_run() -> None:
    calls: list[int] = []

    def counted(model: object, batch: list[str]) -> list[str]:
        calls.append(len(batch))
        return batch

    # A warm-up of 2 items took 1 s: batch 48 (96 samples) twice would take about 96 s.
    report = await tune_batch_size(replica(0, None), counted, ["x"], budget_s=15,
                                   candidates=(48, 96), warmup=(2, 1.0))
    assert calls == [] and report.batch_size is None and not report.items_per_second
    assert "past the 15 s budget" in report.stopped_because


async def test_growth_stops_before_a_size_predicted_past_the_budget() -> None:
    def per_item(model: object, batch: list[str]) -> list[str]:
        time.sleep(0.002 * len(batch))  # 10 items: 0.02 s; 80 would take 0.32 s, twice
        return batch

    report = await tune_batch_size(replica(0, None), per_item, ["x"], budget_s=0.5,
                                   candidates=(10, 20, 80), warmup=(1, 0.004))
    assert list(report.items_per_second) == [10, 20]
    assert report.stopped_because.startswith("batch 80 would take about")
    assert report.batch_size in (10, 20)


def test_group_by_budget_batches_a_backlog_as_the_batcher_does() -> None:
    costs = [100, 10, 50, 10, 100, 10, 10, 50]
    batches = group_by_budget(costs, budget=200, max_items=3)
    assert [sorted(costs[i] for i in b) for b in batches] == [
        [100, 100], [10, 50, 50], [10, 10, 10]]  # 3 x 50 fits 200; 4 items do not fit 3
    assert sorted(i for b in batches for i in b) == list(range(len(costs)))
    assert group_by_budget([500, 10], budget=100, max_items=8) == [[0], [1]]  # too long: alone


def padded(model: object, batch: list[str]) -> list[str]:
    """Time grows with the padded size, plus a fixed cost per call; 'OOM' past 400 tokens."""
    size = len(batch) * max(len(text) for text in batch)
    if size > 400:
        raise OutOfMemory("too big")
    time.sleep(0.004 + 0.00001 * size)
    return batch


async def test_mixed_lengths_calibrate_a_padded_token_budget() -> None:
    samples = ["x" * n for n in (40, 5, 20, 10, 40, 5, 30, 15)]
    report = await tune_batch_size(replica(0, None), padded, samples, budget_s=30,
                                   candidates=(2, 4, 8, 16), cost=len)
    # size n is the budget n x 40 (the longest sample): 80, 160, 320, then 640 runs out
    assert report.token_budget == {2: 80, 4: 160, 8: 320}
    assert "out of memory" in report.stopped_because
    assert (report.batch_size, report.max_batch_tokens) == (8, 320)
    assert report.max_items == max(len(b) for b in report.batches)  # no more than measured
    assert report.batches and all(
        len(b) * max(map(len, b)) <= 320 for b in report.batches)
    assert sum(len(b) for b in report.batches) == 16  # 2 x the size, mixed lengths


async def test_a_token_ceiling_caps_the_budgets_tried() -> None:
    samples = ["x" * n for n in (40, 5, 20, 10)]
    report = await tune_batch_size(replica(0, None), padded, samples, budget_s=30,
                                   candidates=(2, 4, 8, 16), cost=len, ceiling=200)
    assert report.token_budget == {2: 80, 4: 160, 8: 200}  # the last one at the ceiling
    assert report.max_batch_tokens is not None and report.max_batch_tokens <= 200


async def test_out_of_memory_hands_the_cache_back() -> None:
    released: list[int] = []

    class Watched(Replica[object]):
        async def release_memory(self) -> None:
            released.append(self.index)

    report = await tune_batch_size(Watched(3, "cpu", None, ThreadPoolExecutor(1)), sleepy, ["x"],
                                   budget_s=30, candidates=(32, 128))
    assert released == [3] and report.batch_size == 32


async def test_a_shared_engine_is_resized_for_each_side_of_the_comparison() -> None:
    sizes: list[int] = []

    async def resize(count: int) -> None:
        sizes.append(count)

    group = [replica(i, None) for i in range(3)]
    await tune_replicas(group, sleepy, [["x"] * 4], TuneReport(), resize)
    assert sizes == [1, 3]  # the one alone gets the whole device, then all three share it
