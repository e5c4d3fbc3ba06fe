"""The seq2seq summarizer on CTranslate2: the decode loop in C++, int8/fp16, token batches.

``SEQ2SEQ_BACKEND`` chooses it (``auto``: when the ``ctranslate2`` package is installed). The
checkpoint is converted once and cached (:mod:`.ct2_convert`). Tokenizing, the input
cap and the ``GEN_*`` settings are the transformers backend's (:mod:`.seq2seq`), and
:func:`decode_options` maps the resolved generation config onto ``translate_batch``'s options
so that both backends decode the same way (greedy fp32 output is token-identical).

**Replicas.** A ``ctranslate2.Translator`` runs up to ``inter_threads`` batches at once, one
per worker, and its workers on one device share one copy of the weights (each on its own
CUDA stream); ``translate_batch`` releases the GIL while it runs. :class:`SharedTranslators`
gives every replica on a device the same translator. It starts with one worker, and the
layout gives it a worker per replica it loads, at most as many as the settings allow
(:func:`streamproc.inference.planner.replica_cap`), so N replicas are N concurrent batches on one
model. Calibration keeps the extra replicas only if they measure faster
(:mod:`streamproc.inference.calibration`). On the CPU the workers split the cores between them.

On CUDA the PyPI wheel loads cuBLAS 12 at run time, whatever CUDA torch is built for:
:func:`preload_cublas` loads the one from the ``nvidia-cublas-cu12`` package (the ``gpu``
extra) before ctranslate2 is imported.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, OutOfMemory
from .ct2_convert import converted_model, default_cache_dir
from .pretrained import load_pretrained
from .seq2seq import SortedRows, SourceTokenizer, resolved_generation

__all__ = [
    "CT2Summarizer", "DecodeOptions", "SharedTranslators", "chosen_backend", "compute_type_for",
    "decode_options", "preload_cublas",
]

log = logging.getLogger("streamproc.ct2")
_CUBLAS_LIBRARIES = ("libcublasLt.so.12", "libcublas.so.12")
_HF_MAX_LENGTH = 20  # generate's max_length when neither the checkpoint nor GEN_* sets one


def chosen_backend(requested: str) -> Literal["ctranslate2", "transformers"]:
    """``SEQ2SEQ_BACKEND`` resolved: ``auto`` is ctranslate2 when it is installed."""
    installed = importlib.util.find_spec("ctranslate2") is not None
    if requested == "transformers" or (requested == "auto" and not installed):
        return "transformers"
    if not installed:
        raise ConfigError("SEQ2SEQ_BACKEND", requested,
                          "ctranslate2 is not installed: pip install 'streamproc[ctranslate2]'")
    return "ctranslate2"


def preload_cublas() -> list[str]:
    """Load cuBLAS 12 from the ``nvidia-cublas-cu12`` package, globally, so ctranslate2's own
    ``dlopen`` finds it; the paths loaded (none if the package is absent: the system's cuBLAS
    12, if any, is then ctranslate2's only hope)."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    loaded: list[str] = []
    for name in _CUBLAS_LIBRARIES:
        for root in roots:
            found = sorted(root.glob(f"*/lib/{name}"))
            if found:
                ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)
                loaded.append(str(found[0]))
                break
    return loaded


def compute_type_for(requested: str, device: str, use_fp16: bool) -> str:
    """``CT2_COMPUTE_TYPE`` resolved for ``device``: ``auto`` is int8 on the CPU and float16 on
    CUDA (float32 with ``GPU_USE_FP16`` off). A type the device cannot run is a ConfigError."""
    import ctranslate2

    kind = "cuda" if device.startswith("cuda") else "cpu"
    supported = set(ctranslate2.get_supported_compute_types(kind))
    if requested == "auto":
        wanted = ("float16" if use_fp16 else "float32") if kind == "cuda" else "int8"
        return wanted if wanted in supported else "float32"
    if requested not in supported:
        choices = ", ".join(sorted(supported))
        raise ConfigError("CT2_COMPUTE_TYPE", requested,
                          f"not supported on {kind} here (supported: {choices})")
    return requested


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """``translate_batch`` options equivalent to an HF ``GenerationConfig``."""

    beam_size: int
    length_penalty: float
    no_repeat_ngram_size: int
    min_decoding_length: int
    max_decoding_length: int
    prefix: tuple[str, ...]  # the forced first token(s), e.g. BART's <s>

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "beam_size": self.beam_size, "length_penalty": self.length_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "min_decoding_length": self.min_decoding_length,
            "max_decoding_length": self.max_decoding_length,
        }


def decode_options(config: Any, tokenizer: Any) -> DecodeOptions:
    """Map a resolved ``GenerationConfig`` to ctranslate2's options.

    HF counts the decoder start token in ``min_length``/``max_length`` and not in the
    ``*_new_tokens``; ctranslate2 counts neither, but counts the target prefix (the forced
    BOS). With ``forced_eos_token_id``, HF's last step is the forced end token, which decoding
    drops, so ctranslate2 stops one token earlier. ``num_beams=1`` is greedy.
    """
    if config.max_new_tokens is not None:
        longest = int(config.max_new_tokens)
    else:  # transformers leaves unset fields None and applies its defaults in generate
        longest = int(config.max_length if config.max_length is not None else _HF_MAX_LENGTH) - 1
    if config.forced_eos_token_id is not None:
        longest -= 1
    if config.min_new_tokens is not None:
        shortest = int(config.min_new_tokens)
    else:
        shortest = max(0, int(config.min_length or 0) - 1)
    beams = int(config.num_beams or 1)
    forced = config.forced_bos_token_id
    prefix = () if forced is None else (str(tokenizer.convert_ids_to_tokens(int(forced))),)
    return DecodeOptions(
        beam_size=beams,
        length_penalty=float(config.length_penalty or 1.0) if beams > 1 else 1.0,
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        min_decoding_length=min(shortest, max(longest, 1)),
        max_decoding_length=max(longest, 1),
        prefix=prefix,
    )


class SharedTranslators:
    """One translator per (model, device, compute type), shared by that device's replicas.
    It starts with one worker (``inter_threads``), so the first replica's warm-up and
    calibration have the whole device; :meth:`resize` gives it a worker per replica, up to
    ``max_workers``. On the CPU the workers split the cores, unless ``intra_threads`` is
    given. Owned by one worker's loader; thread-safe, since each replica loads on its own
    thread."""

    def __init__(self, max_workers: int = 1, intra_threads: int | None = None) -> None:
        self.max_workers = max(1, max_workers)
        self.intra_threads = intra_threads
        self._translators: dict[tuple[str, str, str], Any] = {}
        self._sized: dict[str, int] = {}  # device -> workers, once resized
        self._lock = threading.Lock()

    def workers_on(self, device: str) -> int:
        return self._sized.get(device, 1)

    def threads_for(self, device: str) -> int:
        """Each worker's intra-op threads on ``device``."""
        if self.intra_threads is not None:
            return self.intra_threads
        if device.startswith("cuda"):
            return 1
        return max(1, _cpu_threads() // self.workers_on(device))

    def get(self, model_dir: Path, device: str, compute_type: str) -> Any:
        key = (str(model_dir), device, compute_type)
        with self._lock:
            translator = self._translators.get(key)
            if translator is None:
                translator = self._translators[key] = self._new(key)
            return translator

    def resize(self, device: str, workers: int) -> None:
        """Rebuild ``device``'s translators with ``workers`` workers, at most ``max_workers``
        (on the CPU, each then gets its share of the cores). Only between batches: the layout
        calls it at start."""
        workers = min(max(1, workers), self.max_workers)
        with self._lock:
            if self.workers_on(device) == workers:
                return
            self._sized[device] = workers
            for key in [k for k in self._translators if k[1] == device]:
                del self._translators[key]  # the old copy goes before the new one loads
                self._translators[key] = self._new(key)

    def _new(self, key: tuple[str, str, str]) -> Any:
        import ctranslate2

        model_dir, device, compute_type = key
        on_cuda = device.startswith("cuda")
        index = int(device.partition(":")[2] or 0) if on_cuda else 0
        workers, threads = self.workers_on(device), self.threads_for(device)
        log.info("ctranslate2 translator on %s: %d worker(s), %d thread(s) each, %s", device,
                 workers, threads, compute_type)
        return ctranslate2.Translator(
            model_dir, device="cuda" if on_cuda else "cpu", device_index=index,
            compute_type=compute_type, inter_threads=workers, intra_threads=threads,
        )


@dataclass(slots=True)
class TokenBatch:
    """A length-sorted batch as token strings, ctranslate2's input."""

    rows: SortedRows
    sources: list[list[str]]


class CT2Summarizer:
    """An abstractive encoder-decoder summarizer decoded by a ``ctranslate2.Translator``."""

    def __init__(
        self, model_name: str, device: str = "cpu", *, max_input_tokens: int = 1024,
        compute_type: str = "auto", use_fp16: bool = False,
        generation: Mapping[str, Any] | None = None, cache_dir: str | Path | None = None,
        max_batch_tokens: int | None = None, intra_threads: int | None = None,
        translators: SharedTranslators | None = None,
    ) -> None:
        """``translators``: the device's shared translator (replicas); without it, a
        translator of its own with one worker and ``intra_threads`` threads."""
        if translators is not None and intra_threads is not None:
            raise ValueError("give intra_threads to the SharedTranslators, not to each replica")
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        def load(source: str, local_only: bool) -> tuple[Any, Any, Any]:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            config = AutoConfig.from_pretrained(source, local_files_only=local_only)
            try:
                generation = GenerationConfig.from_pretrained(source, local_files_only=local_only)
            except OSError:  # no generation_config.json: the model config's defaults
                generation = GenerationConfig.from_model_config(config)
            return tokenizer, config, generation

        self.model_name = model_name
        self.device = device
        tokenizer, config, checkpoint_generation = load_pretrained(model_name, load)
        self.source = SourceTokenizer(
            tokenizer, max_input_tokens, getattr(config, "max_position_embeddings", None)
        )
        self.tokenizer = tokenizer
        self.max_input_tokens = self.source.max_input_tokens
        self.generation_config = resolved_generation(checkpoint_generation, generation)
        self.options = decode_options(self.generation_config, tokenizer)
        on_cuda = device.startswith("cuda")
        if on_cuda:
            loaded = preload_cublas()
            log.info("cuBLAS 12 for ctranslate2: %s", ", ".join(loaded) or "the system's")
        self.compute_type = compute_type_for(compute_type, device, use_fp16)
        local = Path(model_name).expanduser()
        source = str(local) if local.is_dir() else model_name
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.model_dir, self.converted = converted_model(source, self.compute_type, cache)
        self.max_batch_tokens = max_batch_tokens
        self._pool = translators or SharedTranslators(1, intra_threads)
        self._pool.get(self.model_dir, device, self.compute_type)  # load it now

    @property
    def translator(self) -> Any:
        """The device's translator (rebuilt when the layout resizes it)."""
        return self._pool.get(self.model_dir, self.device, self.compute_type)

    @property
    def workers(self) -> int:
        return self._pool.workers_on(self.device)

    @property
    def shares_weights(self) -> bool:
        """Whether the replicas on this device would share these weights (the planner then
        counts them once)."""
        return self._pool.max_workers > 1

    def keep_replicas(self, count: int) -> None:
        """The layout keeps ``count`` replicas on this device: one worker each."""
        self._pool.resize(self.device, count)

    def token_length(self, text: str) -> int:
        """Tokens the encoder will see (special tokens included, truncated to the input cap)."""
        return self.source.token_length(text)

    def prepare(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenize and sort by length (longest first), on the CPU."""
        rows = self.source.sorted_rows(texts)
        convert = self.tokenizer.convert_ids_to_tokens
        return TokenBatch(rows, [list(convert(row)) for row in rows.rows])

    def run(self, batch: TokenBatch) -> list[str]:
        """Decode a prepared batch; summaries in input order. With a token budget, ctranslate2
        splits the batch into length-sorted sub-batches of at most that many padded tokens."""
        if not batch.sources:
            return [""] * batch.rows.size
        prefix = [list(self.options.prefix)] * len(batch.sources) if self.options.prefix else None
        budget = {"max_batch_size": self.max_batch_tokens, "batch_type": "tokens"} \
            if self.max_batch_tokens else {}
        try:
            results = self.translator.translate_batch(
                batch.sources, target_prefix=prefix, **budget, **self.options.as_kwargs()
            )
        except RuntimeError as exc:
            if OutOfMemory.describes(exc):
                raise OutOfMemory(f"ctranslate2: {exc}") from exc
            raise
        to_ids = self.tokenizer.convert_tokens_to_ids
        return self.source.summaries(batch.rows, [to_ids(r.hypotheses[0]) for r in results])

    def summarize(self, texts: Sequence[str]) -> list[str]:
        """Summaries in input order; empty or whitespace-only texts give ``""``."""
        return self.run(self.prepare(texts))

    def describe(self) -> dict[str, Any]:
        """What really runs, for the worker's metrics."""
        return {"backend": "ctranslate2", "compute_type": self.compute_type,
                "translator_workers": self.workers}


def _cpu_threads() -> int:
    """The CPU threads ctranslate2 may use: torch's count, as the other backend."""
    import torch

    return max(1, torch.get_num_threads() or (os.cpu_count() or 1))
