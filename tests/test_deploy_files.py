"""Static checks of the container files: docker-compose.yml and Dockerfile."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_compose_services() -> None:
    services = _compose()["services"]
    assert {"kafka", "streamproc"} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["streamproc"]["build"]["dockerfile"] == "Dockerfile"


def test_compose_kafka_is_single_node_kraft() -> None:
    env = _compose()["services"]["kafka"]["environment"]
    assert str(env["KAFKA_NODE_ID"]) == "1"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
    ):
        assert str(env[key]) == "1", key


def test_compose_healthchecks() -> None:
    services = _compose()["services"]
    kafka_hc = _healthcheck_text(services["kafka"])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in kafka_hc
    assert "--bootstrap-server localhost:9092" in kafka_hc
    app_hc = _healthcheck_text(services["streamproc"])
    assert "http://localhost:9108/healthz" in app_hc
    assert "urllib" in app_hc and "curl" not in app_hc


def test_compose_streamproc_service() -> None:
    app = _compose()["services"]["streamproc"]
    assert app["env_file"] in (".env", [".env"])
    env = app["environment"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:19092"
    assert app["depends_on"]["kafka"]["condition"] == "service_healthy"
    # Image ENTRYPOINT + compose command must run `streamproc run`.
    entrypoint = app.get("entrypoint")
    if entrypoint is None:
        entrypoint = _exec_form(dict(_dockerfile_instructions())["ENTRYPOINT"])
    assert [*entrypoint, *app["command"]] == ["streamproc", "run"]


def test_compose_gpu_reservation() -> None:
    app = _compose()["services"]["streamproc"]
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == "all" and "gpu" in d["capabilities"]
        for d in devices
    ), devices


def test_dockerfile_base_user_entrypoint() -> None:
    instrs = _dockerfile_instructions()
    froms = [args for instr, args in instrs if instr == "FROM"]
    assert froms and froms[-1].startswith("nvidia/cuda:"), froms
    users = [args for instr, args in instrs if instr == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]
    entry = [args for instr, args in instrs if instr == "ENTRYPOINT"]
    assert entry and _exec_form(entry[-1]) == ["streamproc"]
    cmd = [args for instr, args in instrs if instr == "CMD"]
    assert cmd and _exec_form(cmd[-1]) == ["run"]
    assert ("EXPOSE", "9108") in instrs
    assert ("STOPSIGNAL", "SIGTERM") in instrs


def test_dockerfile_copy_sources_exist() -> None:
    """Every local COPY source is in the build context (pip install . needs the readme)."""
    dockerignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for instr, args in _dockerfile_instructions():
        if instr != "COPY" or "--from" in args:
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            if src.startswith("--"):
                continue
            assert (ROOT / src).exists(), f"COPY source {src} missing from the repo"
            assert src.rstrip("/") not in dockerignore, f"COPY source {src} is .dockerignored"
