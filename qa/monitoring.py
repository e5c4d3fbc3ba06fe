"""A real Prometheus (Debian's ``prometheus`` package) for the monitoring tests and the
dashboard's picture.

:class:`Prometheus` runs one over a temporary directory, scraping the given targets every
second with the given rules, and answers queries and alerts through Prometheus's HTTP API.
``python -m qa.monitoring picture OUT.png`` runs ``streamproc run`` against a broker of its
own with records flowing, scrapes it, and has headless Chromium render Prometheus's graph page
with the key queries of the dashboard (``docs/monitoring.png`` was made so).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["DASHBOARD", "RULES", "Prometheus", "PrometheusError", "dashboard_queries"]

READY_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "streamproc.json"
RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml"
# The dashboard's variables as "All", and Grafana's rate interval at a 1 s scrape.
VARIABLES = {"$instance": ".*", "$topic": ".*", "$__rate_interval": "5s"}
# The queries of the picture: (panel title, legend) of the dashboard's.
PICTURED = (("Items/s in and out", "in {{instance}}"), ("Consumer lag by partition", None),
            ("End-to-end latency", "p99"), ("Dead letters by reason", None))


def dashboard_queries(pick: tuple[tuple[str, str | None], ...] | None = None) -> list[str]:
    """The dashboard's PromQL, with its variables set to match everything: every query, or
    those ``pick`` names by panel title and legend (None: the panel's first)."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    if pick is None:
        exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    else:
        by_title = {p["title"]: p["targets"] for p in panels if p["type"] != "row"}
        exprs = [next(t["expr"] for t in by_title[title]
                      if legend is None or t["legendFormat"] == legend)
                 for title, legend in pick]
    for name, value in VARIABLES.items():
        exprs = [e.replace(name, value) for e in exprs]
    return exprs


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error."""


class Prometheus:
    """One ``prometheus`` process on ``127.0.0.1:port``, its data in ``workdir``: job
    ``streamproc`` scrapes ``targets`` every second, and ``rules`` (a rule file's text) are
    evaluated every second. A context manager; leaving it stops the process."""

    def __init__(self, workdir: Path, port: int, targets: list[str], rules: str) -> None:
        self.workdir, self.port, self.targets, self.rules = workdir, port, targets, rules
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    def __enter__(self) -> Self:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (Debian: apt-get install "
                                    "prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "alerts.yaml").write_text(self.rules, encoding="utf-8")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": ["alerts.yaml"],
            "scrape_configs": [{"job_name": "streamproc",
                                "static_configs": [{"targets": self.targets}]}],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config), encoding="utf-8")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"prometheus did not become ready:\n{self.log_text()}")
            time.sleep(0.2)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return int(answer.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def _api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: "
                                  f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) ``expr`` gives now."""
        data = self._api("query", query=expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing now."""
        return list(self._api("alerts")["alerts"])

    def target_health(self) -> list[str]:
        return [t["health"] for t in self._api("targets")["activeTargets"]]


# --- the picture --------------------------------------------------------------------------


def picture(out: Path, seconds: float, port: int, metrics_port: int) -> None:
    """``streamproc run`` on a broker of its own, fed good and bad records for ``seconds``
    at a rate that rises and falls, scraped by a Prometheus on ``port``; then headless
    Chromium renders Prometheus's graph page with the dashboard's key queries into ``out``."""
    from qa.harness import Processor, processor_env, say, suite_broker

    work = Path(tempfile.mkdtemp(prefix="streamproc-picture-"))
    with suite_broker() as broker:
        env = processor_env(broker.bootstrap, "picture", "at_least_once",
                            METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1")
        asyncio.run(_topics(broker.bootstrap))
        process = Processor(env, work, "--item-delay-s", "0.002")
        try:
            rules = RULES.read_text(encoding="utf-8")
            with Prometheus(work / "prometheus", port, [f"127.0.0.1:{metrics_port}"],
                            rules) as prom:
                say(f"feeding records for {seconds:.0f} s; Prometheus on {prom.url}")
                asyncio.run(_feed(broker.bootstrap, seconds))
                _screenshot(prom, out, seconds)
        finally:
            process.kill()
    say(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


async def _topics(bootstrap: str) -> None:
    from streamproc.testing.kafka import create_topics

    await create_topics(bootstrap, {"picture.in": 3, "picture.out": 3, "picture.dlq": 1})


async def _feed(bootstrap: str, seconds: float) -> None:
    import math

    import orjson
    from aiokafka import AIOKafkaProducer

    from streamproc.testing.records import BAD_RECORDS

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        started, i = time.monotonic(), 0
        while (elapsed := time.monotonic() - started) < seconds:
            rate = 60 + 50 * math.sin(elapsed / seconds * 2 * math.pi)  # records/s
            for _ in range(max(1, int(rate / 10))):
                i += 1
                value = (BAD_RECORDS[i % len(BAD_RECORDS)].value if i % 40 == 0 else
                         orjson.dumps({"id": f"p-{i}", "text": f"Story {i} happened. More."}))
                await producer.send("picture.in", value=value, key=str(i).encode())
            await asyncio.sleep(0.1)
        await producer.flush()
    finally:
        await producer.stop()


def _screenshot(prom: Prometheus, out: Path, seconds: float) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    params: dict[str, str] = {}
    for i, expr in enumerate(dashboard_queries(PICTURED)):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.stacked": "0",
                       f"g{i}.range_input": f"{max(int(seconds), 60)}s"})
    url = f"{prom.url}/graph?{urllib.parse.urlencode(params)}"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={out}", "--window-size=1200,2900",
                    "--virtual-time-budget=15000", url],
                   check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qa.monitoring")
    sub = parser.add_subparsers(dest="command", required=True)
    shot = sub.add_parser("picture", help="Prometheus's graph page of a real run, as a PNG")
    shot.add_argument("out", type=Path)
    shot.add_argument("--seconds", type=float, default=90)
    shot.add_argument("--port", type=int, default=19090, help="Prometheus's port")
    shot.add_argument("--metrics-port", type=int, default=19108, help="streamproc's")
    args = parser.parse_args(argv)
    picture(args.out.resolve(), args.seconds, args.port, args.metrics_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
