"""Engine throughput: streamproc's replica/batch layouts on fixed work, in one process.

    .venv/bin/python bench/engine.py [--shape bart-large-cnn|tiny] [--device auto|cpu|cuda]
        [--items N] [--source-tokens 512] [--new-tokens 64] [--gen both|greedy|checkpoint]
        [--backend auto|ctranslate2|transformers] [--compute-type auto|int8|float16|...]
        [--layouts a,b,c] [--batch 48] [--no-mixed] [--no-bare] [--json OUT]

Model: ``--shape bart-large-cnn`` builds a checkpoint with bart-large-cnn's dimensions (d_model
1024, 12+12 layers, 16 heads, ffn 4096, 1024 positions, vocab 50264) and random weights, saved
with ``save_pretrained`` into a temporary directory next to the tokenizer of
:func:`streamproc.testing.tiny_model.build_tiny_model` (its ids are < 800 < vocab), so it
loads through the production ``from_pretrained`` path. ``--shape tiny`` is the tiny
checkpoint itself. fp16 on CUDA, fp32 on the CPU (``GPU_USE_FP16`` as in production).

Fixed work: every source is exactly ``--source-tokens`` tokens (texts tokenize to more,
``MAX_INPUT_TOKENS`` truncates them; checked) and every summary exactly ``--new-tokens``
new tokens: the checkpoint's ``generation_config.json`` sets ``min_new_tokens = max_new_tokens``
and no ``min_length``/``max_length`` (checked on one generate call per setting). Generation
settings, applied through ``GEN_*`` so the summarizer's own code path runs:

* ``greedy``: ``GEN_NUM_BEAMS=1 GEN_NO_REPEAT_NGRAM_SIZE=0``;
* ``checkpoint``: bart-large-cnn's ``num_beams 4, no_repeat_ngram_size 3, length_penalty 2.0``.

Layouts, each ``build_worker(settings)``; ``await worker.infer_many(texts)`` is timed after
``start()`` returned (loading, warm-up and autotuning excluded):

* ``a``: the seed document's layout: replicas as the VRAM plan allows, at most 8
  (``MODEL_POOL_MAX_INSTANCES=8``, ``GPU_MAX_MODEL_INSTANCES`` unset, multi-instance on),
  ``GPU_BATCH_SIZE=--batch`` (48), autotune off, plain FIFO batches. The CPU has no VRAM to
  plan from: 2 replicas stand in for the plan.
* ``b``: one replica, ``GPU_BATCH_SIZE=--batch`` (48), autotune off,
  ``GPU_LENGTH_SORT_WINDOW=0``.
* ``c``: streamproc's defaults (autotune, warm-up, length-aware batching); only the model,
  input length, generation and device settings are set.
* ``bare`` (not a layout): one summarizer, ``summarize()`` on batches of ``--batch`` in a plain
  loop on the calling thread: the model's own speed, to show what the worker adds or loses.

Length-mixed inputs (unless ``--no-mixed``): sources drawn uniformly between 64 and 1024
tokens (seeded), ``MAX_INPUT_TOKENS=1024``, through ``b``, ``c`` and ``c`` with
``GPU_LENGTH_SORT_WINDOW=0`` (what length-aware selection buys).

Items: ``--items`` for every run; by default 2000 (greedy) and 1000 (checkpoint) on CUDA;
768 with ``--shape tiny`` on the CPU (twice the largest batch the CPU calibrates, so a backlog
forms and length-aware selection has something to choose from); 96 with ``--shape
bart-large-cnn`` on the CPU (slow: minutes per batch of 48). On one GPU the whole default
run can exceed ten minutes (autotune alone may spend 120 s per ``c`` worker): run ``--gen
greedy`` and ``--gen checkpoint`` separately.

Every layout runs ``--rounds`` timed passes over the same items (default 3 for the tiny model
on the CPU, whose figures are noisy on a shared machine, else 1); the median counts. Only one
worker exists at a time, so its VRAM plan and peak memory are its own: on the CPU, workers
kept alive side by side slowed each other (each thread that has run torch keeps its own
OpenMP team), which says nothing about production, where a process holds one worker. By
default each layout starts, runs its passes and stops before the next. With ``--rotate`` (the
default for the tiny model on the CPU) every round starts each layout afresh, one after the
other in a rotated order, so drifts in the machine's load hit every layout alike; the ratios
are then also given round by round (passes of one round ran back to back).

Output: one line per figure, then the JSON of everything (also written to ``--json OUT``):
device, torch/transformers versions, commit, command line, items/s, ratios ``c/a`` and
``c/b`` (and, with ``--rotate``, the same ratios paired round by round), start times, peak
GPU memory per layout, the worker's plan and autotune report, OOMs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import ROOT, git_commit, load_average
from streamproc.demo.progress import Progress
from streamproc.errors import OutOfMemory
from streamproc.settings import Settings
from streamproc.summarize.ct2 import CT2Summarizer, chosen_backend
from streamproc.summarize.factory import build_worker, load_summarizer
from streamproc.testing.tiny_model import TINY_CORPUS, build_tiny_model

__all__ = ["BART_LARGE_CNN", "GENERATION", "build_checkpoint", "main", "make_texts"]

log = logging.getLogger("bench.engine")

# bart-large-cnn's config.json, from memory of the published checkpoint (no download).
BART_LARGE_CNN: dict[str, Any] = {
    "vocab_size": 50264, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
    "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096, "max_position_embeddings": 1024, "activation_function": "gelu",
    "scale_embedding": False, "dropout": 0.1, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "init_std": 0.02, "pad_token_id": 1, "bos_token_id": 0,
    "eos_token_id": 2, "decoder_start_token_id": 2, "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
}
# bart-large-cnn's generation_config.json without its lengths (min_length 56, max_length 142):
# the lengths are replaced by min_new_tokens = max_new_tokens = --new-tokens.
CHECKPOINT_GENERATION: dict[str, Any] = {
    "num_beams": 4, "no_repeat_ngram_size": 3, "length_penalty": 2.0, "early_stopping": True,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2,
    "forced_bos_token_id": 0, "forced_eos_token_id": 2,
}
# The GEN_* settings of each generation setting (never GEN_MIN/MAX_LENGTH: they would clear
# the new-token limits).
GENERATION: dict[str, dict[str, Any]] = {
    "greedy": {"gen_num_beams": 1, "gen_no_repeat_ngram_size": 0},
    "checkpoint": {"gen_num_beams": 4, "gen_no_repeat_ngram_size": 3, "gen_length_penalty": 2.0},
}
SEED_BATCH = 48
SEED_POOL_MAX = 8  # layout a on CUDA: the plan's replicas, at most this many (a large card
# would otherwise load about 60 replicas, minutes of loading for one figure)
CPU_STAND_IN_REPLICAS = 2
MIXED_RANGE = (64, 1024)
SEED = 20240611


# --- machine -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"kind": device, "cpu": cpu_model(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "load": load_average()}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["name"] = info["gpus"][0]
        info["total_gib"] = [torch.cuda.get_device_properties(i).total_memory / 2**30
                             for i in range(torch.cuda.device_count())]
    else:
        info["name"] = info["cpu"]
    return info


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return choice


def overriding_environment() -> list[str]:
    """Environment variables that Settings would read on top of what the benchmark sets."""
    fields = {name.upper() for name in Settings.model_fields}
    return sorted(name for name in os.environ if name.upper() in fields)


# --- checkpoint -------------------------------------------------------------------------------

def _pad_vocabulary(checkpoint: Path, size: int) -> None:
    """Give the saved tokenizer ``size`` ids, as many as the model's embedding rows: unused
    tokens that no merge produces, so tokenizing is unchanged but every id the model can
    generate decodes (ctranslate2's converter also takes its vocabulary from the tokenizer)."""
    path = checkpoint / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab.values()) | {token["id"] for token in data.get("added_tokens", [])}
    vocab.update({f"<unused{i}>": i for i in range(size) if i not in taken})
    path.write_text(json.dumps(data, ensure_ascii=False))


def build_checkpoint(shape: str, workdir: Path, new_tokens: int, *, half: bool) -> Path:
    """The checkpoint directory: the tiny model, or a bart-large-cnn-shaped random one with the
    tiny tokenizer. Its generation config asks for exactly ``new_tokens`` new tokens."""
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        GenerationConfig,
    )

    tiny = build_tiny_model(workdir / "tiny")
    if shape == "tiny":
        target = tiny
    else:
        import torch

        target = workdir / "bart-large-cnn-shaped"
        torch.manual_seed(0)
        model = BartForConditionalGeneration(BartConfig(**BART_LARGE_CNN))
        if half:
            model = model.half()
        model.save_pretrained(target)
        del model
        gc.collect()
        AutoTokenizer.from_pretrained(tiny).save_pretrained(target)
        _pad_vocabulary(target, BART_LARGE_CNN["vocab_size"])
    generation = GenerationConfig(**CHECKPOINT_GENERATION, min_new_tokens=new_tokens,
                                  max_new_tokens=new_tokens)
    generation.save_pretrained(target)
    saved = GenerationConfig.from_pretrained(target)
    assert saved.min_new_tokens == saved.max_new_tokens == new_tokens
    assert saved.min_length in (None, 0) and saved.max_length in (None, 20), saved
    return target


# --- inputs -----------------------------------------------------------------------------------

def _sentences() -> list[str]:
    text = " ".join(TINY_CORPUS.split())
    return [s.strip() + "." for s in text.split(". ") if s.strip()]


def _long_text(rng: random.Random, sentences: list[str], chars: int) -> str:
    parts: list[str] = []
    length = 0
    while length < chars:
        order = sentences[:]
        rng.shuffle(order)
        for sentence in order:
            parts.append(sentence)
            length += len(sentence) + 1
    return " ".join(parts)


def make_texts(tokenizer: Any, lengths: Sequence[int], seed: int, *, exact: bool) -> list[str]:
    """One text per wanted length (in tokens, special tokens included). ``exact``: each text
    tokenizes to more than its length, so truncation at that length makes it exact; otherwise
    the text is cut at a token boundary to about its length."""
    rng = random.Random(seed)
    sentences = _sentences()
    texts: list[str] = []
    for wanted in lengths:
        content = wanted - 2 + (2 if exact else 0)  # <s> ... </s>
        chars = 6 * content + 64
        while True:
            text = _long_text(rng, sentences, chars)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
            if len(offsets) > content:
                break
            chars *= 2
        texts.append(text[: offsets[content - 1][1]].strip())
    return texts


def token_lengths(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[int]:
    """What the summarizer's encoder sees (as ``SourceTokenizer.encode`` tokenizes)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_tokens)
    return [len(ids) for ids in encoded["input_ids"]]


# --- runs -------------------------------------------------------------------------------------

def _cuda_devices() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _reset_peaks() -> None:
    import torch

    for i in _cuda_devices():
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)


def _peaks_gib() -> dict[str, float]:
    import torch

    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 2**30 for i in _cuda_devices()}


def _allocated_gib() -> dict[str, float]:
    import torch

    return {f"cuda:{i}": torch.cuda.memory_allocated(i) / 2**30 for i in _cuda_devices()}


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc).splitlines()[0][:300] if str(exc)
            else "", "oom": OutOfMemory.describes(exc)}


class _Layout:
    """One layout's worker: started, timed pass by pass, summarized, stopped."""

    def __init__(self, label: str, settings: Settings, items: int) -> None:
        self.settings = settings
        self.out: dict[str, Any] = {"layout": label, "items": items}
        self.worker: Any = None
        self.seconds: list[float] = []
        self.failed: list[BaseException] = []
        self.busy_before = 0.0
        self.busy_seconds = 0.0  # replica-seconds in model calls during the timed passes

    @property
    def alive(self) -> bool:
        return self.worker is not None and "error" not in self.out

    async def start(self) -> None:
        _free_memory()
        _reset_peaks()
        began = time.perf_counter()
        self.worker = build_worker(self.settings)
        try:
            await self.worker.start()
        except Exception as exc:
            self.out["error"] = {"during": "start", **_error(exc)}
            log.debug("start failed", exc_info=True)
            return
        self.out["start_s"] = time.perf_counter() - began
        self.out["start_peak_gib"] = _peaks_gib()
        _reset_peaks()
        self.busy_before = self.worker.get_metrics()["inference_seconds"]

    async def timed_pass(self, texts: list[str]) -> None:
        started = time.perf_counter()
        done_before = self.worker.stats.total_inferences + self.worker.stats.failures
        with Progress(len(texts), f"  {self.out.get('layout', 'run')}") as progress:

            async def follow() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    stats = self.worker.stats
                    progress.advance(stats.total_inferences + stats.failures - done_before
                                     - progress.done)

            follower = asyncio.create_task(follow())
            try:
                results = await self.worker.infer_many(texts)
            except Exception as exc:
                self.out["error"] = {"during": "run", **_error(exc)}
                return
            finally:
                follower.cancel()
            progress.advance(len(texts) - progress.done)
        self.seconds.append(time.perf_counter() - started)
        self.failed += [r for r in results if isinstance(r, BaseException)]
        busy = self.worker.get_metrics()["inference_seconds"]
        self.busy_seconds += busy - self.busy_before
        self.busy_before = busy

    async def finish(self) -> dict[str, Any]:
        """Record the figures, stop the worker and free its memory."""
        out = self.out
        if self.worker is None:
            return out
        try:
            if self.seconds and "error" not in out:
                self._record()
        finally:
            await self.worker.stop()
            self.worker = None
            _free_memory()
            if _cuda_devices():
                out["allocated_after_stop_gib"] = _allocated_gib()
        return out

    def _record(self) -> None:
        out, seconds, items = self.out, self.seconds, self.out["items"]
        elapsed = statistics.median(seconds)
        out.update(seconds=elapsed, items_per_second=items / elapsed,
                   rounds_items_per_second=[items / s for s in seconds],
                   ok=items * len(seconds) - len(self.failed), run_peak_gib=_peaks_gib())
        if self.failed:
            kinds: dict[str, int] = {}
            for r in self.failed:
                kinds[type(r).__name__] = kinds.get(type(r).__name__, 0) + 1
            out["failures"] = kinds
            out["first_failure"] = str(self.failed[0])[:300]
        metrics = self.worker.get_metrics()
        out["batch_size"] = metrics["batch_size"]
        out["replicas"] = sum(metrics["replicas_per_device"].values())
        out["plan"] = metrics["plan"]
        out["autotune"] = metrics["autotune"]
        out["batches"] = metrics["batches"]
        out["mean_batch_size"] = metrics["mean_batch_size"]
        out["model_calls"] = metrics["model_calls"]
        out["oom_splits"] = metrics["oom_splits"]
        # replica-seconds inside model calls over wall seconds: how busy the replicas were
        out["replica_busy"] = self.busy_seconds / sum(seconds)
        out["sort_window"] = metrics["length_sort_window"]


async def run_layouts(layouts: dict[str, tuple[str, Settings]], texts: list[str], rounds: int,
                      rotate: bool) -> dict[str, dict[str, Any]]:
    """Each layout's figures, one worker at a time. Plain: a layout starts, runs ``rounds``
    timed passes and stops, then the next. Rotated: each round starts, runs once and stops
    every layout, in an order rotated by one each round."""
    runs = {key: _Layout(label, settings, len(texts)) for key, (label, settings) in
            layouts.items()}
    keys = list(runs)
    schedule = ([[key] * rounds for key in keys] if not rotate else
                [keys[r % len(keys):] + keys[:r % len(keys)] for r in range(rounds)])
    try:
        for group in schedule:
            for key in group:
                run = runs[key]
                if "error" in run.out:
                    continue
                if run.worker is None:
                    await run.start()
                if run.alive:
                    await run.timed_pass(texts)
                if rotate:
                    await run.finish()
            await runs[group[0]].finish()
    finally:
        for run in runs.values():  # after a failure: stop what is still running
            await run.finish()
    return {key: run.out for key, run in runs.items()}


def _bare(settings: Settings, texts: list[str], batch: int, rounds: int) -> list[float]:
    import torch

    device = "cuda:0" if settings.gpu_device_ids != "cpu" and torch.cuda.is_available() else "cpu"
    model = load_summarizer(settings, device)
    try:
        model.summarize(texts[:2])  # load the code paths
        seconds: list[float] = []
        for _ in range(rounds):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            for i in range(0, len(texts), batch):
                model.summarize(texts[i:i + batch])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        return seconds
    finally:
        del model
        _free_memory()


def run_bare(settings: Settings, texts: list[str], batch: int,
             rounds: int = 1) -> dict[str, Any]:
    """One summarizer, ``summarize()`` on consecutive batches in a plain loop, no worker. It
    runs on a thread of its own, as a replica does (on a busy CPU torch's speed differs a lot
    between the main thread and others)."""
    out: dict[str, Any] = {"layout": "bare", "items": len(texts), "batch_size": batch}
    with ThreadPoolExecutor(1, thread_name_prefix="bare") as pool:
        try:
            seconds = pool.submit(_bare, settings, texts, batch, rounds).result()
        except Exception as exc:
            out["error"] = {"during": "run", **_error(exc)}
            return out
    elapsed = statistics.median(seconds)
    out.update(seconds=elapsed, items_per_second=len(texts) / elapsed,
               rounds_items_per_second=[len(texts) / s for s in seconds])
    return out


def check_new_tokens(settings: Settings, text: str, new_tokens: int) -> dict[str, Any]:
    """One decode on the summarizer as loaded by streamproc: the summary must be
    ``decoder_start + new_tokens`` long (for ctranslate2, its hypothesis plus the decoder start
    and the forced end token that HF spends the last step on), and the effective generation
    config as asked."""
    import torch

    device = "cuda:0" if settings.gpu_device_ids != "cpu" and torch.cuda.is_available() else "cpu"
    model: Any = load_summarizer(settings, device)
    try:
        config = model.generation_config
        prepared = model.prepare([text, text])
        if isinstance(model, CT2Summarizer):
            options = model.options
            prefix = [list(options.prefix)] * 2 if options.prefix else None
            results = model.translator.translate_batch(prepared.sources, target_prefix=prefix,
                                                       **options.as_kwargs())
            forced_eos = 1 if config.forced_eos_token_id is not None else 0
            length = len(results[0].hypotheses[0]) + 1 + forced_eos
        else:
            inputs = {k: v.to(device) for k, v in prepared.inputs.items()}
            with torch.inference_mode():
                length = int(model.model.generate(**inputs, generation_config=config).shape[1])
        found = {"backend": type(model).__name__, "output_length": length,
                 "expected_length": new_tokens + 1,
                 "num_beams": config.num_beams, "no_repeat_ngram_size": config.no_repeat_ngram_size,
                 "length_penalty": config.length_penalty,
                 "min_new_tokens": config.min_new_tokens, "max_new_tokens": config.max_new_tokens,
                 "min_length": config.min_length, "max_length": config.max_length}
    finally:
        del model
        _free_memory()
    if found["output_length"] != found["expected_length"]:
        raise SystemExit(f"generation does not give exactly {new_tokens} new tokens: {found}")
    return found


# --- main -------------------------------------------------------------------------------------

def default_items(device: str, shape: str, gen: str) -> int:
    if device == "cuda":
        return 2000 if gen == "greedy" else 1000
    return 768 if shape == "tiny" else 96  # tiny: 2 x the CPU's largest calibrated batch


def _describe(result: dict[str, Any], device: str) -> str:
    if "error" in result:
        err = result["error"]
        return f"FAILED during {err['during']}: {err['type']}{' (OOM)' if err['oom'] else ''}: " \
               f"{err['message']}"
    text = (f"{result['items_per_second']:9.2f} items/s  ({result['items']} items in "
            f"{result['seconds']:.2f} s")
    spread = result.get("rounds_items_per_second", [])
    if len(spread) > 1:
        text += f", median of {len(spread)}: {min(spread):.1f}..{max(spread):.1f}"
    if "start_s" in result:
        text += (f"; start {result['start_s']:.1f} s; replicas {result['replicas']}, batch "
                 f"{result['batch_size']}, mean batch {result['mean_batch_size']:.1f}, "
                 f"{result['model_calls']} model calls, replicas busy "
                 f"{result['replica_busy']:.2f}")
        if device == "cuda":
            peak = max(result["run_peak_gib"].values(), default=0.0)
            start_peak = max(result["start_peak_gib"].values(), default=0.0)
            text += f"; peak GPU {peak:.2f} GiB run / {start_peak:.2f} GiB start"
        if result.get("failures"):
            text += f"; FAILURES {result['failures']}"
        if result.get("oom_splits"):
            text += f"; {result['oom_splits']} OOM splits"
    return text + ")"


def _ratio(results: dict[str, dict[str, Any]], top: str, bottom: str) -> float | None:
    a, b = results.get(top, {}), results.get(bottom, {})
    if "items_per_second" not in a or "items_per_second" not in b:
        return None
    return float(a["items_per_second"] / b["items_per_second"])


def _paired(results: dict[str, dict[str, Any]], top: str, bottom: str) -> dict[str, Any] | None:
    """Round-by-round ratios ``top / bottom``: with ``--rotate`` the two passes of a round
    ran back to back, so load from other work hits both; their median is steadier than the
    ratio of the two medians."""
    a = results.get(top, {}).get("rounds_items_per_second", [])
    b = results.get(bottom, {}).get("rounds_items_per_second", [])
    if not a or len(a) != len(b):
        return None
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "rounds": len(ratios)}


def _fmt_paired(paired: dict[str, Any] | None) -> str:
    if paired is None or paired["rounds"] < 2:
        return ""
    return (f" (paired by round: median {paired['median']:.2f}, {paired['min']:.2f}.."
            f"{paired['max']:.2f} over {paired['rounds']} rounds)")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


async def _bench(args: argparse.Namespace, device: str, checkpoint: Path, tokenizer: Any,
                 report: dict[str, Any]) -> None:
    device_ids: Literal["cpu"] | None = "cpu" if device == "cpu" else None
    gens = ["greedy", "checkpoint"] if args.gen == "both" else [args.gen]
    seed_pool = SEED_POOL_MAX if device == "cuda" else CPU_STAND_IN_REPLICAS
    a_note = (f"replicas as the VRAM plan allows (pool max {SEED_POOL_MAX})" if device == "cuda"
              else f"{CPU_STAND_IN_REPLICAS} replicas standing in for the VRAM plan (CPU)")

    def settings(gen: str, max_tokens: int, **layout: Any) -> Settings:
        return Settings(_env_file=None, summarizer="seq2seq",  # type: ignore[call-arg]
                        model_name=str(checkpoint), max_input_tokens=max_tokens,
                        gpu_device_ids=device_ids, seq2seq_backend=args.backend,
                        ct2_compute_type=args.compute_type,
                        ct2_cache_dir=str(args.ct2_cache or checkpoint.parent / "ct2"),
                        **GENERATION[gen],
                        **layout)

    batch = args.batch
    seed_layout: dict[str, Any] = {
        "gpu_batch_size": batch, "model_pool_max_instances": seed_pool,
        "gpu_max_model_instances": None, "gpu_enable_multi_model_instances": True,
        "model_pool_enabled": True, "gpu_autotune": False, "gpu_length_sort_window": 0}
    single: dict[str, Any] = {"gpu_batch_size": batch, "model_pool_max_instances": 1,
                              "gpu_autotune": False, "gpu_length_sort_window": 0}
    Layouts = dict[str, tuple[str, dict[str, Any]]]
    layouts: Layouts = {"a": (f"a seed document: {a_note}, batch {batch}", seed_layout),
                        "b": (f"b one replica, batch {batch}, FIFO", single),
                        "c": ("c streamproc defaults", {})}
    layouts = {key: value for key, value in layouts.items() if key in args.layouts}
    source = args.source_tokens
    rounds = args.rounds or (3 if device == "cpu" and args.shape == "tiny" else 1)
    rotate = (args.rotate if args.rotate is not None
              else device == "cpu" and args.shape == "tiny")
    report["rounds"] = rounds
    report["rotated"] = rotate
    report["fixed"] = {}
    report["mixed"] = {}
    for gen in gens:
        n = args.items or default_items(device, args.shape, gen)
        texts = make_texts(tokenizer, [source] * n, SEED, exact=True)
        lengths = token_lengths(tokenizer, texts, source)
        if set(lengths) != {source}:
            raise SystemExit(f"sources are not exactly {source} tokens: {sorted(set(lengths))}")
        with ThreadPoolExecutor(1, thread_name_prefix="check") as pool:
            # Not on the main thread: torch run there first made every later replica thread
            # slower (about 1.5x measured with the tiny model on 2 CPU cores).
            check = pool.submit(check_new_tokens, settings(gen, source), texts[0],
                                args.new_tokens).result()
        section: dict[str, Any] = {"items": n, "generation": GENERATION[gen],
                                   "generation_check": check, "layouts": {}}
        report["fixed"][gen] = section
        print(f"[{gen}] {n} items, sources {source} tokens, {args.new_tokens} new tokens, "
              f"num_beams {check['num_beams']}, no_repeat_ngram_size "
              f"{check['no_repeat_ngram_size']}", flush=True)
        results = await run_layouts(
            {key: (label, settings(gen, source, **layout))
             for key, (label, layout) in layouts.items()}, texts, rounds, rotate)
        for key, (label, _) in layouts.items():
            result = results[key]
            section["layouts"][key] = result
            print(f"[{gen}] {label:58s} {_describe(result, device)}", flush=True)
            if key == "c" and "batch_size" in result:
                tune = result["autotune"]
                print(f"[{gen}]   c chose batch {result['batch_size']}, replicas "
                      f"{result['replicas']}, sort window {result['sort_window']}; autotune: "
                      f"{'off' if tune is None else tune}",
                      flush=True)
            if "plan" in result:
                for plan in result["plan"]:
                    print(f"[{gen}]   plan {key}: {plan['device']} replicas={plan['replicas']} "
                          f"memory_allows={plan['memory_allows']} limited_by="
                          f"{plan['limited_by']} model={plan['model_gb']:.2f}GiB activations="
                          f"{plan['activation_gb']:.2f}GiB", flush=True)
        if args.bare:
            bare = run_bare(settings(gen, source), texts, batch, rounds)
            section["layouts"]["bare"] = bare
            print(f"[{gen}] {f'bare: summarize() loop, batch {batch}, no worker':58s} "
                  f"{_describe(bare, device)}", flush=True)
        section["ratios"] = {"c/a": _ratio(section["layouts"], "c", "a"),
                             "c/b": _ratio(section["layouts"], "c", "b")}
        section["paired"] = {"c/a": _paired(section["layouts"], "c", "a"),
                             "c/b": _paired(section["layouts"], "c", "b")}
        if args.bare:
            section["ratios"]["b/bare"] = _ratio(section["layouts"], "b", "bare")
        print(f"[{gen}] ratios: c/a={_fmt(section['ratios']['c/a'])} "
              f"c/b={_fmt(section['ratios']['c/b'])}"
              + (f" b/bare={_fmt(section['ratios']['b/bare'])}" if args.bare else "")
              + (f"; c/b{_fmt_paired(section['paired']['c/b'])}" if rotate else ""),
              flush=True)

        if not args.mixed:
            continue
        low, high = MIXED_RANGE
        rng = random.Random(SEED + 1)
        wanted = [rng.randint(low, high) for _ in range(n)]
        mixed_texts = make_texts(tokenizer, wanted, SEED + 2, exact=False)
        got = token_lengths(tokenizer, mixed_texts, high)
        mixed: dict[str, Any] = {"items": n, "max_input_tokens": high, "layouts": {},
                                 "source_tokens": {"min": min(got), "max": max(got),
                                                   "mean": statistics.fmean(got),
                                                   "median": statistics.median(got)}}
        report["mixed"][gen] = mixed
        print(f"[{gen} mixed] {n} items, sources {min(got)}..{max(got)} tokens (mean "
              f"{statistics.fmean(got):.0f}), max_input_tokens {high}", flush=True)
        mixed_layouts: Layouts = {"b": (f"b one replica, batch {batch}, FIFO", single),
                                  "c": ("c streamproc defaults", {}),
                                  "c_window0": ("c defaults, GPU_LENGTH_SORT_WINDOW=0",
                                                {"gpu_length_sort_window": 0})}
        mixed_layouts = {key: value for key, value in mixed_layouts.items()
                         if key[0] in args.layouts}
        results = await run_layouts(
            {key: (label, settings(gen, high, **layout))
             for key, (label, layout) in mixed_layouts.items()}, mixed_texts, rounds, rotate)
        for key, (label, _) in mixed_layouts.items():
            result = results[key]
            mixed["layouts"][key] = result
            print(f"[{gen} mixed] {label:52s} {_describe(result, device)}", flush=True)
        mixed["ratios"] = {"c/b": _ratio(mixed["layouts"], "c", "b"),
                           "c/c_window0": _ratio(mixed["layouts"], "c", "c_window0")}
        mixed["paired"] = {"c/b": _paired(mixed["layouts"], "c", "b"),
                           "c/c_window0": _paired(mixed["layouts"], "c", "c_window0")}
        print(f"[{gen} mixed] ratios: c/b={_fmt(mixed['ratios']['c/b'])} "
              f"c/c_window0={_fmt(mixed['ratios']['c/c_window0'])}"
              + (f"; c/b{_fmt_paired(mixed['paired']['c/b'])}" if rotate else ""),
              flush=True)


def _relative(path: str) -> str:
    """``path`` relative to the repository when inside it (the command line as typed there)."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(ROOT))
    except ValueError:
        return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("bart-large-cnn", "tiny"), default="bart-large-cnn")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--items", type=int, default=None,
                        help="items per run (default: 2000/1000 CUDA, 768 CPU tiny, 96 CPU)")
    parser.add_argument("--source-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen", choices=("both", "greedy", "checkpoint"), default="both")
    parser.add_argument("--layouts", default="a,b,c",
                        help="which of the layouts a, b, c to run (comma-separated)")
    parser.add_argument("--batch", type=int, default=SEED_BATCH,
                        help=f"GPU_BATCH_SIZE of layouts a, b and bare (default {SEED_BATCH})")
    parser.add_argument("--backend", choices=("auto", "ctranslate2", "transformers"),
                        default="auto", help="SEQ2SEQ_BACKEND (default auto, as in production)")
    parser.add_argument("--ct2-cache", type=Path, default=None,
                        help="CT2_CACHE_DIR (default: in the run's temporary directory)")
    parser.add_argument("--compute-type", default="auto",
                        help="CT2_COMPUTE_TYPE for the ctranslate2 backend (default auto)")
    parser.add_argument("--no-mixed", dest="mixed", action="store_false",
                        help="skip the length-mixed runs")
    parser.add_argument("--no-bare", dest="bare", action="store_false",
                        help="skip the plain summarize() loop")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed passes per layout, median counts (default: 3 for CPU "
                             "tiny, else 1)")
    parser.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                        help="each round starts every layout afresh, in a rotated order "
                             "(default: only for --shape tiny on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--verbose", action="store_true", help="streamproc's INFO logs")
    args = parser.parse_args(argv)
    args.layouts = args.layouts.split(",")
    if not set(args.layouts) <= {"a", "b", "c"}:
        parser.error("--layouts takes a, b and/or c")
    if not 8 <= args.source_tokens <= 1024:
        parser.error("--source-tokens must be between 8 and 1024")
    if args.new_tokens < 1 or any(v is not None and v < 1 for v in (args.items, args.rounds)):
        parser.error("--new-tokens, --items and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # no "Loading weights" bars per replica
    device = resolve_device(args.device)
    command = shlex.join([_relative(sys.executable), _relative(__file__),
                          *(sys.argv[1:] if argv is None else argv)])
    report: dict[str, Any] = {
        "benchmark": "engine", "command": command, "commit": git_commit(),
        "device": device_info(device), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": args.shape, "dtype": "float16" if device == "cuda" else "float32",
        "backend": chosen_backend(args.backend), "compute_type": args.compute_type,
        "source_tokens": args.source_tokens, "new_tokens": args.new_tokens,
        "environment_overrides": overriding_environment(),
    }
    print(f"engine benchmark: shape={args.shape} device={device} ({report['device']['name']}) "
          f"backend={report['backend']} dtype={report['dtype']} torch={torch.__version__} "
          f"transformers={transformers.__version__} commit={report['commit']} "
          f"load={load_average()}",
          flush=True)
    print(f"command: {command}", flush=True)
    if report["environment_overrides"]:
        print(f"WARNING: these environment variables also reach Settings: "
              f"{report['environment_overrides']}", flush=True)
    if device == "cpu" and args.shape == "bart-large-cnn":
        print("WARNING: bart-large-cnn on the CPU is slow (minutes per batch of 48); "
              "use a small --items and --gen greedy --no-mixed", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        began = time.perf_counter()
        checkpoint = build_checkpoint(args.shape, Path(tmp), args.new_tokens,
                                      half=device == "cuda")
        report["checkpoint_build_s"] = time.perf_counter() - began
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        try:
            asyncio.run(_bench(args, device, checkpoint, tokenizer, report))
        except Exception as exc:  # keep what was measured
            report["error"] = {"during": "bench", **_error(exc),
                               "traceback": traceback.format_exc()[-2000:]}
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
    report["total_s"] = time.perf_counter() - began
    report["load_end"] = load_average()
    print(f"done in {report['total_s']:.0f} s; load average now {report['load_end']} "
          f"(other work on the machine skews the figures)", flush=True)
    text = json.dumps(report, default=str)
    print(text, flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if "error" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
