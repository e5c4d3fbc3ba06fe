"""The Kafka pipeline's counters and histograms, owned by the processor (no global
registry); :mod:`streamproc.ops.prometheus` exports them on ``/metrics``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Histogram

from ..inference.stats import SECOND_BUCKETS, histogram

__all__ = ["LATENCY_BUCKETS", "PipelineStats"]

# End to end, a record that waited in a backlog is hours old: the engine's buckets, then on
# to the oldest source timestamp the metric takes (outbound.MAX_SOURCE_AGE_S, 7 days).
LATENCY_BUCKETS = (*SECOND_BUCKETS, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600,
                   12 * 3600, 24 * 3600, 2 * 86400, 4 * 86400, 7 * 86400)


@dataclass(slots=True)
class PipelineStats:
    """Counters of the Kafka pipeline, touched only from the event loop thread."""

    started_at: float = field(default_factory=time.monotonic)
    consumed: int = 0
    produced: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)  # by reason code
    commits: int = 0
    transaction_aborts: int = 0  # transactions aborted (exactly_once)
    dropped_stale: int = 0  # results of a rewound, revoked or stopped partition's records
    backpressure_seconds: float = 0.0  # time the fetch waited for room in the worker
    pauses: int = 0  # waits long enough to pause the partitions
    rebalances: int = 0  # assignments received from the group
    generation: int = -1  # the group generation of the last one
    end_to_end: Histogram = field(default_factory=lambda: histogram(
        "streamproc_end_to_end_latency_seconds", "From the input record's timestamp to the "
        "broker's acknowledgement (or transaction commit) of its output.", LATENCY_BUCKETS))

    def dead_letter(self, reason_code: str) -> None:
        self.dead_letters[reason_code] = self.dead_letters.get(reason_code, 0) + 1

    def answered(self) -> int:
        return self.produced + sum(self.dead_letters.values())

    def as_dict(self) -> dict[str, object]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "consumed": self.consumed,
            "produced": self.produced,
            "dead_letters": dict(self.dead_letters),
            "answered_per_second": self.answered() / elapsed,
            "commits": self.commits,
            "transaction_aborts": self.transaction_aborts,
            "dropped_stale": self.dropped_stale,
            "backpressure_seconds": self.backpressure_seconds,
            "pauses": self.pauses,
            "rebalances": self.rebalances,
            "generation": self.generation,
            "uptime_seconds": elapsed,
        }
