"""``TaskEnums.SUMMARIZER``: the built-in summarization task of a
:class:`~streamproc.inference.worker.GPUWorker` built by its user, as the seed document's
usage does: ``GPUWorker(model_loader, GPUConfig(...), TaskEnums.SUMMARIZER)``.

It summarizes with the loader's Hugging Face seq2seq model. The loader returns the model, or
``(model, tokenizer)``; without a tokenizer, the one saved with the model (its
``name_or_path``) is loaded. Payloads are strings, or feed items (dicts or objects) with a
``text`` string; results are summaries, in payload order. Inputs are truncated to
``DEFAULT_MAX_INPUT_TOKENS`` and the checkpoint's own generation config applies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidRecord, ModelLoadError
from ..inference.config import GPUConfig
from ..inference.tasks import BoundTask, place, takes_device
from ..settings import CHARS_PER_TOKEN_CAP, DEFAULT_MAX_INPUT_TOKENS, DEFAULT_MAX_SUMMARY_CHARS
from .base import prepare_batch, run_prepared
from .workload import calibration_texts, estimate_tokens, warmup_texts

__all__ = ["bind_summarizer", "payload_text"]


def payload_text(payload: Any) -> str:
    """The text of a payload: a string, or a feed item (dict or object) with a ``text``."""
    if isinstance(payload, str):
        return payload
    text = payload.get("text") if isinstance(payload, Mapping) else getattr(payload, "text", None)
    if not isinstance(text, str):
        raise InvalidRecord("a summarizer payload is a string, or a feed item with a 'text' "
                            f"string; got {type(payload).__name__}", "invalid_payload")
    return text


def bind_summarizer(model_loader: Callable[..., Any],
                    config: GPUConfig) -> BoundTask[Any, Any, str]:
    """The worker's loader, task, prepare step and cost for ``TaskEnums.SUMMARIZER``."""
    max_tokens = DEFAULT_MAX_INPUT_TOKENS
    if config.enable_warmup and not config.warmup_payloads:
        config = config.model_copy(
            update={"warmup_payloads": warmup_texts(max_tokens, config.batch_size)})
    if config.autotune and not config.calibration_payloads:
        config = config.model_copy(
            update={"calibration_payloads": calibration_texts(max_tokens)})

    def cost(payload: Any) -> int:
        try:
            return estimate_tokens(max_tokens, payload_text(payload))
        except InvalidRecord:
            return 1  # it fails alone when its batch runs

    return BoundTask(config, functools.partial(_load_summarizer, model_loader, config.use_fp16,
                                               max_tokens),
                     functools.partial(run_prepared, max_chars=DEFAULT_MAX_SUMMARY_CHARS),
                     _prepare, cost)


def _load_summarizer(model_loader: Callable[..., Any], use_fp16: bool, max_tokens: int,
                     device: str) -> Any:
    from .pretrained import load_pretrained
    from .seq2seq import Seq2SeqSummarizer

    zero_args = not takes_device(model_loader)
    built = model_loader() if zero_args else model_loader(device)
    model, tokenizer = built if isinstance(built, tuple) else (built, None)
    if zero_args:
        model = place(model, device, use_fp16)
    name = str(getattr(model, "name_or_path", "") or "")
    if tokenizer is None:
        if not name:
            raise ModelLoadError("TaskEnums.SUMMARIZER needs a tokenizer: return (model, "
                                 "tokenizer) from the loader, or a model from from_pretrained")
        from transformers import AutoTokenizer

        tokenizer = load_pretrained(name, lambda source, local_only: AutoTokenizer.from_pretrained(
            source, local_files_only=local_only))
    return Seq2SeqSummarizer(model, tokenizer, model_name=name or "model", device=device,
                             max_input_tokens=max_tokens)


def _prepare(model: Any, payloads: list[Any]) -> Any:
    return prepare_batch(model, [payload_text(p) for p in payloads],
                         DEFAULT_MAX_INPUT_TOKENS * CHARS_PER_TOKEN_CAP)
