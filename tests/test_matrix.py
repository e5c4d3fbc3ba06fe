"""The fault matrix, short form: every case in both guarantees against the harness's own
broker (it restarts it), with fewer items than the long form (see CONTRIBUTING.md)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from qa.matrix import CASES
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def figures(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def test_fault_matrix_short_form_every_case_in_both_guarantees() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "qa.matrix", "--n", "80"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
                          check=False)
    context = (f"rc={done.returncode} after {time.monotonic() - started:.0f} s\n"
               f"{done.stdout}\n{done.stderr[-8000:]}")
    lines = [figures(line) for line in done.stdout.splitlines() if line.startswith("case=")]
    assert {(f["case"], f["mode"]) for f in lines} == {
        (case.name, mode) for case in CASES for mode in ("at_least_once", "exactly_once")
    }, context
    for f in lines:
        where = f"{f['case']}/{f['mode']}\n{context}"
        assert f["lost"] == "0" and f["disorder"] == "0", where
        assert f["good_dead_lettered"] == "0" and f["wrong_reason"] == "0", where
        assert f["dlq"] == f["bad"], where
        assert f["unexpected_exits"] == "0", where
        assert float(f["sigterm_exit_s"]) > 0, where  # a SIGTERM landed during the fault
        if f["mode"] == "exactly_once":
            assert f["duplicated"] == "0", where
        assert f["ok"] == "yes", where
    assert f"fault-matrix: {len(lines)} passed, 0 failed" in done.stdout, context
    assert done.returncode == 0, context
