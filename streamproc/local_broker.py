"""The single-node Kafka broker script the package ships (``data/kafka/kafka.sh``, with its
Maven pom and log4j2 config), which ``streamproc demo`` and the crash suite start brokers with.

It works from a checkout and from an installed package alike; see the script's header for
where it keeps its jars and data (``STREAMPROC_STATE_DIR``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["KAFKA_SH"]

KAFKA_SH = Path(str(resources.files("streamproc").joinpath("data/kafka/kafka.sh")))
