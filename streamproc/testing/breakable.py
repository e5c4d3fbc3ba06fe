"""A model to break on purpose in tests of the service: the identity summarizer, slowed down
per item, that fails every call after a batch holding a marker, as a GPU does after a
device-side assert, or that stalls on a batch holding another marker, as a wedged kernel
does. No torch is needed."""

from __future__ import annotations

import time

from ..inference.worker import GPUWorker
from ..settings import EngineSettings
from ..summarize.base import SummaryWorker, summarize_batch
from ..summarize.identity import IdentitySummarizer

__all__ = ["BreakableModel", "breakable_worker"]


class BreakableModel:
    """The identity summarizer, ``item_delay_s`` slower per item; after a batch holding
    ``break_on`` it fails every call; a batch holding ``stall_on`` takes ``stall_s`` more."""

    def __init__(self, device: str, item_delay_s: float = 0.0, break_on: str | None = None,
                 stall_on: str | None = None, stall_s: float = 0.0) -> None:
        self.inner = IdentitySummarizer(device)
        self.item_delay_s = item_delay_s
        self.break_on = break_on
        self.stall_on = stall_on
        self.stall_s = stall_s
        self.broken = False

    def __call__(self, texts: list[str]) -> list[str]:
        if self.item_delay_s:
            time.sleep(self.item_delay_s * len(texts))
        if self.stall_on is not None and any(self.stall_on in text for text in texts):
            time.sleep(self.stall_s)
        if self.break_on is not None and any(self.break_on in text for text in texts):
            self.broken = True
        if self.broken:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return summarize_batch(self.inner, texts)


def breakable_worker(settings: EngineSettings, item_delay_s: float = 0.0,
                     break_on: str | None = None, stall_on: str | None = None,
                     stall_s: float = 0.0) -> SummaryWorker:
    """A GPUWorker over :class:`BreakableModel` replicas, planned by ``settings``; its probe
    payload is a plain sentence."""
    config = settings.gpu_config(warmup_payloads=("A known good sentence.",))

    def load(device: str) -> BreakableModel:
        return BreakableModel(device, item_delay_s, break_on, stall_on, stall_s)

    return GPUWorker(load, config, BreakableModel.__call__)  # type: ignore[arg-type]
