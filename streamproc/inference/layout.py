"""Building the replica layout: probe, load, warm up, calibrate, plan.

For each device: load the first replica and measure its footprint (free memory before and
after); run its warm-up batch (maximum-length inputs: the worst case) and measure the memory
it reserves; on the first device, calibrate the batch size and token budget on mixed lengths
(:mod:`.calibration`); plan the device with the measured numbers
(:func:`.planner.plan_device`; a :class:`SharedEngine`, as the CTranslate2
backend's, is planned as one copy of the weights); load the remaining replicas; and keep
them only if they earn their place (a shared engine is resized to one worker, then to all,
for the comparison, and left with a worker per replica kept).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from .calibration import (
    CPU_BUDGET_S,
    CPU_CANDIDATES,
    GPU_BUDGET_S,
    GPU_CANDIDATES,
    TuneReport,
    tune_batch_size,
    tune_replicas,
)
from .config import GPUConfig
from .planner import DevicePlan, plan_device, probe_memory, resolve_devices
from .replicas import Replica, measure_warmup, warmup_items

__all__ = ["SharedEngine", "build_layout"]

M = TypeVar("M")
log = logging.getLogger("streamproc.layout")


@runtime_checkable
class SharedEngine(Protocol):
    """A replica model whose replicas on one device are workers of one engine, with one copy
    of the weights (the CTranslate2 backend): the planner counts the weights once, and the
    layout sizes the engine to the replicas it keeps."""

    @property
    def shares_weights(self) -> bool: ...

    def keep_replicas(self, count: int) -> None: ...


async def build_layout(
    loader: Callable[[str], M], config: GPUConfig,
    direct: Callable[[M, list[Any]], Sequence[Any]], replicas: list[Replica[M]],
    cost: Callable[[Any], int] | None = None,
) -> tuple[GPUConfig, list[DevicePlan], TuneReport | None]:
    """Load every device's replicas into ``replicas`` (so the caller can free them if this
    fails half-way). Returns the config (with a calibrated batch size and token budget), the
    plans and the calibration report. ``cost`` is the batcher's (tokens of a payload)."""
    plans: list[DevicePlan] = []
    report: TuneReport | None = None
    for device in resolve_devices(config):
        config, plan, report = await _load_device(loader, config, direct, replicas, device,
                                                  report, cost)
        plans.append(plan)
    return config, plans, report


async def _load_device(
    loader: Callable[[str], M], cfg: GPUConfig, direct: Callable[[M, list[Any]], Sequence[Any]],
    replicas: list[Replica[M]], device: str, report: TuneReport | None,
    cost: Callable[[Any], int] | None,
) -> tuple[GPUConfig, DevicePlan, TuneReport | None]:
    loop = asyncio.get_running_loop()
    before = probe_memory(device)
    first = await Replica.load(loader, device, len(replicas), loop)
    replicas.append(first)
    after_load = probe_memory(device)
    began = time.perf_counter()
    activation_gb = await measure_warmup(first, direct, cfg, loop)
    warmup = (warmup_items(device, cfg), time.perf_counter() - began)
    if cfg.autotune and cfg.enable_warmup and cfg.warmup_payloads and report is None:
        cuda = device.startswith("cuda")
        candidates = cfg.autotune_candidates or (GPU_CANDIDATES if cuda else CPU_CANDIDATES)
        # A batch never holds more than the queue does.
        fitting = [size for size in candidates if size <= cfg.queue_size] or [cfg.queue_size]
        report = await tune_batch_size(
            first, direct, cfg.calibration_payloads or cfg.warmup_payloads,
            GPU_BUDGET_S if cuda else CPU_BUDGET_S, fitting, warmup, cost=cost,
            ceiling=cfg.max_batch_tokens)
        if report.batch_size is not None:
            assert report.max_items is not None
            cfg = cfg.model_copy(update={"batch_size": report.max_items,
                                         "max_batch_tokens": report.max_batch_tokens})
    if report is not None and report.batch_size is not None:  # every device serves it
        activation_gb = max(activation_gb, report.peak_activation_gb[report.batch_size])
    # What the run left taken, with torch's cache handed back: an allocator torch cannot
    # empty (CTranslate2's) keeps its peak, and each replica will too.
    await first.release_memory()
    settled = probe_memory(device)
    model_gb = None
    if before.free_gb is not None and after_load.free_gb is not None:
        model_gb = max(before.free_gb - after_load.free_gb, 0.01)
        if settled.free_gb is not None:
            activation_gb = max(activation_gb, after_load.free_gb - settled.free_gb)
    shared = first.model if isinstance(first.model, SharedEngine) else None

    async def resize(count: int) -> None:
        assert shared is not None
        await loop.run_in_executor(first.executor, shared.keep_replicas, count)

    plan = plan_device(before, cfg, model_gb=model_gb, activation_gb=activation_gb,
                       shared_weights=shared is not None and shared.shares_weights)
    if plan.warning:
        log.warning(plan.warning)
    on_device = [first]
    for _ in range(plan.replicas - 1):
        replica = await Replica.load(loader, device, len(replicas), loop)
        replicas.append(replica)
        on_device.append(replica)
        await measure_warmup(replica, direct, cfg, loop)
    if shared is not None:
        await resize(len(on_device))  # a worker per replica loaded, no idle ones
    if report is not None and report.batches and len(on_device) > 1:
        keep = await tune_replicas(on_device, direct, report.batches, report,
                                   resize if shared is not None else None)
        for extra in on_device[keep:]:
            extra.retire()
            replicas.remove(extra)
        if shared is not None:
            await resize(keep)
        plan = dataclasses.replace(plan, replicas=keep, limited_by="autotune")
    return cfg, plan, report
