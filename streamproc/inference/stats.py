"""The engine's counters and histograms.

They are plain attributes and unregistered ``prometheus_client`` histograms, owned by the
worker (no global registry). ``GPUWorker.get_metrics()`` reads them, and
:mod:`streamproc.ops.prometheus` exports the very same objects on ``/metrics``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Histogram

__all__ = ["SECOND_BUCKETS", "WorkerStats", "histogram"]

_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
_TOKEN_BUCKETS = tuple(2.0**i for i in range(6, 21))
SECOND_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, doc, buckets=buckets, registry=None)


@dataclass(slots=True)
class WorkerStats:
    """Touched only from the event loop thread."""

    started_at: float = field(default_factory=time.monotonic)
    total_inferences: int = 0  # items answered with a result
    failures: int = 0  # items answered with an error
    batches: int = 0  # batches taken from the batcher
    batch_items: int = 0  # items in those batches
    model_calls: int = 0  # calls into the model (chunks, retries and splits included)
    inference_seconds: float = 0.0  # wall time inside model calls, summed over replicas
    oom_splits: int = 0
    chunk_retries: int = 0
    queue_wait: Histogram = field(default_factory=lambda: histogram(
        "streamproc_queue_wait_seconds", "How long the oldest item of each batch waited in the "
        "queue before the batch was dispatched.", SECOND_BUCKETS))
    batch_size_items: Histogram = field(default_factory=lambda: histogram(
        "streamproc_batch_size_items", "Items per dispatched batch.", _ITEM_BUCKETS))
    batch_size_tokens: Histogram = field(default_factory=lambda: histogram(
        "streamproc_batch_size_tokens", "Estimated input tokens per dispatched batch.",
        _TOKEN_BUCKETS))
    batch_inference: Histogram = field(default_factory=lambda: histogram(
        "streamproc_batch_inference_seconds", "Wall time of one model call.", SECOND_BUCKETS))

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
