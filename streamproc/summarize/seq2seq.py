"""The abstractive summarizer on HF ``generate``, and what both seq2seq backends share.

A batch runs in two steps so the worker can overlap them: :meth:`Seq2SeqSummarizer.prepare`
tokenizes, sorts by length and pads on the CPU (into pinned memory on CUDA), while the
previous batch's :meth:`Seq2SeqSummarizer.run` generates on the device. ``no_repeat_ngram_size``
is applied on the device (:mod:`streamproc.summarize.ngram`) instead of by HF's CPU loop, and
``GPU_STATIC_CACHE`` turns on HF's static KV cache (compiled decoding) with a clean fallback.
transformers 5 builds the static cache inside each ``generate`` call, so after an
out-of-memory nothing of it stays on the model: :meth:`Seq2SeqSummarizer._generate` raises
outside its ``except`` block so the failed call's frames (and the cache) are freed, and the
worker empties torch's cache before it retries.

Shared with the CTranslate2 backend (:mod:`.ct2`): :class:`SourceTokenizer` (input truncation,
length sorting, decoding, order restored) and :func:`resolved_generation` (the ``GEN_*``
settings over the checkpoint's generation config).
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

from ..errors import OutOfMemory
from ..settings import CHARS_PER_TOKEN_CAP, ModelSettings
from .ngram import DeviceNoRepeatNGram
from .pretrained import load_pretrained, torch_dtype

__all__ = [
    "MAX_CHARS_PER_TOKEN", "PreparedBatch", "Seq2SeqSummarizer", "SortedRows", "SourceTokenizer",
    "generation_overrides", "resolved_generation",
]

log = logging.getLogger("streamproc.seq2seq")
CUDA_PAD_MULTIPLE = 8  # inputs padded to a multiple of this on CUDA: repeating shapes
# A token is rarely longer than this many characters; texts are cut to
# ``max_tokens * MAX_CHARS_PER_TOKEN`` characters before tokenizing so huge inputs stay cheap.
MAX_CHARS_PER_TOKEN = CHARS_PER_TOKEN_CAP


def generation_overrides(settings: ModelSettings) -> dict[str, Any]:
    """The ``GEN_*`` settings that are set, as ``GenerationConfig`` field names."""
    values = {
        "num_beams": settings.gen_num_beams,
        "min_length": settings.gen_min_length,
        "max_length": settings.gen_max_length,
        "length_penalty": settings.gen_length_penalty,
        "no_repeat_ngram_size": settings.gen_no_repeat_ngram_size,
    }
    return {key: value for key, value in values.items() if value is not None}


def resolved_generation(checkpoint: Any, overrides: Mapping[str, Any] | None) -> Any:
    """A copy of the checkpoint's ``GenerationConfig`` with ``overrides`` applied (a
    ``GEN_MAX_LENGTH``/``GEN_MIN_LENGTH`` clears the checkpoint's new-token limit, which would
    otherwise win), validated."""
    config = copy.deepcopy(checkpoint)
    overrides = dict(overrides or {})
    if "max_length" in overrides:
        config.max_new_tokens = None
    if "min_length" in overrides:
        config.min_new_tokens = None
    config.update(**overrides)
    config.validate()
    return config


@dataclass(slots=True)
class SortedRows:
    """The non-empty texts of a batch as token ids, longest first."""

    size: int  # texts in the batch, empty ones included
    todo: list[int]  # positions of the non-empty texts
    order: list[int]  # position in ``rows`` -> index into ``todo``
    rows: list[list[int]]  # token ids, in ``order``


class SourceTokenizer:
    """The encoder side of a seq2seq checkpoint's tokenizer: truncation to the input cap,
    length-sorted batches, decoding, and summaries put back in input order. Thread-safe."""

    def __init__(self, tokenizer: Any, max_input_tokens: int, position_limit: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_input_tokens = (
            min(max_input_tokens, position_limit) if position_limit else max_input_tokens
        )
        self._lock = threading.Lock()  # fast tokenizers are not thread-safe

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        cut = self.max_input_tokens * MAX_CHARS_PER_TOKEN
        with self._lock:
            encoded = self.tokenizer(
                [text[:cut] for text in texts], truncation=True, max_length=self.max_input_tokens
            )
        return [list(ids) for ids in encoded["input_ids"]]

    def token_length(self, text: str) -> int:
        """Tokens the encoder will see (special tokens included, truncated to the input cap)."""
        return len(self.encode([text])[0])

    def sorted_rows(self, texts: Sequence[str]) -> SortedRows:
        todo = [i for i, text in enumerate(texts) if text.strip()]
        rows = self.encode([texts[i] for i in todo]) if todo else []
        order = sorted(range(len(todo)), key=lambda k: len(rows[k]), reverse=True)
        return SortedRows(len(texts), todo, order, [rows[k] for k in order])

    def pad(self, rows: Sequence[Sequence[int]], multiple: int | None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, padded by the tokenizer in one call (to a
        multiple of ``multiple`` tokens, so that shapes repeat from batch to batch)."""
        with self._lock:
            padded = self.tokenizer.pad({"input_ids": list(rows)}, padding=True,
                                        pad_to_multiple_of=multiple, return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    def summaries(self, batch: SortedRows, outputs: Sequence[Sequence[int]]) -> list[str]:
        """Decode ``outputs`` (one per row of ``batch``); summaries in input order, ``""`` for
        empty texts."""
        with self._lock:
            decoded = self.tokenizer.batch_decode(outputs, skip_special_tokens=True)
        summaries = [""] * batch.size
        for position, k in enumerate(batch.order):
            summaries[batch.todo[k]] = decoded[position].strip()
        return summaries


@dataclass(slots=True)
class PreparedBatch:
    """A length-sorted batch, padded; ``inputs`` is None when every text is empty."""

    rows: SortedRows
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
        self.source = SourceTokenizer(
            self.tokenizer, max_input_tokens,
            getattr(self.model.config, "max_position_embeddings", None),
        )
        self.max_input_tokens = self.source.max_input_tokens
        if self.tokenizer.pad_token_id is None:  # the tokenizer pads: give it the model's id
            self.tokenizer.pad_token_id = int(self.model.config.pad_token_id or 0)
        # What generation means; _call_config is how it runs.
        self.generation_config = resolved_generation(self.model.generation_config, generation)
        self.static_cache = static_cache and device.startswith("cuda")  # still on, or fell back
        self._static_proven = False  # a static-cache generate has succeeded
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

    def token_length(self, text: str) -> int:
        """Tokens the encoder will see (special tokens included, truncated to the input cap)."""
        return self.source.token_length(text)

    def prepare(self, texts: Sequence[str]) -> PreparedBatch:
        """Tokenize, sort by length (longest first) and pad, on the CPU."""
        rows = self.source.sorted_rows(texts)
        if not rows.rows:
            return PreparedBatch(rows, None)
        on_cuda = self.device.startswith("cuda")
        inputs = self.source.pad(rows.rows, CUDA_PAD_MULTIPLE if on_cuda else None)
        if on_cuda:
            inputs = {key: value.pin_memory() for key, value in inputs.items()}
        return PreparedBatch(rows, inputs)

    def run(self, batch: PreparedBatch) -> list[str]:
        """Generate and decode a prepared batch; summaries in input order."""
        if batch.inputs is None:
            return [""] * batch.rows.size
        if self.device.startswith("cuda"):
            with torch.cuda.device(self.device):  # this replica's device, on any thread
                inputs = {k: v.to(self.device, non_blocking=True)
                          for k, v in batch.inputs.items()}
                output = self._generate(inputs)
        else:
            output = self._generate(batch.inputs)
        return self.source.summaries(batch.rows, output.tolist())

    def _generate(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out_of_memory: str | None = None
        try:
            with torch.inference_mode():
                output = self.model.generate(**inputs, generation_config=self._call_config,
                                             logits_processor=self._processors)
        except Exception as exc:
            if not OutOfMemory.describes(exc):
                if not self._static_unsupported(exc):
                    raise
                log.warning("static KV cache unsupported for %s (%s: %s); using the dynamic "
                            "cache", self.model_name, type(exc).__name__, exc)
                self.static_cache = False
                self._configure_call()
                return self._generate(inputs)
            out_of_memory = f"{type(exc).__name__}: {exc}"
        if out_of_memory is not None:
            # Raised outside the except block, unchained: the failed call's frames, and the
            # KV cache and activations they hold, are freed before the worker retries.
            raise OutOfMemory(out_of_memory)
        self._static_proven = self.static_cache
        return output

    def describe(self) -> dict[str, Any]:
        """What really runs, for the worker's metrics: the static cache may have fallen back."""
        return {"backend": "transformers", "dtype": str(self.model.dtype).removeprefix("torch."),
                "static_cache": self.static_cache}

    def _static_unsupported(self, exc: Exception) -> bool:
        """Whether ``exc`` says the static cache cannot work for this model: only before it
        has worked once, and only the errors that set-up and compilation raise for that."""
        if not self.static_cache or self._static_proven:
            return False
        return isinstance(exc, ValueError | NotImplementedError | TypeError) or any(
            cls.__module__.startswith("torch._dynamo") for cls in type(exc).__mro__)

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """Summaries in input order; empty or whitespace-only texts give ``""``."""
        return self.run(self.prepare(texts))
