"""Summarization: the summarizers (seq2seq on HF ``generate`` or CTranslate2, extractive,
identity), loading checkpoints without hanging on the Hub, converting to CTranslate2, n-gram
blocking on the device, sentence splitting, the warm-up and calibration workload, and the
factory that wires them into a :class:`~streamproc.inference.worker.GPUWorker`.

The submodules import torch and transformers; import them where they are needed.
"""

from __future__ import annotations

__all__: list[str] = []
