"""Smoke test of bench/engine.py: a tiny run on the CPU gives a figure for every layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import engine


def _positive(result: dict[str, object]) -> bool:
    value = result.get("items_per_second")
    return isinstance(value, float) and value > 0


def test_engine_bench_tiny_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engine.json"
    code = engine.main(["--shape", "tiny", "--device", "cpu", "--items", "16",
                        "--source-tokens", "32", "--new-tokens", "4", "--rounds", "1",
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report == json.loads(printed.strip().splitlines()[-1])  # the JSON comes last
    assert report["command"].startswith(".venv/bin/python bench/engine.py --shape tiny")
    assert report["commit"] and report["device"]["name"]
    assert report["torch"] and report["transformers"]
    for gen in ("greedy", "checkpoint"):
        fixed = report["fixed"][gen]
        check = fixed["generation_check"]
        assert check["output_length"] == 5 and check["min_new_tokens"] == 4
        assert check["num_beams"] == (1 if gen == "greedy" else 4)
        for layout in ("a", "b", "c", "bare"):
            assert _positive(fixed["layouts"][layout]), (gen, layout, fixed["layouts"][layout])
        assert fixed["layouts"]["a"]["replicas"] == 2  # the CPU stand-in for the VRAM plan
        assert fixed["layouts"]["b"]["replicas"] == 1
        tune = fixed["layouts"]["c"]["autotune"]  # the CPU calibrates too, within its budget
        assert tune["items_per_second_by_batch"] and tune["batch_size"] in (48, 96, 192, 384)
        assert fixed["layouts"]["c"]["batch_size"] == tune["batch_size"]
        assert fixed["layouts"]["b"]["autotune"] is None
        assert fixed["ratios"]["c/a"] > 0 and fixed["ratios"]["c/b"] > 0
        mixed = report["mixed"][gen]
        for layout in ("b", "c", "c_window0"):
            assert _positive(mixed["layouts"][layout]), (gen, layout, mixed["layouts"][layout])
        assert mixed["layouts"]["c"]["sort_window"] > 0 == mixed["layouts"]["c_window0"][
            "sort_window"]
        assert 64 <= mixed["source_tokens"]["min"] <= mixed["source_tokens"]["max"] <= 1024
    assert "[greedy] ratios: c/a=" in printed


def test_exact_source_lengths(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = engine.make_texts(tokenizer, [100] * 5, seed=1, exact=True)
    assert engine.token_lengths(tokenizer, texts, 100) == [100] * 5
    assert all(length > 100 for length in engine.token_lengths(tokenizer, texts, 1024))
    rough = engine.make_texts(tokenizer, [64, 300, 1000], seed=2, exact=False)
    for wanted, got in zip([64, 300, 1000], engine.token_lengths(tokenizer, rough, 1024),
                           strict=True):
        assert abs(got - wanted) <= 3
