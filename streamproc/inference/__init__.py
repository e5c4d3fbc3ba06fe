"""The engine: :class:`GPUWorker` with model replicas planned from free memory, fed by a
pure-asyncio micro-batcher, with per-item fault isolation, calibration at start and worker
statistics.

It knows no summarizer, no Kafka, no transformers and no ctranslate2: a built-in task such as
``TaskEnums.SUMMARIZER`` is bound by import path (:data:`.tasks.BUILT_IN`), and torch is
imported only where the hardware is probed.
"""

from __future__ import annotations

from .batcher import MicroBatcher
from .config import GPUConfig
from .planner import DeviceMemory, DevicePlan, plan_device
from .tasks import TaskEnums
from .worker import GPUWorker

__all__ = ["DeviceMemory", "DevicePlan", "GPUConfig", "GPUWorker", "MicroBatcher", "TaskEnums",
           "plan_device"]
