"""The error tree. Behaviour lives on the classes, not in ``isinstance`` ladders.

``dead_letter``   the record can never succeed; it goes to the dead-letter topic and its
                  offset counts as complete.
``reason_code``   a short, stable, machine-readable tag used in DLQ headers and metrics.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "InferenceFailed",
    "InvalidRecord",
    "ItemTooLarge",
    "ModelLoadError",
    "NoHealthyReplica",
    "OutOfMemory",
    "StreamprocError",
    "WorkerClosed",
]


class StreamprocError(Exception):
    """Base of every error streamproc raises on purpose."""

    dead_letter: bool = False
    reason_code: str = "error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(StreamprocError):
    """A setting is missing or invalid. Raised at start; names the variable."""

    reason_code = "config"

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
