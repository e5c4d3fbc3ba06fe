"""Settings for running against one's own cluster, against the real broker: where a new
group starts (``KAFKA_AUTO_OFFSET_RESET``) and how missing topics are created."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streamproc.errors import ConfigError
from streamproc.kafka.topics import BROKER_DEFAULT, ensure_topics, new_topic
from tests.helpers import (
    committed,
    items,
    output_ids,
    produce,
    running_processor,
    service_topics,
    settings_for,
    wait_for_output,
)

pytestmark = pytest.mark.kafka


async def test_latest_skips_the_backlog_and_commits_its_start(kafka_bootstrap: str) -> None:
    settings = settings_for(kafka_bootstrap, kafka_auto_offset_reset="latest")
    await service_topics(settings, input_partitions=1)
    await produce(kafka_bootstrap, settings.kafka_input_topic, items(3, "old"))
    async with running_processor(settings) as processor:
        await asyncio.wait_for(processor.joined.wait(), 30)
        assert await committed(settings) == {0: 3}  # the start, before any record is read
        await produce(kafka_bootstrap, settings.kafka_input_topic, items(2, "new"))
        await wait_for_output(settings, 2, timeout_s=30)
    assert set(await output_ids(settings)) == {"new-0000", "new-0001"}
    assert await committed(settings) == {0: 5}


async def replicas(bootstrap: str, topics: list[str]) -> dict[str, list[int]]:
    """Each topic's replica count, by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: [len(p["replicas"]) for p in t["partitions"]] for t in described}


async def test_created_topics_take_the_partitions_and_the_brokers_replication_default(
        kafka_bootstrap: str) -> None:
    settings = settings_for(kafka_bootstrap, kafka_create_topics=True, kafka_topic_partitions=2)
    assert new_topic("t", settings).replication_factor == BROKER_DEFAULT
    await ensure_topics(settings)
    names = [settings.kafka_input_topic, settings.kafka_output_topic, settings.kafka_dlq_topic]
    assert await replicas(kafka_bootstrap, names) == {name: [1, 1] for name in names}


async def test_a_replication_factor_the_cluster_cannot_place_names_the_variable(
        kafka_bootstrap: str) -> None:
    settings = settings_for(kafka_bootstrap, kafka_create_topics=True,
                            kafka_topic_replication_factor=2)
    with pytest.raises(ConfigError, match="KAFKA_TOPIC_REPLICATION_FACTOR=2: the broker refused"):
        await ensure_topics(settings)
