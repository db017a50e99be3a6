"""Request validation every servicer shares: field violations gathered and raised together, the
ids that travel between services, and timestamps between protobuf and Python."""

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from c360.common.v1 import common_pb2
from services.runtime.errors import InvalidArgument

# Shop and person ids go inside Redis hash tags and schema-free keys: no braces, and no colon in
# shops.
SHOP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PERSON_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# The range of google.protobuf.Timestamp: 0001-01-01 to 9999-12-31.
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_IDENTIFIER = 256

CHANNEL_NAMES: dict[common_pb2.Channel.ValueType, str] = {
    common_pb2.CHANNEL_EMAIL: "email",
    common_pb2.CHANNEL_SMS: "sms",
    common_pb2.CHANNEL_WHATSAPP: "whatsapp",
    common_pb2.CHANNEL_PUSH: "push",
}
CHANNEL_ENUMS = {name: value for value, name in CHANNEL_NAMES.items()}


class Violations:
    """Collects every field violation of a request, then raises them together."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, field: str, why: str) -> None:
        self.found.append((field, why))

    def raise_any(self) -> None:
        if self.found:
            raise InvalidArgument(self.found)


def shop(value: str, violations: Violations) -> str:
    """A shop id, or a violation of `shop_id`."""
    if not SHOP_ID.fullmatch(value):
        violations.add("shop_id", "must be 1-128 letters, digits, '.', '_' or '-'")
    return value


def person(value: str, field: str, violations: Violations) -> str:
    """A person id, or a violation of `field`."""
    if not PERSON_ID.fullmatch(value):
        violations.add(field, "must be 1-128 letters, digits, '.', '_', ':' or '-'")
    return value


@dataclass(frozen=True)
class PersonRef:
    """Who a request is about: a person id, or an identifier (type, value); `field` is the
    request's field it came from, which a refusal of the identifier names."""

    person_id: str = ""
    identifier: tuple[str, str] | None = None
    field: str = "person"


def person_ref(message: Any, field: str, violations: Violations) -> PersonRef:
    """A c360.common.v1.PersonRef field: a valid person id, or an identifier of 1-256 printable
    characters of type and value; a violation of `field` when neither is given."""
    ref = getattr(message, field)
    which = ref.WhichOneof("ref")
    if which == "person_id":
        return PersonRef(
            person_id=person(ref.person_id, f"{field}.person_id", violations), field=field
        )
    if which == "identifier":
        for part in ("type", "value"):
            value = getattr(ref.identifier, part)
            if not value or len(value) > MAX_IDENTIFIER or not value.isprintable():
                violations.add(
                    f"{field}.identifier.{part}", f"must be 1-{MAX_IDENTIFIER} printable characters"
                )
        return PersonRef(identifier=(ref.identifier.type, ref.identifier.value), field=field)
    violations.add(field, "a person_id or an identifier is required")
    return PersonRef(field=field)


def channel_name(value: common_pb2.Channel.ValueType, field: str, violations: Violations) -> str:
    """The name of a channel ("email", "sms", "whatsapp", "push"), or a violation of `field`."""
    name = CHANNEL_NAMES.get(value)
    if name is None:
        violations.add(
            field, "must be CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_WHATSAPP or CHANNEL_PUSH"
        )
        return "email"
    return name


MAX_TEXT = 256


def text(value: str, field: str, violations: Violations, required: bool = True) -> str:
    """A short free text (a reason, a source, an id a caller chose): printable, at most
    MAX_TEXT characters, and non-empty when required."""
    if (required and not value) or len(value) > MAX_TEXT or not value.isprintable():
        violations.add(field, f"must be {'1' if required else '0'}-{MAX_TEXT} printable characters")
    return value


class UnreadableJson(ValueError):
    """JSON that parses as text but not into values: nested deeper than the parser recurses, or
    an integer of more digits than Python converts (4300)."""


def json_value(body: bytes | str) -> Any:
    """The JSON value of a body a caller sent, integers exact. ValueError for anything else:
    JSONDecodeError (not JSON), UnicodeDecodeError (not UTF-8), UnreadableJson."""
    try:
        return json.loads(body)
    except RecursionError:
        raise UnreadableJson("nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as bad:
        raise UnreadableJson(str(bad)) from None


# Nesting of a caller's JSON value past which it is refused: far beyond any real document, and
# well within what the code that walks it (recursively) can follow.
MAX_JSON_DEPTH = 64


def unstorable(value: Any) -> str | None:
    """Why a JSON-like value (strings, numbers, lists, objects) cannot be stored as PostgreSQL
    text or JSON, or None: a string or key holding a NUL character or a lone surrogate (what
    "\\u0000" and "\\ud800" decode to), a number that is not finite (NaN, Infinity), or
    nesting deeper than MAX_JSON_DEPTH."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "must not contain NUL characters"
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "must be valid Unicode (a lone surrogate is not)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "must be a finite number"
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                return f"must be nested at most {MAX_JSON_DEPTH} levels deep"
            inner = [x for pair in item.items() for x in pair] if isinstance(item, dict) else item
            pending.extend((x, depth + 1) for x in inner)
    return None


def plain(value: Any) -> Any:
    """A value as JSON has it: instants as ISO 8601 strings, decimals as strings (exact), and
    mappings and sequences converted throughout (what a protobuf Struct can hold)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def timestamp(instant: datetime | None) -> Timestamp | None:
    """A protobuf timestamp, None for None."""
    if instant is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def time_field(
    message: Any, name: str, violations: Violations, required: bool = True, path: str = ""
) -> datetime | None:
    """A Timestamp field as an aware UTC datetime: None when unset (a violation if required) or
    outside the years 1-9999 (a violation). Violations name `path` (a nested field's path in
    the request), else `name`."""
    field = path or name
    if not message.HasField(name):
        if required:
            violations.add(field, "required")
        return None
    stamp: Timestamp = getattr(message, name)
    if not MIN_SECONDS <= stamp.seconds <= MAX_SECONDS or not 0 <= stamp.nanos < 1_000_000_000:
        violations.add(field, "must be a time between the years 1 and 9999")
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def required_time(message: Any, name: str, violations: Violations) -> datetime:
    """A required Timestamp field (see time_field); the epoch stands in while a violation is
    pending."""
    found = time_field(message, name, violations)
    return EPOCH if found is None else found


def bounded(value: int, field: str, default: int, maximum: int, violations: Violations) -> int:
    """A page size or similar count: 0 means the default, more than the maximum is a violation."""
    if not 0 <= value <= maximum:
        violations.add(field, f"must be 0-{maximum} (0 = {default})")
    return value or default


def cursor(value: str, field: str, violations: Violations) -> int:
    """A page token made of a position (ASCII digits, as this service handed it out)."""
    if value and not (value.isascii() and value.isdigit() and len(value) <= 18):
        violations.add(field, "must be a token from a previous page")
        return 0
    return int(value or 0)
