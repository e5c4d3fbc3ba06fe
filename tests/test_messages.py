"""Feed-item decoding is strict and every failure carries a reason code."""

from __future__ import annotations

import orjson
import pytest

from streamproc.errors import ConfigError, InvalidRecord
from streamproc.records import InputFields, SourceRef, Summary, decode_feed_item
from streamproc.settings import load_settings


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


def test_the_id_text_and_title_can_come_from_fields_of_other_names() -> None:
    fields = InputFields(id="guid", text="body", title="headline")
    raw = orjson.dumps({"guid": "g1", "body": "Hello.", "headline": "H", "title": "kept",
                        "lang": "en"})
    item = decode_feed_item(raw, max_input_bytes=1000, fields=fields)
    assert (item.id, item.text, item.title, item.lang) == ("g1", "Hello.", "H", "en")
    assert item.extra == {"title": "kept"}
    with pytest.raises(InvalidRecord, match="'body' is missing") as missing:
        decode_feed_item(orjson.dumps({"guid": "g2", "text": "t"}), max_input_bytes=1000,
                         fields=fields)
    assert missing.value.reason_code == "missing_text"
    untitled = decode_feed_item(orjson.dumps({"id": "a", "text": "t", "title": 7}),
                                max_input_bytes=1000, fields=InputFields(title=None))
    assert untitled.title is None and untitled.extra == {"title": 7}


@pytest.mark.parametrize(("values", "variable"), [
    ({"input_text_field": "id"}, "INPUT_TEXT_FIELD"),
    ({"input_id_field": "guid", "input_title_field": "guid"}, "INPUT_TITLE_FIELD"),
    ({"input_id_field": ""}, "INPUT_ID_FIELD"),
    ({"input_title_field": "url"}, "INPUT_TITLE_FIELD"),
])
def test_input_field_names_are_checked_at_start(values: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}="):
        load_settings(None, **values)
    assert load_settings(None, input_title_field="").input_fields.title is None
