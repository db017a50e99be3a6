"""Customer upload in Custobar's format (seed 004): validation and partial updates of one record.

A later upload changes only the keys it supplies; an empty string removes a key; `tags.add`,
`tags.remove`, `mailing_lists.add` and `mailing_lists.remove` edit those sets; `COMPANY__field`
keys are kept as they come; `is_forgotten` anonymises for good and `is_deleted` removes the
record from use for good.
"""

import re
from typing import Any

from services.runtime.validation import unstorable

IDENTIFYING = ("external_id", "email", "phone_number")
EXTERNAL_ID = re.compile(r"[A-Za-z0-9-]{1,256}")
PERMISSIONS = {"can_email": "email", "can_sms": "sms", "can_push": "push"}
BOOLEANS = frozenset({*PERMISSIONS, "can_post", "can_profile", "is_forgotten", "is_deleted"})
SETS = ("tags", "mailing_lists")
LIMITS = {"email": 320, "phone_number": 64, "canonical_id": 256, "first_name": 256,
          "last_name": 256}  # fmt: skip
# Keys that say who the customer is: gone from a forgotten record, and never taken again.
PII = frozenset(
    {
        "external_id", "email", "phone_number", "canonical_id", "first_name", "last_name",
        "birth_date", "city", "street_address", "street_name", "house_number",
        "house_number_addition", "zip_code", "province", "vat_number", "company",
    }
)  # fmt: skip
KNOWN = frozenset(
    {
        *IDENTIFYING, *BOOLEANS, *SETS, *PII, "date_joined", "last_login", "country", "gender",
        "language", "shop_id",
    }
)  # fmt: skip


def plain(value: Any) -> Any:
    """A value as JSON gives it: integral numbers (a protobuf Struct's doubles) as integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def problems(record: Any) -> list[tuple[str, str]]:
    """What is wrong with one record, as (field, why); empty when it can be applied."""
    if not isinstance(record, dict):
        return [("", "must be a JSON object")]
    found: list[tuple[str, str]] = []
    if not any(isinstance(record.get(k), str | int) and str(record[k]) for k in IDENTIFYING):
        found.append(("", "needs at least one of external_id, email, phone_number"))
    external_id = record.get("external_id")
    if external_id not in (None, "") and not EXTERNAL_ID.fullmatch(str(plain(external_id))):
        found.append(("external_id", "1-256 letters, digits and dashes"))
    for name, limit in LIMITS.items():
        if len(str(plain(record.get(name, "")))) > limit:  # as it is stored
            found.append((name, f"at most {limit} characters"))
    for key, value in record.items():
        why = unstorable(key) or unstorable(value)
        if why is not None:
            found.append((key, why))
            continue
        base = key.rsplit(".", 1)[0] if key.endswith((".add", ".remove")) else key
        if base in SETS and key != base:
            if not isinstance(value, list | str):
                found.append((key, "must be a string or a list of strings"))
        elif key in BOOLEANS and not isinstance(value, bool) and value != "":
            found.append((key, "must be true or false"))
        elif key not in KNOWN and "__" not in key:
            found.append((key, "unknown field (company fields are COMPANY__name)"))
    return found


def keys_of(record: dict[str, Any]) -> list[str]:
    """The keys a record can be found by, one per identifying field it carries (external_id
    first): a later upload carrying any of them updates it."""
    keys = []
    for name in IDENTIFYING:
        value = record.get(name)
        if value not in (None, ""):
            text = str(plain(value)).strip()
            keys.append(f"{name}:{text.lower() if name == 'email' else text}")
    return keys


def _as_set(value: Any) -> set[str]:
    return {str(v) for v in (value if isinstance(value, list) else [value]) if str(v)}


def merged(stored: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The stored document with this upload applied."""
    document = dict(stored)
    forgotten = bool(document.get("is_forgotten")) or record.get("is_forgotten") is True
    for key, value in record.items():
        value = plain(value)
        if key.endswith((".add", ".remove")):
            name, _, action = key.rpartition(".")
            current = set(document.get(name, []))
            current = current | _as_set(value) if action == "add" else current - _as_set(value)
            document[name] = sorted(current)
        elif key in ("is_forgotten", "is_deleted"):
            document[key] = bool(document.get(key)) or value is True  # never undone
        elif value == "":
            document.pop(key, None)
        elif key in SETS:
            document[key] = sorted(_as_set(value))
        else:
            document[key] = value
    for permission in (*PERMISSIONS, "can_post", "can_profile"):
        document.setdefault(permission, False)
    if forgotten:
        document = {k: v for k, v in document.items() if k not in PII}
        document["is_forgotten"] = True
    return document


def identifiers(document: dict[str, Any]) -> list[tuple[str, str]]:
    """The identifiers of a record, its canonical id among them (it groups records into one
    person)."""
    found = [
        (type_, str(document[name]))
        for name, type_ in (("external_id", "external_id"), ("email", "email"),
                            ("phone_number", "phone"))
        if document.get(name) not in (None, "")
    ]  # fmt: skip
    if document.get("canonical_id") not in (None, ""):
        # A colon: a real external_id (letters, digits, dashes) can never look like it.
        found.append(("external_id", f"canonical:{document['canonical_id']}"))
    return found
