"""The abstractive summarizer: a Hugging Face encoder-decoder (BART, PEGASUS, T5, ...).

A batch runs in two steps so the worker can overlap them: :meth:`Seq2SeqSummarizer.prepare`
tokenizes, sorts by length and pads on the CPU (into pinned memory on CUDA), while the
previous batch's :meth:`Seq2SeqSummarizer.run` generates on the device. ``no_repeat_ngram_size``
is applied on the device (:mod:`streamproc.decoding`) instead of by HF's CPU loop, and
``GPU_STATIC_CACHE`` turns on HF's static KV cache (compiled decoding) with a clean fallback.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, LogitsProcessorList

from .checkpoints import load_pretrained, torch_dtype
from .decoding import DeviceNoRepeatNGram
from .settings import Settings

__all__ = ["MAX_CHARS_PER_TOKEN", "PreparedBatch", "Seq2SeqSummarizer", "generation_overrides"]

log = logging.getLogger("streamproc.seq2seq")
# A token is rarely longer than this many characters; texts are cut to
# ``max_tokens * MAX_CHARS_PER_TOKEN`` characters before tokenizing so huge inputs stay cheap.
MAX_CHARS_PER_TOKEN = 16


def generation_overrides(settings: Settings) -> dict[str, Any]:
    """The ``GEN_*`` settings that are set, as ``GenerationConfig`` field names."""
    values = {
        "num_beams": settings.gen_num_beams,
        "min_length": settings.gen_min_length,
        "max_length": settings.gen_max_length,
        "length_penalty": settings.gen_length_penalty,
        "no_repeat_ngram_size": settings.gen_no_repeat_ngram_size,
    }
    return {key: value for key, value in values.items() if value is not None}


@dataclass(slots=True)
class PreparedBatch:
    """A tokenized, length-sorted, padded batch; ``inputs`` is None when every text is empty."""

    size: int
    todo: list[int]  # positions of the non-empty texts
    order: list[int]  # rows of ``inputs`` -> index into ``todo``
    inputs: dict[str, torch.Tensor] | None


class Seq2SeqSummarizer:
    """An abstractive encoder-decoder summarizer (default ``facebook/bart-large-cnn``)."""

    def __init__(
        self, model: Any, tokenizer: Any, *, model_name: str, device: str = "cpu",
        max_input_tokens: int = 1024, generation: Mapping[str, Any] | None = None,
        static_cache: bool = False,
    ) -> None:
        """Wrap a loaded model (already on ``device``) and its tokenizer."""
        self.model_name = model_name
        self.device = device
        self.tokenizer = tokenizer
        self.model = model
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not thread-safe
        pad_id = self.tokenizer.pad_token_id
        self._pad_id = int(pad_id if pad_id is not None else self.model.config.pad_token_id or 0)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_input_tokens = min(max_input_tokens, limit) if limit else max_input_tokens
        config = copy.deepcopy(self.model.generation_config)
        overrides = dict(generation or {})
        if "max_length" in overrides:
            config.max_new_tokens = None  # would otherwise win over max_length
        if "min_length" in overrides:
            config.min_new_tokens = None
        config.update(**overrides)
        config.validate()
        self.generation_config = config  # what generation means; _call_config is how it runs
        self.static_cache = static_cache and device.startswith("cuda")
        self._configure_call()

    @classmethod
    def load(
        cls, model_name: str, device: str = "cpu", *, max_input_tokens: int = 1024,
        use_fp16: bool = False, generation: Mapping[str, Any] | None = None,
        static_cache: bool = False,
    ) -> Seq2SeqSummarizer:
        """Load ``model_name`` (a directory, the HF cache or the Hub) onto ``device``."""
        dtype = torch_dtype(device, use_fp16)

        def load(source: str, local_only: bool) -> tuple[Any, Any]:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            model = AutoModelForSeq2SeqLM.from_pretrained(
                source, local_files_only=local_only, dtype=dtype
            )
            return tokenizer, model

        tokenizer, model = load_pretrained(model_name, load)
        return cls(model.to(device).eval(), tokenizer, model_name=model_name, device=device,
                   max_input_tokens=max_input_tokens, generation=generation,
                   static_cache=static_cache)

    def _configure_call(self) -> None:
        config = copy.deepcopy(self.generation_config)
        self._processors = LogitsProcessorList()
        if config.no_repeat_ngram_size:
            self._processors.append(DeviceNoRepeatNGram(int(config.no_repeat_ngram_size)))
            config.no_repeat_ngram_size = 0
        if config.num_beams == 1:  # beam-only flags would only draw warnings from generate
            config.early_stopping = False
            config.length_penalty = 1.0
        if self.static_cache:
            config.cache_implementation = "static"
        self._call_config = config

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        cut = self.max_input_tokens * MAX_CHARS_PER_TOKEN
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                [text[:cut] for text in texts], truncation=True, max_length=self.max_input_tokens
            )
        return [list(ids) for ids in encoded["input_ids"]]

    def token_length(self, text: str) -> int:
        """Tokens the encoder will see (special tokens included, truncated to the input cap)."""
        return len(self._encode([text])[0])

    def prepare(self, texts: Sequence[str]) -> PreparedBatch:
        """Tokenize, sort by length (longest first) and pad, on the CPU."""
        todo = [i for i, text in enumerate(texts) if text.strip()]
        if not todo:
            return PreparedBatch(len(texts), [], [], None)
        rows = self._encode([texts[i] for i in todo])
        order = sorted(range(len(todo)), key=lambda k: len(rows[k]), reverse=True)
        width = len(rows[order[0]])
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for position, k in enumerate(order):
            ids[position, : len(rows[k])] = torch.tensor(rows[k], dtype=torch.long)
            mask[position, : len(rows[k])] = 1
        if self.device.startswith("cuda"):
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return PreparedBatch(len(texts), todo, order, {"input_ids": ids, "attention_mask": mask})

    def run(self, batch: PreparedBatch) -> list[str]:
        """Generate and decode a prepared batch; summaries in input order."""
        summaries = [""] * batch.size
        if batch.inputs is None:
            return summaries
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.inputs.items()}
        output = self._generate(inputs)
        with self._tokenizer_lock:
            decoded = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        for position, k in enumerate(batch.order):
            summaries[batch.todo[k]] = decoded[position].strip()
        return summaries

    def _generate(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        try:
            with torch.inference_mode():
                return self.model.generate(**inputs, generation_config=self._call_config,
                                           logits_processor=self._processors)
        except Exception as exc:
            if not self.static_cache or type(exc).__name__ == "OutOfMemoryError":
                raise
            log.warning("static KV cache unsupported for %s (%s: %s); using the dynamic cache",
                        self.model_name, type(exc).__name__, exc)
            self.static_cache = False
            self._configure_call()
            return self._generate(inputs)

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """Summaries in input order; empty or whitespace-only texts give ``""``."""
        return self.run(self.prepare(texts))
