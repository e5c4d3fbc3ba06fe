"""Bad input, fuzzed through the real pipeline: every payload ends as exactly one output or one
dead letter, classified as the decoder classifies it, and the processor neither crashes nor
grows its memory without bound."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from streamproc.errors import InvalidRecord
from streamproc.kafka.processor import StreamProcessor
from streamproc.records import decode_feed_item
from streamproc.settings import Settings
from streamproc.summarize.factory import build_worker
from streamproc.testing.kafka import create_topics, read_to_end
from tests.helpers import unique_topic

pytestmark = pytest.mark.kafka

MAX_INPUT_BYTES = 20_000
PAYLOADS_PER_EXAMPLE = 260
EXAMPLES = 3  # 780 payloads in all

int64 = st.integers(-(2**63), 2**63 - 1)
ids = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
unicode_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=200
).filter(lambda s: s.strip() != "")
valid_items = st.builds(lambda i, t: orjson.dumps({"id": i, "text": t}), ids, unicode_text)
edge_unicode = st.sampled_from([
    '{"id": "z", "text": "zero\\u200bwidth \\u202eRTL\\u202c \\ud83d\\ude00 ok."}',
    '{"id": "s", "text": "lone surrogate \\ud800 here"}',
    '{"id": "n", "text": "nul \\u0000 inside"}',
    '{"id": "\\u00e9t\\u00e9", "text": "accents \\u00e9\\u00e8"}',
    '{"id": "bom", "text": "\\ufeffbom first"}',
]).map(str.encode)
random_bytes = st.binary(min_size=0, max_size=400)
near_valid = st.tuples(valid_items, st.integers(0, 60), st.sampled_from([b"", b"}", b",", b"\""])
                       ).map(lambda t: t[0][: max(1, len(t[0]) - t[1])] + t[2])
huge = st.integers(MAX_INPUT_BYTES - 40, MAX_INPUT_BYTES * 2).map(
    lambda n: orjson.dumps({"id": "big", "text": "x" * n}))
deep = st.integers(10, 3000).map(lambda n: b'{"id": "d", "text": "t", "x": ' + b"[" * n
                                 + b"]" * n + b"}")
wrong_types = st.builds(
    lambda i, t: orjson.dumps({"id": i, "text": t}),
    st.one_of(ids, int64, st.none(), st.booleans(), st.lists(int64, max_size=2)),
    st.one_of(unicode_text, int64, st.floats(allow_nan=False), st.none(),
              st.dictionaries(ids, ids, max_size=2)))
payloads = st.one_of(valid_items, edge_unicode, random_bytes, near_valid, huge, deep, wrong_types)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_through_pipeline(bootstrap: str, batch: list[bytes]) -> None:
    topic = unique_topic("fuzz")
    config = Settings(
        _env_file=None, kafka_bootstrap_servers=bootstrap, kafka_input_topic=f"{topic}.raw",
        kafka_output_topic=f"{topic}.out", kafka_dlq_topic=f"{topic}.dlq",
        kafka_group_id=f"{topic}-group", summarizer="identity", gpu_device_ids="cpu",
        gpu_enable_warmup=False, max_input_bytes=MAX_INPUT_BYTES, kafka_commit_interval_ms=200,
        gpu_max_delay_ms=10, metrics_port=0,
    )
    for name in (config.kafka_input_topic, config.kafka_output_topic, config.kafka_dlq_topic):
        await create_topics(bootstrap, {name: 1})
    from streamproc.kafka.produce import produce_values

    await produce_values(config, config.kafka_input_topic, [(None, value) for value in batch])
    async with build_worker(config) as worker, StreamProcessor(config, worker) as processor:
        runner = asyncio.create_task(processor.run())
        deadline = asyncio.get_running_loop().time() + 90
        while processor.stats.answered() < len(batch):
            assert not runner.done(), "the processor stopped on its own"
            assert asyncio.get_running_loop().time() < deadline, processor.stats.as_dict()
            await asyncio.sleep(0.05)
        processor.request_stop()
        await asyncio.wait_for(runner, 30)
    outputs = await read_to_end(bootstrap, config.kafka_output_topic)
    dead = await read_to_end(bootstrap, config.kafka_dlq_topic)
    answered: dict[int, str] = {}
    for record in outputs:
        offset = orjson.loads(record.value)["source"]["offset"]
        assert offset not in answered, f"offset {offset} answered twice"
        answered[offset] = "ok"
    for record in dead:
        headers = dict(record.headers)
        offset = int(headers["streamproc.source.offset"])
        assert offset not in answered, f"offset {offset} answered twice"
        answered[offset] = headers["streamproc.error.code"].decode()
        assert record.value == (batch[offset] or b"")[: len(record.value)]
    assert sorted(answered) == list(range(len(batch))), "every payload answered exactly once"
    for offset, value in enumerate(batch):
        try:
            decode_feed_item(value, max_input_bytes=MAX_INPUT_BYTES)
            expected = "ok"
        except InvalidRecord as exc:
            expected = exc.reason_code
        assert answered[offset] == expected, (offset, value[:80])


def test_fuzzed_payloads_each_end_as_one_output_or_one_dead_letter(kafka_bootstrap: str) -> None:
    baseline = rss_mib()

    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(payloads, min_size=PAYLOADS_PER_EXAMPLE, max_size=PAYLOADS_PER_EXAMPLE))
    def check(batch: list[bytes]) -> None:
        asyncio.run(run_through_pipeline(kafka_bootstrap, batch))

    check()
    grown = rss_mib() - baseline
    assert grown < 400, f"resident memory grew by {grown:.0f} MiB over {EXAMPLES} runs"
