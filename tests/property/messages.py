"""Hypothesis strategies for bad input: any protobuf request built from its descriptor (every
field at the edges of its type, odd unicode, oversized values, unknown fields, fields sent with
the wrong wire type, bytes that are no message at all), and JSON bodies as HTTP callers send them
(huge numbers, escaped lone surrogates, deep nesting, values of the wrong type in real shapes).

Nothing here names an RPC: a request's fields are read from its descriptor. Each field gets a
plausible value (near its valid form; a few field names common to every service, such as shop_id,
amounts, currencies and filters, say what that is) or an odd one, and each example decides how
often odd wins: never, about one field in ten, or half of them. So most bad input is one bad
field in an otherwise good request, which validation must catch before any store sees it.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.profile.segments import FIELDS, WINDOWED

Draw = Callable[[st.SearchStrategy[Any]], Any]

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# google.protobuf.Timestamp's range (years 1-9999).
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799
# Nesting of messages within a request beyond which fields are left unset.
MAX_DEPTH = 4
FIXTURES = Path(__file__).parents[1] / "fixtures" / "shopify"

# Characters that break naive handling: NUL (PostgreSQL text cannot hold it), escape and delete,
# bidirectional overrides, combining marks, zero-width joiners, a byte order mark, line and
# paragraph separators, the last code point, non-ASCII digits, case folding that changes length,
# and what quoting, LIKE patterns, Redis hash tags and CSV treat specially.
ODD_CHARACTERS = (
    "\x00", "\x1b", "\x7f", "\u202e", "\u200f", "\u0301", "\u0489", "\u200d", "\ufeff",
    "\u2028", "\u2029", "\U0010ffff", "\U0001f600", "\u0663", "\u0130", "\u00df", "\n", "\t",
    " ", '"', "'", "\\", "%", "_", "{", "}", ":", ",",
)  # fmt: skip
IDENTIFIER_TYPES = (
    "shopify_customer_id", "crm_id", "external_id", "email", "phone", "amazon_buyer_id",
    "ebay_user_id", "tiktok_buyer_id", "pos_customer_id", "cookie",
)  # fmt: skip

# Any character a protobuf string can carry (surrogates cannot be encoded in UTF-8).
characters = st.characters(codec="utf-8")
odd_text = st.lists(st.sampled_from(ODD_CHARACTERS) | characters, max_size=12).map("".join)
plausible_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)
words = st.from_regex(r"[A-Za-z][A-Za-z0-9 _-]{0,15}", fullmatch=True)
oversized_text = st.sampled_from((257, 4001, 70_000)).map(lambda n: "x" * n)
texts: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(("", " ", "0", "-1", "NaN", "\x00", "a\x00b", "e\u0301", "\u202eabc")),
    st.text(characters, max_size=24),
    odd_text,
    oversized_text,
)
decimal_text = st.one_of(
    st.sampled_from(
        (
            "-1", "1e3", "1E-3", "NaN", "-NaN", "sNaN", "Infinity", "-0", "1_000", " 12 ",
            "\u0661\u0662", "0.000000000000000000001", "999999999999999.99",
            "1e999999999", "12,50", "",
        )
    ),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.just(400).map(lambda n: "9" * n),
    texts,
)  # fmt: skip
timestamp_seconds = st.one_of(
    st.sampled_from((0, -1, MIN_SECONDS, MAX_SECONDS, MIN_SECONDS - 1, MAX_SECONDS + 1)),
    st.integers(*INT64),
)
odd_nanos = st.sampled_from((-1, 10**9)) | st.integers(*INT32)

# The segment filter language (services/profile/segments.py), with odd words, numbers,
# strings, windows and nesting in it.
_field = st.sampled_from(sorted([*FIELDS, "tags"]))
_value = st.one_of(
    st.integers(0, 1000).map(str),
    st.sampled_from(("1e999", "0.5", "-1", "true", "new", "online", "12.3.4")),
    st.just(1500).map(lambda n: "9" * n),
    texts.map(lambda t: json.dumps(t, ensure_ascii=False)),
    texts.map(lambda t: f"'{t}'"),
)
_window = st.builds(
    lambda what, days, qualifier: f"{what}({days}{qualifier})",
    st.sampled_from(sorted(WINDOWED)),
    st.sampled_from(("90d", "1d", "0d", "3651d", "9" * 30 + "d", "90", "-1d")),
    st.sampled_from(("", ", email", ", pos", ", \x00", ", 'sms'")),
)
_comparison = st.builds(
    lambda name, op, value: f"{name} {op} {value}",
    _field | _window | texts,
    st.sampled_from(("=", "!=", "<", "<=", ">", ">=", "has", "in", "")),
    _value | _value.map(lambda v: f"({v}, {v})"),
)
filters = st.recursive(
    _comparison,
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} and {b}", inner, inner),
        st.builds(lambda a, b: f"{a} or {b}", inner, inner),
        inner.map(lambda a: f"not {a}"),
        inner.map(lambda a: f"({a})"),
    ),
    max_leaves=6,
)
deep_filters = st.sampled_from(
    ("not " * 490 + "unsubscribed", "(" * 660 + "orders > 1" + ")" * 660, "(" * 1100)
)
# Filters as docs/audiences.md writes them.
valid_filters = st.sampled_from(
    (
        "orders(90d) >= 2 and consent.whatsapp and aov > 80",
        "lifecycle_stage in (at_risk, churned) or (rfm.r <= 2 and rfm.f >= 3)",
        'tags has "vip" and not unsubscribed and clicks(30d, email) > 0',
        "spend(365d, pos) > 100", "days_since_last_order > 30", "loyalty_member",
    )
)  # fmt: skip


def _small(low: int) -> st.SearchStrategy[int]:
    return st.integers(max(low, 0), 100)


def _edges(low: int, high: int) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted({low, high, 0, 1, high // 2, low + 1})) | st.integers(low, high)


@dataclass(frozen=True)
class Values:
    """Where an example's values come from: the example's own shop, and how often a field gets
    an odd value rather than a plausible one (0: never; n: one field in n)."""

    shop: str
    odd_one_in: int

    def pick(
        self, plausible: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]
    ) -> st.SearchStrategy[Any]:
        """Plausible, or now and then odd; shrinks towards plausible."""
        if self.odd_one_in == 0:
            return plausible
        return st.one_of(*[plausible] * (self.odd_one_in - 1), odd)

    def string(self, field: FieldDescriptor) -> st.SearchStrategy[str]:
        """A string field's value, by what its name says it holds."""
        name = field.name
        if name in ("shop_id", "shops", "shop_ids"):
            return self.pick(st.just(self.shop), texts)
        if name in (
            "total", "amount", "price", "points_per_currency_unit", "historical_ltv",
            "predicted_ltv_90d",
        ):  # fmt: skip
            return self.pick(st.decimals(0, 10_000, places=2).map(str), decimal_text)
        if name == "fatigue_threshold":
            return self.pick(st.sampled_from(("0.5", "0.7", "1")), decimal_text)
        if name == "currency":
            return self.pick(st.sampled_from(("EUR", "USD")), texts)
        if name in ("country", "default_country"):
            return self.pick(st.sampled_from(("GB", "FI", "US")), texts)
        if name == "time_zone":
            zones = st.sampled_from(("Europe/Helsinki", "UTC", "America/New_York", ""))
            return self.pick(zones, st.sampled_from(("Mars/Olympus", "Europe", "../x")) | texts)
        if name in ("page_token", "from_cursor", "ids"):
            tokens = st.integers(0, 10**6).map(str)
            return self.pick(tokens, st.integers(0, 10**30).map(str) | texts)
        if name == "filter":
            return self.pick(valid_filters, filters | deep_filters | texts)
        if name in ("segment_id", "job_id"):
            return self.pick(st.from_regex(r"[0-9a-f]{32}", fullmatch=True), texts)
        if name == "topic":
            return self.pick(st.sampled_from(GDPR_TOPICS), texts)
        if name == "kinds":
            kinds = ("lifecycle_stage_changed", "merged", "consent_changed", "gdpr_erasure")
            return self.pick(st.sampled_from(kinds), texts)
        if name == "lifecycle_stage":
            stages = ("", "new", "engaged", "converted", "loyal", "at_risk", "churned")
            return self.pick(st.sampled_from(stages), texts)
        if name == "own_domains":
            return self.pick(st.sampled_from(("example.com", "shop.example")), texts)
        if name.endswith(("_id", "_ids")):
            return self.pick(plausible_id, texts)
        return self.pick(words, texts)

    def scalar(self, field: FieldDescriptor) -> st.SearchStrategy[Any]:
        """Values of one non-message field's type."""
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self.string(field)
        if kind == FieldDescriptor.TYPE_BYTES:
            return self.pick(gdpr_payloads(self.shop), json_bodies(GDPR_SHAPES))
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_ENUM:
            # Mostly a value that means something (0 is unset, valid only for a few fields).
            assert field.enum_type is not None
            known = [value.number for value in field.enum_type.values]
            meaning = [number for number in known if number] or known
            return self.pick(st.sampled_from(meaning) | st.sampled_from(known), _edges(*INT32))
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.pick(
                st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True) | st.just(-0.0)
            )
        low, high = INT64
        if kind in (
            FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32
        ):  # fmt: skip
            low, high = INT32
        elif kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            low, high = UINT32
        elif kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            low, high = UINT64
        return self.pick(_small(low), _edges(low, high))

    def present(self) -> st.SearchStrategy[bool]:
        """Whether a field is set: always in a plausible example, mostly in one with an odd
        field now and then, half the time in one odd throughout."""
        if self.odd_one_in == 0:
            return st.just(True)
        if self.odd_one_in == 2:
            return st.booleans()
        return st.integers(0, 9).map(bool)


GDPR_TOPICS = ("customers/redact", "customers/data_request", "shop/redact")
GDPR_SHAPES = tuple(
    json.loads((FIXTURES / f"{name}.json").read_text())
    for name in ("customers_redact", "customers_data_request", "shop_redact")
)


def gdpr_payloads(shop: str) -> st.SearchStrategy[bytes]:
    """Shopify's GDPR payloads as they come, for the example's shop."""
    return st.sampled_from(GDPR_SHAPES).map(
        lambda shape: json.dumps(shape).replace("{shop}.myshopify.com", shop).encode()
    )


def fill(message: Message, draw: Draw, values: Values, depth: int = 0) -> Message:
    """Sets a selection of the message's fields to values of their types."""
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    full_name = descriptor.full_name
    if full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        seconds = st.integers(946_684_800, 1_900_000_000)  # 2000-2030
        if full_name == "google.protobuf.Duration":
            seconds = st.integers(3600, 90 * 86_400)  # an hour to 90 days
        message.seconds = draw(values.pick(seconds, timestamp_seconds))  # type: ignore[attr-defined]
        message.nanos = draw(values.pick(st.integers(0, 999_999_999), odd_nanos))  # type: ignore[attr-defined]
        return message
    if full_name == "google.protobuf.Struct":
        document = st.dictionaries(values.pick(words, texts), json_values(), max_size=4)
        message.update(draw(document))  # type: ignore[attr-defined]
        return message
    if full_name == "c360.common.v1.Identifier":
        kind = draw(values.pick(st.sampled_from(IDENTIFIER_TYPES), texts))
        message.type = kind  # type: ignore[attr-defined]
        message.value = draw(values.pick(identifier_values(kind), texts))  # type: ignore[attr-defined]
        return message
    # One member of each oneof is a candidate (setting another would clear it).
    left_out: set[str] = set()
    for oneof in descriptor.oneofs:
        chosen = draw(st.sampled_from(range(len(oneof.fields))))
        left_out.update(f.name for i, f in enumerate(oneof.fields) if i != chosen)
    for field in descriptor.fields:
        if field.name in left_out or not draw(values.present()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            fill_map(message, field, draw, values, depth)
        elif field.message_type is not None:
            if depth >= MAX_DEPTH:
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 3))):
                    fill(getattr(message, field.name).add(), draw, values, depth + 1)
            else:
                fill(getattr(message, field.name), draw, values, depth + 1)
                getattr(message, field.name).SetInParent()
        elif field.is_repeated:
            scalars = values.scalar(field)
            # One more than a list's usual limit (1000), of values short enough that the
            # request stays under gRPC's 4 MiB.
            many = scalars.map(lambda one: [one[:256] if isinstance(one, str) else one] * 1001)
            getattr(message, field.name).extend(
                draw(values.pick(st.lists(scalars, max_size=3), many))
            )
        else:
            setattr(message, field.name, draw(values.scalar(field)))
    return message


def identifier_values(kind: str) -> st.SearchStrategy[str]:
    """Values an identifier of that type plausibly has."""
    if kind == "email":
        return st.from_regex(r"[a-z][a-z0-9.]{0,8}@(example\.com|shop\.example)", fullmatch=True)
    if kind == "phone":
        return st.sampled_from(("+447757138957", "+358 40 1234567", "+1 202 555 0143"))
    if kind == "shopify_customer_id":
        return st.integers(1, 2**64).map(str)
    return plausible_id


def fill_map(
    message: Message, field: FieldDescriptor, draw: Draw, values: Values, depth: int
) -> None:
    entry = field.message_type
    assert entry is not None
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    target = getattr(message, field.name)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(values.scalar(key_field))
        if value_field.message_type is not None:
            if depth < MAX_DEPTH:
                fill(target[key], draw, values, depth + 1)
        else:
            target[key] = draw(values.scalar(value_field))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


@st.composite
def wire_fields(draw: Draw) -> bytes:
    """Fields the message does not declare (high numbers), or declared numbers (1-20) sent with
    any wire type, the wrong one included."""
    number = draw(st.integers(1, 20) | st.integers(1000, 2**29 - 1))
    wire = draw(st.sampled_from((0, 1, 2, 5)))
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(draw(st.integers(0, 2**64 - 1)))
    if wire in (1, 5):
        fixed: bytes = draw(
            st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4)
        )
        return tag + fixed
    payload: bytes = draw(st.binary(max_size=16) | odd_text.map(lambda t: t.encode()))
    return tag + _varint(len(payload)) + payload


@dataclass(frozen=True)
class Payload:
    """What goes on the wire, and the message it was built from (None for plain noise)."""

    raw: bytes
    message: Message | None
    how: str

    def __repr__(self) -> str:
        shown = repr(self.raw[:200]) if self.message is None else f"{self.message}"[:3000]
        return f"Payload({self.how}: {shown})"


# How an example is made: plausible throughout, one odd field in ten, half odd; or a message
# with fields appended that it does not declare or with the wrong wire type, cut short, or noise.
HOW = (
    *("plausible", "odd one in ten") * 3, "odd half", "extra fields", "cut short", "noise",
)  # fmt: skip
ODD_ONE_IN = {"plausible": 0, "odd one in ten": 10, "odd half": 2}


@st.composite
def payloads(draw: Draw, descriptor: Descriptor, shop: str) -> Payload:
    """Bytes sent as a request of the given type."""
    how = draw(st.sampled_from(HOW))
    if how == "noise":
        return Payload(draw(st.binary(max_size=96)), None, how)
    values = Values(shop, ODD_ONE_IN.get(how, 10))
    message = fill(message_factory.GetMessageClass(descriptor)(), draw, values)
    raw = message.SerializeToString()
    if how == "extra fields":
        raw += b"".join(draw(st.lists(wire_fields(), min_size=1, max_size=3)))
    elif how == "cut short" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return Payload(raw, message, how)


# --- JSON bodies -------------------------------------------------------------------------------


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """JSON-shaped Python values (what a google.protobuf.Struct holds), with odd strings and
    numbers at the edges of a double."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        texts,
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from((2.0**53 + 1, 1e308, -1e308, 5e-324, -0.0)),
        st.integers(-(2**63), 2**63),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=max_leaves,
    )


@dataclass(frozen=True)
class Raw:
    """JSON text put into a body as it is (a number no float holds, an escaped lone surrogate,
    NaN, deep nesting): what json.dumps would never write. (Not a str: Hypothesis would take
    it for one of its own string choices when replaying an example.)"""

    text: str


RAW_TOKENS = st.one_of(
    st.sampled_from(
        (
            "1e999999", "-1e-999999", "NaN", "Infinity", "-Infinity", "18446744073709551617",
            "9007199254740993", "0.1e1", "1E400", '"\\ud800"', '"\\udfff\\ud800"',
            '"a\\u0000b"', '"\\u202egnp.exe"',
        )
    ),
    # More digits than Python converts to an integer (4300), with and without a sign.
    st.sampled_from((4301, 5000)).map(lambda n: "9" * n),
    st.just(4301).map(lambda n: "-" + "1" * n),
    # Nesting, shallow to deeper than Python's parser recurses.
    st.integers(10, 3000).map(lambda depth: "[" * depth + "]" * depth),
    st.just(100_000).map(lambda depth: "[" * depth + "]" * depth),
    st.just(20_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
)  # fmt: skip


def odd_json(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """JSON values whose leaves may be raw tokens as well as ordinary values."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        texts,
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        RAW_TOKENS.map(Raw),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=max_leaves,
    )


def encode(value: Any, ascii_only: bool) -> str:
    """JSON text of a value, raw tokens as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        pairs = (f"{encode(str(k), ascii_only)}:{encode(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def at_path(document: Any, path: list[str | int], value: Any) -> Any:
    """A copy of a JSON document with the value at the path replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(document, dict) and isinstance(head, str):
        return {**document, head: at_path(document.get(head), rest, value)}
    if isinstance(document, list) and isinstance(head, int) and document:
        return [at_path(v, rest, value) if i == head else v for i, v in enumerate(document)]
    return value


def paths(document: Any, prefix: tuple[str | int, ...] = ()) -> list[list[str | int]]:
    """Every path into a JSON document (object keys and list positions), its root included."""
    found = [list(prefix)]
    if isinstance(document, dict):
        for key, value in document.items():
            found.extend(paths(value, (*prefix, key)))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            found.extend(paths(value, (*prefix, i)))
    return found


@st.composite
def mutated(draw: Draw, document: Any) -> str:
    """A real document with one to three values anywhere in it replaced by odd JSON of any type,
    as JSON text; half of them a top-level value or one just below (a whole object or list),
    which deep paths, far more numerous, would rarely be."""
    every = paths(document)[1:] or [[]]
    shallow = [path for path in every if len(path) <= 2]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(shallow) | st.sampled_from(every))
        document = at_path(document, path, draw(odd_json(max_leaves=4)))
    return encode(document, draw(st.booleans()))


def json_bodies(shapes: tuple[Any, ...] = ()) -> st.SearchStrategy[bytes]:
    """Bodies a caller may send where JSON is expected: real shapes with odd values (most
    often) or as they are, odd JSON, JSON that is not an object, text that is not JSON, bytes
    that are not UTF-8."""
    real = [mutated(shape) for shape in shapes for _ in range(3)]
    whole = [st.sampled_from(shapes).map(lambda shape: encode(shape, False))] if shapes else []
    text = st.one_of(
        *real,
        *whole,
        st.builds(encode, odd_json(), st.booleans()),
        st.builds(encode, st.dictionaries(texts, odd_json(4), max_size=5), st.booleans()),
        st.sampled_from(("", "{", "{}", "[]", "null", '{"id": }', "\ufeff{}", "{}{}", "1 2")),
        st.text(characters, max_size=40),
    )
    encoded = text.map(lambda t: t.encode("utf-8", "surrogatepass"))
    return st.one_of(*[encoded] * 6, st.binary(max_size=64), encoded.map(lambda b: b"\xff" + b))
