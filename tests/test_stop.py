"""A stop that stops (issue 19), against the real broker: SIGTERM during a long model call and
in the first seconds after start, as processes (``python -m qa.harness serve`` and
``python -m streamproc run``); and a stop that lands while an exactly_once transaction
commits, in process. (A stop during a rebalance is in ``tests/test_group.py``.)"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from qa.harness import Processor, processor_env
from streamproc.kafka.processor import StreamProcessor
from streamproc.testing.kafka import create_topics
from tests.helpers import (
    committed,
    identity_worker,
    items,
    output_ids,
    produce,
    running,
    service_topics,
    settings_for,
    unique_topic,
    wait_for,
)

pytestmark = pytest.mark.kafka

SHUTDOWN_S = 2.0
BOUND_S = SHUTDOWN_S + 5  # every SIGTERM exits within SHUTDOWN_TIMEOUT_S + 5 s


async def service(bootstrap: str, logs: Path, *serve_args: str, **env: str) -> Processor:
    """A service process on topics of its own (``<name>.in`` holds three feed items)."""
    name = unique_topic("stop")
    await create_topics(bootstrap, {f"{name}.in": 1, f"{name}.out": 1, f"{name}.dlq": 1})
    await produce(bootstrap, f"{name}.in", items(3, name))
    return Processor(processor_env(bootstrap, name, "at_least_once",
                                   SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S), **env), logs, *serve_args)


async def test_sigterm_during_a_long_model_call_exits_within_the_bound(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """A model call runs 30 s. The drain gives up on it at SHUTDOWN_TIMEOUT_S, the service
    commits what is safe and logs "stopped cleanly"; the process must then exit, not wait at
    the interpreter's exit for the replica's thread to finish the call."""
    process = await service(kafka_bootstrap, tmp_path, "--item-delay-s", "30",
                            GPU_BATCH_SIZE="1", GPU_MAX_DELAY_MS="0")
    for _ in range(600):
        if process.assigned_or_exited():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the first item's call is under way
    rc = await process.terminate(timeout_s=60)
    log = process.log_text()
    assert rc == 0 and process.exit_s < BOUND_S, (
        f"rc={rc} after {process.exit_s:.1f} s (bound {BOUND_S:.0f} s)\n{log[-3000:]}")
    assert "stopped cleanly" in log and "a model call or the model's import is still" in log, (
        log[-3000:])


def catches_sigterm(pid: int) -> bool:
    """The process has a handler for SIGTERM (Linux: the SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))
                 .split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


async def test_sigterm_in_the_first_seconds_exits_0_with_a_log_line(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """The signal comes as soon as the process handles it, and three seconds after the start
    at the latest: the process is still importing the model stack then. It must not be killed
    by default (rc -15 and an empty log): it stops there, says so, and exits 0."""
    process = await service(kafka_bootstrap, tmp_path)  # python -m streamproc run
    for _ in range(30):
        if process.proc.poll() is not None or catches_sigterm(process.proc.pid):
            break
        await asyncio.sleep(0.1)
    assert process.proc.poll() is None, process.log_text()
    rc = await process.terminate(timeout_s=60)
    log = process.log_text()
    assert rc == 0 and process.exit_s < BOUND_S, (
        f"rc={rc} after {process.exit_s:.1f} s (bound {BOUND_S:.0f} s)\n{log[-3000:]}")
    assert "stopped during start-up" in log, log[-3000:]


async def test_a_stop_lets_the_transaction_in_flight_commit(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """exactly_once: the stop lands while a transaction commits (each commit takes a second
    here). The commit is let finish within the budget, and the rest is committed after the
    drain, rather than the transaction cancelled: a cancelled one stays open, holds back
    every read_committed reader of the output topic until the next owner starts, and leaves
    its records uncommitted."""
    settings = settings_for(kafka_bootstrap, "exactly_once", kafka_commit_interval_ms=100)
    await service_topics(settings, 1)
    sent = items(40, "inflight")
    await produce(kafka_bootstrap, settings.kafka_input_topic, sent)
    original = AIOKafkaProducer.commit_transaction
    commits: list[float] = []

    async def slow_commit(self: AIOKafkaProducer, *args: Any) -> None:
        commits.append(asyncio.get_running_loop().time())
        await asyncio.sleep(1.0)
        await original(self, *args)

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", slow_commit)
    async with identity_worker(delay_s=0.01, batch_size=4, max_delay_ms=5) as worker:
        processor = StreamProcessor(settings, worker)
        async with running(processor):
            await wait_for(lambda: bool(commits), "the first transaction's commit")
            processor.request_stop()
    assert await committed(settings) == {0: len(sent)}
    assert await output_ids(settings) == Counter(k.decode() for k, _ in sent)
