"""streamproc: Kafka news-feed items in, summaries out, on GPUs, continuously.

The engine's names (settings, records, batcher, planner, worker, errors) import eagerly and
bring neither torch nor aiokafka; the parts that do (the summarizer factory, the processor,
the service) load on first use.

Layers, from the bottom (``make lint`` checks them with import-linter):

* ``errors``, ``records``, ``aio``, ``lifecycle``: what every layer may use;
* :mod:`streamproc.inference`: the engine, knowing no summarizer and no Kafka;
* ``settings``: the one settings declaration, in sections;
* :mod:`streamproc.summarize` and :mod:`streamproc.kafka`: the models, and the Kafka layer;
* :mod:`streamproc.ops`: HTTP endpoints, metrics, logs;
* ``service``, ``cli``, :mod:`streamproc.demo`: the process; :mod:`streamproc.testing`:
  helpers for users' tests.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

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
from .inference import (
    DeviceMemory,
    DevicePlan,
    GPUConfig,
    GPUWorker,
    MicroBatcher,
    TaskEnums,
    plan_device,
)
from .records import FeedItem, SourceRef, Summary, decode_feed_item
from .settings import Settings, load_settings

try:
    __version__ = version("streamproc")  # the installed distribution's
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from .kafka.processor import StreamProcessor
    from .service import run_service
    from .summarize.base import Summarizer
    from .summarize.factory import build_worker, load_summarizer

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
    "OutOfMemory",
    "Settings",
    "SourceRef",
    "StreamProcessor",
    "StreamprocError",
    "Summarizer",
    "Summary",
    "TaskEnums",
    "WorkerClosed",
    "__version__",
    "build_worker",
    "decode_feed_item",
    "load_settings",
    "load_summarizer",
    "plan_device",
    "run_service",
]

_LAZY = {
    "build_worker": "summarize.factory",
    "StreamProcessor": "kafka.processor",
    "run_service": "service",
    "Summarizer": "summarize.base",
    "load_summarizer": "summarize.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'streamproc' has no attribute {name!r}")
