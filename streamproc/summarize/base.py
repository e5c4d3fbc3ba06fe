"""What every summarizer is, and the worker's entry points into one.

A summarizer is one loaded model on one device (:class:`Summarizer`). The worker runs a
batch in two steps, so that it can overlap them: ``prepare`` (CPU work: tokenizing, padding)
on a thread of its own, then ``run`` (the device work) on the replica's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import InferenceFailed
from ..inference.worker import GPUWorker

__all__ = ["Summarizer", "SummaryWorker", "Unprepared", "prepare_batch", "run_prepared",
           "summarize_batch"]


class Summarizer(Protocol):
    """What a worker replica holds: one loaded model on one device."""

    model_name: str
    device: str

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """One summary per text, in input order."""
        ...

    def token_length(self, text: str) -> int:
        """A cheap estimate of the work ``text`` costs, in tokens (for length bucketing)."""
        ...

    def prepare(self, texts: Sequence[str]) -> Any:
        """CPU-side work for a batch (tokenizing, padding), run ahead on another thread."""
        ...

    def run(self, prepared: Any) -> list[str]:
        """The device work for a prepared batch: one summary per text, in input order."""
        ...


class Unprepared:
    """For summarizers with no separate CPU step: ``prepare`` hands the texts through."""

    def summarize(self, texts: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def prepare(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def run(self, prepared: list[str]) -> list[str]:
        return self.summarize(prepared)


def summarize_batch(model: Summarizer, texts: Sequence[str]) -> list[str]:
    """``model.summarize(texts)``, checked to give one output per input."""
    summaries = model.summarize(texts)
    if len(summaries) != len(texts):
        raise InferenceFailed(
            f"{model.model_name} returned {len(summaries)} summaries for {len(texts)} texts"
        )
    return summaries


def prepare_batch(model: Summarizer, texts: list[str], max_chars: int | None = None) -> Any:
    """The worker's ``prepare`` step: CPU work, run ahead of the device. Each text is cut to
    ``max_chars`` (``MAX_INPUT_CHARS``) first, before any tokenizer or sentence splitter sees
    it, so no input costs a summarizer more than a text of that length."""
    if max_chars is not None:
        texts = [text[:max_chars] for text in texts]
    return model.prepare(texts)


def run_prepared(model: Summarizer, prepared: Any, max_chars: int | None = None) -> list[str]:
    """The worker's ``task``: the device work for a prepared batch; each summary cut to
    ``max_chars`` (``MAX_SUMMARY_CHARS``)."""
    summaries = model.run(prepared)
    if max_chars is None:
        return summaries
    return [summary[:max_chars] for summary in summaries]


SummaryWorker = GPUWorker[Summarizer, str, str]
