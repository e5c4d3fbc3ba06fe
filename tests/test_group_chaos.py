"""The group chaos suite, short form, against the session's test broker: three members of
one group on 12 partitions under a backlog, through a kill -9, a SIGTERM, a member joining
and leaving, a member frozen past the session timeout and a burst of bad records. The two
guarantees run side by side, each in its own group. Broker restarts need the suite's own
broker (the long form, see CONTRIBUTING.md); here they are 0."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, TEST_PORT

pytestmark = pytest.mark.kafka


def figures(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


async def short_form(bootstrap: str, guarantee: str) -> tuple[int, str, str]:
    args = ["--n", "500", "--members", "3", "--partitions", "12", "--kills", "1",
            "--sigterms", "1", "--joins", "1", "--freezes", "1", "--bad", "10",
            "--broker-restarts", "0", "--guarantee", guarantee, "--bootstrap", bootstrap,
            "--seed", "3", "--timeout-s", "150"]
    log = REPO_ROOT / ".kafka" / "test-data" / str(TEST_PORT) / "server.log"
    if bootstrap.endswith(f":{TEST_PORT}") and log.exists():
        args += ["--broker-log", str(log)]  # the session's own broker: removals are counted
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qa.group_chaos", *args, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 400)
    return process.returncode or 0, out.decode(), err.decode()


async def test_group_chaos_short_form_both_guarantees(kafka_bootstrap: str) -> None:
    started = time.monotonic()
    runs = await asyncio.gather(*(short_form(kafka_bootstrap, g)
                                  for g in ("at_least_once", "exactly_once")))
    for rc, out, err in runs:
        context = f"rc={rc} after {time.monotonic() - started:.0f} s\n{out}\n{err[-6000:]}"
        lines = [figures(line) for line in out.splitlines() if line.startswith("items=")]
        assert len(lines) == 1, context
        f = lines[0]
        assert (f["kills"], f["sigterms"], f["joins"], f["freezes"]) == ("1",) * 4, context
        assert f["lost"] == "0" and f["order_violations"] == "0", context
        assert f["dlq"] == "10" and f["unexpected_exits"] == "0", context
        assert f.get("removed_not_rejoined", "0") == "0", context  # no storm
        assert int(f["slow_sigterms"]) <= 1, context
        if f["mode"] == "exactly_once":
            assert f["duplicated"] == "0", context
        else:
            assert int(f["duplicated"]) <= int(f["max_in_flight_at_faults"]), context
        assert rc == 0, context
