"""The seed document's GPUWorker, as a user coming from it writes it: its usage example and its
monitoring snippet run verbatim (but for the import line), on the tiny checkpoint, on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from streamproc import GPUConfig, GPUWorker, TaskEnums
from streamproc.summarize.seq2seq import Seq2SeqSummarizer
from streamproc.summarize.workload import sample_feed


async def test_the_seed_document_usage_example_and_monitoring_snippet_run_verbatim(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    from transformers import AutoModelForSeq2SeqLM

    def model_loader() -> Any:  # the seed document's loader takes no arguments
        return AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))

    items = sample_feed()
    payloads = [{"id": item.id, "title": item.title, "text": item.text} for item in items]
    caplog.set_level(logging.WARNING, "streamproc")

    # --- the seed document, verbatim--------------------------------------------------------------
    config = GPUConfig(device_id=0, max_batch_size=64, enable_multi_model_instances=True)
    worker = GPUWorker(model_loader, config, TaskEnums.SUMMARIZER)
    await worker.start()
    results = await worker.infer_many(payloads)
    num_instances = len(worker._models)
    metrics = worker.get_metrics()
    print(metrics["total_inferences"], metrics["inferences_per_second"])
    # -----------------------------------------------------------------------------------------

    await worker.stop()
    direct = Seq2SeqSummarizer.load(str(tiny_model_dir)).summarize([i.text for i in items])
    assert results == direct, "the summaries of the payloads, in payload order"
    assert num_instances == len(worker.models) == 1
    assert worker.models[0].model.training is False, "the worker put the replica in eval mode"
    assert metrics["total_inferences"] == len(payloads) and metrics["inferences_per_second"] > 0
    total, rate = capsys.readouterr().out.split()
    assert (int(total), float(rate)) == (len(payloads), metrics["inferences_per_second"])
    if not torch.cuda.is_available():
        fallback = [r.getMessage() for r in caplog.records if "device_id=0" in r.getMessage()]
        assert fallback == ["device_id=0: no CUDA device here; running on the CPU"]
