"""Input and output records, decoded and encoded with orjson, strictly.

A feed item is a JSON object with a required non-empty string ``id`` and ``text``, and
optional string ``title``, ``url``, ``published_at`` and ``lang``. The id, text and title are
read from fields of other names when :class:`InputFields` says so (``INPUT_ID_FIELD``,
``INPUT_TEXT_FIELD``, ``INPUT_TITLE_FIELD``). Unknown fields are kept in ``extra`` and passed
through to the summary. orjson holds 64-bit integers and doubles; an
integer past 64 bits, or a number past a double's range, is kept as its JSON text and written
back unchanged, never turned into a float. Every way a record can be wrong raises
:class:`~streamproc.errors.InvalidRecord` with a stable ``reason_code`` and a reason a person
can read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import InvalidRecord

__all__ = ["OPTIONAL_FIELDS", "FeedItem", "InputFields", "SourceRef", "Summary",
           "decode_feed_item"]

OPTIONAL_FIELDS = ("title", "url", "published_at", "lang")


@dataclass(frozen=True, slots=True)
class InputFields:
    """The input's field names for a feed item's id, text and title (``title=None``: the
    input has none; a field called ``title`` is then passed through as an unknown one)."""

    id: str = "id"
    text: str = "text"
    title: str | None = "title"

    def names(self) -> dict[str, str]:
        """Each of the item's own fields by the name the input gives it."""
        named = {"id": self.id, "text": self.text, "title": self.title}
        return {attr: name for attr, name in named.items() if name is not None} | {
            attr: attr for attr in OPTIONAL_FIELDS if attr != "title"}


DEFAULT_FIELDS = InputFields()


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


# A run of this many digits may be an integer past 64 bits, which orjson reads as a float
# (or refuses, past a double's range): such values are read again, exactly (_load_exact).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_INT64 = (-(2**63), 2**64 - 1)  # what orjson reads and writes as an integer


def _exact_int(literal: str) -> Any:
    """An integer literal: an int within 64 bits, else kept as its JSON text."""
    if len(literal) <= 21:
        number = int(literal)
        if _INT64[0] <= number <= _INT64[1]:
            return number
    return orjson.Fragment(literal.encode())


def _exact_float(literal: str) -> Any:
    """A float literal: a float when a double holds it, else kept as its JSON text."""
    number = float(literal)
    return number if math.isfinite(number) else orjson.Fragment(literal.encode())


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


def _load_exact(text: str) -> Any:
    """The JSON ``text`` with every number as written: integers past 64 bits and numbers past
    a double's range stay their JSON text (``orjson.Fragment``), written back unchanged."""
    return json.loads(text, parse_int=_exact_int, parse_float=_exact_float,
                      parse_constant=_not_json)


def _load(value: bytes) -> Any:
    try:
        data = orjson.loads(value)  # validates UTF-8 too; tell the two apart only on failure
    except orjson.JSONDecodeError as exc:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidRecord(f"the value is not valid UTF-8 ({bad.reason} at byte "
                                f"{bad.start})", "invalid_utf8") from None
        if "number" not in str(exc):
            raise InvalidRecord(f"the value is not valid JSON: {exc}", "not_json") from None
        data = None  # a number orjson cannot hold (10**5000): read it exactly below
    else:
        if not _LONG_DIGITS.search(value):
            return data
        text = value.decode("utf-8")
    try:
        return _load_exact(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRecord(f"the value is not valid JSON: {exc}", "not_json") from None


def decode_feed_item(value: bytes | None, *, max_input_bytes: int,
                     size: int | None = None, fields: InputFields = DEFAULT_FIELDS) -> FeedItem:
    """Parse and validate one record value. Raises :class:`InvalidRecord`. ``size``: the
    value's length on the wire, when the consumer holds it cut (too large to keep);
    ``fields``: the input's names for the id, text and title."""
    if value is None or len(value) == 0:
        raise InvalidRecord("the record has no value (null or empty)", "empty")
    size = max(len(value), size or 0)
    if size > max_input_bytes:  # the text is never longer than the JSON holding it
        raise InvalidRecord(
            f"the record is {size} bytes, over MAX_INPUT_BYTES={max_input_bytes}",
            "too_large",
        )
    data = _load(value)
    if not isinstance(data, dict):
        raise InvalidRecord(f"the JSON value is a {type(data).__name__}, not an object",
                            "not_object")
    names = fields.names()
    for attr in ("id", "text"):
        name = names[attr]
        if name not in data:
            raise InvalidRecord(f"the required field {name!r} is missing", f"missing_{attr}")
        if not isinstance(data[name], str):
            kind = "number" if isinstance(data[name], orjson.Fragment) else type(
                data[name]).__name__
            raise InvalidRecord(
                f"the field {name!r} must be a string, got {kind}",
                "wrong_type",
            )
        if not data[name].strip():
            raise InvalidRecord(f"the required field {name!r} is empty", f"missing_{attr}")
    optional: dict[str, str | None] = {}
    for attr in OPTIONAL_FIELDS:
        if (given := names.get(attr)) is None:
            continue
        value_ = data.get(given)
        if value_ is not None and not isinstance(value_, str):
            kind = "number" if isinstance(value_, orjson.Fragment) else type(value_).__name__
            raise InvalidRecord(
                f"the field {given!r} must be a string or null, got {kind}",
                "wrong_type",
            )
        optional[attr] = value_
    known = set(names.values())
    extra = {k: v for k, v in data.items() if k not in known}
    if extra:
        try:  # they are written back out with the summary; orjson nests at most 255 deep
            orjson.dumps(extra)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise InvalidRecord(f"an extra field cannot be passed through: {exc}",
                                "unserializable") from None
    return FeedItem(id=data[names["id"]], text=data[names["text"]], extra=extra, **optional)
