"""Identifier types, their trust ranking and per-person limits, and the versioned normaliser.

Every identifier is stored three ways: the raw value as it arrived, the normalised value, and the
match key that linking compares (the normalised value, except where two spellings reach the same
inbox, e.g. Gmail's dots and +tags). Values that cannot tell people apart (junk, role addresses,
the shop's own addresses, placeholders) are recognised here and never link anyone.
"""

import functools
import re
import unicodedata
from dataclasses import dataclass, field

import phonenumbers
from email_validator import EmailNotValidError, validate_email

# Bumped whenever a rule below changes what a value normalises to; stored with every identifier.
NORMALIZER_VERSION = 1

# Strongest first (spec §3); equal ranks are equally trusted.
RANK: dict[str, int] = {
    "shopify_customer_id": 0,
    "crm_id": 1,
    "external_id": 1,
    "email": 2,
    "phone": 3,
    "amazon_buyer_id": 4,
    "ebay_user_id": 4,
    "tiktok_buyer_id": 4,
    "pos_customer_id": 4,
    "cookie": 5,
}
TYPES = tuple(RANK)

# How many distinct emails and phone numbers each process keeps parsed (email-validator and
# phonenumbers cost 50-100 µs a value; an import sees each shopper's in their record and again
# in each of their orders). About 200 bytes an entry.
PARSED_CACHE = 65_536

# How many identifiers of a type one person may hold. A type capped at 1 is single-valued: a
# second value means a second person (a conflict), never a second id.
CAPS: dict[str, int] = {
    "shopify_customer_id": 1,
    "crm_id": 1,
    "external_id": 5,
    "email": 10,
    "phone": 5,
    "amazon_buyer_id": 1,
    "ebay_user_id": 1,
    "tiktok_buyer_id": 1,
    "pos_customer_id": 1,
    "cookie": 100,
}
SINGLE_VALUED = frozenset(t for t, cap in CAPS.items() if cap == 1)

MAX_LENGTH: dict[str, int] = {"email": 320, "phone": 64}
DEFAULT_MAX_LENGTH = 256

GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
# Addresses that name a function, not a person.
ROLE_LOCAL_PARTS = frozenset(
    {
        "abuse", "accounts", "admin", "billing", "contact", "customerservice", "do-not-reply",
        "donotreply", "enquiries", "hello", "help", "info", "mail", "marketing", "no-reply",
        "noreply", "office", "orders", "postmaster", "sales", "service", "shop", "store",
        "support", "team", "webmaster",
    }
)  # fmt: skip
JUNK_EMAILS = frozenset({"test@test.com", "test@example.com", "a@a.com", "no@email.com"})
JUNK_DOMAINS = frozenset({"test.com", "invalid"})
# Placeholder values any source may send for "no value".
JUNK_VALUES = frozenset(
    {"", "-", "0", "n/a", "na", "none", "null", "nil", "undefined", "unknown", "test", "guest"}
)
REPEATED_CHARACTER = re.compile(r"(.)\1{3,}")
SALESFORCE_ID = re.compile(r"[A-Za-z0-9]{15}")
SALESFORCE_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


class InvalidIdentifier(ValueError):
    """A value that is not a valid identifier of its type (say, an impossible phone number), or
    a type that is none; `field` names which of the two ("type" or "value") is wrong."""

    def __init__(self, why: str, field: str = "value") -> None:
        super().__init__(why)
        self.field = field


@dataclass(frozen=True)
class ShopRules:
    """What a shop adds to the normaliser: its country for national phone numbers, its own
    email domains, and values that must never link (its POS placeholder customer, say)."""

    country: str = ""
    own_domains: frozenset[str] = frozenset()
    blocked: frozenset[tuple[str, str]] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Normalized:
    """One identifier as stored: raw, normalised, match key; `blocked` when it never links."""

    type: str
    raw: str
    value: str
    match_key: str
    blocked: bool

    @property
    def rank(self) -> int:
        return RANK[self.type]

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.match_key)


def salesforce_18(value: str) -> str:
    """The case-safe 18-character form of a 15-character Salesforce id."""
    suffix = ""
    for start in range(0, 15, 5):
        bits = sum(1 << i for i, c in enumerate(value[start : start + 5]) if c.isupper())
        suffix += SALESFORCE_SUFFIX[bits]
    return value + suffix


@functools.lru_cache(maxsize=PARSED_CACHE)
def _email_parts(text: str) -> tuple[str, str]:
    """The local part and domain of a valid address (NFC, lower case)."""
    try:
        valid = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidIdentifier(f"not a valid email address: {exc}") from None
    return valid.local_part.lower(), valid.domain.lower()


def _email(raw: str, rules: ShopRules) -> Normalized:
    local, domain = _email_parts(unicodedata.normalize("NFC", raw.strip()).lower())
    value = f"{local}@{domain}"
    match_key = value
    if domain in GMAIL_DOMAINS:
        match_key = f"{local.split('+', 1)[0].replace('.', '')}@gmail.com"
    blocked = (
        value in JUNK_EMAILS
        or domain in JUNK_DOMAINS
        or domain in rules.own_domains
        or local.split("+", 1)[0] in ROLE_LOCAL_PARTS
    )
    return Normalized("email", raw, value, match_key, blocked)


def _phone(raw: str, country: str) -> Normalized:
    text = raw.strip()
    digits = re.sub(r"\D", "", text)
    if not digits or REPEATED_CHARACTER.fullmatch(digits) or digits in ("1234567", "123456789"):
        return Normalized("phone", raw, digits, digits, blocked=True)
    e164 = _e164(text, country.upper())
    return Normalized("phone", raw, e164, e164, blocked=False)


@functools.lru_cache(maxsize=PARSED_CACHE)
def _e164(text: str, country: str) -> str:
    """A valid number in E.164, parsed with `country` unless it starts with +."""
    hint = "" if text.startswith("+") or country else " (give a country or use +<code>)"
    try:
        number = phonenumbers.parse(text, country or None)
    except phonenumbers.NumberParseException:
        raise InvalidIdentifier(f"not a phone number{hint}") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidIdentifier(f"not a valid phone number{hint}")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _opaque(type_: str, raw: str) -> Normalized:
    value = raw.strip()
    if type_ == "crm_id" and SALESFORCE_ID.fullmatch(value):
        value = salesforce_18(value)
    blocked = value.lower() in JUNK_VALUES or bool(REPEATED_CHARACTER.fullmatch(value))
    return Normalized(type_, raw, value, value, blocked)


def normalize(type_: str, raw: str, rules: ShopRules, country: str = "") -> Normalized:
    """The stored form of one identifier. Raises InvalidIdentifier for an unknown type, a value
    too long or empty, an invalid email or an invalid phone number (parsed with `country`, else
    the shop's)."""
    if type_ not in RANK:
        raise InvalidIdentifier(f"unknown identifier type; one of: {', '.join(TYPES)}", "type")
    limit = MAX_LENGTH.get(type_, DEFAULT_MAX_LENGTH)
    if not raw.strip() or len(raw) > limit:
        raise InvalidIdentifier(f"must be 1-{limit} characters")
    if any(unicodedata.category(c) == "Cc" and c not in "\t\r\n" for c in raw):
        raise InvalidIdentifier("must not contain control characters")
    if type_ == "email":
        found = _email(raw, rules)
    elif type_ == "phone":
        found = _phone(raw, country or rules.country)
    else:
        found = _opaque(type_, raw)
    if found.key in rules.blocked and not found.blocked:
        return Normalized(found.type, found.raw, found.value, found.match_key, blocked=True)
    return found
