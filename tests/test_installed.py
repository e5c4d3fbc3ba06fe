"""The package as pip installs it (a wheel, not editable) into a fresh venv: ``streamproc
demo`` runs from there, starting its own broker with the script the package ships."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, TEST_PORT, build_wheel

pytestmark = [pytest.mark.slow, pytest.mark.kafka]


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False,
                          **kwargs)  # type: ignore[call-overload, no-any-return]


def test_an_installed_package_runs_the_demo_with_its_own_broker(tmp_path: Path) -> None:
    venv, cwd = tmp_path / "venv", tmp_path / "elsewhere"
    cwd.mkdir()
    wheel = build_wheel(tmp_path / "wheels")
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    # The dependencies come from this venv's site-packages (as a plain path, so its editable
    # streamproc is not picked up); streamproc itself is the wheel.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "streamproc-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel)
    assert installed.returncode == 0, installed.stderr
    where = run(venv / "bin" / "python", "-c", "import streamproc; print(streamproc.__file__)",
                cwd=cwd)
    assert where.stdout.startswith(str(site)), where
    version = run(venv / "bin" / "streamproc", "--version", cwd=cwd)
    assert version.stdout.strip() == f"streamproc {wheel.name.split('-')[1]}", version

    port = TEST_PORT + 10  # nothing answers there: the demo starts (and stops) a broker
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "GPU_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
               KAFKA_DATA_DIR=str(tmp_path / "kafka-data"),
               STREAMPROC_STATE_DIR=str(REPO_ROOT),  # the jars the test broker fetched
               HF_HUB_OFFLINE="1")
    demo = run(venv / "bin" / "streamproc", "demo", cwd=cwd, env=env, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert f"starting a local Kafka broker on 127.0.0.1:{port}" in demo.stderr
    assert "== 10 summaries" in demo.stdout and "== 6 dead letters ==" in demo.stdout
    assert run("bash", site / "streamproc" / "testing" / "data" / "kafka" / "kafka.sh", "status",
               env={**env, "KAFKA_PORT": str(port)}).returncode == 1, "the demo stopped it"
