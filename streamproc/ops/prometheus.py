"""The Prometheus collector behind ``/metrics``.

Metric names live in the ``streamproc_`` namespace, with units in their names. Counters and
gauges are read at scrape time from the same objects ``get_metrics()`` reads; histograms are
the worker's and the processor's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..kafka.processor import StreamProcessor
    from ..summarize.base import SummaryWorker

__all__ = ["registry"]


def registry(worker: SummaryWorker, processor: StreamProcessor | None) -> CollectorRegistry:
    """A registry of its own (no global state) that reads ``worker`` and ``processor``."""
    found = CollectorRegistry(auto_describe=False)
    found.register(_Collector(worker, processor))
    return found


class _Collector(Collector):
    def __init__(self, worker: SummaryWorker, processor: StreamProcessor | None) -> None:
        self.worker = worker
        self.processor = processor

    def collect(self) -> Iterator[Metric]:
        worker, processor = self.worker, self.processor
        ws = worker.stats
        yield CounterMetricFamily("streamproc_inferences", "Items the model answered.",
                                  value=ws.total_inferences)
        yield CounterMetricFamily("streamproc_inference_failures", "Items that failed in the "
                                  "model for good.", value=ws.failures)
        yield CounterMetricFamily("streamproc_oom_splits", "Batches split after running out "
                                  "of device memory.", value=ws.oom_splits)
        yield GaugeMetricFamily("streamproc_queue_depth_items", "Items waiting in the worker's "
                                "queue.", value=worker.queue_depth())
        replicas = GaugeMetricFamily("streamproc_replicas", "Healthy model replicas.",
                                     labels=["device"])
        for device, count in worker.get_metrics()["replicas_per_device"].items():
            replicas.add_metric([device], count)
        yield replicas
        planned = GaugeMetricFamily("streamproc_replicas_planned", "Model replicas the "
                                    "start-up plan placed.", labels=["device"])
        for plan in worker.plan:
            planned.add_metric([plan.device], plan.replicas)
        yield planned
        yield GaugeMetricFamily("streamproc_longest_model_call_seconds", "How long the oldest "
                                "model call in progress has run (0 when idle); /healthz fails "
                                "past HEALTH_BATCH_DEADLINE_S.",
                                value=worker.longest_running_call_s())
        yield from self._gpu_memory()
        for histogram in (ws.queue_wait, ws.batch_size_items, ws.batch_size_tokens,
                          ws.batch_inference):
            yield from histogram.collect()
        if processor is None:
            return
        ps = processor.stats
        yield CounterMetricFamily("streamproc_items_consumed", "Records read from the input "
                                  "topic.", value=ps.consumed)
        yield CounterMetricFamily("streamproc_summaries_produced", "Summaries safely written.",
                                  value=ps.produced)
        dead = CounterMetricFamily("streamproc_dead_letters", "Records written to the "
                                   "dead-letter topic.", labels=["reason"])
        for reason, count in sorted(ps.dead_letters.items()):
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily("streamproc_commits", "Offset commits (or committed "
                                  "transactions).", value=ps.commits)
        yield CounterMetricFamily("streamproc_transaction_aborts", "Transactions aborted "
                                  "(exactly_once).", value=ps.transaction_aborts)
        yield CounterMetricFamily("streamproc_partition_pauses", "Fetch waits for room in "
                                  "the worker's queue long enough to pause the partitions.",
                                  value=ps.pauses)
        yield GaugeMetricFamily("streamproc_fatal_stop", "1 once a fault not a record's own "
                                "has stopped the processor (/healthz fails), else 0.",
                                value=int(processor.fatal is not None))
        yield CounterMetricFamily("streamproc_backpressure_seconds", "Time the fetch waited "
                                  "for room in the worker's queue.",
                                  value=ps.backpressure_seconds)
        yield CounterMetricFamily("streamproc_rebalances", "Assignments this member received "
                                  "from its consumer group.", value=ps.rebalances)
        yield GaugeMetricFamily("streamproc_group_generation", "The consumer group generation "
                                "of this member's last assignment.", value=ps.generation)
        yield from ps.end_to_end.collect()
        lag = GaugeMetricFamily("streamproc_consumer_lag_records", "High-water mark minus the "
                                "consumer's position.", labels=["topic", "partition"])
        for tp, value in sorted(processor.lag.lag.items()):
            lag.add_metric([tp.topic, str(tp.partition)], value)
        yield lag
        yield GaugeMetricFamily("streamproc_assigned_partitions", "Input partitions assigned "
                                "to this process.", value=len(processor.assigned))

    def _gpu_memory(self) -> Iterator[Metric]:
        devices = sorted({r.device for r in self.worker.replicas if r.device != "cpu"})
        if not devices:
            return
        import torch

        used = GaugeMetricFamily("streamproc_gpu_memory_used_bytes", "Memory allocated by "
                                 "tensors of this process.", labels=["device"])
        reserved = GaugeMetricFamily("streamproc_gpu_memory_reserved_bytes", "Memory held by "
                                     "this process's caching allocator.", labels=["device"])
        for device in devices:
            used.add_metric([device], torch.cuda.memory_allocated(device))
            reserved.add_metric([device], torch.cuda.memory_reserved(device))
        yield used
        yield reserved
        planned = GaugeMetricFamily("streamproc_gpu_memory_planned_bytes", "Memory the "
                                    "start-up plan gave the replicas: weights and activations "
                                    "of each.", labels=["device"])
        for plan in self.worker.plan:
            if plan.device in devices:
                planned.add_metric([plan.device], plan.planned_bytes())
        yield planned
