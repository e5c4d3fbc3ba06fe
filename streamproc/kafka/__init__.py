"""The Kafka layer: clients, topics, the partition lifecycle, fetching, delivery under either
guarantee, and the stream processor that runs the commit protocol over them. It types the
engine against :class:`~streamproc.kafka.worker.TextWorker` alone."""

from __future__ import annotations

from .processor import StreamProcessor
from .worker import TextWorker

__all__ = ["StreamProcessor", "TextWorker"]
