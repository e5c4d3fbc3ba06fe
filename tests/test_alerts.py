"""The alert rules (``deploy/prometheus/alerts.yaml``) through Debian's ``promtool``: they
parse, and the unit tests in ``alerts.test.yaml`` see each alert stay quiet while the service
is healthy, fire once its condition has held for its ``for``, and resolve. Also: each rule has
what an operator needs (a ``for``, a severity, a summary, a description and a runbook anchor
that exists in the README), and the Kubernetes ``PrometheusRule`` carries the same groups."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import REPO_ROOT, prometheus_tool

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
README = REPO_ROOT / "README.md"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _load(RULES)["groups"] for rule in group["rules"]]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prometheus_tool("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_each_alert_fires_and_resolves_in_the_rule_unit_tests() -> None:
    done = _promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert is tested both ways: firing at some time, and quiet at a later one.
    fired: dict[str, list[int]] = {}
    quiet: dict[str, list[int]] = {}
    for case in _load(RULE_TESTS)["tests"]:
        for check in case["alert_rule_test"]:
            minutes = int(str(check["eval_time"]).removesuffix("m"))
            into = fired if check["exp_alerts"] else quiet
            into.setdefault(check["alertname"], []).append(minutes)
    names = {rule["alert"] for rule in _alerts()}
    assert set(fired) == names and set(quiet) == names
    for name in names:
        assert max(quiet[name]) > min(fired[name]), f"{name} never resolves in its test"
        assert min(quiet[name]) < min(fired[name]), f"{name} is never quiet before it fires"


def test_each_alert_has_a_for_a_severity_a_summary_and_a_runbook_in_the_readme() -> None:
    anchors = {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$",
                                                          README.read_text(encoding="utf-8"),
                                                          re.MULTILINE)}
    for rule in _alerts():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == f"README.md#{name.lower()}", name
        assert name.lower() in anchors, f"README.md has no section {name}"


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_prometheus_rule_carries_the_same_groups() -> None:
    rule = _load(REPO_ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert {"release", "prometheus"} <= set(rule["metadata"]["labels"])
    assert rule["spec"]["groups"] == _load(RULES)["groups"]


def test_the_compose_monitoring_profile_scrapes_the_service_with_these_rules() -> None:
    config = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
    done = _promtool("check", "config", str(config), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout
    services = _load(REPO_ROOT / "docker-compose.yml")["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in prometheus["volumes"]}
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./deploy/prometheus/alerts.yaml"] == "/etc/prometheus/alerts.yaml"
    (job,) = _load(config)["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    metrics_port = services["streamproc"]["ports"][0].rsplit(":", 1)[1]
    assert target == f"streamproc:{metrics_port}"
