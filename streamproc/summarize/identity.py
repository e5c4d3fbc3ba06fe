"""The identity summarizer: the first sentence of each text, with no model. It measures the
pipeline alone, and stands in for a model in tests."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Unprepared
from .sentences import first_sentence

__all__ = ["IdentitySummarizer"]


class IdentitySummarizer(Unprepared):
    """The first sentence of each text. No model; measures the pipeline alone."""

    def __init__(self, device: str = "cpu") -> None:
        self.model_name = "identity"
        self.device = device

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """The first sentence of each text, ``""`` for empty text."""
        return [first_sentence(text) for text in texts]

    def token_length(self, text: str) -> int:
        """Whitespace-separated words."""
        return len(text.split())
