"""Summarizers on local models only: the tiny random BART checkpoint and the bundled MiniLM."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from streamproc.errors import InferenceFailed, ModelLoadError, OutOfMemory
from streamproc.settings import Settings
from streamproc.summarize.base import summarize_batch
from streamproc.summarize.extractive import ExtractiveSummarizer
from streamproc.summarize.factory import build_worker, load_summarizer
from streamproc.summarize.identity import IdentitySummarizer
from streamproc.summarize.sentences import split_sentences
from streamproc.summarize.seq2seq import Seq2SeqSummarizer
from streamproc.testing.tiny_model import build_tiny_model, main

REPO_ROOT = Path(__file__).resolve().parents[1]

PARAGRAPH = (
    "Heavy rain flooded several towns along the northern coast on Sunday. "
    "Dr. Maria Lopez, who leads the regional emergency office, said about 2,000 people "
    "had left their homes. "
    "Rescue teams used boats to reach families trapped on rooftops in the U.S. Army's old "
    "training grounds. "
    "The national weather service warned that more storms would arrive on Tuesday! "
    "Is the region ready for another flood? "
    "Officials said the main highway would stay closed until the water drops. "
    "Schools in the area will remain shut for the rest of the week. "
    "\"We have never seen the river this high,\" said a local farmer."
)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def seq2seq(model_dir: Path, **values: Any) -> Seq2SeqSummarizer:
    chosen = settings(summarizer="seq2seq", model_name=str(model_dir),
                      seq2seq_backend="transformers", **values)
    model = load_summarizer(chosen, "cpu")
    assert isinstance(model, Seq2SeqSummarizer)
    return model


# --- seq2seq -------------------------------------------------------------------------------


def test_seq2seq_generates_one_summary_per_input(tiny_model_dir: Path) -> None:
    model = seq2seq(tiny_model_dir, max_input_tokens=64)
    texts = ["Markets rose on Monday.", "word " * 2000, "", PARAGRAPH, "Short."]
    summaries = summarize_batch(model, texts)
    assert len(summaries) == len(texts)
    assert all(isinstance(summary, str) for summary in summaries)
    assert summaries[2] == ""
    assert model.token_length("word " * 2000) == 64  # truncated, special tokens included
    assert 0 < model.token_length("Markets rose on Monday.") < 64


def test_seq2seq_truncates_sorts_and_restores_order(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = seq2seq(tiny_model_dir, max_input_tokens=16)
    seen: list[int] = []

    def echo(input_ids: Any, attention_mask: Any, **_: Any) -> Any:
        seen.extend(int(mask.sum()) for mask in attention_mask)
        return input_ids

    monkeypatch.setattr(model.model, "generate", echo)
    long_text = " ".join(f"story{i}" for i in range(200))
    texts = ["The vote passed.", long_text, "Rain is expected later this week in the city."]
    summaries = model.summarize(texts)
    assert summaries[0] == "The vote passed."
    assert summaries[2] == "Rain is expected later this week in the city."
    assert long_text.startswith(summaries[1]) and len(summaries[1]) < len(long_text)
    assert seen == sorted(seen, reverse=True) and max(seen) == 16


def test_seq2seq_generation_settings_override_the_checkpoint(tiny_model_dir: Path) -> None:
    default = seq2seq(tiny_model_dir).generation_config
    assert (default.num_beams, default.min_length, default.max_length) == (1, 4, 24)
    assert default.no_repeat_ngram_size == 3

    model = seq2seq(
        tiny_model_dir, gen_num_beams=2, gen_min_length=2, gen_max_length=10,
        gen_length_penalty=1.5, gen_no_repeat_ngram_size=2,
    )
    config = model.generation_config
    assert (config.num_beams, config.min_length, config.max_length) == (2, 2, 10)
    assert (config.length_penalty, config.no_repeat_ngram_size) == (1.5, 2)
    assert model.model.generation_config.max_length == 24  # the checkpoint's copy is untouched
    (summary,) = model.summarize([PARAGRAPH])
    assert len(model.tokenizer(summary)["input_ids"]) <= 10 + 2


def test_seq2seq_input_cap_follows_the_position_limit(tiny_model_dir: Path) -> None:
    assert seq2seq(tiny_model_dir, max_input_tokens=4096).max_input_tokens == 1024


def test_the_tokenizer_pads_to_repeating_shapes(tiny_model_dir: Path) -> None:
    model = seq2seq(tiny_model_dir)
    rows = model.source.sorted_rows(["A much longer story about the harbour.", "", "Short."])
    padded = model.source.pad(rows.rows, 8)
    longest = len(rows.rows[0])
    assert longest % 8 and padded["input_ids"].shape == (2, (longest // 8 + 1) * 8)
    assert padded["attention_mask"].sum(dim=1).tolist() == [len(row) for row in rows.rows]
    assert (padded["input_ids"][padded["attention_mask"] == 0] == 1).all()  # BART's pad id
    assert model.source.pad(rows.rows, None)["input_ids"].shape == (2, len(rows.rows[0]))


def test_allocation_failures_count_as_out_of_memory() -> None:
    assert OutOfMemory.describes(RuntimeError("CUDA failed with error out of memory"))
    assert OutOfMemory.describes(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
                                              "calling `cublasCreate(handle)`"))
    assert OutOfMemory.describes(type("OutOfMemoryError", (RuntimeError,), {})("CUDA"))
    assert OutOfMemory.describes(OutOfMemory("ours"))
    assert not OutOfMemory.describes(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not OutOfMemory.describes(ValueError("bad input"))


def test_static_cache_falls_back_only_on_set_up_errors_before_it_worked(
    tiny_model_dir: Path,
) -> None:
    model = seq2seq(tiny_model_dir)
    assert not model._static_unsupported(ValueError("no static cache"))  # it is off
    model.static_cache = True  # as on CUDA with GPU_STATIC_CACHE
    assert model._static_unsupported(ValueError("does not support static cache"))
    assert model._static_unsupported(NotImplementedError())
    assert not model._static_unsupported(RuntimeError("device-side assert triggered"))
    model._static_proven = True  # once it has worked, an error is an error
    assert not model._static_unsupported(ValueError("shape"))


# --- loading failures ----------------------------------------------------------------------


def test_missing_model_fails_fast_naming_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="MODEL_NAME") as caught:
        load_summarizer(settings(model_name="streamproc-tests/no-such-model"), "cpu")
    assert time.monotonic() - started < 5
    assert "neither in the local Hugging Face cache nor reachable" in str(caught.value)


def test_bad_local_paths_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="MODEL_NAME"):
        load_summarizer(settings(model_name=str(tmp_path / "absent")), "cpu")
    with pytest.raises(ModelLoadError, match="not a loadable checkpoint"):
        load_summarizer(settings(model_name=str(tmp_path)), "cpu")


# --- extractive, identity, sentences -------------------------------------------------------


def test_split_sentences_keeps_abbreviations_together() -> None:
    text = 'Dr. Lee met U.S. officials in Jan. 2024.  "Good news!" she said. Was it? Yes.'
    assert split_sentences(text) == [
        "Dr. Lee met U.S. officials in Jan. 2024.", '"Good news!" she said.', "Was it?", "Yes.",
    ]
    assert split_sentences("  \n ") == []


def test_extractive_picks_k_sentences_in_original_order() -> None:
    model = load_summarizer(settings(summarizer="extractive", extractive_sentences=3), "cpu")
    assert isinstance(model, ExtractiveSummarizer)
    sentences = split_sentences(PARAGRAPH)
    assert len(sentences) == 8
    summary, short, empty = model.summarize([PARAGRAPH, "One  thing.\nTwo things.", "   "])
    picked = split_sentences(summary)
    assert len(picked) == 3
    positions = [sentences.index(sentence) for sentence in picked]
    assert positions == sorted(positions)
    assert (short, empty) == ("One thing. Two things.", "")
    assert model.token_length(PARAGRAPH) > len(sentences)


def test_the_extractive_clip_cuts_a_text_of_few_long_tokens() -> None:
    """One 500,000-character word is a single unknown token: the clip used to count tokens
    only and let the whole text through, and one such record stalled every partition."""
    model = load_summarizer(settings(summarizer="extractive", max_input_tokens=64), "cpu")
    assert isinstance(model, ExtractiveSummarizer)
    for text in ("w" * 500_000, "e" + "\u0301" * 50_000, "Short. Text."):
        clipped, was_cut = model._clip(text)
        assert len(clipped) <= 64 * 16, len(clipped)
        assert was_cut == (len(text) > 64 * 16)
    (summary,) = model.summarize(["w" * 500_000])
    assert len(summary) <= 64 * 16


def test_every_summarizer_sees_at_most_max_input_chars_and_gives_at_most_max_summary_chars(
) -> None:
    """The worker's prepare and run steps cut every text before a tokenizer or sentence
    splitter sees it, and every summary after the model: the identity summarizer's first
    "sentence" of 330,000 initials was once the whole 990 KB text."""
    config = settings(summarizer="identity", max_input_chars=5_000, max_summary_chars=300)
    worker = build_worker(config)
    model = load_summarizer(config, "cpu")
    seen: list[str] = []
    model.prepare = lambda texts: seen.extend(texts) or list(texts)  # type: ignore[method-assign]
    prepared = worker._prepare(model, ["A. " * 330_000, "x" * 10])
    assert [len(text) for text in seen] == [5_000, 10]
    assert [len(s) for s in worker._task(model, prepared)] == [300, 10]
    assert config.model_copy(update={"max_input_chars": None}).input_char_cap == 1024 * 16


def test_sentence_splitting_stays_exact_on_hostile_texts() -> None:
    assert split_sentences("A. " * 1000) == [("A. " * 1000).strip()]
    assert split_sentences("." * 10_000 + " Next one.") == ["." * 10_000, "Next one."]
    assert split_sentences("w" * 100_000 + ". Then A. B. Smith left.") == [
        "w" * 100_000 + ".", "Then A. B. Smith left."]


def test_identity_returns_the_first_sentence() -> None:
    model = load_summarizer(settings(summarizer="identity"), "cpu")
    assert isinstance(model, IdentitySummarizer) and model.model_name == "identity"
    assert model.summarize([PARAGRAPH, "", "No stop at all"]) == [
        "Heavy rain flooded several towns along the northern coast on Sunday.",
        "",
        "No stop at all",
    ]
    assert model.token_length("three short words") == 3


def test_summarize_batch_checks_the_output_count() -> None:
    class Broken(IdentitySummarizer):
        def summarize(self, texts: Sequence[str]) -> list[str]:
            return []

    with pytest.raises(InferenceFailed):
        summarize_batch(Broken(), ["One."])


# --- devtools ------------------------------------------------------------------------------


def test_build_tiny_model_is_idempotent(tiny_model_dir: Path) -> None:
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_devtools_cli_prints_the_checkpoint_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    # In a subprocess on a built checkpoint (fast: nothing to build, torch is never imported) ...
    copied = shutil.copytree(tiny_model_dir, tmp_path / "copied")
    done = subprocess.run(
        [sys.executable, "-m", "streamproc.testing", "tiny-model", str(copied)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    assert done.stdout.strip() == str(copied.resolve())
    # ... and in-process on a fresh directory, which builds a loadable checkpoint.
    fresh = tmp_path / "fresh" / "model"
    assert main(["tiny-model", str(fresh)]) == 0
    assert isinstance(seq2seq(fresh).summarize(["A short test."])[0], str)
