"""The Grafana dashboard (``deploy/grafana/streamproc.json``) and the alert rules against real
parts: a real Prometheus (Debian's package, :class:`qa.monitoring.Prometheus`) scrapes a real
``streamproc run`` (``python -m qa.harness serve``: the identity summarizer behind a model that
can stall) on the test broker while records flow.

1. Every query of the dashboard, with its variables set to match everything, returns data
   through Prometheus's HTTP API. The GPU memory queries are the one exception: a CPU run has
   no GPU, so they must evaluate without error and find nothing.
2. Every alert expression evaluates without error. A healthy run gives most of them no
   series, by design, so each series an alert reads (each selector in its expression) must
   return data instead; and two of them are seen to go pending for real:
3. the model stalls on a record while more arrive: lag, no output, ``StreamprocStuck``;
4. the processor stops: ``StreamprocTargetDown``.

The test's copy of the rules has short windows (``[5s]``) and a ``for`` of a minute, so
an alert goes pending within seconds and stays pending for the test to see."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from qa.harness import Processor, processor_env
from qa.monitoring import DASHBOARD, RULES, Prometheus, dashboard_queries
from streamproc.testing.kafka import create_topics
from streamproc.testing.records import BAD_RECORDS
from tests.helpers import items, produce, prometheus_tool, unique_topic
from tests.probes import free_port

GPU_ONLY = re.compile(r"streamproc_gpu_memory_\w+")
SELECTOR = re.compile(r"\b((?:streamproc_\w+|up))\b(\{[^}]*\})?(?!\s*\()")
STALL = "STALL-THE-MODEL"


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def fast_rules() -> str:
    """The rules with every range window 5 s and every ``for`` a minute."""
    text = RULES.read_text(encoding="utf-8")
    text = re.sub(r"\[\d+[smh]\]", "[5s]", text)
    return re.sub(r"for: \d+[smh]", "for: 1m", text)


def selectors(expr: str) -> list[str]:
    """The series selectors of ``expr`` (a metric name and its matchers, not a function)."""
    return sorted({name + (matchers or "") for name, matchers in SELECTOR.findall(expr)})


def test_the_dashboard_is_importable_and_has_the_panels() -> None:
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "topic"):
        assert variables[name]["type"] == "query" and variables[name]["allValue"] == ".*"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "instance=~\"$instance\"" in target["expr"], (panel["title"], target)
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in ("items/s in and out", "lag by partition", "time to drain", "latency",
                   "dead letters by reason", "batch size", "batch latency", "replicas",
                   "health", "gpu memory", "commits and transaction aborts",
                   "rebalances and partition pauses"):
        assert wanted in titles, wanted
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_every_query_parses() -> None:
    """promtool reads each dashboard query as a recording rule (no server needed)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e}
        for i, e in enumerate(dashboard_queries())]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(json.dumps(rules))
        f.flush()
        done = subprocess.run([prometheus_tool("promtool"), "check", "rules", f.name],
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.kafka
async def test_prometheus_scrapes_a_run_every_query_answers_and_alerts_go_pending(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    prometheus_tool("prometheus")
    name = unique_topic("mon")
    await create_topics(kafka_bootstrap, {f"{name}.in": 3, f"{name}.out": 1,
                                          f"{name}.dlq": 1})
    metrics_port = free_port()
    target = f"127.0.0.1:{metrics_port}"
    env = processor_env(kafka_bootstrap, name, "at_least_once", METRICS_PORT=str(metrics_port),
                        METRICS_HOST="127.0.0.1", GPU_QUEUE_SIZE="4", GPU_BATCH_SIZE="2",
                        GPU_MAX_DELAY_MS="5", SHUTDOWN_TIMEOUT_S="2",
                        KAFKA_CONNECT_TIMEOUT_S="15")
    process = Processor(env, tmp_path, "--stall-on", STALL, "--stall-s", "120")
    try:
        with Prometheus(tmp_path / "prometheus", free_port(), [target], fast_rules()) as prom:
            await _while_records_flow(prom, kafka_bootstrap, name, process)
            await _stuck(prom, kafka_bootstrap, name)
            await process.terminate(timeout_s=15)
            await _pending(prom, "StreamprocTargetDown", {"instance": target}, 20)
    finally:
        process.kill()


async def _while_records_flow(prom: Prometheus, bootstrap: str, name: str,
                              process: Processor) -> None:
    async def answered() -> float:
        found = await asyncio.to_thread(
            prom.query, "sum(streamproc_summaries_produced_total)")
        return float(found[0]["value"][1]) if found else 0.0

    async def trickle() -> None:  # good and bad records, a few a second, while we look
        for i in range(1000):
            await produce(bootstrap, f"{name}.in", items(2, f"{name}-t{i}"))
            if i % 5 == 0:
                await produce(bootstrap, f"{name}.in", [(b"bad", BAD_RECORDS[0].value)])
            await asyncio.sleep(0.2)

    flowing = asyncio.create_task(trickle())
    try:
        await produce(bootstrap, f"{name}.in", items(20, name))
        await produce(bootstrap, f"{name}.in", [(b"bad", bad.value) for bad in BAD_RECORDS])
        for _ in range(300):
            assert process.proc.poll() is None, process.log_text()[-3000:]
            if await answered() >= 20:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"no summaries scraped:\n{process.log_text()[-3000:]}")
        await asyncio.sleep(6)  # one full [5s] window of scrapes with records in it
        empty: list[str] = []
        for expr in dashboard_queries():
            found = await asyncio.to_thread(prom.query, expr)  # PrometheusError on an error
            if bool(found) == bool(GPU_ONLY.search(expr)):
                empty.append(f"{expr} -> {found}")
        assert not empty, "\n".join(empty)
        for rule in alert_rules():
            await asyncio.to_thread(prom.query, rule["expr"])  # evaluates without error
            for selector in selectors(rule["expr"]):
                assert await asyncio.to_thread(prom.query, selector), (rule["alert"], selector)
    finally:
        flowing.cancel()
        await asyncio.gather(flowing, return_exceptions=True)


async def _stuck(prom: Prometheus, bootstrap: str, name: str) -> None:
    """The model stalls on one record; the records behind it fill the worker's queue (4),
    the fetch stops, lag builds, and nothing is written."""
    stall = orjson.dumps({"id": "stall", "text": f"{STALL} now. Nothing after."})
    await produce(bootstrap, f"{name}.in", [(b"stall", stall)])
    await asyncio.sleep(0.5)
    await produce(bootstrap, f"{name}.in", items(30, f"{name}-behind"))
    await _pending(prom, "StreamprocStuck", {}, 30)


async def _pending(prom: Prometheus, alert: str, labels: dict[str, str],
                   timeout_s: float) -> None:
    seen: list[dict[str, Any]] = []
    for _ in range(int(timeout_s / 0.5)):
        seen = await asyncio.to_thread(prom.alerts)
        if any(a["labels"]["alertname"] == alert and a["state"] == "pending"
               and labels.items() <= a["labels"].items() for a in seen):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{alert} did not go pending within {timeout_s:.0f} s; alerts: {seen}")
