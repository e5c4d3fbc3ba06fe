"""Talking to a running streamproc from outside, as an operator would: feed records to its
input topic, scrape its HTTP endpoints, and wait for what they say to settle. Shared by the
observability tests (a processor in this process or a subprocess) and the container test."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, str] | None:
    """(status, body) of ``GET path``; None when nothing answers (not up yet, or gone)."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return None


async def aget(port: int, path: str) -> tuple[int, str] | None:
    return await asyncio.to_thread(http_get, port, path)


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text page, by (sample name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


async def scrape(port: int) -> Samples:
    answer = await aget(port, "/metrics")
    assert answer is not None and answer[0] == 200, answer
    return parse_metrics(answer[1])


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def lag_by_partition(samples: Samples) -> dict[int, float]:
    return {int(dict(labels)["partition"]): v for (name, labels), v in samples.items()
            if name == "streamproc_consumer_lag_records"}


async def eventually(probe: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float,
                     what: str, interval_s: float = 0.1) -> Any:
    """Await ``probe()`` until ``done(result)``; the last result, or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                 f"last: {result!r}"[:4000])
        await asyncio.sleep(interval_s)


def good_record(i: int) -> bytes:
    return orjson.dumps({"id": f"item-{i:03d}", "title": f"Title {i}",
                         "text": f"Story {i}. The city council approved a new budget on Tuesday."})
