"""The summarization engine: a GPUWorker wired to the configured summarizer."""

from __future__ import annotations

import functools
from importlib import resources

from .ct2 import SharedTranslators
from .messages import FeedItem, decode_feed_item
from .planner import replica_cap
from .settings import GPUConfig, Settings
from .summarizers import Summarizer, load_summarizer, prepare_batch, run_prepared
from .worker import GPUWorker

__all__ = ["SummaryWorker", "build_worker", "calibration_texts", "estimate_tokens", "sample_feed",
           "warmup_texts"]

SummaryWorker = GPUWorker[Summarizer, str, str]


def sample_feed() -> list[FeedItem]:
    """The bundled sample feed (ten short news items) used by the demo and warm-up."""
    raw = resources.files("streamproc").joinpath("data/sample_feed.jsonl").read_bytes()
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


def build_worker(settings: Settings) -> SummaryWorker:
    config = GPUConfig.from_settings(
        settings,
        warmup_payloads=warmup_texts(settings.max_input_tokens, settings.gpu_batch_size),
        calibration_payloads=(calibration_texts(settings.max_input_tokens)
                              if settings.autotune_enabled else ()))
    # The CTranslate2 backend's replicas on a device share one translator, with a worker
    # for each replica loaded there, at most as many as the settings allow.
    translators = SharedTranslators(replica_cap(config)[0])
    return GPUWorker(
        functools.partial(load_summarizer, settings, translators=translators),
        config,
        run_prepared,
        prepare=prepare_batch,
        cost=functools.partial(estimate_tokens, settings.max_input_tokens),
    )


def feed_lines(path: str) -> list[bytes]:
    """Non-empty lines of a JSON-lines file, as bytes."""
    with open(path, "rb") as handle:
        return [line.rstrip(b"\r\n") for line in handle if line.strip()]


