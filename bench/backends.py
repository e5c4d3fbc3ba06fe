"""Decode backends side by side: HF generate against CTranslate2, one process, same inputs.

    .venv/bin/python bench/backends.py [--shape bart-large-cnn|tiny] [--device auto|cpu|cuda]
        [--gen greedy,checkpoint] [--lengths fixed,mixed] [--batch 8[,16...]] [--items N]
        [--source-tokens 256] [--new-tokens 32] [--compute-types int8,float32]
        [--rounds 3] [--ct2-cache DIR] [--workers 1,2] [--json OUT]

The model is :func:`bench.engine.build_checkpoint`'s (bart-large-cnn's shape with random
weights, or the tiny checkpoint); every summary is exactly ``--new-tokens`` new tokens and the
generation settings are ``greedy`` or the checkpoint's beam search (4 beams, no-repeat 3,
length penalty 2), applied through ``GEN_*`` as in production. Each backend is loaded through
:func:`streamproc.summarize.factory.load_summarizer` (``SEQ2SEQ_BACKEND``, ``CT2_COMPUTE_TYPE``) and
times ``summarize()`` on consecutive batches of ``--batch`` items in a plain loop: the model's
own speed, no worker. ``fixed``: every source exactly ``--source-tokens`` tokens; ``mixed``:
lengths drawn uniformly from 64 to ``--source-tokens`` (seeded).

Rounds are paired: each round runs every backend once, in a rotated order, and the ratio of
each ctranslate2 run to the transformers run of the same round is kept, so load drifts on a
shared machine hit both sides of a ratio alike; the median of the paired ratios is the figure.
``--workers``: ctranslate2 replicas as the worker runs them (:func:`run_workers`), per compute
type, against one worker in the same rounds.
Agreement: the first round's summaries of each ctranslate2 compute type against transformers
(and int8 against float32): the share of identical summaries and of identical tokens at the
same position. The JSON is rewritten after every section, so a time-out keeps what ran.
"""

from __future__ import annotations

import argparse
import json
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
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, load_average
from bench.engine import (
    GENERATION,
    MIXED_RANGE,
    SEED,
    _relative,
    build_checkpoint,
    device_info,
    make_texts,
    resolve_device,
)
from streamproc.settings import Settings
from streamproc.summarize.ct2 import SharedTranslators
from streamproc.summarize.factory import load_summarizer

__all__ = ["main", "token_agreement"]

HF = "transformers"


def token_agreement(tokenizer: Any, left: Sequence[str], right: Sequence[str]) -> dict[str, float]:
    """Identical summaries, and identical tokens at the same position (over the longer of
    each pair), as shares of the whole."""
    same = sum(a == b for a, b in zip(left, right, strict=True))
    matched = total = 0
    for a, b in zip(left, right, strict=True):
        ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
        ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
        matched += sum(x == y for x, y in zip(ids_a, ids_b, strict=False))
        total += max(len(ids_a), len(ids_b))
    return {"summaries": same / len(left), "tokens": matched / total if total else 1.0}


def _timed(model: Any, texts: list[str], batch: int, device: str) -> tuple[float, list[str]]:
    import torch

    out: list[str] = []
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        out.extend(model.summarize(texts[i:i + batch]))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def variant_settings(checkpoint: Path, variant: str, gen: str, device: str, max_tokens: int,
                     ct2_cache: Path) -> Settings:
    """The settings a variant (``transformers`` or ``ctranslate2-<compute type>``) loads with."""
    backend, _, compute = variant.partition("-")
    return Settings(  # type: ignore[call-arg]
        _env_file=None, summarizer="seq2seq", model_name=str(checkpoint),
        max_input_tokens=max_tokens, gpu_use_fp16=device == "cuda",
        seq2seq_backend="transformers" if backend == HF else "ctranslate2",
        ct2_compute_type=compute or "auto", ct2_cache_dir=str(ct2_cache), **GENERATION[gen],
    )


def load_variants(checkpoint: Path, variants: list[str], gen: str, device: str,
                  max_tokens: int, ct2_cache: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every variant loaded for one generation setting, and what really loaded: the class
    and, for ctranslate2, the compute type it resolved to (no silent fallback goes unseen)."""
    models: dict[str, Any] = {}
    ran: dict[str, Any] = {}
    for variant in variants:
        settings = variant_settings(checkpoint, variant, gen, device, max_tokens, ct2_cache)
        began = time.perf_counter()
        model = load_summarizer(settings, "cuda:0" if device == "cuda" else "cpu")
        ran[variant] = {"class": type(model).__name__, "device": model.device,
                        "compute_type": getattr(model, "compute_type", None),
                        "load_s": time.perf_counter() - began}
        models[variant] = model
    return models, ran


def run_section(models: dict[str, Any], tokenizer: Any, texts: list[str], batch: int,
                rounds: int, device: str) -> dict[str, Any]:
    """One input set at one batch size: every variant, paired rounds."""
    variants = list(models)
    for model in models.values():
        model.summarize(texts[:2])  # load the code paths
    section: dict[str, Any] = {"batch": batch, "items": len(texts)}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    outputs: dict[str, list[str]] = {}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            elapsed, summaries = _timed(models[variant], texts, batch, device)
            seconds[variant].append(elapsed)
            outputs.setdefault(variant, summaries)
    n = len(texts)
    section["items_per_second"] = {v: n / statistics.median(s) for v, s in seconds.items()}
    section["rounds_items_per_second"] = {v: [n / x for x in s] for v, s in seconds.items()}
    section["paired_ratio_vs_transformers"] = {
        v: statistics.median(h / c for h, c in zip(seconds[HF], seconds[v], strict=True))
        for v in variants if v != HF}
    section["agreement_vs_transformers"] = {
        v: token_agreement(tokenizer, outputs[HF], outputs[v]) for v in variants if v != HF}
    if {"ctranslate2-int8", "ctranslate2-float32"} <= set(variants):
        section["agreement_int8_vs_float32"] = token_agreement(
            tokenizer, outputs["ctranslate2-float32"], outputs["ctranslate2-int8"])
    return section


def run_workers(settings: Settings, counts: list[int], texts: list[str], batch: int,
                rounds: int, device: str) -> dict[str, Any]:
    """CTranslate2 replicas as the worker runs them: for each count ``w``, ``w`` replicas
    sharing one translator with ``w`` workers (on the CPU, the cores split between them),
    each replica's thread submitting its share of the batches at once. Paired rounds; the
    ratio of each count to one worker in the same round."""
    import torch

    target = "cuda:0" if device == "cuda" else "cpu"
    pools: dict[int, list[Any]] = {}
    threads: dict[int, int] = {}
    for count in counts:
        translators = SharedTranslators(count)
        pools[count] = [load_summarizer(settings, target, translators=translators)
                        for _ in range(count)]
        translators.resize(target, count)  # as the layout does once the replicas are loaded
        threads[count] = translators.threads_for(target)
        pools[count][0].summarize(texts[:2])  # load the code paths
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]

    def timed(models: list[Any]) -> float:
        def share(k: int) -> None:
            for chunk in batches[k::len(models)]:
                models[k].summarize(chunk)

        with ThreadPoolExecutor(len(models)) as pool:
            started = time.perf_counter()
            list(pool.map(share, range(len(models))))
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

    seconds: dict[int, list[float]] = {c: [] for c in counts}
    for round_index in range(rounds):
        shift = round_index % len(counts)
        for count in counts[shift:] + counts[:shift]:
            seconds[count].append(timed(pools[count]))
    n = len(texts)
    first = counts[0]
    return {
        "batch": batch, "items": n,
        "translator_workers": {c: pools[c][0].translator.num_translators for c in counts},
        "threads_per_worker": threads,
        "items_per_second": {c: n / statistics.median(s) for c, s in seconds.items()},
        "rounds_items_per_second": {c: [n / x for x in s] for c, s in seconds.items()},
        f"paired_ratio_vs_{first}_worker": {
            c: statistics.median(a / b for a, b in zip(seconds[first], seconds[c], strict=True))
            for c in counts},
    }


def _describe(name: str, section: dict[str, Any]) -> str:
    rates = ", ".join(f"{v} {r:.2f}" for v, r in section["items_per_second"].items())
    ratios = ", ".join(f"{v} {r:.2f}x"
                       for v, r in section["paired_ratio_vs_transformers"].items())
    agree = ", ".join(f"{v} {a['tokens']:.0%} tokens/{a['summaries']:.0%} summaries"
                      for v, a in section["agreement_vs_transformers"].items())
    extra = section.get("agreement_int8_vs_float32")
    if extra:
        agree += f"; int8 vs float32 {extra['tokens']:.0%}/{extra['summaries']:.0%}"
    return (f"[{name}] items/s: {rates}\n[{name}] paired ratio vs transformers: {ratios}\n"
            f"[{name}] agreement with transformers: {agree}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("bart-large-cnn", "tiny"), default="bart-large-cnn")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--gen", default="greedy", help="greedy and/or checkpoint, comma-separated")
    parser.add_argument("--lengths", default="fixed,mixed", help="fixed and/or mixed")
    parser.add_argument("--batch", default="8", help="batch sizes, comma-separated")
    parser.add_argument("--items", type=int, default=None, help="items per run (default: batch)")
    parser.add_argument("--source-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compute-types", default=None,
                        help="ctranslate2 compute types (default: int8,float32 on the CPU, "
                             "float16,int8_float16 on CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ct2-cache", type=Path, default=None,
                        help="CT2_CACHE_DIR (default: in the run's temporary directory)")
    parser.add_argument("--workers", default=None,
                        help="also measure ctranslate2 replicas: worker counts, comma-separated "
                             "(e.g. 1,2), at each batch size, per compute type")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")] if args.workers else []
    args.gen = args.gen.split(",")
    args.lengths = args.lengths.split(",")
    args.batch = [int(b) for b in args.batch.split(",")]
    if not set(args.gen) <= set(GENERATION) or not set(args.lengths) <= {"fixed", "mixed"}:
        parser.error("--gen takes greedy/checkpoint, --lengths fixed/mixed")
    if not MIXED_RANGE[0] <= args.source_tokens <= MIXED_RANGE[1]:
        parser.error(f"--source-tokens must be within {MIXED_RANGE}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import ctranslate2
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = resolve_device(args.device)
    types = (args.compute_types.split(",") if args.compute_types
             else ["float16", "int8_float16"] if device == "cuda" else ["int8", "float32"])
    variants = [HF] + [f"ctranslate2-{t}" for t in types]
    command = shlex.join([_relative(sys.executable), _relative(__file__),
                          *(sys.argv[1:] if argv is None else argv)])
    report: dict[str, Any] = {
        "benchmark": "backends", "command": command, "commit": git_commit(),
        "device": device_info(device), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "ctranslate2": ctranslate2.__version__, "shape": args.shape,
        "source_tokens": args.source_tokens, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "variants": variants, "sections": {},
    }
    print(f"backends benchmark: shape={args.shape} device={device} ({report['device']['name']}) "
          f"commit={report['commit']} load={load_average()}\ncommand: {command}", flush=True)

    def save() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        checkpoint = build_checkpoint(args.shape, Path(tmp), args.new_tokens,
                                      half=device == "cuda")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        for gen in args.gen:
            try:
                models, ran = load_variants(checkpoint, variants, gen, device,
                                            args.source_tokens, args.ct2_cache or Path(tmp) / "ct2")
            except Exception as exc:
                report["sections"][gen] = {"error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc()[-2000:]}
                print(f"[{gen}] FAILED to load: {type(exc).__name__}: {exc}", flush=True)
                save()
                continue
            report.setdefault("ran", {})[gen] = ran
            print(f"[{gen}] loaded: {ran}", flush=True)
            for lengths in args.lengths:
                for batch in args.batch:
                    name = f"{gen}/{lengths}/batch{batch}"
                    n = args.items or batch
                    rng = random.Random(SEED)
                    wanted = ([args.source_tokens] * n if lengths == "fixed" else
                              [rng.randint(MIXED_RANGE[0], args.source_tokens) for _ in range(n)])
                    texts = make_texts(tokenizer, wanted, SEED, exact=lengths == "fixed")
                    try:
                        section = run_section(models, tokenizer, texts, batch, args.rounds,
                                              device)
                    except Exception as exc:  # keep what was measured
                        report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                                    "traceback": traceback.format_exc()[-2000:]}
                        print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                    else:
                        report["sections"][name] = section
                        print(_describe(name, section), flush=True)
                    save()
                    for variant in (v for v in variants if v != HF and args.workers):
                        key = f"{name}/{variant}/workers"
                        try:
                            found = run_workers(variant_settings(
                                checkpoint, variant, gen, device, args.source_tokens,
                                args.ct2_cache or Path(tmp) / "ct2"), args.workers, texts, batch,
                                args.rounds, device)
                        except Exception as exc:
                            report["sections"][key] = {
                                "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-2000:]}
                            print(f"[{key}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                        else:
                            report["sections"][key] = found
                            print(f"[{key}] items/s by workers: " + ", ".join(
                                f"{c}: {r:.2f}" for c, r in found["items_per_second"].items())
                                + f"; paired ratio vs {args.workers[0]}: " + ", ".join(
                                f"{c}: {r:.2f}x" for c, r in
                                found[f"paired_ratio_vs_{args.workers[0]}_worker"].items()),
                                flush=True)
                        save()
            del models
    report["total_s"] = time.perf_counter() - began
    report["load_end"] = load_average()
    save()
    print(f"done in {report['total_s']:.0f} s; load average now {report['load_end']}", flush=True)
    print(json.dumps(report, default=str), flush=True)
    return 1 if any("error" in s for s in report["sections"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
