"""The summarizer a service runs, and the worker that runs it.

``seq2seq``     an abstractive Hugging Face encoder-decoder (BART, PEGASUS, T5, ...), decoded by
               CTranslate2 (:mod:`.ct2`) or by HF ``generate`` (:mod:`.seq2seq`), as
               ``SEQ2SEQ_BACKEND`` says.
``extractive``  picks the sentences closest to the document's mean sentence embedding
               (:mod:`.extractive`).
``identity``    returns the first sentence; no model, for measuring the pipeline alone
               (:mod:`.identity`).

:func:`build_worker` wires the one ``SUMMARIZER`` names into a
:class:`~streamproc.inference.worker.GPUWorker`.
"""

from __future__ import annotations

import functools

from ..inference.planner import replica_cap
from ..inference.worker import GPUWorker
from ..settings import Settings
from .base import Summarizer, SummaryWorker, prepare_batch, run_prepared
from .ct2 import CT2Summarizer, SharedTranslators, chosen_backend
from .extractive import ExtractiveSummarizer
from .identity import IdentitySummarizer
from .seq2seq import Seq2SeqSummarizer, generation_overrides
from .workload import calibration_texts, estimate_tokens, warmup_texts

__all__ = ["SummaryWorker", "build_worker", "load_summarizer"]

def load_summarizer(settings: Settings, device: str, *,
                    translators: SharedTranslators | None = None) -> Summarizer:
    """Load the summarizer ``SUMMARIZER`` names onto ``device`` ("cpu" or "cuda:N"), in half
    precision on CUDA with ``GPU_USE_FP16``; a ``GPU_MAX_BATCH_TOKENS`` set by hand is handed
    to CTranslate2. ``translators``: the CTranslate2 translators the worker's replicas
    share."""
    use_fp16, max_batch_tokens = settings.gpu_use_fp16, settings.gpu_max_batch_tokens
    name = settings.resolved_model_name
    if settings.summarizer == "identity":
        return IdentitySummarizer(device)
    if settings.summarizer == "extractive":
        return ExtractiveSummarizer(
            name, device, sentences=settings.extractive_sentences,
            max_input_tokens=settings.max_input_tokens, use_fp16=use_fp16,
        )
    if chosen_backend(settings.seq2seq_backend) == "ctranslate2":
        return CT2Summarizer(
            name, device, max_input_tokens=settings.max_input_tokens,
            compute_type=settings.ct2_compute_type, use_fp16=use_fp16,
            generation=generation_overrides(settings), cache_dir=settings.ct2_cache_dir,
            max_batch_tokens=max_batch_tokens, translators=translators,
        )
    return Seq2SeqSummarizer.load(
        name, device, max_input_tokens=settings.max_input_tokens,
        use_fp16=use_fp16, generation=generation_overrides(settings),
        static_cache=settings.gpu_static_cache,
    )


def build_worker(settings: Settings) -> SummaryWorker:
    """The service's worker: the summarizer ``SUMMARIZER`` names, on the replicas the engine
    settings plan, warmed up on inputs as long as ``MAX_INPUT_TOKENS``. Texts are cut to
    ``MAX_INPUT_CHARS`` before the summarizer sees them, and summaries to
    ``MAX_SUMMARY_CHARS``."""
    config = settings.gpu_config(
        warmup_payloads=warmup_texts(settings.max_input_tokens, settings.gpu_batch_size),
        calibration_payloads=(calibration_texts(settings.max_input_tokens)
                              if settings.autotune_enabled else ()))
    # The CTranslate2 backend's replicas on a device share one translator, with a worker
    # for each replica loaded there, at most as many as the settings allow.
    translators = SharedTranslators(replica_cap(config)[0])
    return GPUWorker(
        functools.partial(load_summarizer, settings, translators=translators),
        config,
        functools.partial(run_prepared, max_chars=settings.max_summary_chars),
        prepare=functools.partial(prepare_batch, max_chars=settings.input_char_cap),
        cost=functools.partial(estimate_tokens, settings.max_input_tokens),
    )
