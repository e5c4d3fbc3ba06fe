"""``streamproc demo --engine-only``: the sample feed summarized by the engine alone, and the
settings and output both halves of the demo share (the other half is :mod:`.through_kafka`)."""

from __future__ import annotations

import textwrap
from typing import Any

import orjson

from ..settings import Settings
from ..summarize.factory import build_worker
from ..summarize.workload import sample_feed

__all__ = ["demo_settings", "print_metrics", "run_engine_demo"]


def demo_settings(settings: Settings) -> Settings:
    """The demo runs the offline extractive model unless ``SUMMARIZER`` was set explicitly."""
    if "summarizer" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"summarizer": "extractive"})


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    print(f"\n== {title} ==")
    print(orjson.dumps(metrics, option=orjson.OPT_INDENT_2, default=str).decode())


async def run_engine_demo(settings: Settings) -> int:
    items = sample_feed()
    async with build_worker(settings) as worker:
        results = await worker.infer_many([item.text for item in items])
        metrics = worker.get_metrics()
    print(f"\n== {len(items)} summaries by {settings.resolved_model_name} ==")
    failed = 0
    for item, result in zip(items, results, strict=True):
        print(f"\n[{item.id}] {item.title}")
        if isinstance(result, Exception):
            failed += 1
            print(f"  ERROR {type(result).__name__}: {result}")
        else:
            print(textwrap.indent(textwrap.fill(result, 96), "  "))
    print_metrics("worker metrics", metrics)
    return 1 if failed else 0
