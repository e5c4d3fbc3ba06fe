"""GPUWorker logic on the CPU, with small in-process models (pure logic, no torch)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from streamproc.errors import (
    InferenceFailed,
    ItemTooLarge,
    NoHealthyReplica,
    OutOfMemory,
    ReplicaBroken,
    WorkerClosed,
)
from streamproc.inference.config import GPUConfig
from streamproc.inference.worker import GPUWorker


@dataclass
class EchoModel:
    """Uppercases its inputs; can be told to fail in specific ways."""

    index: int
    always_fail: bool = False
    max_batch: int | None = None  # more items than this raise OutOfMemory
    calls: list[list[str]] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)


def echo_task(model: EchoModel, payloads: list[str]) -> list[str]:
    model.calls.append(list(payloads))
    model.threads.add(threading.current_thread().name)
    if model.always_fail:
        raise RuntimeError("CUDA error: device-side assert triggered")
    if model.max_batch is not None and len(payloads) > model.max_batch:
        raise OutOfMemory(f"{len(payloads)} items do not fit")
    if "bad" in payloads:
        raise ValueError("cannot summarize 'bad'")
    return [f"{p.upper()}@{model.index}" for p in payloads]


class Loader:
    def __init__(self, **per_index: dict[str, object]) -> None:
        self.models: list[EchoModel] = []
        self.per_index = per_index

    def __call__(self, device: str) -> EchoModel:
        model = EchoModel(len(self.models), **self.per_index.get(f"r{len(self.models)}", {}))  # type: ignore[arg-type]
        self.models.append(model)
        return model


def cpu_config(**overrides: object) -> GPUConfig:
    base: dict[str, object] = {"device_ids": "cpu", "batch_size": 8, "max_delay_ms": 5,
                               "queue_size": 100, "pool_max_instances": 2}
    return GPUConfig(**{**base, **overrides})  # type: ignore[arg-type]


async def test_infer_many_lines_up_with_payloads_across_two_replicas() -> None:
    loader = Loader()
    async with GPUWorker(loader, cpu_config(), echo_task) as worker:
        payloads = [f"item{i}" for i in range(100)]
        results = await worker.infer_many(payloads)
    assert [str(r).split("@")[0] for r in results] == [p.upper() for p in payloads]
    assert len(loader.models) == 2
    assert all(m.calls for m in loader.models), "both replicas took chunks"
    main = threading.current_thread().name
    assert all(main not in m.threads for m in loader.models), "model work ran off the loop"


async def test_a_raising_item_fails_alone_with_a_typed_error() -> None:
    loader = Loader()
    async with GPUWorker(loader, cpu_config(batch_size=16, pool_max_instances=1), echo_task) as w:
        payloads = ["a", "b", "bad", "c", "d", "e"]
        results = await w.infer_many(payloads)
        metrics = w.get_metrics()
    assert isinstance(results[2], InferenceFailed)
    assert "cannot summarize" in results[2].reason and results[2].dead_letter
    assert [r for i, r in enumerate(results) if i != 2] == ["A@0", "B@0", "C@0", "D@0", "E@0"]
    assert metrics["failures"] == 1 and metrics["total_inferences"] == 5
    assert metrics["dead_replicas"] == 0, "a bad item does not kill the replica"


async def test_out_of_memory_splits_the_batch_and_every_item_succeeds() -> None:
    loader = Loader(r0={"max_batch": 3})
    async with GPUWorker(loader, cpu_config(batch_size=16, max_delay_ms=50,
                                            pool_max_instances=1), echo_task) as worker:
        results = await worker.infer_many([str(i) for i in range(16)])
        metrics = worker.get_metrics()
    assert results == [f"{i}@0" for i in range(16)]
    assert metrics["oom_splits"] >= 3
    assert max(len(c) for c in loader.models[0].calls if len(c) <= 3) <= 3


async def test_a_single_item_that_never_fits_gets_item_too_large() -> None:
    loader = Loader(r0={"max_batch": 0})
    async with GPUWorker(loader, cpu_config(pool_max_instances=1), echo_task) as worker:
        results = await worker.infer_many(["x", "y"])
    assert all(isinstance(r, ItemTooLarge) for r in results)


async def test_a_dead_replica_leaves_rotation_and_its_work_is_retried_elsewhere() -> None:
    loader = Loader(r1={"always_fail": True})
    async with GPUWorker(loader, cpu_config(replica_max_failures=3), echo_task) as worker:
        results = await worker.infer_many([f"i{i}" for i in range(80)])
        metrics = worker.get_metrics()
    assert results == [f"I{i}@0" for i in range(80)]
    assert metrics["dead_replicas"] == 1
    assert metrics["replicas_per_device"] == {"cpu": 1}
    dead = [r for r in metrics["replicas"] if not r["healthy"]]
    assert dead[0]["index"] == 1 and "device-side assert" in dead[0]["last_error"]
    assert metrics["chunk_retries"] >= 3


async def test_metrics_match_known_counts() -> None:
    async with GPUWorker(Loader(), cpu_config(batch_size=5, max_delay_ms=0,
                                              pool_max_instances=1), echo_task) as worker:
        for i in range(4):  # 4 rounds of 5 items: each fills one batch exactly
            await worker.infer_many([f"{i}{j}" for j in range(5)])
        await worker.infer_many(["bad"])
        m = worker.get_metrics()
    assert (m["total_inferences"], m["failures"], m["batches"]) == (20, 1, 5)
    assert m["mean_batch_size"] == pytest.approx(21 / 5)
    assert m["inferences_per_second"] > 0 and m["queue_depth"] == 0
    assert m["plan"][0]["device"] == "cpu" and m["plan"][0]["replicas"] == 1


async def test_warmup_runs_on_every_replica_before_start_returns() -> None:
    loader = Loader()
    worker = GPUWorker(loader, cpu_config(warmup_payloads=("warm",)), echo_task)
    await worker.start()
    assert [m.calls for m in loader.models] == [[["warm"]], [["warm"]]]
    await worker.stop()


async def test_start_and_stop_are_idempotent_and_stop_drains_the_queue() -> None:
    worker = GPUWorker(Loader(), cpu_config(max_delay_ms=200), echo_task)
    await worker.start()
    await worker.start()
    futures = [await worker.submit(f"q{i}") for i in range(5)]
    await worker.stop()
    await worker.stop()
    assert [f.result().split("@")[0] for f in futures] == [f"Q{i}" for i in range(5)]
    with pytest.raises(WorkerClosed):
        await worker.infer("late")


async def test_full_queue_makes_callers_wait() -> None:
    gate = threading.Event()

    def slow_task(model: EchoModel, payloads: list[str]) -> list[str]:
        gate.wait(5)
        return echo_task(model, payloads)

    worker = GPUWorker(Loader(), cpu_config(batch_size=1, max_delay_ms=0, queue_size=2,
                                            pool_max_instances=1), slow_task)
    async with worker:
        first = await worker.submit("running")  # taken by the replica, blocks on the gate
        await asyncio.sleep(0.05)
        queued = [await worker.submit("q1"), await worker.submit("q2")]
        assert worker.queue_full()
        blocked = asyncio.create_task(worker.submit("q3"))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        gate.set()
        last = await asyncio.wait_for(blocked, 5)
        results = await asyncio.gather(first, *queued, last)
    assert results == ["RUNNING@0", "Q1@0", "Q2@0", "Q3@0"]


async def test_prepare_step_runs_off_the_replica_thread_and_results_line_up() -> None:
    prepared_on: set[str] = set()

    def prepare(model: EchoModel, payloads: list[str]) -> list[str]:
        prepared_on.add(threading.current_thread().name)
        if "bad" in payloads:
            raise ValueError("cannot tokenize 'bad'")
        return [p + "!" for p in payloads]

    async with GPUWorker(Loader(), cpu_config(batch_size=4, pool_max_instances=1), echo_task,
                         prepare=prepare) as worker:
        results = await worker.infer_many([f"p{i}" for i in range(20)] + ["bad"])
    assert results[:20] == [f"P{i}!@0" for i in range(20)]
    # A failing prepare step is isolated like a failing model call: only "bad" fails.
    assert isinstance(results[20], InferenceFailed) and "tokenize" in results[20].reason
    assert "prepare_0" in prepared_on


async def test_items_whose_callers_gave_up_are_skipped() -> None:
    loader = Loader()
    worker = GPUWorker(loader, cpu_config(batch_size=4, max_delay_ms=100, pool_max_instances=1),
                       echo_task)
    async with worker:
        futures = [await worker.submit(f"c{i}") for i in range(4)]
        for future in futures:
            future.cancel()  # a whole batch nobody waits for any more
        assert await worker.infer("after") == "AFTER@0"
    assert all("c0" not in call for call in loader.models[0].calls)


async def test_submit_many_cancelled_while_waiting_skips_what_it_had_queued() -> None:
    gate = threading.Event()
    loader = Loader()

    def gated(model: EchoModel, payloads: list[str]) -> list[str]:
        gate.wait(5)
        return echo_task(model, payloads)

    worker = GPUWorker(loader, cpu_config(batch_size=1, max_delay_ms=0, queue_size=2,
                                          pool_max_instances=1), gated)
    async with worker:
        first = await worker.submit("running")  # taken by the replica, blocks on the gate
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(worker.submit_many(["m0", "m1", "m2", "m3"]))
        await asyncio.sleep(0.05)
        assert worker.queue_full() and not waiting.done()  # m0 and m1 in, m2 waits for room
        waiting.cancel()
        gate.set()
        assert await first == "RUNNING@0"
        assert await worker.infer("after") == "AFTER@0"
    ran = [p for call in loader.models[0].calls for p in call]
    assert ran == ["running", "after"]  # m0 and m1 were queued, then skipped


async def test_on_the_cpu_a_fast_model_is_calibrated_and_a_slow_one_is_not() -> None:
    def fixed_cost(model: EchoModel, payloads: list[str]) -> list[str]:
        threading.Event().wait(0.002)  # per call, not per item: bigger batches win
        return echo_task(model, payloads)

    warm = {"enable_warmup": True, "autotune": True, "warmup_payloads": ("w",) * 8,
            "pool_max_instances": 1, "autotune_candidates": (8, 16, 32)}
    async with GPUWorker(Loader(), cpu_config(**warm), fixed_cost) as fast:
        assert fast.autotune is not None and fast.autotune.batch_size == 32
        assert fast.config.batch_size == 32
        assert (await fast.infer("x")).startswith("X@")
    async with GPUWorker(Loader(), cpu_config(**warm, queue_size=16), fixed_cost) as capped:
        assert capped.config.batch_size == 16  # no batch bigger than the queue

    def slow_warmup(model: EchoModel, payloads: list[str]) -> list[str]:
        threading.Event().wait(1.0 if payloads == ["w", "w"] else 0)  # 2 warm-up items: 1 s
        return echo_task(model, payloads)

    # Batch 16 (32 samples) at the warm-up's 0.5 s an item, twice: about 32 s, past 15 s.
    slow_config = cpu_config(**{**warm, "autotune_candidates": (16, 32)})
    async with GPUWorker(Loader(), slow_config, slow_warmup) as slow:
        assert slow.autotune is not None and slow.autotune.batch_size is None
        assert slow.config.batch_size == 8  # GPU_BATCH_SIZE kept
        assert "budget" in slow.autotune.stopped_because


async def test_with_a_cost_calibration_picks_a_token_budget_on_mixed_lengths() -> None:
    def padded(model: EchoModel, payloads: list[str]) -> list[str]:
        threading.Event().wait(0.002 + 0.00002 * len(payloads) * max(map(len, payloads)))
        return echo_task(model, payloads)

    mixed = tuple("w" * n for n in (40, 5, 20, 10, 35, 15, 25, 30))
    config = cpu_config(enable_warmup=True, autotune=True, warmup_payloads=("w" * 40,) * 8,
                        calibration_payloads=mixed, pool_max_instances=1,
                        autotune_candidates=(4, 8, 16))
    async with GPUWorker(Loader(), config, padded, cost=len) as worker:
        tune = worker.autotune
        assert tune is not None and tune.batch_size is not None
        assert tune.token_budget == {4: 160, 8: 320, 16: 640}  # n x the longest sample
        # The budget decides the padded size; the item cap is the most items it measured.
        assert worker.config.max_batch_tokens == tune.token_budget[tune.batch_size]
        assert worker.config.batch_size == tune.max_items == max(map(len, tune.batches))
        assert worker.get_metrics()["autotune"]["max_batch_tokens"] == tune.max_batch_tokens
        assert worker.sort_window == worker.config.queue_size  # the whole queue, by default
        assert await worker.infer_many(["ab", "c"]) == ["AB@0", "C@0"]
    ceiling = config.model_copy(update={"max_batch_tokens": 200})
    async with GPUWorker(Loader(), ceiling, padded, cost=len) as capped:
        assert capped.autotune is not None and capped.config.max_batch_tokens is not None
        assert capped.config.max_batch_tokens <= 200  # a budget set by hand is a ceiling


def poison_task(model: EchoModel, payloads: list[str]) -> list[str]:
    """A replica that sees "poison" is broken for good: this and every later call fails, as
    after a CUDA device-side assert."""
    model.calls.append(list(payloads))
    if "poison" in payloads:
        model.always_fail = True
    if model.always_fail:
        raise RuntimeError("CUDA error: device-side assert triggered")
    return [f"{p.upper()}@{model.index}" for p in payloads]


@pytest.mark.parametrize("replicas", [1, 2, 3])
async def test_a_poison_item_that_breaks_replicas_is_dead_lettered_and_never_loops(
        replicas: int) -> None:
    """The probe (the first warm-up payload) tells a broken replica from a bad item: the
    poison is dead-lettered as replica_broken, the replicas it broke leave the rotation, and
    nothing is blamed on the items around it while a healthy replica is left."""
    loader = Loader()
    config = cpu_config(pool_max_instances=replicas, batch_size=8, enable_warmup=False,
                        warmup_payloads=("probe",))
    async with GPUWorker(loader, config, poison_task) as worker:
        payloads = [f"item{i}" for i in range(6)] + ["poison"] + [f"item{i}" for i in range(6, 12)]
        results = await worker.infer_many(payloads)
        healthy = [r for r in worker.replicas if r.healthy]
        later = await worker.infer_many(["after"]) if healthy else None
    poison = results[6]
    assert isinstance(poison, ReplicaBroken) and poison.dead_letter
    assert len(healthy) >= replicas - 2  # at most two replicas broken by one poison item
    if replicas >= 3:  # a healthy replica was always left: every other item succeeded
        assert all(isinstance(r, str) for i, r in enumerate(results) if i != 6), results
        assert later is not None and isinstance(later[0], str)
    if not healthy:
        # The suspects with no replica left to try them on are dead-lettered (never retried
        # forever); the items of later batches get NoHealthyReplica, which is not a dead
        # letter: the pipeline stops with them uncommitted.
        assert all(isinstance(r, (str, ReplicaBroken, NoHealthyReplica)) for r in results)
        assert not NoHealthyReplica("x").dead_letter
