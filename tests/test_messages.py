"""Feed-item decoding is strict and every failure carries a reason code."""

from __future__ import annotations

import orjson
import pytest

from streamproc.errors import InvalidRecord
from streamproc.records import SourceRef, Summary, decode_feed_item


def decode(value: bytes | None, limit: int = 1000) -> object:
    return decode_feed_item(value, max_input_bytes=limit)


def test_valid_item_keeps_optional_and_unknown_fields() -> None:
    raw = orjson.dumps({"id": "a1", "text": "Hello.", "title": "T", "lang": "en", "tags": [1]})
    item = decode_feed_item(raw, max_input_bytes=1000)
    assert (item.id, item.text, item.title, item.lang) == ("a1", "Hello.", "T", "en")
    assert item.url is None
    assert item.passthrough() == {"tags": [1], "title": "T", "lang": "en"}


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"\xff\xfe not utf8", "invalid_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"just a string"', "not_object"),
        (b'{"text": "x"}', "missing_id"),
        (b'{"id": "", "text": "x"}', "missing_id"),
        (b'{"id": "1"}', "missing_text"),
        (b'{"id": "1", "text": "   "}', "missing_text"),
        (b'{"id": 1, "text": "x"}', "wrong_type"),
        (b'{"id": "1", "text": ["x"]}', "wrong_type"),
        (b'{"id": "1", "text": "x", "title": 5}', "wrong_type"),
        (orjson.dumps({"id": "1", "text": "x" * 2000}), "too_large"),
        (b"[" * 5000 + b"]" * 5000, "too_large"),
    ],
)
def test_invalid_records_get_a_reason_code_and_a_readable_reason(
    value: bytes | None, code: str
) -> None:
    with pytest.raises(InvalidRecord) as info:
        decode(value, limit=1000 if code != "not_json" else 10_000)
    assert info.value.reason_code == code
    assert info.value.dead_letter and len(info.value.reason) > 10


def test_deep_nesting_under_the_size_limit_is_rejected_not_crashing() -> None:
    with pytest.raises(InvalidRecord) as info:
        decode(b"[" * 5000 + b"]" * 5000, limit=100_000)
    assert info.value.reason_code == "not_json"


def test_summary_json_carries_source_timings_and_passthrough() -> None:
    summary = Summary(id="a1", summary="S.", model="m", source=SourceRef("t", 2, 41),
                      timings_ms={"inference": 1.23456}, passthrough={"title": "T", "id": "x"})
    record = orjson.loads(summary.to_json())
    assert record == {"id": "a1", "summary": "S.", "model": "m", "title": "T",
                      "source": {"topic": "t", "partition": 2, "offset": 41},
                      "timings_ms": {"inference": 1.235}}


def test_extra_fields_too_deep_to_write_back_are_rejected_at_decode() -> None:
    value = b'{"id": "d", "text": "t", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    with pytest.raises(InvalidRecord) as info:
        decode(value, limit=100_000)
    assert info.value.reason_code == "unserializable"
