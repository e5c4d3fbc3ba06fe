"""``/metrics``, ``/healthz`` and ``/readyz`` against the real local Kafka broker.

1. In process: a StreamProcessor around the identity summarizer, with Observability serving
   on a free port. Good and bad records go through; the scraped counters must move by exactly
   what went through, the lag gauge must fall to 0, and ``/metrics`` must agree with
   ``get_metrics()``.
2. As a process (``python -m streamproc run``) with the tiny seq2seq checkpoint and a slow
   warm-up: ``/readyz`` answers 503 while the model loads, 200 only after the warm-up and the
   group join, and 503 "shutting down" between SIGTERM and a clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from streamproc.errors import DeliveryFailed
from streamproc.kafka.processor import StreamProcessor
from streamproc.ops.http import OpsServer
from streamproc.settings import Settings
from streamproc.summarize.factory import build_worker
from streamproc.testing.kafka import read_to_end
from streamproc.testing.records import BAD_RECORDS
from tests.helpers import identity_worker, produce, unique_topic
from tests.probes import (
    Samples,
    aget,
    eventually,
    free_port,
    good_record,
    lag_by_partition,
    parse_metrics,
    scrape,
    value,
)

pytestmark = pytest.mark.kafka

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- 1. in process ---------------------------------------------------------------------------


async def test_metrics_count_what_went_through(kafka_bootstrap: str) -> None:
    n_good, partitions = 12, 3
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, summarizer="identity", gpu_device_ids="cpu", gpu_enable_warmup=False,
        gpu_batch_size=8, gpu_max_delay_ms=20, metrics_port=free_port(),
        metrics_host="127.0.0.1", kafka_bootstrap_servers=kafka_bootstrap,
        kafka_input_topic=unique_topic("obs-in"), kafka_output_topic=unique_topic("obs-out"),
        kafka_dlq_topic=unique_topic("obs-dlq"), kafka_group_id=unique_topic("obs-group"),
        kafka_create_topics=True, kafka_topic_partitions=partitions,
        kafka_commit_interval_ms=200, kafka_connect_timeout_s=15, log_interval_s=0.5,
        shutdown_timeout_s=10)
    worker = build_worker(settings)
    processor = StreamProcessor(settings, worker)
    async with (asyncio.timeout(60), OpsServer(settings, worker, processor) as obs, worker,
                processor):
        port = obs.port
        assert port == settings.metrics_port
        task = asyncio.create_task(processor.run())
        try:
            ready = await eventually(lambda: aget(port, "/readyz"),
                                     lambda r: r is not None and r[0] == 200, 30, "ready")
            assert ready == (200, "ready\n")
            assert await aget(port, "/healthz") == (200, "ok\n")
            assert (await aget(port, "/nope") or (0,))[0] == 404
            before = await scrape(port)

            bad = [(f"bad-{i}".encode(), v) for i, (_, v, _) in enumerate(BAD_RECORDS)]
            good = [(f"item-{i}".encode(), good_record(i)) for i in range(n_good)]
            await produce(kafka_bootstrap, settings.kafka_input_topic, [*good, *bad])
            total = n_good + len(bad)

            def answered(s: Samples) -> float:
                dead = sum(v for (name, _), v in s.items()
                           if name == "streamproc_dead_letters_total")
                return value(s, "streamproc_summaries_produced_total") + dead

            await eventually(lambda: scrape(port), lambda s: answered(s) >= total, 30,
                             "every record answered")
            after = await eventually(
                lambda: scrape(port),
                lambda s: (value(s, "streamproc_commits_total") >= 1
                           and len(lag_by_partition(s)) == partitions
                           and not any(lag_by_partition(s).values())),
                20, "a commit and zero lag on every partition")
        finally:
            processor.request_stop()
            stopping = await aget(port, "/readyz")
            await asyncio.wait_for(task, 30)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("streamproc_items_consumed_total") == total
    assert moved("streamproc_summaries_produced_total") == n_good
    expected: dict[str, int] = {}
    for _, _, reason in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert moved("streamproc_dead_letters_total", reason=reason) == count, reason
    reasons = {dict(labels)["reason"] for (name, labels) in after
               if name == "streamproc_dead_letters_total"}
    assert reasons == set(expected)
    assert moved("streamproc_inferences_total") == n_good
    assert value(after, "streamproc_inference_failures_total") == 0
    assert value(after, "streamproc_batch_size_items_count") >= 1
    assert value(after, "streamproc_batch_size_items_sum") == n_good
    # One queue-wait observation per dispatched batch (its oldest item's wait).
    batches = moved("streamproc_batch_size_items_count")
    assert moved("streamproc_queue_wait_seconds_count") == batches
    assert moved("streamproc_end_to_end_latency_seconds_count") == total
    assert value(after, "streamproc_commits_total") >= 1
    assert value(after, "streamproc_assigned_partitions") == partitions
    assert value(after, "streamproc_replicas", device="cpu") == 1
    assert value(after, "streamproc_replicas_planned", device="cpu") == 1
    assert after[("streamproc_fatal_stop", frozenset())] == 0
    assert value(after, "streamproc_transaction_aborts_total") == 0
    assert value(after, "streamproc_partition_pauses_total") == processor.stats.pauses
    assert ("streamproc_longest_model_call_seconds", frozenset()) in after
    assert value(after, "streamproc_queue_depth_items") == 0
    assert lag_by_partition(after) == dict.fromkeys(range(partitions), 0.0)
    # /metrics reads the very counters get_metrics() and the processor's stats read.
    assert worker.get_metrics()["total_inferences"] == value(after, "streamproc_inferences_total")
    assert processor.stats.consumed == value(after, "streamproc_items_consumed_total")
    assert ("streamproc_backpressure_seconds_total", frozenset()) in after
    assert processor.stats.backpressure_seconds == value(
        after, "streamproc_backpressure_seconds_total")
    assert stopping is not None and stopping[0] == 503 and "shutting down" in stopping[1]
    # And the topics hold what the counters say.
    assert len(await read_to_end(kafka_bootstrap, settings.kafka_output_topic)) == n_good
    assert len(await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic)) == len(bad)


# --- 2. readiness lifecycle of `streamproc run` ----------------------------------------------


def service_env(**variables: object) -> dict[str, str]:
    """The current environment without any streamproc setting, plus ``variables``."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in variables.items()})
    return env


def start_service(cwd: Path, env: dict[str, str], stderr: Path) -> subprocess.Popen[bytes]:
    with stderr.open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "streamproc", "run"], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def log_time(log: str, needle: str) -> float:
    """Wall-clock time (epoch seconds) of the first log line containing ``needle``."""
    for line in log.splitlines():
        if needle in line:
            stamp = " ".join(line.split(" ", 2)[:2])  # "2025-01-31 12:00:00,123"
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no {needle!r} line in the log:\n{log[-4000:]}")


async def test_readiness_follows_load_join_and_sigterm(
        kafka_bootstrap: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    input_topic, output_topic = unique_topic("ready-in"), unique_topic("ready-out")
    stderr = tmp_path / "stderr.log"
    # Forced 96-token generations make the warm-up batch (2 items on the CPU) and every
    # later batch take about a second (more on a busy machine): long enough to see 503 while
    # the model is loaded and warmed, and "shutting down" while a batch drains after SIGTERM.
    env = service_env(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_INPUT_TOPIC=input_topic,
        KAFKA_OUTPUT_TOPIC=output_topic, KAFKA_DLQ_TOPIC=unique_topic("ready-dlq"),
        KAFKA_GROUP_ID=unique_topic("ready-group"), KAFKA_CREATE_TOPICS="true",
        KAFKA_COMMIT_INTERVAL_MS=200, KAFKA_CONNECT_TIMEOUT_S=15,
        SUMMARIZER="seq2seq", MODEL_NAME=str(tiny_model_dir), GPU_DEVICE_IDS="cpu",
        GPU_ENABLE_WARMUP="true", GPU_USE_FP16="false", GPU_BATCH_SIZE=8, GPU_MAX_DELAY_MS=20,
        MAX_INPUT_TOKENS=256, GEN_NUM_BEAMS=1, GEN_MIN_LENGTH=96, GEN_MAX_LENGTH=96,
        SHUTDOWN_TIMEOUT_S=20, METRICS_PORT=port, METRICS_HOST="127.0.0.1",
        LOG_INTERVAL_S=0.5, HF_HUB_OFFLINE=1)
    process = start_service(tmp_path, env, stderr)

    def log() -> str:
        return stderr.read_text(errors="replace")

    try:
        # 1. Not ready while the model loads and warms up, then ready.
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"the service exited early:\n{log()[-4000:]}"
            assert time.monotonic() < deadline, f"never ready: {seen[-3:]}\n{log()[-4000:]}"
            answer = await aget(port, "/readyz")
            if answer is not None:
                seen.append(answer)
                if answer[0] == 200:
                    ready_at, log_at_ready = time.time(), log()
                    break
            await asyncio.sleep(0.05)
        assert seen[-1] == (200, "ready\n")
        not_ready = [body for status, body in seen[:-1] if status == 503]
        assert any("models not loaded and warm" in body for body in not_ready), seen[:5]
        assert {status for status, _ in seen[:-1]} <= {503}, seen
        # Warm-up and join were done (and logged) before the first 200.
        for needle in ("warmed up on", "partitions assigned"):
            assert needle in log_at_ready, f"ready before {needle!r}:\n{log_at_ready[-4000:]}"
            assert log_time(log_at_ready, needle) <= ready_at
        assert log_time(log_at_ready, "metrics and health on") <= log_time(
            log_at_ready, "warmed up on"), "the health server must start before the load"
        assert await aget(port, "/healthz") == (200, "ok\n")

        # 2. Work in hand, then SIGTERM: "shutting down" until the drain is done, exit 0.
        n = 2
        await produce(kafka_bootstrap, input_topic,
                      [(f"k{i}".encode(), good_record(i)) for i in range(n)])
        await eventually(lambda: scrape(port),
                         lambda s: value(s, "streamproc_items_consumed_total") >= n, 30,
                         "the records consumed")
        process.send_signal(signal.SIGTERM)
        after_term: list[tuple[int, str]] = []
        while process.poll() is None:
            answer = await aget(port, "/readyz")
            if answer is None:
                break  # the server closes last, just before the process exits
            after_term.append(answer)
            await asyncio.sleep(0.02)
        code = await asyncio.to_thread(process.wait, 40)
    finally:
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
    text = log()
    assert code == 0, text[-4000:]
    assert "stopped cleanly" in text, text[-4000:]
    shutting = [i for i, (status, body) in enumerate(after_term)
                if status == 503 and "shutting down" in body]
    assert shutting, f"never saw 503 'shutting down' after SIGTERM: {after_term[:5]}"
    assert all(status == 503 for status, _ in after_term[shutting[0]:]), after_term
    # The drain finished the work in hand before the exit.
    assert len(await read_to_end(kafka_bootstrap, output_topic)) == n


def test_a_metrics_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """Before any model or Kafka work: one line naming METRICS_PORT and the port, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "METRICS_"))}
        env.update(METRICS_HOST="127.0.0.1", METRICS_PORT=str(port), SUMMARIZER="identity",
                   KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
        done = subprocess.run([sys.executable, "-m", "streamproc", "run"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"streamproc: invalid setting METRICS_PORT={port}: cannot listen on 127.0.0.1:{port} "
        "(Address already in use); pick a free port, or 0 for none"]


async def test_liveness_fails_with_its_reason_when_no_replica_is_healthy_or_a_fault_stops(
        ) -> None:
    """/healthz's answer: the last healthy replica leaving, or a fault not a record's own
    stopping the processor, each turn it to 503 with the reason (no broker needed)."""
    settings = Settings(_env_file=None, metrics_port=0, summarizer="identity",  # type: ignore[call-arg]
                        gpu_device_ids="cpu", gpu_enable_warmup=False)
    worker = identity_worker()
    await worker.start()
    processor = StreamProcessor(settings, worker)
    try:
        health = OpsServer(settings, worker, processor)

        def gauges() -> tuple[float, float]:  # what the alert rules read of the same state
            samples = parse_metrics(generate_latest(health.registry).decode())
            return (samples[("streamproc_fatal_stop", frozenset())],
                    samples[("streamproc_replicas", frozenset({("device", "cpu")}))])

        assert health.liveness() == (True, "ok")
        assert gauges() == (0, 1)
        processor.fatal = DeliveryFailed("feeds-0: not acknowledged within "
                                         "KAFKA_DELIVERY_TIMEOUT_MS")
        ok, why = health.liveness()
        assert not ok and "KAFKA_DELIVERY_TIMEOUT_MS" in why
        assert gauges() == (1, 1)
        processor.fatal = None
        for replica in worker.replicas:
            replica.broken(RuntimeError("device-side assert"))
        assert health.liveness() == (False, "no healthy model replica")
        assert gauges() == (0, 0)
    finally:
        await processor.stop()
        await worker.stop(1)


def test_end_to_end_latency_buckets_reach_a_backlogs_hours() -> None:
    """A record that waited hours in a backlog lands in a bucket of its own size, up to the
    oldest source timestamp the metric takes."""
    from streamproc.kafka.outbound import MAX_SOURCE_AGE_S
    from streamproc.kafka.stats import PipelineStats

    stats = PipelineStats()
    stats.end_to_end.observe(3 * 3600)
    samples = {s.labels["le"]: s.value for m in stats.end_to_end.collect() for s in m.samples
               if s.name.endswith("_bucket")}
    assert samples["7200.0"] == 0 and samples["14400.0"] == 1
    assert float(max((le for le in samples if le != "+Inf"), key=float)) == MAX_SOURCE_AGE_S
