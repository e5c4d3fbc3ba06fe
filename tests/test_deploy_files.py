"""Static checks of the container files: docker-compose.yml, the Dockerfile and the
Kubernetes manifests."""

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
    """The production images by default; KAFKA_IMAGE and STREAMPROC_IMAGE override them."""
    services = _compose()["services"]
    assert {"kafka", "kafka-init", "streamproc"} <= set(services)
    assert services["kafka"]["image"] == "${KAFKA_IMAGE:-apache/kafka:4.1.1}"
    assert services["kafka-init"]["image"] == services["kafka"]["image"]
    assert services["streamproc"]["image"] == "${STREAMPROC_IMAGE:-streamproc:latest}"
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
    assert "--bootstrap-server localhost:19092" in kafka_hc  # advertised as kafka:19092
    app_hc = _healthcheck_text(services["streamproc"])
    assert "http://localhost:9108/healthz" in app_hc
    assert "urllib" in app_hc and "curl" not in app_hc


def test_compose_streamproc_service() -> None:
    app = _compose()["services"]["streamproc"]
    assert app["env_file"] == "${STREAMPROC_ENV_FILE:-.env}"
    assert "${MODELS_DIR:-./models}:/models:ro" in app["volumes"]
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
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"], froms
    args = [args for instr, args in instrs if instr == "ARG"]
    # The production default: a plain base, so the image holds one CUDA stack (torch's).
    assert args[0] == "BASE_IMAGE=debian:12-slim", args
    users = [args for instr, args in instrs if instr == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]
    entry = [args for instr, args in instrs if instr == "ENTRYPOINT"]
    assert entry and _exec_form(entry[-1]) == ["streamproc"]
    cmd = [args for instr, args in instrs if instr == "CMD"]
    assert cmd and _exec_form(cmd[-1]) == ["run"]
    assert ("EXPOSE", "9108") in instrs
    assert ("STOPSIGNAL", "SIGTERM") in instrs


def test_dockerfile_runtime_stage_copies_only_the_venv_and_the_wheel() -> None:
    """The build inputs (pyproject, sources, an optional build-ca.pem) stay in the builder."""
    instrs = _dockerfile_instructions()
    runtime = instrs[instrs.index(("FROM", "${BASE_IMAGE} AS runtime")):]
    assert [args for instr, args in runtime if instr == "COPY"] == [
        "--from=builder /opt/venv /opt/venv", "--from=builder /dist/ /tmp/dist/"]


def test_dockerfile_copy_sources_exist() -> None:
    """Every local COPY source is in the build context (pip install . needs the readme).
    A glob source (build-ca.pe[m]) may match nothing."""
    dockerignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for instr, args in _dockerfile_instructions():
        if instr != "COPY" or "--from" in args:
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            if src.startswith("--") or "[" in src:
                continue
            assert (ROOT / src).exists(), f"COPY source {src} missing from the repo"
            assert src.rstrip("/") not in dockerignore, f"COPY source {src} is .dockerignored"


# --- Kubernetes manifests (deploy/kubernetes/) ------------------------------------------------

K8S_DIR = ROOT / "deploy" / "kubernetes"


def _k8s_docs() -> list[dict[str, Any]]:
    """Every document of every manifest, parsed with safe_load_all (empty documents dropped)."""
    paths = sorted([*K8S_DIR.glob("*.yaml"), *K8S_DIR.glob("*.yml")])
    assert paths, f"no manifests under {K8S_DIR}"
    docs: list[dict[str, Any]] = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: a document has no {key}"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} has no name"
            docs.append(doc)
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    named: list[dict[str, Any]] = [c for c in containers if c["name"] == "streamproc"]
    assert len(named) == 1, [c["name"] for c in containers]
    return named[0]


def _k8s_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's literal environment: the ConfigMaps of envFrom (declared in these
    manifests), then ``env`` values on top, as Kubernetes resolves them. Secret refs are left
    out (see _secret_env)."""
    container = _container(_one(docs, "StatefulSet"))
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in config_maps, f"envFrom ConfigMap {name} is not in deploy/kubernetes"
            prefix = source.get("prefix", "")
            env.update({prefix + k: str(v) for k, v in config_maps[name].get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def _secret_env(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    container = _container(_one(docs, "StatefulSet"))
    return {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container.get("env", [])
            if "secretKeyRef" in v.get("valueFrom", {})}


def _setting(env: dict[str, str], name: str) -> Any:
    """A setting as the pod would see it: the manifest's value, else the Settings default."""
    from streamproc.settings import Settings

    if name.upper() in env:
        overrides: dict[str, Any] = {k.lower(): v for k, v in env.items()}
        settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
        return getattr(settings, name.lower())
    return Settings.model_fields[name.lower()].default


def test_k8s_manifests_parse_and_declare_the_pieces() -> None:
    kinds = [d["kind"] for d in _k8s_docs()]
    for kind in ("ConfigMap", "Service", "StatefulSet", "ScaledObject", "PodDisruptionBudget",
                 "ServiceMonitor"):
        assert kind in kinds, kinds


def test_k8s_configured_variables_are_real_settings_that_parse() -> None:
    from streamproc.settings import Settings

    docs = _k8s_docs()
    env = _k8s_env(docs)
    unknown = sorted(k for k in [*env, *_secret_env(docs)]
                     if k.lower() not in Settings.model_fields)
    assert not unknown, f"not streamproc settings: {unknown}"
    overrides: dict[str, Any] = {k.lower(): v for k, v in env.items()}
    settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
    assert settings.autotune_enabled, "GPU_BATCH_SIZE in the manifests turns calibration off"


def test_k8s_statefulset_runs_the_image_with_run() -> None:
    deployment = _one(_k8s_docs(), "StatefulSet")
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    container = _container(deployment)
    assert "streamproc" in container["image"]
    # No `command`: the image's ENTRYPOINT ["streamproc"] stays, so this is `streamproc run`.
    assert "command" not in container
    entrypoint = _exec_form(dict(_dockerfile_instructions())["ENTRYPOINT"])
    assert [*entrypoint, *container["args"]] == ["streamproc", "run"]


def test_k8s_statefulset_gpu_and_resources() -> None:
    resources = _container(_one(_k8s_docs(), "StatefulSet"))["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resources[section].get(resource), f"no {section}.{resource}"


def test_k8s_probes_on_the_metrics_port() -> None:
    docs = _k8s_docs()
    deployment = _one(docs, "StatefulSet")
    container = _container(deployment)
    port = int(_setting(_k8s_env(docs), "metrics_port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("metrics") == port == 9108, ports
    exposed = [args for instr, args in _dockerfile_instructions() if instr == "EXPOSE"]
    assert str(port) in exposed

    def http_get(probe: str) -> dict[str, Any]:
        assert probe in container, f"no {probe}"
        action = container[probe]["httpGet"]
        assert action["port"] in ("metrics", port), action
        return dict(action)

    assert http_get("livenessProbe")["path"] == "/healthz"
    assert http_get("readinessProbe")["path"] == "/readyz"
    if "startupProbe" in container:
        assert http_get("startupProbe")["path"] in ("/healthz", "/readyz")
    # Model download + load + warm-up: readiness must not give up at once, and liveness must
    # not kill a pod that is still starting (the server answers /healthz during the load).
    ready = container["readinessProbe"]
    patience = (ready.get("initialDelaySeconds", 0)
                + ready.get("periodSeconds", 10) * ready.get("failureThreshold", 3))
    assert patience >= 30 or "startupProbe" in container, ready

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_k8s_grace_period_exceeds_shutdown_timeout() -> None:
    docs = _k8s_docs()
    container = _container(_one(docs, "StatefulSet"))
    assert any(v["name"] == "SHUTDOWN_TIMEOUT_S" for v in container.get("env", []))
    shutdown_timeout_s = float(_setting(_k8s_env(docs), "shutdown_timeout_s"))
    grace = _one(docs, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > shutdown_timeout_s, (grace, shutdown_timeout_s)


def test_k8s_sasl_password_from_an_optional_secret() -> None:
    docs = _k8s_docs()
    secrets = _secret_env(docs)
    ref = secrets.get("KAFKA_SASL_PASSWORD")
    assert ref is not None and ref.get("name") and ref.get("key"), secrets
    assert ref.get("optional") is True
    assert "KAFKA_SASL_PASSWORD" not in _k8s_env(docs), "a password in plain text"


def test_k8s_runs_as_non_root() -> None:
    deployment = _one(_k8s_docs(), "StatefulSet")
    pod = deployment["spec"]["template"]["spec"].get("securityContext", {})
    container = _container(deployment).get("securityContext", {})
    merged = {**pod, **container}
    assert merged.get("runAsNonRoot") is True, merged
    assert merged.get("runAsUser", 10001) == 10001  # the image's user (Dockerfile useradd)
    assert container.get("allowPrivilegeEscalation") is False
    assert "10001" in DOCKERFILE.read_text(encoding="utf-8")


def test_keda_scaledobject_scales_the_statefulset_on_lag() -> None:
    docs = _k8s_docs()
    env = _k8s_env(docs)
    deployment = _one(docs, "StatefulSet")
    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target["kind"] == "StatefulSet"
    triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
    assert len(triggers) == 1, scaled["spec"]["triggers"]
    meta = triggers[0]["metadata"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServers"] == _setting(env, "kafka_bootstrap_servers")
    assert meta["consumerGroup"] == _setting(env, "kafka_group_id")
    assert meta["topic"] == _setting(env, "kafka_input_topic")
    assert str(meta["allowIdleConsumers"]).lower() == "false"


def test_keda_max_replicas_is_the_partition_count() -> None:
    """Partitions bound the group's parallelism: more pods than partitions idle on a GPU."""
    docs = _k8s_docs()
    env = _k8s_env(docs)
    assert "KAFKA_TOPIC_PARTITIONS" in env, "declare the input topic's partition count"
    partitions = int(env["KAFKA_TOPIC_PARTITIONS"])
    spec = _one(docs, "ScaledObject")["spec"]
    assert spec["minReplicaCount"] == 1
    assert spec["maxReplicaCount"] == partitions


def test_k8s_static_membership_from_the_pods_stable_name() -> None:
    """Each pod joins the group as a static member named after itself: a StatefulSet's pod
    keeps its name through a restart, so it rejoins under the same id with no rebalance. The
    timeouts let a restart fit, and the rebalance timing fits the settings."""
    from streamproc.kafka.group import rebalance_problems
    from streamproc.settings import Settings

    docs = _k8s_docs()
    workload = _one(docs, "StatefulSet")
    env = {v["name"]: v for v in _container(workload).get("env", [])}
    field = env["KAFKA_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.name"
    service = _one(docs, "Service")
    assert workload["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert workload["spec"]["podManagementPolicy"] == "Parallel"
    overrides: dict[str, Any] = {k.lower(): v for k, v in _k8s_env(docs).items()}
    settings = Settings(_env_file=None, kafka_group_instance_id="streamproc-0",  # type: ignore[call-arg]
                        **overrides)
    assert rebalance_problems(settings) == []
    assert settings.kafka_session_timeout_ms >= 60_000  # a restart, not a blink


HOME = "/home/streamproc"  # the image user's home (Dockerfile)
CACHES = {"huggingface": f"{HOME}/.cache/huggingface",  # HF_HOME: the model download
          "ctranslate2": f"{HOME}/.cache/streamproc/ctranslate2"}  # its CT2 conversion


def _covered(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_the_model_caches_outlive_the_container() -> None:
    """The model download and its CTranslate2 conversion are on volumes in compose and on
    the pod's own claim on Kubernetes; the image makes the directories its user owns, so a
    fresh named volume mounted there is writable."""
    from streamproc.summarize.ct2_convert import default_cache_dir

    env = dict(word.split("=", 1) for instr, args in _dockerfile_instructions()
               if instr == "ENV" for word in shlex.split(args) if "=" in word)
    assert env["HF_HOME"] == CACHES["huggingface"]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("XDG_CACHE_HOME", raising=False)
        patch.setenv("HOME", HOME)
        assert str(default_cache_dir()) == CACHES["ctranslate2"]
    compose = _compose()
    named = [v.split(":")[1] for v in compose["services"]["streamproc"]["volumes"]
             if v.split(":")[0] in compose["volumes"]]
    assert all(_covered(path, named) for path in CACHES.values()), named
    made = " ".join(args for instr, args in _dockerfile_instructions() if instr == "RUN")
    assert all("mkdir -p" in made and path in made for path in named), named

    workload = _one(_k8s_docs(), "StatefulSet")
    claims = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
    mounts = [m["mountPath"] for m in _container(workload)["volumeMounts"] if m["name"] in claims]
    assert all(_covered(path, mounts) for path in CACHES.values()), mounts


def test_k8s_pdb_service_and_servicemonitor_select_the_pods() -> None:
    docs = _k8s_docs()
    workload = _one(docs, "StatefulSet")
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = _one(docs, "Service")
    assert service["metadata"]["name"] == workload["spec"]["serviceName"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container(workload)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    port = service_ports[endpoint["port"]]
    assert container_ports[port["targetPort"]] == int(_setting(_k8s_env(docs), "metrics_port"))
    assert endpoint["path"] == "/metrics"


def test_keda_trigger_authentication_example_reads_the_pods_secret() -> None:
    """The example gives KEDA's Kafka scaler the SASL credentials from the same Secret as
    the pods' KAFKA_SASL_PASSWORD, and the ScaledObject resets offsets as the service does."""
    docs = _k8s_docs()
    [auth] = [d for d in yaml.safe_load_all((K8S_DIR / "examples" /
                                             "keda-triggerauthentication.yaml").read_text())
              if d is not None]
    assert auth["kind"] == "TriggerAuthentication"
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert {"sasl", "username", "password"} <= set(refs)
    pods_secret = _secret_env(docs)["KAFKA_SASL_PASSWORD"]
    assert (refs["password"]["name"], refs["password"]["key"]) == (pods_secret["name"],
                                                                   pods_secret["key"])
    [trigger] = _one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["offsetResetPolicy"] == _setting(_k8s_env(docs),
                                                                "kafka_auto_offset_reset")
