"""One model replica: a model on a device, with its own thread, and its health.

The thread is bound to the replica's CUDA device when it starts, so a model call on it
allocates on that device whichever GPU it is. Device memory is measured as the allocator
*reserves* it (:class:`MemoryWatch`), not as tensors hold it: what the planner must leave
room for is what the process takes from the card.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .config import GPUConfig
from .planner import GIB

__all__ = ["MemoryWatch", "Replica", "measure_warmup", "warmup_items"]

M = TypeVar("M")
log = logging.getLogger("streamproc.replicas")
CPU_WARMUP_ITEMS = 2


def _bind_thread(device: str) -> None:
    """A replica thread's initializer: make ``device`` the thread's current CUDA device."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


class MemoryWatch:
    """The device memory a stretch of model work needs, on the calling thread: the growth of
    torch's peak *reserved* memory over a cache emptied at the start, or the drop in the
    driver's free memory (which sees allocators other than torch's, such as CTranslate2's),
    whichever is larger. Zero on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self._reserved = 0
        self._free = 0

    def start(self) -> MemoryWatch:
        """Empty torch's cache and take the baselines the peak is measured from."""
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._reserved = torch.cuda.memory_reserved(self.device)
            self._free = torch.cuda.mem_get_info(torch.device(self.device))[0]
        return self

    def synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def peak_gb(self) -> float:
        if not self.cuda:
            return 0.0
        import torch

        reserved = torch.cuda.max_memory_reserved(self.device) - self._reserved
        driver = self._free - torch.cuda.mem_get_info(torch.device(self.device))[0]
        return float(max(reserved, driver, 0)) / GIB


@dataclass(slots=True)
class Replica(Generic[M]):
    index: int
    device: str
    model: M
    executor: ThreadPoolExecutor
    healthy: bool = True
    consecutive_blames: int = 0
    blames: int = 0
    last_error: str | None = None
    busy_since: float | None = None  # monotonic start of the model call in progress

    @property
    def name(self) -> str:
        return f"replica {self.index} on {self.device}"

    @classmethod
    async def load(cls, loader: Callable[[str], M], device: str, index: int,
                   loop: asyncio.AbstractEventLoop) -> Replica[M]:
        """Build the model on the replica's own thread, which later runs all its batches."""
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"replica-{index}-{device}",
                                      initializer=_bind_thread, initargs=(device,))
        try:
            model = await loop.run_in_executor(executor, loader, device)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        log.info("loaded replica %d on %s", index, device)
        return cls(index, device, model, executor)

    def blame(self, exc: BaseException, max_failures: int) -> None:
        self.blames += 1
        self.consecutive_blames += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.healthy and self.consecutive_blames >= max_failures:
            self.healthy = False
            log.error("%s taken out of rotation after %d failures in a row; last: %s",
                      self.name, self.consecutive_blames, self.last_error)

    def broken(self, exc: BaseException) -> None:
        """It failed a known-good probe: out of the rotation for good."""
        self.last_error = f"failed a health probe: {type(exc).__name__}: {exc}"
        if self.healthy:
            self.healthy = False
            log.error("%s taken out of rotation: %s", self.name, self.last_error)

    def succeeded(self) -> None:
        self.consecutive_blames = 0

    def timed(self, direct: Callable[[M, list[Any]], Sequence[Any]], batches: list[list[Any]],
              measure_memory: bool = False) -> tuple[float, float]:
        """Run ``batches`` in turn, on the calling thread (the replica's own): the seconds,
        and with ``measure_memory`` (from an emptied cache) the peak memory in GiB."""
        watch = MemoryWatch(self.device)
        if measure_memory:
            watch.start()
        started = time.perf_counter()
        for batch in batches:
            direct(self.model, batch)
        watch.synchronize()
        return time.perf_counter() - started, watch.peak_gb() if measure_memory else 0.0

    async def release_memory(self) -> None:
        """After running out of memory: hand torch's cached blocks back to the card, so the
        retry (and any other process) has the room it needs."""
        if self.device.startswith("cuda"):
            import torch

            await asyncio.get_running_loop().run_in_executor(self.executor, torch.cuda.empty_cache)

    def retire(self) -> None:
        """Leave the rotation for good and free the model (autotune found it not worth it)."""
        self.healthy = False
        self.executor.shutdown(wait=False)
        self.model = None  # type: ignore[assignment]
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        engine = getattr(self.model, "describe", None)  # the built-in summarizers say theirs
        return {"index": self.index, "device": self.device, "healthy": self.healthy,
                "blames": self.blames, "last_error": self.last_error,
                "engine": engine() if callable(engine) else None}


def warmup_items(device: str, config: GPUConfig) -> int:
    """How many items the warm-up batch holds on ``device`` (0 when it does not run)."""
    if not config.enable_warmup:
        return 0
    count = len(config.warmup_payloads)
    return count if device.startswith("cuda") else min(count, CPU_WARMUP_ITEMS)


async def measure_warmup(replica: Replica[M], task: Callable[[M, list[Any]], Sequence[Any]],
                         config: GPUConfig, loop: asyncio.AbstractEventLoop) -> float:
    """Run the warm-up batch (when enabled); return its peak activation memory in GiB."""
    if not config.enable_warmup:
        return 0.0
    payloads = list(config.warmup_payloads)
    if not payloads:
        log.warning("%s: GPU_ENABLE_WARMUP is set but no warm-up payloads were given", replica.name)
        return 0.0

    # no VRAM to plan from on the CPU: a short batch only loads the code paths
    payloads = payloads[:warmup_items(replica.device, config)]

    _, peak = await loop.run_in_executor(replica.executor, replica.timed, task, [payloads], True)
    log.info("%s warmed up on %d items (peak activations %.2f GiB)", replica.name,
             len(payloads), peak)
    return peak
