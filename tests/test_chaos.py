"""The chaos harness, short form, against the session's test broker, in both guarantees.

``python -m qa.chaos`` runs the service as subprocesses and, while items are in
flight, kills it with SIGKILL three times, lets a second processor join the group and leave
(SIGTERM), and sends a burst of bad records; then it reads the output and DLQ topics with an
independent read_committed consumer. Broker restarts need the harness's own broker (the long
form, see CONTRIBUTING.md); here they are 0.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.kafka



def figures(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def test_chaos_short_form_both_guarantees(kafka_bootstrap: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "qa.chaos", "--n", "300", "--kills", "3",
         "--partitions", "6", "--bad", "10", "--rebalance", "--broker-restarts", "0",
         "--guarantee", "both", "--bootstrap", kafka_bootstrap, "--seed", "1",
         "--timeout-s", "150"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=420, check=False)
    elapsed = time.monotonic() - started
    context = f"rc={done.returncode} after {elapsed:.0f} s\n{done.stdout}\n{done.stderr[-6000:]}"
    assert done.returncode == 0, context

    lines = {figures(line)["mode"]: figures(line) for line in done.stdout.splitlines()
             if line.startswith("items=")}
    assert set(lines) == {"at_least_once", "exactly_once"}, context
    for mode, f in lines.items():
        assert (f["items"], f["kills"], f["broker_restarts"]) == ("300", "3", "0"), context
        assert f["lost"] == "0", f"{mode} lost items\n{context}"
        assert f["dlq"] == "10", f"{mode}: every bad record dead-lettered once\n{context}"
    assert lines["exactly_once"]["duplicated"] == "0", context
    alo = lines["at_least_once"]
    assert int(alo["duplicated"]) <= int(alo["max_in_flight_at_kills"]), context
    assert "throughput exactly_once/at_least_once = " in done.stdout, context
