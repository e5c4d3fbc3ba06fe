"""The container path, for real (``make container-test``; deselected from ``make test``).

Builds the base, Kafka and streamproc images from nothing (tests/container_stack.py), brings up
the project's docker-compose.yml (local image names, host ports 49092/49100, no GPU
reservation) with the tiny seq2seq checkpoint mounted as the model volume, and then, from the
host only, through the published ports:

- good feed items come back as summaries and bad ones as dead letters;
- ``/metrics`` counts exactly those, ``/readyz`` is 200, and docker's HEALTHCHECK says healthy;
- the service runs as the image's non-root user;
- ``docker compose stop`` ends it with exit code 0 and every input offset committed.

The stack is always torn down with ``docker compose down -v``; the images are removed at the
end unless CONTAINER_TEST_KEEP_IMAGES=1.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streamproc.testing.kafka import committed_offsets, read_to_end
from streamproc.testing.records import BAD_RECORDS
from tests import container_stack as cs
from tests.helpers import produce
from tests.probes import aget, eventually, good_record, scrape, value

pytestmark = pytest.mark.container

KAFKA_HOST_PORT = int(os.environ.get("CONTAINER_TEST_KAFKA_PORT", "49092"))
METRICS_HOST_PORT = int(os.environ.get("CONTAINER_TEST_METRICS_PORT", "49100"))
BOOTSTRAP = f"127.0.0.1:{KAFKA_HOST_PORT}"
N_GOOD = 24
INPUT, OUTPUT, DLQ, GROUP = "feeds.raw", "feeds.summaries", "feeds.dlq", "streamproc"


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    """The three images, built from nothing; the seconds each took go to the test log.
    CONTAINER_TEST_REUSE_IMAGES=1 (for working on the test itself) keeps images already built."""
    reuse = os.environ.get("CONTAINER_TEST_REUSE_IMAGES") == "1"
    timings: dict[str, float] = {}
    for tag, make in ((cs.BASE_TAG, cs.debian_base), (cs.KAFKA_TAG, cs.build_kafka),
                      (cs.STREAMPROC_TAG, cs.build_streamproc)):
        if not (reuse and cs.image_exists(tag)):
            timings[tag] = make()
    sizes = {tag: cs.image_bytes(tag) for tag in (cs.BASE_TAG, cs.KAFKA_TAG, cs.STREAMPROC_TAG)}
    print(f"build seconds: {timings}; image bytes: {sizes}", file=sys.stderr)
    yield
    if os.environ.get("CONTAINER_TEST_KEEP_IMAGES") != "1":
        cs.remove_images(cs.STREAMPROC_TAG, cs.KAFKA_TAG, cs.BASE_TAG)


@pytest.fixture
def stack(images: None, tiny_model_dir: Path, tmp_path: Path) -> Iterator[cs.ComposeStack]:
    # The container's user (uid 10001) reads the model through the volume.
    for path in [tiny_model_dir, *tiny_model_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    env_file = tmp_path / "streamproc.env"
    env_file.write_text("\n".join([
        "SUMMARIZER=seq2seq",
        "MODEL_NAME=/models",
        "HF_HUB_OFFLINE=1",
        "GPU_DEVICE_IDS=cpu",
        "GPU_BATCH_SIZE=8",
        "GEN_MAX_LENGTH=16",
        f"KAFKA_GROUP_ID={GROUP}",
        "LOG_FORMAT=json",
    ]) + "\n")
    variables = {
        "KAFKA_IMAGE": cs.KAFKA_TAG,
        "STREAMPROC_IMAGE": cs.STREAMPROC_TAG,
        "KAFKA_HOST_PORT": str(KAFKA_HOST_PORT),
        "METRICS_HOST_PORT": str(METRICS_HOST_PORT),
        "STREAMPROC_ENV_FILE": str(env_file),
        "MODELS_DIR": str(tiny_model_dir),
    }
    with cs.ComposeStack("streamproc-container-test", variables) as stack:
        yield stack


async def test_the_compose_stack_summarizes_reports_and_stops_cleanly(
        stack: cs.ComposeStack) -> None:
    assert stack.state("streamproc")["Health"]["Status"] == "healthy"  # type: ignore[index]
    user = stack.compose("exec", "-T", "streamproc", "id", "-u", capture=True).stdout.strip()
    assert user == "10001"
    # Healthy (alive) comes first; ready once the model is loaded and warm and the group joined.
    await eventually(lambda: aget(METRICS_HOST_PORT, "/readyz"),
                     lambda answer: answer is not None and answer[0] == 200, 300,
                     "/readyz to answer 200", interval_s=1.0)

    good = [(f"item-{i}".encode(), good_record(i)) for i in range(N_GOOD)]
    bad = [(f"bad-{i}".encode(), v) for i, (_, v, _) in enumerate(BAD_RECORDS)]
    await produce(BOOTSTRAP, INPUT, [*good, *bad])

    summaries = await eventually(lambda: read_to_end(BOOTSTRAP, OUTPUT),
                                 lambda records: len(records) >= N_GOOD, 180, "the summaries",
                                 interval_s=1.0)
    ids = Counter(orjson.loads(r.value)["id"] for r in summaries)
    assert ids == Counter(f"item-{i:03d}" for i in range(N_GOOD))
    assert all(orjson.loads(r.value)["model"] == "/models" for r in summaries)
    dead = await eventually(lambda: read_to_end(BOOTSTRAP, DLQ),
                            lambda records: len(records) >= len(BAD_RECORDS), 60,
                            "the dead letters", interval_s=1.0)
    assert sorted(r.value or b"" for r in dead) == sorted(bad.value for bad in BAD_RECORDS)

    samples = await scrape(METRICS_HOST_PORT)
    assert value(samples, "streamproc_summaries_produced_total") == N_GOOD
    for reason, count in Counter(bad.reason for bad in BAD_RECORDS).items():
        assert value(samples, "streamproc_dead_letters_total", reason=reason) == count, reason

    stack.compose("stop", "streamproc", timeout_s=120)
    state = stack.state("streamproc")
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    ends: dict[int, int] = {}
    for record in await read_to_end(BOOTSTRAP, INPUT):
        ends[record.partition] = record.offset + 1
    assert await committed_offsets(BOOTSTRAP, GROUP, INPUT) == ends
