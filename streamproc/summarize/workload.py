"""The workload the summarizers are warmed up and calibrated on, and the cheap token estimate
the batcher groups by: texts from the bundled sample feed (``data/sample_feed.jsonl``, ten
short news items, which the demo uses too)."""

from __future__ import annotations

from importlib import resources

from ..records import FeedItem, decode_feed_item

__all__ = ["CALIBRATION_ITEMS", "calibration_texts", "estimate_tokens", "sample_feed",
           "warmup_texts"]


def sample_feed() -> list[FeedItem]:
    """The bundled sample feed (ten short news items) used by the demo and warm-up."""
    raw = resources.files(__package__).joinpath("data/sample_feed.jsonl").read_bytes()
    return [decode_feed_item(line, max_input_bytes=1 << 20) for line in raw.splitlines() if line]


def estimate_tokens(max_input_tokens: int, text: str) -> int:
    """A cheap token count for batching (about four characters a token), capped at the
    truncation length. It runs on the event loop for every item, so it must not tokenize."""
    return min(max_input_tokens, len(text) // 4 + 2)


def warmup_texts(max_input_tokens: int, batch_size: int) -> tuple[str, ...]:
    """A full batch of inputs as long as the model will read, so the warm-up's peak memory
    is the worst case the planner must leave room for."""
    paragraph = " ".join(item.text for item in sample_feed())
    long_text = (paragraph + " ") * (max_input_tokens * 4 // len(paragraph) + 1)
    return (long_text[: max_input_tokens * 4],) * batch_size


CALIBRATION_ITEMS = 1536  # 2 x the largest calibration candidate


def calibration_texts(max_input_tokens: int, count: int = CALIBRATION_ITEMS) -> tuple[str, ...]:
    """Inputs of many lengths, from an eighth of the cap to all of it, for calibration. The
    lengths follow a golden-ratio sequence, so every prefix of the tuple is spread over the
    whole range (calibration takes prefixes)."""
    longest = warmup_texts(max_input_tokens, 1)[0]
    shortest = max(1, len(longest) // 8)
    step = 0.6180339887498949
    return tuple(longest[: shortest + int(((i * step) % 1.0) * (len(longest) - shortest))]
                 for i in range(count))
