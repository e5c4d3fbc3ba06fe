"""The VRAM planner is a pure function: no GPU needed."""

from __future__ import annotations

import pytest

from streamproc.inference.config import GPUConfig
from streamproc.inference.planner import GIB, DeviceMemory, plan_device, replica_cap


def config(**overrides: object) -> GPUConfig:
    # A pool cap well above what memory allows, so the memory arithmetic decides.
    return GPUConfig(**{"pool_max_instances": 64, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(("card_gb", "expected"), [(24, 14), (10, 5), (8, 4)])
def test_spec_cards_with_default_buffer_and_size(card_gb: float, expected: int) -> None:
    # (free - 2.0 GiB buffer) // 1.5 GiB per replica
    plan = plan_device(DeviceMemory("cuda:0", card_gb, card_gb), config())
    assert plan.replicas == expected
    assert plan.memory_allows == expected
    assert plan.limited_by == "memory"
    assert plan.warning is None


def test_cap_from_gpu_max_model_instances() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 24, 24), config(max_model_instances=3))
    assert (plan.replicas, plan.memory_allows) == (3, 14)
    assert plan.limited_by == "GPU_MAX_MODEL_INSTANCES"


def test_cap_above_what_memory_allows_does_not_raise_the_count() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 8, 8), config(max_model_instances=10))
    assert (plan.replicas, plan.limited_by) == (4, "memory")


def test_multi_instance_disabled_gives_one() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 24, 24), config(enable_multi_model_instances=False))
    assert (plan.replicas, plan.limited_by) == (1, "multi_instance_disabled")


def test_device_already_partly_used_plans_from_free_memory_not_total() -> None:
    plan = plan_device(DeviceMemory("cuda:0", total_gb=24, free_gb=6.5), config())
    assert plan.replicas == 3  # (6.5 - 2) // 1.5


def test_buffer_larger_than_memory_plans_one_replica_with_a_warning() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 8, 8), config(model_memory_buffer_gb=10))
    assert plan.replicas == 1
    assert plan.warning is not None and "cuda:0" in plan.warning


def test_measured_footprint_and_activations_replace_the_estimate() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 24, 24), config(), model_gb=2.5, activation_gb=0.5)
    assert plan.replicas == 7  # (24 - 2) // (2.5 + 0.5)
    assert (plan.model_gb, plan.activation_gb) == (2.5, 0.5)


def test_default_pool_cap_is_one_replica_per_device() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 80, 80), GPUConfig())
    assert (plan.replicas, plan.memory_allows, plan.limited_by) == (
        1, 52, "MODEL_POOL_MAX_INSTANCES")


def test_pool_disabled_gives_one() -> None:
    plan = plan_device(DeviceMemory("cuda:0", 80, 80), config(pool_enabled=False))
    assert (plan.replicas, plan.limited_by) == (1, "MODEL_POOL_ENABLED")


def test_cpu_has_no_vram_and_follows_the_pool_cap() -> None:
    plan = plan_device(DeviceMemory("cpu", None, None), config(pool_max_instances=2))
    assert (plan.replicas, plan.memory_allows) == (2, None)
    assert "no VRAM" in plan.describe()


def test_shared_weights_count_the_model_once() -> None:
    memory = DeviceMemory("cuda:0", 80, 80)
    separate = plan_device(memory, config(), model_gb=3.0, activation_gb=1.0)
    shared = plan_device(memory, config(), model_gb=3.0, activation_gb=1.0, shared_weights=True)
    assert separate.memory_allows == 19  # (80 - 2) // (3 + 1)
    assert shared.memory_allows == 75  # 1 + (78 - 4) // 1: one model, then activations only


def test_replica_cap_is_the_tightest_setting() -> None:
    assert replica_cap(GPUConfig()) == (1, "MODEL_POOL_MAX_INSTANCES")
    assert replica_cap(config(max_model_instances=4)) == (4, "GPU_MAX_MODEL_INSTANCES")
    assert replica_cap(config(enable_multi_model_instances=False)) == (
        1, "multi_instance_disabled")
    assert replica_cap(config(pool_enabled=False)) == (1, "MODEL_POOL_ENABLED")


@pytest.mark.parametrize(("shared", "expected_gb"), [(False, 5 * 1.5), (True, 1.0 + 5 * 0.5)])
def test_planned_memory_counts_the_weights_once_per_copy(shared: bool,
                                                          expected_gb: float) -> None:
    """streamproc_gpu_memory_planned_bytes: what the plan gives its replicas."""
    plan = plan_device(DeviceMemory("cuda:0", 9.5, 9.5), config(max_model_instances=5),
                       model_gb=1.0, activation_gb=0.5, shared_weights=shared)
    assert plan.replicas == 5
    assert plan.planned_bytes() == expected_gb * GIB
