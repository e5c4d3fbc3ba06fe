"""streamproc: Kafka news-feed items in, summaries out, on GPUs, continuously.

The light parts (settings, records, batcher, planner, worker, errors) import eagerly; the parts
that pull in torch or aiokafka (summarizers, engine, pipeline, service) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .batcher import MicroBatcher
from .errors import (
    BrokerUnavailable,
    ConfigError,
    InferenceFailed,
    InvalidRecord,
    ItemTooLarge,
    ModelLoadError,
    NoHealthyReplica,
    OutOfMemory,
    StreamprocError,
    WorkerClosed,
)
from .messages import FeedItem, SourceRef, Summary, decode_feed_item
from .offsets import OffsetTracker
from .planner import DeviceMemory, DevicePlan, plan_device
from .settings import GPUConfig, Settings, load_settings
from .tasks import TaskEnums
from .worker import GPUWorker

if TYPE_CHECKING:
    from .engine import build_worker
    from .pipeline import StreamProcessor
    from .service import run_service
    from .summarizers import Summarizer, load_summarizer

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DeviceMemory",
    "DevicePlan",
    "FeedItem",
    "GPUConfig",
    "GPUWorker",
    "InferenceFailed",
    "InvalidRecord",
    "ItemTooLarge",
    "MicroBatcher",
    "ModelLoadError",
    "NoHealthyReplica",
    "OffsetTracker",
    "OutOfMemory",
    "Settings",
    "SourceRef",
    "StreamProcessor",
    "StreamprocError",
    "Summarizer",
    "Summary",
    "TaskEnums",
    "WorkerClosed",
    "build_worker",
    "decode_feed_item",
    "load_settings",
    "load_summarizer",
    "plan_device",
    "run_service",
]

_LAZY = {
    "build_worker": "engine",
    "StreamProcessor": "pipeline",
    "run_service": "service",
    "Summarizer": "summarizers",
    "load_summarizer": "summarizers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'streamproc' has no attribute {name!r}")
