"""What is written for each record (:mod:`streamproc.kafka.outbound`), how a failed write is
classified (:mod:`streamproc.kafka.sink`), and numbers orjson cannot hold
(:mod:`streamproc.records`): pure logic, no broker."""

from __future__ import annotations

import time

import orjson
import pytest
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    UnknownError,
)
from aiokafka.structs import ConsumerRecord

from streamproc.errors import InvalidRecord
from streamproc.kafka.clients import PRODUCER_BATCH_BYTES, producer_for, record_size
from streamproc.kafka.fetched import FetchedRecord
from streamproc.kafka.outbound import OWN_HEADERS, Outputs, source_age_s
from streamproc.kafka.sink import refused, replayable
from streamproc.records import decode_feed_item
from streamproc.settings import KafkaSettings

LIMIT = 20_000
ERROR = InvalidRecord("it is bad", "not_json")


def outputs() -> Outputs:
    settings = KafkaSettings(_env_file=None, kafka_output_topic="out",  # type: ignore[call-arg]
                             kafka_dlq_topic="dlq")
    return Outputs(settings, "identity", {"out": LIMIT, "dlq": LIMIT})


def record(key: bytes | None, value: bytes | None, headers: tuple[tuple[str, bytes], ...] = (),
           timestamp: int | None = None) -> ConsumerRecord[bytes, bytes]:
    stamp = int(time.time() * 1000) if timestamp is None else timestamp
    return ConsumerRecord("in", 0, 5, stamp, 0, key, value, None,
                          -1 if key is None else len(key), -1 if value is None else len(value),
                          headers)


def size(out: object) -> int:
    return record_size(out.key, out.value, out.headers)  # type: ignore[attr-defined]


def test_a_dead_letter_always_fits_cutting_the_value_then_the_key() -> None:
    cases = {
        "oversize key, empty value": record(b"k" * 50_000, b""),
        "oversize key and value": record(b"k" * 50_000, b"v" * 50_000),
        "oversize value": record(b"key", b"v" * 50_000),
        "10,000 headers": record(b"key", b"v" * 100,
                                 tuple((f"h{i}", b"x" * 10) for i in range(10_000))),
    }
    for what, source in cases.items():
        letter = outputs().dead_letter(source, ERROR)
        headers = dict(letter.headers)
        assert size(letter) <= LIMIT, what
        assert headers["streamproc.error.code"] == b"not_json", what
        if len(source.value) > LIMIT:
            assert headers["streamproc.value.truncated_from"] == str(len(source.value)).encode()
        if len(source.key) > LIMIT:
            assert headers["streamproc.key.truncated_from"] == b"50000", what
            assert letter.value == b"", what  # the value goes first
        else:
            assert letter.key == source.key, what
    many = outputs().dead_letter(cases["10,000 headers"], ERROR)
    kept = [h for h in many.headers if h[0].startswith("h")]
    assert 0 < len(kept) < 10_000
    assert dict(many.headers)["streamproc.headers.dropped"] == str(10_000 - len(kept)).encode()


def test_a_value_held_cut_is_marked_with_its_size_on_the_wire() -> None:
    held = FetchedRecord("in", 0, 5, 1, 0, b"k", b"v" * 100, None, 1, 9_000_000, (),
                         headers_dropped=3)
    letter = outputs().dead_letter(held, ERROR)
    headers = dict(letter.headers)
    assert letter.value == b"v" * 100
    assert headers["streamproc.value.truncated_from"] == b"9000000"
    assert headers["streamproc.headers.dropped"] == b"3"


def test_a_tombstone_keeps_its_null_value_and_a_record_with_neither_gets_an_empty_key() -> None:
    assert outputs().dead_letter(record(b"gone", None), ERROR).value is None
    letter = outputs().dead_letter(record(None, None), ERROR)
    assert (letter.key, letter.value) == (b"", None)


def test_input_headers_are_carried_but_never_streamprocs_own() -> None:
    headers = (("trace", b"t-1"), ("streamproc.error.code", b"forged"),
               ("streamproc.source.offset", b"0"))
    source = record(b"k", b'{"id": "a", "text": "Fine."}', headers)
    item = decode_feed_item(source.value, max_input_bytes=LIMIT)
    summary = outputs().summary(source, item, "Fine.", time.monotonic())
    assert summary.headers == [("trace", b"t-1")]
    letter = outputs().dead_letter(source, ERROR)
    assert ("trace", b"t-1") in letter.headers
    assert dict(letter.headers)["streamproc.error.code"] == b"not_json"
    assert dict(letter.headers)["streamproc.source.offset"] == b"5"
    assert {"streamproc.error.code", "streamproc.source.offset"} <= OWN_HEADERS


def test_a_trace_context_replaces_the_inputs_and_without_one_it_is_carried_as_is() -> None:
    headers = (("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
               ("tracestate", b"v=1"), ("correlation-id", b"c-7"))
    source = record(b"k", b'{"id": "a", "text": "Fine."}', headers)
    item = decode_feed_item(source.value, max_input_bytes=LIMIT)
    assert outputs().summary(source, item, "Fine.", time.monotonic()).headers == list(headers)
    ours = [("traceparent", b"00-" + b"1" * 32 + b"-" + b"3" * 16 + b"-01")]
    summary = outputs().summary(source, item, "Fine.", time.monotonic(), ours)
    assert summary.headers == [*ours, ("correlation-id", b"c-7")]
    letter = outputs().dead_letter(source, ERROR, ours)
    assert [h for h in letter.headers if not h[0].startswith("streamproc.")] == summary.headers


def test_a_cut_dead_letter_still_fits_with_the_count_of_the_headers_left_out() -> None:
    trace = ("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")
    letter = outputs().dead_letter(record(b"k", b"v" * (3 * LIMIT), (trace,)), ERROR)
    assert dict(letter.headers)["streamproc.headers.dropped"] == b"1"
    assert letter.size <= LIMIT


def test_a_summary_drops_input_headers_before_it_is_called_too_large() -> None:
    headers = tuple((f"h{i}", b"x" * 100) for i in range(500))
    source = record(b"k", b'{"id": "a", "text": "Fine."}', headers)
    item = decode_feed_item(source.value, max_input_bytes=LIMIT)
    summary = outputs().summary(source, item, "Fine.", time.monotonic())
    assert summary.reason_code is None and 0 < len(summary.headers) < 500
    assert size(summary) <= LIMIT


def test_a_refused_record_goes_alone_first_then_becomes_a_dead_letter() -> None:
    source = record(b"k", b'{"id": "a", "text": "Fine."}')
    item = decode_feed_item(source.value, max_input_bytes=LIMIT)
    summary = outputs().summary(source, item, "Fine.", time.monotonic())
    exc = MessageSizeTooLargeError()
    alone = outputs().refused(summary, exc)
    assert alone is not None and alone.alone and alone.reason_code is None
    letter = outputs().refused(alone, exc)
    assert letter is not None and letter.alone and letter.reason_code == "output_refused"
    assert outputs().refused(letter, exc) is None


def test_only_the_records_own_refusals_count_as_refusals() -> None:
    """aiokafka reports UNKNOWN_SERVER_ERROR and every code it does not know as UnknownError:
    it says nothing about the record, so it is a fault, never a dead letter."""
    assert refused(MessageSizeTooLargeError()) and replayable(MessageSizeTooLargeError())
    assert not refused(UnknownError()) and not replayable(UnknownError())
    assert replayable(OutOfOrderSequenceNumber()) and not refused(OutOfOrderSequenceNumber())
    assert not replayable(KafkaTimeoutError())


def test_an_implausible_source_timestamp_stays_out_of_the_latency() -> None:
    now = time.time()
    assert source_age_s(record(b"k", b"v", timestamp=1), now) is None
    assert source_age_s(record(b"k", b"v", timestamp=int((now + 3600) * 1000)), now) is None
    assert source_age_s(record(b"k", b"v", timestamp=-1), now) is None
    assert source_age_s(record(b"k", b"v", timestamp=int((now - 2) * 1000)), now) == (
        pytest.approx(2, abs=0.01))
    source = record(b"k", b'{"id": "a", "text": "Fine."}', timestamp=1)
    item = decode_feed_item(source.value, max_input_bytes=LIMIT)
    built = orjson.loads(outputs().summary(source, item, "Fine.", time.monotonic()).value)
    assert "since_source_timestamp" not in built["timings_ms"]


@pytest.mark.parametrize("literal", [b"18446744073709551617", b"-9223372036854775809",
                                     b"1" + b"0" * 5000, b"1e400", b"-12345678901234567890123"])
def test_numbers_orjson_cannot_hold_pass_through_exactly(literal: bytes) -> None:
    value = b'{"id": "a", "text": "t", "n": ' + literal + b', "m": [1, 2.5]}'
    item = decode_feed_item(value, max_input_bytes=1 << 20)
    assert orjson.dumps(item.passthrough()) == b'{"n":' + literal + b',"m":[1,2.5]}'


def test_numbers_are_not_strings_and_nan_is_not_json() -> None:
    with pytest.raises(InvalidRecord, match="got number") as big:
        decode_feed_item(b'{"id": 1' + b"0" * 30 + b', "text": "t"}', max_input_bytes=1000)
    assert big.value.reason_code == "wrong_type"
    with pytest.raises(InvalidRecord) as nan:
        decode_feed_item(b'{"id": "a", "text": "t", "n": NaN}', max_input_bytes=1000)
    assert nan.value.reason_code == "not_json"
    item = decode_feed_item(b'{"id": "a", "text": "12345678901234567890123"}',
                            max_input_bytes=1000)
    assert item.text == "12345678901234567890123"


@pytest.mark.parametrize("compression", ["none", "gzip", "snappy", "lz4", "zstd"])
async def test_producers_compress_as_set_and_batch_within_the_topics_limit(
        compression: str) -> None:
    """aiokafka refuses to build a producer for a codec whose library is missing; the batch
    size follows the smallest limit of the topics written (a batch is what the broker
    judges), never above aiokafka's default."""
    settings = KafkaSettings(_env_file=None,  # type: ignore[call-arg]
                             kafka_compression_type=compression)
    small = producer_for(settings, record_limit=4096)
    large = producer_for(settings)
    try:
        assert small._compression_type == (None if compression == "none" else compression)
        assert small._message_accumulator._batch_size == 4096
        assert large._message_accumulator._batch_size == PRODUCER_BATCH_BYTES
    finally:
        await small.stop()
        await large.stop()
