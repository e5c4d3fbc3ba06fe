"""Input and output records, decoded and encoded with orjson, strictly.

A feed item is a JSON object with a required non-empty string ``id`` and ``text``, and
optional string ``title``, ``url``, ``published_at`` and ``lang``. Unknown fields are kept in
``extra`` and passed through to the summary. Every way a record can be wrong raises
:class:`~streamproc.errors.InvalidRecord` with a stable ``reason_code`` and a reason a person
can read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import InvalidRecord

__all__ = ["OPTIONAL_FIELDS", "FeedItem", "SourceRef", "Summary", "decode_feed_item"]

OPTIONAL_FIELDS = ("title", "url", "published_at", "lang")
_KNOWN = {"id", "text", *OPTIONAL_FIELDS}


@dataclass(frozen=True, slots=True)
class FeedItem:
    id: str
    text: str
    title: str | None = None
    url: str | None = None
    published_at: str | None = None
    lang: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def passthrough(self) -> dict[str, Any]:
        """The fields a summary carries along: the optional ones that are set, and unknowns."""
        out = dict(self.extra)
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class SourceRef:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Summary:
    id: str
    summary: str
    model: str
    source: SourceRef | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    passthrough: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        record: dict[str, Any] = dict(self.passthrough)
        record.update(id=self.id, summary=self.summary, model=self.model)
        if self.source is not None:
            record["source"] = {
                "topic": self.source.topic,
                "partition": self.source.partition,
                "offset": self.source.offset,
            }
        record["timings_ms"] = {k: round(v, 3) for k, v in self.timings_ms.items()}
        return orjson.dumps(record)


def decode_feed_item(value: bytes | None, *, max_input_bytes: int) -> FeedItem:
    """Parse and validate one record value. Raises :class:`InvalidRecord`."""
    if value is None or len(value) == 0:
        raise InvalidRecord("the record has no value (null or empty)", "empty")
    if len(value) > max_input_bytes:  # the text is never longer than the JSON holding it
        raise InvalidRecord(
            f"the record is {len(value)} bytes, over MAX_INPUT_BYTES={max_input_bytes}",
            "too_large",
        )
    try:
        data = orjson.loads(value)  # validates UTF-8 too; tell the two apart only on failure
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidRecord(f"the value is not valid UTF-8 ({bad.reason} at byte "
                                f"{bad.start})", "invalid_utf8") from None
        raise InvalidRecord(f"the value is not valid JSON: {exc}", "not_json") from None
    if not isinstance(data, dict):
        raise InvalidRecord(f"the JSON value is a {type(data).__name__}, not an object",
                            "not_object")
    for name in ("id", "text"):
        if name not in data:
            raise InvalidRecord(f"the required field {name!r} is missing", f"missing_{name}")
        if not isinstance(data[name], str):
            raise InvalidRecord(
                f"the field {name!r} must be a string, got {type(data[name]).__name__}",
                "wrong_type",
            )
        if not data[name].strip():
            raise InvalidRecord(f"the required field {name!r} is empty", f"missing_{name}")
    optional: dict[str, str | None] = {}
    for name in OPTIONAL_FIELDS:
        value_ = data.get(name)
        if value_ is not None and not isinstance(value_, str):
            raise InvalidRecord(
                f"the field {name!r} must be a string or null, got {type(value_).__name__}",
                "wrong_type",
            )
        optional[name] = value_
    extra = {k: v for k, v in data.items() if k not in _KNOWN}
    if extra:
        try:  # they are written back out with the summary; orjson nests at most 255 deep
            orjson.dumps(extra)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise InvalidRecord(f"an extra field cannot be passed through: {exc}",
                                "unserializable") from None
    return FeedItem(id=data["id"], text=data["text"], extra=extra, **optional)
