"""The device n-gram blocker matches transformers' own processor exactly."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from streamproc.summarize.ngram import DeviceNoRepeatNGram


@pytest.mark.parametrize("ngram", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 7, 40])
def test_matches_hf_processor_on_random_sequences(ngram: int, length: int) -> None:
    generator = torch.Generator().manual_seed(ngram * 100 + length)
    vocab = 12  # a small vocabulary makes repeats, and so bans, frequent
    ids = torch.randint(0, vocab, (16, length), generator=generator)
    scores = torch.randn(16, vocab, generator=generator)
    expected = NoRepeatNGramLogitsProcessor(ngram)(ids, scores.clone())
    actual = DeviceNoRepeatNGram(ngram)(ids, scores.clone())
    assert torch.equal(torch.isinf(expected), torch.isinf(actual))
    assert torch.equal(expected, actual)


def test_blocks_the_token_that_would_repeat_a_trigram() -> None:
    ids = torch.tensor([[5, 6, 7, 1, 5, 6]])
    out = DeviceNoRepeatNGram(3)(ids, torch.zeros(1, 10))
    assert torch.isinf(out[0, 7]) and not torch.isinf(out[0]).sum() > 1


def test_generation_with_the_device_processor_equals_hf_blocking(tiny_model_dir: object) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, LogitsProcessorList

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval()
    batch = tokenizer(["the council voted on the harbor barrier again and again"] * 2,
                      return_tensors="pt")
    kwargs = {"num_beams": 2, "max_length": 30, "min_length": 20, "do_sample": False}
    with torch.inference_mode():
        reference = model.generate(**batch, no_repeat_ngram_size=2, **kwargs)
        ours = model.generate(**batch, no_repeat_ngram_size=0, **kwargs,
                              logits_processor=LogitsProcessorList([DeviceNoRepeatNGram(2)]))
    assert torch.equal(reference, ours)
