"""How this member takes part in the consumer group: the rebalance timing, the assignor and
static membership.

aiokafka speaks the group's *eager* protocol: in a rebalance every member hands back all its
partitions (``on_partitions_revoked``) before it rejoins, the group waits for every member to
rejoin, and only then hands out the new assignment (``on_partitions_assigned``). The timing
holds by construction:

- **The group's wait is explicit.** The group waits ``KAFKA_REBALANCE_TIMEOUT_MS`` for a
  member to rejoin, then removes it. aiokafka would otherwise send the session timeout
  (10 s), so a member that drained on revoke for longer was removed, its partitions went to
  the others, and it rejoined to a new rebalance: the storm of issue 19.
- **A hand-back fits in that wait.** A revoke drains until 80% of ``SHUTDOWN_TIMEOUT_S``,
  commits until 100% and closes its producers within 1 s (:func:`revoke_deadlines`), so a
  member rejoins ``SHUTDOWN_TIMEOUT_S`` + 1 s after the rebalance began at most. That must
  fit, with :data:`REBALANCE_MARGIN_S` to spare, in the rebalance timeout and in the
  consumer's request timeout (the other members' ``JoinGroup`` requests wait at the broker
  for the slowest member).
- **The assignment callback is short.** aiokafka sends no heartbeats while
  ``on_partitions_assigned`` runs, so the callback only registers the new partitions,
  paused; their set-up (under exactly_once the producer that fences the previous owner, and
  the seek to the committed offset) runs after it returns, and they stay paused until it is
  done, so the fencing argument of :mod:`streamproc.kafka.exactly_once` still holds.
- :func:`rebalance_problems` says at start which settings cannot fit; they are honoured, and
  the service logs a warning for each.

**The assignor** is ``KAFKA_ASSIGNOR``: ``sticky`` (the default) keeps each partition with
its owner where the balance allows, so a member joining or leaving moves only the partitions
it must; ``roundrobin`` (aiokafka's default) and ``range`` deal them out again.

**Static membership** (``KAFKA_GROUP_INSTANCE_ID``, KIP-345): the member joins with a stable
instance id, so a process that restarts with the same id within the session timeout gets its
partitions back with no rebalance. aiokafka 0.14 sends the id in ``JoinGroup`` and
``SyncGroup`` (v5/v3), but its ``LeaveGroup`` (v1) cannot carry it, so a static member never
leaves the group: a member stopped for good (scaled down) keeps its partitions until the
session timeout passes.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from ..settings import KafkaSettings

__all__ = ["CONSUMER_REQUEST_TIMEOUT_MS", "DRAIN_SHARE", "REBALANCE_MARGIN_S", "REVOKE_CLOSE_S",
           "group_options", "note_generation", "rebalance_problems", "revoke_deadlines"]

DRAIN_SHARE = 0.8  # of SHUTDOWN_TIMEOUT_S: a drain (revoke or shutdown) ends here
REVOKE_CLOSE_S = 1.0  # closing a revoked partition's producer, after its commit
REBALANCE_MARGIN_S = 5.0  # spare time between a member's hand-back and the group's wait
CONSUMER_REQUEST_TIMEOUT_MS = 40_000  # aiokafka's default, set explicitly


def revoke_deadlines(settings: KafkaSettings, started: float) -> tuple[float, float]:
    """When a revoke that began at ``started`` (monotonic) stops draining, and when its
    commit must be done."""
    budget = settings.shutdown_timeout_s
    return started + DRAIN_SHARE * budget, started + budget


def rebalance_problems(settings: KafkaSettings) -> list[str]:
    """Why these settings cannot keep a rebalance inside the group's clock; empty when they
    fit."""
    hand_back = settings.shutdown_timeout_s + REVOKE_CLOSE_S
    problems = []
    for limit_ms, name in ((settings.kafka_rebalance_timeout_ms, "KAFKA_REBALANCE_TIMEOUT_MS"),
                           (CONSUMER_REQUEST_TIMEOUT_MS, "the consumer's request timeout")):
        if hand_back + REBALANCE_MARGIN_S > limit_ms / 1000:
            problems.append(
                f"a revoke may take SHUTDOWN_TIMEOUT_S={settings.shutdown_timeout_s:g} s + "
                f"{REVOKE_CLOSE_S:g} s, which does not fit in {name} ({limit_ms / 1000:g} s) "
                f"with {REBALANCE_MARGIN_S:g} s to spare: under a backlog the group will remove "
                "members in rebalances; lower SHUTDOWN_TIMEOUT_S"
                + (" or raise KAFKA_REBALANCE_TIMEOUT_MS" if "KAFKA" in name else ""))
    if settings.kafka_session_timeout_ms > settings.kafka_rebalance_timeout_ms:
        problems.append("KAFKA_SESSION_TIMEOUT_MS is above KAFKA_REBALANCE_TIMEOUT_MS: the group "
                        "gives up on a rejoining member before it would on a silent one")
    return problems


_ASSIGNORS: dict[str, type[AbstractPartitionAssignor]] = {
    "sticky": StickyPartitionAssignor, "roundrobin": RoundRobinPartitionAssignor,
    "range": RangePartitionAssignor}


def _assignor(name: str) -> type[AbstractPartitionAssignor]:
    base = _ASSIGNORS[name]
    # aiokafka's sticky assignor keeps the member's last assignment in class attributes: a
    # class of its own per consumer keeps two consumers in one process apart.
    return type(f"{base.__name__}ForOneConsumer", (base,), {}) if base is StickyPartitionAssignor \
        else base


def group_options(settings: KafkaSettings) -> dict[str, Any]:
    """The consumer's group options (see the module docstring)."""
    return {
        "group_id": settings.kafka_group_id,
        "group_instance_id": settings.kafka_group_instance_id,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": max(settings.kafka_session_timeout_ms // 3, 100),
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "rebalance_timeout_ms": settings.kafka_rebalance_timeout_ms,
        "request_timeout_ms": CONSUMER_REQUEST_TIMEOUT_MS,
        "partition_assignment_strategy": (_assignor(settings.kafka_assignor),),
    }


def note_generation(consumer: AIOKafkaConsumer) -> int:
    """The group generation this member last joined (-1 before it joined), told to the
    sticky assignor too: it sends it with the member's last assignment, so that the leader
    can tell a partition's current owner from an older one (aiokafka never tells it). aiokafka
    keeps the generation on its coordinator only."""
    coordinator = getattr(consumer, "_coordinator", None)
    value = getattr(coordinator, "generation", -1)
    gen = value if isinstance(value, int) else -1
    for assignor in getattr(coordinator, "_assignors", ()):
        if isinstance(assignor, type) and issubclass(assignor, StickyPartitionAssignor):
            sticky: type[StickyPartitionAssignor] = assignor
            sticky.on_generation_assignment(gen)
    return gen
