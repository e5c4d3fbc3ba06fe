"""How GPUWorker reads its model loader and its task (streamproc.inference.tasks), and the
built-in summarization task (streamproc.summarize.task)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from streamproc import GPUConfig, GPUWorker, TaskEnums
from streamproc.errors import InferenceFailed
from streamproc.inference.tasks import place, takes_device
from streamproc.summarize.task import payload_text


@dataclass
class Placeable:
    """Records what the worker does to a model it places."""

    calls: list[str] = field(default_factory=list)

    def to(self, device: str) -> Placeable:
        self.calls.append(f"to {device}")
        return self

    def half(self) -> Placeable:
        self.calls.append("half")
        return self

    def eval(self) -> Placeable:
        self.calls.append("eval")
        return self


def names(model: Placeable, payloads: list[str]) -> list[str]:
    return [f"{p}:{' '.join(model.calls)}" for p in payloads]


def test_the_loader_kind_is_read_from_its_signature() -> None:
    def no_args() -> None: ...
    def device(device: str) -> None: ...
    def optional(device: str = "cpu") -> None: ...
    def varargs(*args: str) -> None: ...
    def keyword_only(*, seed: int = 0) -> None: ...

    class Callable:
        def __call__(self) -> None: ...

    assert [takes_device(f) for f in (no_args, device, optional, varargs, keyword_only,
                                      Callable(), lambda: None)] == [
        False, True, True, True, False, False, False]


def test_place_moves_halves_on_cuda_only_and_evals() -> None:
    assert place(Placeable(), "cpu", use_fp16=True).calls == ["to cpu", "eval"]
    assert place(Placeable(), "cuda:1", use_fp16=True).calls == ["to cuda:1", "half", "eval"]
    assert place(Placeable(), "cuda:1", use_fp16=False).calls == ["to cuda:1", "eval"]


async def test_a_zero_argument_loader_gets_its_models_placed_by_the_worker() -> None:
    built: list[Placeable] = []

    def loader() -> Placeable:
        built.append(Placeable())
        return built[-1]

    config = GPUConfig(device_ids="cpu", pool_max_instances=2, max_delay_ms=1)
    async with GPUWorker(loader, config, names) as worker:
        assert await worker.infer("x") == "x:to cpu eval"
        assert worker.models == worker._models == built and len(built) == 2


async def test_a_one_argument_loader_is_called_with_the_device_and_left_alone() -> None:
    devices: list[str] = []

    def loader(device: str) -> Placeable:
        devices.append(device)
        return Placeable()

    async with GPUWorker(loader, GPUConfig(device_ids="cpu", max_delay_ms=1), names) as worker:
        assert await worker.infer("x") == "x:"
    assert devices == ["cpu"]


def test_payload_text_reads_strings_and_feed_items() -> None:
    @dataclass
    class Item:
        text: str

    assert [payload_text(p) for p in ("a", {"text": "b"}, Item("c"))] == ["a", "b", "c"]
    with pytest.raises(Exception, match="feed item with a 'text' string"):
        payload_text({"title": "no text"})


async def test_the_summarizer_task_takes_a_model_and_tokenizer_and_fails_bad_payloads_alone(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def loader(device: str) -> tuple[Any, Any]:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir)).to(device).eval()
        return model, tokenizer

    config = GPUConfig(device_ids="cpu", enable_warmup=False, max_delay_ms=1)
    async with GPUWorker(loader, config, TaskEnums.SUMMARIZER) as worker:
        results = await worker.infer_many(["Markets rose on Monday.", {"id": "x"},
                                           {"text": "Markets rose on Monday."}])
    assert isinstance(results[1], InferenceFailed)
    assert "feed item with a 'text' string" in str(results[1])
    assert isinstance(results[0], str) and results[0] and results[0] == results[2]
    assert worker.models[0].tokenizer is tokenizer
