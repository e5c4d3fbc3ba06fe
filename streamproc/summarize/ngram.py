"""Decoding helpers that keep generation on the device.

:class:`DeviceNoRepeatNGram` does what transformers' ``no_repeat_ngram_size`` does, but as a
few tensor operations with no host synchronisation: HF's own processor walks every
hypothesis in Python on the CPU at every step, which the seed document's measurements showed costs
more than the model at large batches.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

__all__ = ["DeviceNoRepeatNGram", "banned_ngram_mask"]


def banned_ngram_mask(input_ids: torch.Tensor, ngram_size: int, vocab_size: int) -> torch.Tensor:
    """A ``(batch, vocab)`` boolean mask of the tokens that would repeat an n-gram already in
    each row of ``input_ids`` (``(batch, length)``)."""
    batch, length = input_ids.shape
    mask = torch.zeros((batch, vocab_size), dtype=torch.bool, device=input_ids.device)
    if ngram_size <= 0 or length < ngram_size:
        return mask
    windows = input_ids.unfold(1, ngram_size, 1)  # (batch, length - n + 1, n)
    prefix = input_ids[:, length - ngram_size + 1:]  # the last n - 1 tokens
    matches = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (batch, windows)
    hits = torch.zeros((batch, vocab_size), dtype=torch.int32, device=input_ids.device)
    hits.scatter_add_(1, windows[:, :, -1], matches.to(torch.int32))
    return hits > 0


class DeviceNoRepeatNGram(LogitsProcessor):  # type: ignore[misc]
    """Forbid repeating any n-gram of ``ngram_size`` tokens, computed on the scores' device."""

    def __init__(self, ngram_size: int) -> None:
        if ngram_size <= 0:
            raise ValueError("ngram_size must be positive")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = banned_ngram_mask(input_ids, self.ngram_size, scores.shape[-1])
        return scores.masked_fill(mask, -float("inf"))
