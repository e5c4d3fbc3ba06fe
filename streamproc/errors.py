"""The error tree. Behaviour lives on the classes, not in ``isinstance`` ladders.

``dead_letter``   the record can never succeed; it goes to the dead-letter topic and its
                  offset counts as complete.
``reason_code``   a short, stable, machine-readable tag used in DLQ headers and metrics.
``exit_code``     the process's exit code when this error stops ``streamproc``.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "ConsumerFailed",
    "DeliveryFailed",
    "FetchFailed",
    "InferenceFailed",
    "InvalidRecord",
    "ItemTooLarge",
    "ModelLoadError",
    "NoHealthyReplica",
    "OutOfMemory",
    "RebalanceFailed",
    "ReplicaBroken",
    "StreamprocError",
    "WorkerClosed",
]


class StreamprocError(Exception):
    """Base of every error streamproc raises on purpose."""

    dead_letter: bool = False
    reason_code: str = "error"
    exit_code: int = 1

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(StreamprocError):
    """A setting is missing or invalid. Raised at start; names the variable."""

    reason_code = "config"
    exit_code = 2

    def __init__(self, variable: str, value: object, problem: str) -> None:
        super().__init__(f"{variable}={value!r}: {problem}")
        self.variable = variable
        self.value = value


class InvalidRecord(StreamprocError):
    """A Kafka record that can never be processed: bad bytes, bad JSON, bad fields."""

    dead_letter = True

    def __init__(self, reason: str, reason_code: str = "invalid") -> None:
        super().__init__(reason)
        self.reason_code = reason_code


class InferenceFailed(StreamprocError):
    """The model raised on this item, alone, on a healthy replica."""

    dead_letter = True
    reason_code = "inference_failed"


class OutOfMemory(InferenceFailed):
    """Device memory ran out. The worker splits the batch and retries."""

    reason_code = "out_of_memory"
    # What a device allocation failure says when it is not torch's OutOfMemoryError: cuBLAS
    # and cuDNN raise plain RuntimeErrors, CTranslate2 its own "out of memory".
    MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")

    @classmethod
    def describes(cls, exc: BaseException) -> bool:
        """Whether ``exc`` means device memory ran out: ours, torch's ``OutOfMemoryError``
        (checked by name: no torch import here), or an allocation failure by its message."""
        if isinstance(exc, cls) or type(exc).__name__ == "OutOfMemoryError":
            return True
        text = str(exc).lower()
        return any(marker in text for marker in cls.MARKERS)


class ReplicaBroken(InferenceFailed):
    """The item's batch left its replica failing a known-good probe: the item is the prime
    suspect, so it is dead-lettered rather than allowed to break the next replica too."""

    reason_code = "replica_broken"


class ItemTooLarge(InferenceFailed):
    """A single item still ran out of memory after every split."""

    reason_code = "item_too_large"


class NoHealthyReplica(StreamprocError):
    """Every replica was taken out of rotation; the worker cannot serve."""

    reason_code = "no_healthy_replica"


class WorkerClosed(StreamprocError):
    """The worker is stopped or stopping and takes no new work."""

    reason_code = "worker_closed"


class ModelLoadError(StreamprocError):
    """The model could not be loaded (not cached, not reachable, not a valid checkpoint)."""

    reason_code = "model_load"


class BrokerUnavailable(StreamprocError):
    """Kafka could not be reached."""

    reason_code = "broker_unavailable"


class DeliveryFailed(StreamprocError):
    """An output the broker did not take for a reason not its own (unreachable past
    ``KAFKA_DELIVERY_TIMEOUT_MS``, fenced, a producer that kept failing). Its partition stops
    uncommitted and the service exits non-zero, so the orchestrator restarts it."""

    reason_code = "delivery_failed"


class FetchFailed(StreamprocError):
    """Fetching failed for a reason not a record's own (a batch whose CRC does not match,
    an authorization error, the client's own failure). The service stops non-zero with its
    records uncommitted: a restart fetches them again."""

    reason_code = "fetch_failed"


class RebalanceFailed(StreamprocError):
    """Setting up or handing back partitions failed; the member leaves rather than keep
    partitions it cannot serve."""

    reason_code = "rebalance_failed"


class ConsumerFailed(StreamprocError):
    """The consumer cannot go on: the group refused this member (authorization, its
    ``KAFKA_GROUP_INSTANCE_ID`` taken by another member) or aiokafka's coordination failed.
    The service stops non-zero, leaving what is open uncommitted."""

    reason_code = "consumer_failed"
