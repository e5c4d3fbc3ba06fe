"""One model replica: a model on a device, with its own thread, and its health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import OutOfMemory
from .planner import GIB
from .settings import GPUConfig

__all__ = ["Replica", "is_out_of_memory", "measure_warmup", "warmup_items"]

M = TypeVar("M")
log = logging.getLogger("streamproc.replicas")
CPU_WARMUP_ITEMS = 2


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (checked by name: no torch import here), or ours."""
    if isinstance(exc, OutOfMemory):
        return True
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


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
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"replica-{index}-{device}")
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

    def retire(self) -> None:
        """Leave the rotation for good and free the model (autotune found it not worth it)."""
        self.healthy = False
        self.executor.shutdown(wait=False)
        self.model = None  # type: ignore[assignment]
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "device": self.device, "healthy": self.healthy,
                "blames": self.blames, "last_error": self.last_error}


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

    on_gpu = replica.device.startswith("cuda")
    # no VRAM to plan from on the CPU: a short batch only loads the code paths
    payloads = payloads[:warmup_items(replica.device, config)]

    def run() -> float:
        if not on_gpu:
            task(replica.model, payloads)
            return 0.0
        import torch

        device = torch.device(replica.device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        task(replica.model, payloads)
        torch.cuda.synchronize(device)
        return float(max(torch.cuda.max_memory_allocated(device) - base, 0)) / GIB

    peak = await loop.run_in_executor(replica.executor, run)
    log.info("%s warmed up on %d items (peak activations %.2f GiB)", replica.name,
             len(payloads), peak)
    return peak
