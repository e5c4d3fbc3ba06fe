"""Counters of the engine. ``GPUWorker.get_metrics`` reads them; so will ``/metrics``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["PipelineStats", "WorkerStats"]


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


@dataclass(slots=True)
class PipelineStats:
    """Counters of the Kafka pipeline, touched only from the event loop thread."""

    started_at: float = field(default_factory=time.monotonic)
    consumed: int = 0
    produced: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)  # by reason code
    commits: int = 0
    send_retries: int = 0
    dropped_after_revoke: int = 0
    paused: bool = False

    def dead_letter(self, reason_code: str) -> None:
        self.dead_letters[reason_code] = self.dead_letters.get(reason_code, 0) + 1

    def as_dict(self) -> dict[str, object]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        answered = self.produced + sum(self.dead_letters.values())
        return {
            "consumed": self.consumed,
            "produced": self.produced,
            "dead_letters": dict(self.dead_letters),
            "answered_per_second": answered / elapsed,
            "commits": self.commits,
            "send_retries": self.send_retries,
            "dropped_after_revoke": self.dropped_after_revoke,
            "paused": self.paused,
            "uptime_seconds": elapsed,
        }
