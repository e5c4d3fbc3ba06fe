"""Start-up calibration: measure, don't guess.

With warm-up on and ``GPU_BATCH_SIZE`` not set explicitly, the worker times candidate batch
layouts on its first replica and keeps the fastest. It measures the workload it will serve:

1. **Mixed lengths.** The samples are texts of many lengths (``calibration_payloads``, from
   an eighth of the input cap to all of it), not one maximum-length text repeated.
2. **Padded-token budgets.** With a cost function (tokens), a candidate of ``n`` items is the
   budget ``n x the longest sample`` padded tokens. The samples are grouped the way the
   batcher groups a backlog: by length, each batch within the budget, so short texts ride in
   larger batches (:func:`group_by_budget`). Without a cost, a candidate is a plain item
   count.
3. **A ceiling stays a ceiling.** A ``GPU_MAX_BATCH_TOKENS`` set by hand caps the candidate
   budgets: they grow up to it, and the first to reach it is the last.
4. **Each candidate** runs ``2 x n`` samples, twice; the faster run counts (the first run of
   a new shape pays for allocator growth and kernel selection). The first run also measures
   the memory the candidate needs, from an emptied cache. The winner's largest batch, in
   items, becomes the item cap: no batch holds more items than calibration ran.

Growth stops once a candidate runs out of memory, falls below 90% of the best so far, or
would not finish within the time budget: each candidate's time is predicted from the last
one measured (or, for the first, from the warm-up), in proportion to its items. A device
too slow for even the first candidate keeps ``GPU_BATCH_SIZE``. CUDA devices get
``GPU_CANDIDATES`` and ``GPU_BUDGET_S``; the CPU gets fewer sizes and a short budget, so a
model that is fast on the CPU (tests, demos) is tuned and a large one is left alone.

When the plan allows more than one replica, the chosen candidate's batches are then run by
the first replica alone and by all of them at once, and the extra replicas are kept only if
they add at least 10%: replicas in threads of one process share the GIL (HF ``generate``
measured slower with more), while CTranslate2's decode loop releases it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import OutOfMemory
from .replicas import Replica

__all__ = ["CPU_BUDGET_S", "CPU_CANDIDATES", "GPU_BUDGET_S", "GPU_CANDIDATES", "TuneReport",
           "group_by_budget", "tune_batch_size", "tune_replicas"]

M = TypeVar("M")
P = TypeVar("P")
log = logging.getLogger("streamproc.autotune")
GPU_CANDIDATES = (48, 64, 96, 128, 192, 256, 384, 512, 768)
GPU_BUDGET_S = 120.0
CPU_CANDIDATES = (48, 96, 192, 384)
CPU_BUDGET_S = 15.0
REPLICA_GAIN_REQUIRED = 1.10
Direct = Callable[[M, list[Any]], Sequence[Any]]


@dataclass(slots=True)
class TuneReport:
    items_per_second: dict[int, float] = field(default_factory=dict)  # by candidate (items)
    peak_activation_gb: dict[int, float] = field(default_factory=dict)
    token_budget: dict[int, int] = field(default_factory=dict)  # padded tokens, with a cost
    batch_size: int | None = None  # the chosen candidate
    max_items: int | None = None  # the most items one batch may hold
    max_batch_tokens: int | None = None  # the chosen budget (None without a cost)
    replicas_items_per_second: dict[int, float] = field(default_factory=dict)  # by count
    replicas: int | None = None
    stopped_because: str = ""
    batches: list[list[Any]] = field(default_factory=list, repr=False)  # the chosen's samples

    def as_dict(self) -> dict[str, Any]:
        return {"items_per_second_by_batch": {str(k): v for k, v in self.items_per_second.items()},
                "peak_activation_gb_by_batch": {
                    str(k): v for k, v in self.peak_activation_gb.items()},
                "token_budget_by_batch": {str(k): v for k, v in self.token_budget.items()},
                "batch_size": self.batch_size, "max_items": self.max_items,
                "max_batch_tokens": self.max_batch_tokens,
                "items_per_second_by_replicas": {
                    str(k): v for k, v in self.replicas_items_per_second.items()},
                "replicas": self.replicas, "stopped_because": self.stopped_because}


def group_by_budget(costs: Sequence[int], budget: int, max_items: int) -> list[list[int]]:
    """Indices of ``costs`` in batches as the batcher forms them from a backlog: sorted by
    length (longest first), each batch's padded size (items x longest) within ``budget`` and
    its items within ``max_items``. An item longer than the budget goes alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(costs)), key=lambda i: costs[i], reverse=True):
        longest = costs[current[0]] if current else costs[index]
        if current and (len(current) + 1 > max_items or (len(current) + 1) * longest > budget):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True, slots=True)
class _Candidate:
    items: int
    budget: int | None
    batches: list[list[Any]]


def _candidates(samples: Sequence[Any], sizes: Sequence[int], cost: Callable[[Any], int] | None,
                ceiling: int | None) -> list[_Candidate]:
    """Each size's samples (the first ``2 x size``, cycling) in batches: by padded-token
    budget with a cost, else in plain chunks of ``size``. Sizes whose budget would pass the
    ceiling stop at it (one candidate at the ceiling)."""
    pool = list(samples)
    costs = [cost(s) for s in pool] if cost is not None else []
    longest = max(1, max(costs, default=1))
    max_items = max(sizes)
    found: list[_Candidate] = []
    for size in sizes:
        chosen = [i % len(pool) for i in range(2 * size)]
        if cost is None:
            found.append(_Candidate(size, None, [[pool[i] for i in chosen[k:k + size]]
                                                 for k in range(0, len(chosen), size)]))
            continue
        budget = size * longest if ceiling is None else min(size * longest, ceiling)
        groups = group_by_budget([costs[i] for i in chosen], budget, max_items)
        found.append(_Candidate(size, budget, [[pool[chosen[k]] for k in g] for g in groups]))
        if ceiling is not None and budget >= ceiling:
            break
    return found


async def tune_batch_size(replica: Replica[M], direct: Direct[M], samples: Sequence[Any],
                          budget_s: float, candidates: Sequence[int] | None = None,
                          warmup: tuple[int, float] | None = None, *,
                          cost: Callable[[Any], int] | None = None,
                          ceiling: int | None = None) -> TuneReport:
    """``warmup``: (items, seconds) of a batch already run, to predict the first candidate's
    time; without it the first candidate always runs. ``cost`` turns candidates into
    padded-token budgets, capped by ``ceiling``."""
    loop = asyncio.get_running_loop()
    report = TuneReport()
    sizes = GPU_CANDIDATES if candidates is None else candidates
    deadline = time.monotonic() + budget_s
    last = warmup
    measured: dict[int, _Candidate] = {}
    for candidate in _candidates(samples, sizes, cost, ceiling):
        size = candidate.items
        items = sum(len(b) for b in candidate.batches)
        if last is not None and last[0] > 0:
            predicted = 2 * last[1] * items / last[0]
            if time.monotonic() + predicted > deadline:
                report.stopped_because = (f"batch {size} would take about {predicted:.1f} s, "
                                          f"past the {budget_s:.0f} s budget")
                break
        try:  # the first run measures memory from an emptied cache; the second runs warm
            runs = [await loop.run_in_executor(replica.executor, replica.timed, direct,
                                               candidate.batches, first) for first in (True, False)]
        except Exception as exc:
            if not OutOfMemory.describes(exc):
                raise
            report.stopped_because = f"batch {size} ran out of memory"
            await replica.release_memory()
            break
        seconds = min(r[0] for r in runs)
        last = (items, seconds)
        measured[size] = candidate
        report.items_per_second[size] = items / seconds
        report.peak_activation_gb[size] = max(r[1] for r in runs)
        if candidate.budget is not None:
            report.token_budget[size] = candidate.budget
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
    chosen = max(report.items_per_second, key=lambda b: report.items_per_second[b])
    report.batch_size = chosen
    report.max_batch_tokens = measured[chosen].budget
    # No batch may hold more items than calibration ran: memory beyond the padded input
    # (the decoder's caches) grows with the items.
    report.max_items = max(len(b) for b in measured[chosen].batches)
    report.batches = measured[chosen].batches
    log.info("autotune: batch %d%s is fastest (%s; %s)", chosen,
             "" if report.max_batch_tokens is None
             else f" ({report.max_batch_tokens} padded tokens, up to {report.max_items} items)",
             ", ".join(f"{b}: {v:.1f}/s" for b, v in report.items_per_second.items()),
             report.stopped_because)
    return report


async def tune_replicas(replicas: Sequence[Replica[M]], direct: Direct[M],
                        batches: list[list[Any]], report: TuneReport,
                        resize: Callable[[int], Awaitable[None]] | None = None) -> int:
    """How many of ``replicas`` (of one device) to keep: all of them only if, each running
    ``batches`` at the same time, they give ``REPLICA_GAIN_REQUIRED`` times the items per
    second of the first one alone. ``resize(n)``, for replicas that share one engine (the
    CTranslate2 backend's translator), sets it up for ``n`` replicas before each side is
    measured, so the one alone has the whole device (on the CPU, every core)."""
    loop = asyncio.get_running_loop()
    items = sum(len(b) for b in batches)

    async def together(group: Sequence[Replica[M]]) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(loop.run_in_executor(r.executor, r.timed, direct, batches)
                               for r in group))
        return len(group) * items / (time.perf_counter() - started)

    if resize is not None:
        await resize(1)
    single = max([await together(replicas[:1]) for _ in range(2)])
    if resize is not None:
        await resize(len(replicas))
    combined = max([await together(replicas) for _ in range(2)])
    report.replicas_items_per_second = {1: single, len(replicas): combined}
    keep = len(replicas) if combined >= REPLICA_GAIN_REQUIRED * single else 1
    report.replicas = keep
    log.info("autotune: %d replicas together give %.1f items/s against %.1f for one; keeping %d",
             len(replicas), combined, single, keep)
    return keep
