"""Counters of the engine. ``GPUWorker.get_metrics`` reads them; so will ``/metrics``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["WorkerStats"]


@dataclass(slots=True)
class WorkerStats:
    """Plain counters, touched only from the event loop thread."""

    started_at: float = field(default_factory=time.monotonic)
    total_inferences: int = 0  # items answered with a result
    failures: int = 0  # items answered with an error
    batches: int = 0  # batches taken from the batcher
    batch_items: int = 0  # items in those batches
    model_calls: int = 0  # calls into the model (chunks, retries and splits included)
    inference_seconds: float = 0.0  # wall time inside model calls, summed over replicas
    oom_splits: int = 0
    chunk_retries: int = 0

    def as_dict(self) -> dict[str, float | int]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "total_inferences": self.total_inferences,
            "inferences_per_second": self.total_inferences / elapsed,
            "failures": self.failures,
            "batches": self.batches,
            "mean_batch_size": self.batch_items / self.batches if self.batches else 0.0,
            "model_calls": self.model_calls,
            "inference_seconds": self.inference_seconds,
            "oom_splits": self.oom_splits,
            "chunk_retries": self.chunk_retries,
            "uptime_seconds": elapsed,
        }
