"""The worst case of one record, for each summarizer, on this machine.

Every hostile text class of the input corpus that costs a summarizer time (the ones that
reach it: valid feed items) runs alone, as a batch of one, through the worker's own prepare
and run steps, with the caps the settings give (``MAX_INPUT_CHARS``, ``MAX_SUMMARY_CHARS``).
Each is timed ``--repeats`` times and its median kept; the report gives, per summarizer, the
slowest class in seconds and as a ratio to a plain news item in the same run.

    python -m bench.hostile                       # identity, extractive, seq2seq (both backends)
    python -m bench.hostile --summarizers identity,extractive --repeats 5

The seq2seq summarizers run the tiny random BART checkpoint
(``streamproc.testing.tiny_model``): no real checkpoint can be fetched here. Its cost per
token is far below BART-large-CNN's, but the caps bound both the same way: no text reaches
the encoder past ``MAX_INPUT_TOKENS`` tokens, and decoding stops at the generation length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import git_commit, load_average
from streamproc.settings import Settings
from streamproc.summarize.base import prepare_batch, run_prepared
from streamproc.summarize.factory import load_summarizer

NEWS = ("The city council approved a new budget on Tuesday after a long debate about "
        "transport. Officials said the plan would add more buses to busy routes and repair "
        "old bridges. Critics questioned the timing of the decision. ")
CLASSES = {
    "a news item (baseline)": NEWS * 4,
    "news past MAX_INPUT_CHARS": NEWS * 4000,
    "initials, over and over": "A. " * 330_000,
    "one huge word": "w" * 1_000_000,
    "combining characters": "e" + "\u0301" * 500_000,
    "full stops only": "." * 1_000_000,
    "short sentences": "Go. " * 250_000,
    "one letter words": "a " * 500_000,
    "CJK without spaces": "\u4e2d\u6587" * 300_000,
    "emoji": "\U0001f600" * 250_000,
}
BASELINE = "a news item (baseline)"


def settings_for(name: str, model_dir: Path) -> Settings:
    backend = {"seq2seq-transformers": "transformers", "seq2seq-ctranslate2": "ctranslate2"}
    return Settings(  # type: ignore[call-arg]
        _env_file=None, summarizer=name.split("-")[0], seq2seq_backend=backend.get(name, "auto"),
        model_name=str(model_dir) if name.startswith("seq2seq") else None,
        gpu_device_ids="cpu", gpu_use_fp16=False)


def measure(name: str, model_dir: Path, repeats: int) -> dict[str, float]:
    settings = settings_for(name, model_dir)
    model = load_summarizer(settings, "cpu")
    seconds: dict[str, float] = {}
    for what, text in CLASSES.items():
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            prepared = prepare_batch(model, [text], settings.input_char_cap)
            (summary,) = run_prepared(model, prepared, settings.max_summary_chars)
            runs.append(time.perf_counter() - started)
            assert len(summary) <= settings.max_summary_chars
        seconds[what] = statistics.median(runs)
        print(f"  {name:22} {what:28} {seconds[what]:8.4f} s", file=sys.stderr)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarizers", default="identity,extractive,seq2seq-transformers,"
                        "seq2seq-ctranslate2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from streamproc.testing.tiny_model import build_tiny_model

    print(f"commit {git_commit()}, load average {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        for name in args.summarizers.split(","):
            seconds = measure(name, model_dir, args.repeats)
            worst = max((what for what in seconds if what != BASELINE), key=seconds.__getitem__)
            print(f"{name:22} worst: {worst:28} {seconds[worst]:8.4f} s per record "
                  f"({seconds[worst] / seconds[BASELINE]:.1f}x a news item: "
                  f"{seconds[BASELINE]:.4f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
