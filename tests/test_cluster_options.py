"""Settings for running against one's own cluster, against the real broker: where a new
group starts (``KAFKA_AUTO_OFFSET_RESET``) and how missing topics are created."""

from __future__ import annotations

import asyncio

import pytest

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
