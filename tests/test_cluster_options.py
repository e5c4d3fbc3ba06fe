"""Settings for running against one's own cluster, against the real broker: where a new
group starts (``KAFKA_AUTO_OFFSET_RESET``), how missing topics are created, and client
options passed through (``KAFKA_CONSUMER_EXTRA``, ``KAFKA_PRODUCER_EXTRA``), and input
fields of other names (``INPUT_*_FIELD``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from streamproc import service
from streamproc.errors import ConfigError
from streamproc.kafka.clients import check_client_extras, consumer_for, producer_for
from streamproc.kafka.topics import BROKER_DEFAULT, ensure_topics, new_topic
from streamproc.settings import Settings, load_settings
from streamproc.testing.kafka import read_to_end
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


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_latest_skips_the_backlog_and_commits_its_start(kafka_bootstrap: str,
                                                              guarantee: str) -> None:
    settings = settings_for(kafka_bootstrap, guarantee, kafka_auto_offset_reset="latest")
    await service_topics(settings, input_partitions=1)
    await produce(kafka_bootstrap, settings.kafka_input_topic, items(3, "old"))
    async with running_processor(settings) as processor:
        await asyncio.wait_for(processor.joined.wait(), 30)
        assert await committed(settings) == {0: 3}  # the start, before any record is read
        await produce(kafka_bootstrap, settings.kafka_input_topic, items(2, "new"))
        await wait_for_output(settings, 2, timeout_s=30)
    assert set(await output_ids(settings)) == {"new-0000", "new-0001"}
    assert await committed(settings) == {0: 5}


async def test_latest_resumes_an_out_of_range_committed_offset_at_the_first_retained_record(
        kafka_bootstrap: str) -> None:
    """A committed offset the log no longer holds (records deleted past it) is read from the
    first record still retained: ``latest`` is for a partition with no committed offset."""
    settings = settings_for(kafka_bootstrap, kafka_auto_offset_reset="latest")
    await service_topics(settings, input_partitions=1)
    await produce(kafka_bootstrap, settings.kafka_input_topic, items(5, "old"))
    tp = TopicPartition(settings.kafka_input_topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap,
                                group_id=settings.kafka_group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 1})
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(before_offset=3)})
    finally:
        await admin.close()
    async with running_processor(settings):
        await wait_for_output(settings, 2, timeout_s=15)
    assert set(await output_ids(settings)) == {"old-0003", "old-0004"}
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


async def test_the_replication_default_is_the_brokers_not_one(
        second_broker: tuple[str, str]) -> None:
    """That broker's default.replication.factor is 2, more than its one node can place: the
    creation is refused, where a factor of 1 would have passed."""
    settings = settings_for(second_broker[0], kafka_create_topics=True)
    with pytest.raises(ConfigError, match=r"^KAFKA_TOPIC_REPLICATION_FACTOR=None: the broker"):
        await ensure_topics(settings)


async def test_a_replication_factor_the_cluster_cannot_place_names_the_variable(
        kafka_bootstrap: str) -> None:
    settings = settings_for(kafka_bootstrap, kafka_create_topics=True,
                            kafka_topic_replication_factor=2)
    with pytest.raises(ConfigError, match="KAFKA_TOPIC_REPLICATION_FACTOR=2: the broker refused"):
        await ensure_topics(settings)


async def test_passthrough_options_reach_the_live_clients(kafka_bootstrap: str) -> None:
    settings = settings_for(
        kafka_bootstrap, kafka_consumer_extra='{"connections_max_idle_ms": 123456, '
                                              '"fetch_max_bytes": 654321}',
        kafka_producer_extra='{"connections_max_idle_ms": 234567, "linger_ms": 0}')
    await service_topics(settings, input_partitions=1)
    await produce(kafka_bootstrap, settings.kafka_input_topic, items(2, "x"))
    async with running_processor(settings) as processor:
        await wait_for_output(settings, 2, timeout_s=30)
        consumer = processor.consumer
        assert consumer._client._connections_max_idle_ms == 123456
        assert consumer._fetch_max_bytes == 654321
        producer = getattr(processor.sink, "producer", None)
        assert producer is not None and producer.client._connections_max_idle_ms == 234567


@pytest.mark.parametrize(("variable", "value", "problem"), [
    ("kafka_consumer_extra", '{"isolation_level": "read_uncommitted"}',
     "'isolation_level' is streamproc's own"),
    ("kafka_producer_extra", '{"transactional_id": "mine"}',
     "'transactional_id' is streamproc's own .KAFKA_TRANSACTIONAL_ID_PREFIX."),
    ("kafka_consumer_extra", "[1]", "valid dictionary"),
    ("kafka_producer_extra", "{linger_ms: 1}", "not JSON"),
])
def test_a_bad_passthrough_option_fails_at_start_naming_the_variable(
        variable: str, value: str, problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable.upper(), value)
    with pytest.raises(ConfigError, match=f"^{variable.upper()}=.*{problem}") as caught:
        load_settings(None)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("variable", "value", "client"), [
    ("kafka_consumer_extra", {"linger_ms": 5}, consumer_for),
    ("kafka_producer_extra", {"fetch_max_bytes": 5}, producer_for),
])
def test_an_option_the_client_does_not_take_fails_naming_the_variable(
        variable: str, value: dict[str, int], client: Callable[[Settings], object]) -> None:
    settings = load_settings(None, **{variable: value})
    with pytest.raises(ConfigError, match=f"^{variable.upper()}=.*is not an option of aiokafka"):
        client(settings)


@pytest.mark.parametrize(("variable", "value", "problem"), [
    ("kafka_consumer_extra", {"topics": ["t"]}, "'topics' is not an option"),
    ("kafka_producer_extra", {"kwargs": {}}, "'kwargs' is not an option"),
    ("kafka_consumer_extra", {"consumer_timeout_ms": "x"}, "'consumer_timeout_ms' takes an int"),
    ("kafka_consumer_extra", {"fetch_max_wait_ms": "x"}, "'fetch_max_wait_ms' takes an int"),
    ("kafka_consumer_extra", {"fetch_max_wait_ms": 1.5}, "'fetch_max_wait_ms' takes an int"),
    ("kafka_consumer_extra", {"check_crcs": 1}, "'check_crcs' takes a bool"),
    ("kafka_producer_extra", {"linger_ms": True}, "'linger_ms' takes an int"),
    ("kafka_consumer_extra", {"client_rack": {"a": 1}}, "'client_rack' takes a single value"),
    ("kafka_producer_extra", {"partitioner": "murmur2"}, "'partitioner' cannot be given"),
])
def test_a_passthrough_option_of_the_wrong_type_fails_at_start_naming_variable_and_key(
        variable: str, value: dict[str, object], problem: str) -> None:
    """Checked at start (``run_service`` does, before the model is loaded), not when the
    clients are built: a producer's only at the first assignment under exactly_once."""
    settings = load_settings(None, **{variable: value})
    with pytest.raises(ConfigError, match=f"^{variable.upper()}=.*{problem}") as caught:
        check_client_extras(settings)
    assert "\n" not in str(caught.value)


async def test_the_service_checks_the_passthrough_options_before_it_loads_the_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def build_worker(settings: Settings) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(service, "_build_worker", build_worker)
    settings = load_settings(None, processing_guarantee="exactly_once",
                             kafka_producer_extra={"linger_ms": "5"})
    with pytest.raises(ConfigError, match=r"^KAFKA_PRODUCER_EXTRA=.*'linger_ms' takes an int"):
        await service.run_service(settings)


def test_passthrough_options_of_the_right_types_pass_the_check() -> None:
    check_client_extras(load_settings(
        None, kafka_consumer_extra={"fetch_max_wait_ms": 100, "check_crcs": False,
                                    "client_rack": "eu-1"},
        kafka_producer_extra={"linger_ms": 0, "metadata_max_age_ms": 60000}))


async def test_a_feed_with_its_own_field_names_is_summarized(kafka_bootstrap: str) -> None:
    settings = settings_for(kafka_bootstrap, input_id_field="guid", input_text_field="body",
                            input_title_field="headline")
    await service_topics(settings, input_partitions=1)
    await produce(kafka_bootstrap, settings.kafka_input_topic, [
        (b"g1", orjson.dumps({"guid": "g1", "body": "It rained. Then more.", "headline": "H"})),
        (b"g2", orjson.dumps({"id": "g2", "text": "The default names."}))])
    async with running_processor(settings):
        await wait_for_output(settings, 1, timeout_s=30)
        for _ in range(100):  # the dead letter follows the summary on the same partition
            if await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic):
                break
            await asyncio.sleep(0.1)
    [output] = await read_to_end(kafka_bootstrap, settings.kafka_output_topic)
    summary = orjson.loads(output.value)
    assert (summary["id"], summary["summary"], summary["title"]) == ("g1", "It rained.", "H")
    [letter] = await read_to_end(kafka_bootstrap, settings.kafka_dlq_topic)
    assert dict(letter.headers)["streamproc.error.code"] == b"missing_id"
