"""Start-up calibration: measure, don't guess.

With warm-up on and neither ``GPU_BATCH_SIZE`` nor ``GPU_MAX_BATCH_TOKENS`` set explicitly,
the worker times candidate batch sizes on its first replica (max-length inputs, each twice,
the faster run counts) and keeps the fastest. It stops growing once a size runs out of
memory, falls below 90% of the best so far, or would not finish within the time budget: each
size's time is predicted from the last one measured (or, for the first, from the warm-up), in
proportion to its items. A device too slow for even the first size keeps ``GPU_BATCH_SIZE``.
CUDA devices get ``GPU_CANDIDATES`` and ``GPU_BUDGET_S``; the CPU gets fewer sizes and a
short budget, so a model that is fast on the CPU (tests, demos) is tuned and a large one is
left alone.
When the plan allows more than one replica, they are then timed together against the single
replica, and kept only if they add at least 10%: replicas in threads of one process share
the GIL, and the brief's measurements showed them slower than one replica with a larger
batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .planner import GIB
from .replicas import Replica, is_out_of_memory

__all__ = ["CPU_BUDGET_S", "CPU_CANDIDATES", "GPU_BUDGET_S", "GPU_CANDIDATES", "TuneReport",
           "tune_batch_size", "tune_replicas"]

M = TypeVar("M")
log = logging.getLogger("streamproc.autotune")
GPU_CANDIDATES = (48, 64, 96, 128, 192, 256, 384, 512, 768)
GPU_BUDGET_S = 120.0
CPU_CANDIDATES = (48, 96, 192, 384)
CPU_BUDGET_S = 15.0
REPLICA_GAIN_REQUIRED = 1.10


@dataclass(slots=True)
class TuneReport:
    items_per_second: dict[int, float] = field(default_factory=dict)  # by batch size
    peak_activation_gb: dict[int, float] = field(default_factory=dict)
    batch_size: int | None = None
    replicas_items_per_second: dict[int, float] = field(default_factory=dict)  # by count
    replicas: int | None = None
    stopped_because: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"items_per_second_by_batch": {str(k): v for k, v in self.items_per_second.items()},
                "peak_activation_gb_by_batch": {
                    str(k): v for k, v in self.peak_activation_gb.items()},
                "batch_size": self.batch_size,
                "items_per_second_by_replicas": {
                    str(k): v for k, v in self.replicas_items_per_second.items()},
                "replicas": self.replicas, "stopped_because": self.stopped_because}


def _timed_run(replica: Replica[M], direct: Callable[[M, list[Any]], Sequence[Any]],
               payloads: list[Any]) -> tuple[float, float]:
    """Seconds and peak activation GiB of one batch, on the replica's own thread."""
    cuda = replica.device.startswith("cuda")
    base = 0
    if cuda:
        import torch

        torch.cuda.synchronize(replica.device)
        base = torch.cuda.memory_allocated(replica.device)
        torch.cuda.reset_peak_memory_stats(replica.device)
    started = time.perf_counter()
    direct(replica.model, payloads)
    if cuda:
        torch.cuda.synchronize(replica.device)
        peak = max(torch.cuda.max_memory_allocated(replica.device) - base, 0) / GIB
        return time.perf_counter() - started, float(peak)
    return time.perf_counter() - started, 0.0


async def tune_batch_size(replica: Replica[M], direct: Callable[[M, list[Any]], Sequence[Any]],
                          samples: Sequence[Any], budget_s: float,
                          candidates: Sequence[int] | None = None,
                          warmup: tuple[int, float] | None = None) -> TuneReport:
    """``warmup``: (items, seconds) of a batch already run, to predict the first size's time;
    without it the first size always runs."""
    loop = asyncio.get_running_loop()
    report = TuneReport()
    candidates = GPU_CANDIDATES if candidates is None else candidates
    deadline = time.monotonic() + budget_s
    last = warmup
    for size in candidates:
        if last is not None and last[0] > 0:
            predicted = 2 * last[1] * size / last[0]
            if time.monotonic() + predicted > deadline:
                report.stopped_because = (f"batch {size} would take about {predicted:.1f} s, "
                                          f"past the {budget_s:.0f} s budget")
                break
        batch = [samples[i % len(samples)] for i in range(size)]
        try:
            runs = [await loop.run_in_executor(replica.executor, _timed_run, replica, direct,
                                               batch) for _ in range(2)]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            report.stopped_because = f"batch {size} ran out of memory"
            break
        seconds = min(r[0] for r in runs)
        last = (size, seconds)
        report.items_per_second[size] = size / seconds
        report.peak_activation_gb[size] = max(r[1] for r in runs)
        best = max(report.items_per_second.values())
        if report.items_per_second[size] < 0.9 * best:
            report.stopped_because = f"batch {size} was slower than the best"
            break
        if time.monotonic() > deadline:
            report.stopped_because = "time budget spent"
            break
    else:
        report.stopped_because = "all candidates measured"
    if not report.items_per_second:
        log.info("autotune: no batch size measured (%s); keeping the configured one",
                 report.stopped_because)
        return report
    report.batch_size = max(report.items_per_second, key=lambda b: report.items_per_second[b])
    log.info("autotune: batch %d is fastest (%s; %s)", report.batch_size,
             ", ".join(f"{b}: {v:.1f}/s" for b, v in report.items_per_second.items()),
             report.stopped_because)
    return report


async def tune_replicas(replicas: Sequence[Replica[M]],
                        direct: Callable[[M, list[Any]], Sequence[Any]], samples: Sequence[Any],
                        batch_size: int, report: TuneReport) -> int:
    """How many of ``replicas`` (of one device) to keep: all of them only if running them
    together beats the first one alone by ``REPLICA_GAIN_REQUIRED``."""
    loop = asyncio.get_running_loop()
    batch = [samples[i % len(samples)] for i in range(batch_size)]

    async def together(group: Sequence[Replica[M]]) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(loop.run_in_executor(r.executor, _timed_run, r, direct, batch)
                               for r in group))
        return len(group) * batch_size / (time.perf_counter() - started)

    single = max([await together(replicas[:1]) for _ in range(2)])
    combined = max([await together(replicas) for _ in range(2)])
    report.replicas_items_per_second = {1: single, len(replicas): combined}
    keep = len(replicas) if combined >= REPLICA_GAIN_REQUIRED * single else 1
    report.replicas = keep
    log.info("autotune: %d replicas together give %.1f items/s against %.1f for one; keeping %d",
             len(replicas), combined, single, keep)
    return keep
