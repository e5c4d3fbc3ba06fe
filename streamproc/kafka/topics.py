"""The service's topics: checked (or created) at start, and the largest record each output
topic takes."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)

from ..errors import ConfigError, StreamprocError
from ..settings import KafkaSettings
from .clients import client_options, start_with_retry

__all__ = ["BROKER_DEFAULT", "create_and_wait", "ensure_topics", "new_topic"]

log = logging.getLogger("streamproc.kafka")
BROKER_DEFAULT = -1  # CreateTopics: the broker's default.replication.factor


def new_topic(name: str, settings: KafkaSettings) -> NewTopic:
    """A topic to create with ``KAFKA_TOPIC_PARTITIONS`` partitions and
    ``KAFKA_TOPIC_REPLICATION_FACTOR`` replicas, or, with that unset, as many as the broker's
    ``default.replication.factor`` says. (aiokafka's ``NewTopic`` takes -1 only beside a
    replica assignment, so an empty one is passed: the request then carries none.)"""
    factor = settings.kafka_topic_replication_factor
    if factor is None:
        return NewTopic(name, settings.kafka_topic_partitions, BROKER_DEFAULT,
                        replica_assignments={})
    return NewTopic(name, settings.kafka_topic_partitions, factor)


async def create_and_wait(admin: AIOKafkaAdminClient, topics: list[NewTopic],
                          timeout_s: float = 30.0) -> None:
    """Create ``topics`` and wait until every partition of each has a leader. A topic that
    exists already (another member was first) is left as it is; any other refusal raises
    the broker's error, naming the topic."""
    response = await admin.create_topics(topics)
    for topic, code, *message in response.topic_errors:
        error = for_code(code)
        if code and error is not TopicAlreadyExistsError:
            raise error(f"creating topic {topic!r}: {message[0] if message else ''}".strip())
    names = [t.name for t in topics]
    deadline = time.monotonic() + timeout_s
    while True:
        described = {t["topic"]: t for t in await admin.describe_topics(names)}
        if all(t.get("error_code") == 0 and t.get("partitions")
               and all(p.get("leader", -1) >= 0 for p in t["partitions"])
               for t in (described.get(name, {}) for name in names)):
            return
        if time.monotonic() > deadline:
            raise KafkaError(f"topics {names} have no leaders after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def ensure_topics(settings: KafkaSettings) -> dict[str, int]:
    """Check the input, output and DLQ topics exist; create missing ones when
    ``KAFKA_CREATE_TOPICS=true``, else fail naming the topic and the variable.

    Returns the largest record each output topic (``KAFKA_OUTPUT_TOPIC``, ``KAFKA_DLQ_TOPIC``)
    takes: the smaller of ``KAFKA_MAX_REQUEST_SIZE`` and the topic's ``max.message.bytes``."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await start_with_retry("admin client", admin.start, settings)
    try:
        existing = set(await admin.list_topics())
        wanted = {
            "KAFKA_INPUT_TOPIC": settings.kafka_input_topic,
            "KAFKA_OUTPUT_TOPIC": settings.kafka_output_topic,
            "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        }
        missing = {var: topic for var, topic in wanted.items() if topic not in existing}
        if missing and not settings.kafka_create_topics:
            var, topic = next(iter(missing.items()))
            raise ConfigError(var, topic, "the topic does not exist; create it or set "
                              "KAFKA_CREATE_TOPICS=true")
        if missing:
            new = [new_topic(t, settings) for t in sorted(set(missing.values()))]
            try:
                await create_and_wait(admin, new)
            except InvalidReplicationFactorError as exc:
                raise ConfigError("KAFKA_TOPIC_REPLICATION_FACTOR",
                                  settings.kafka_topic_replication_factor,
                                  f"the broker refused it ({exc})") from None
            except InvalidPartitionsError as exc:
                raise ConfigError("KAFKA_TOPIC_PARTITIONS", settings.kafka_topic_partitions,
                                  f"the broker refused it ({exc})") from None
            log.info("created topics %s", [t.name for t in new])
        return await _record_limits(admin, settings)
    except KafkaError as exc:
        raise StreamprocError(f"could not check topics: {exc}") from exc
    finally:
        await admin.close()


async def _record_limits(admin: AIOKafkaAdminClient, settings: KafkaSettings) -> dict[str, int]:
    topics = {settings.kafka_output_topic, settings.kafka_dlq_topic}
    limits = dict.fromkeys(topics, settings.kafka_max_request_size)
    responses = await admin.describe_configs([
        ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        for topic in sorted(topics)])
    for response in responses:
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"]:
                if entry["config_names"] == "max.message.bytes" and entry["config_value"]:
                    topic = resource["resource_name"]
                    limits[topic] = min(limits[topic], int(entry["config_value"]))
    return limits
