"""Shopify webhooks: their signature, and their payloads as the profile's own records.

Ids are kept exactly as delivered: JSON integers become Python integers (never floats, Shopify ids
exceed 2^53) and travel as decimal strings.
"""

import base64
import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from services.profile.profiles import Customer, Order
from services.runtime.validation import unstorable

Record = TypeVar("Record", Order, Customer)

ORDER_TOPICS = frozenset({"orders/create", "orders/updated"})
CUSTOMER_TOPICS = frozenset({"customers/create", "customers/update"})
REFUND_TOPICS = frozenset({"refunds/create"})
# Accepted, verified and recorded for the gdpr service, which acts on them.
GDPR_TOPICS = frozenset({"customers/redact", "customers/data_request", "shop/redact"})
TOPICS = ORDER_TOPICS | CUSTOMER_TOPICS | REFUND_TOPICS | GDPR_TOPICS
# Shopify's source_name of orders placed through a marketplace channel.
MARKETPLACES = frozenset({"amazon", "ebay", "etsy", "tiktok", "walmart", "google", "facebook"})


class PayloadError(ValueError):
    """A payload this service cannot turn into a record (kept as a dead letter)."""


def signature(secret: str, body: bytes) -> str:
    """Shopify's X-Shopify-Hmac-Sha256: base64 of HMAC-SHA256 of the raw body."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def verified(secrets: list[str], body: bytes, header: str | None) -> bool:
    """Whether the header signs the body with one of the secrets (constant-time compare)."""
    if not header:
        return False
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(signature(secret, body).encode(), header.encode())
    return found


# What the profile's columns hold (and its gRPC ingestion accepts): ids, names, places, amounts.
MAX_ID = 64
MAX_NAME = 256
MAX_AMOUNT = Decimal("1e15")


def _id(value: Any, field: str) -> str:
    """An id as delivered (an integer or a string), as an exact decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
        raise PayloadError(f"{field}: missing or not an id")
    text = str(value)
    if len(text) > MAX_ID:
        raise PayloadError(f"{field}: longer than {MAX_ID} characters")
    return text


def _text(value: Any, field: str, limit: int = MAX_NAME) -> str:
    """A text of the payload ("" for a missing one), at most `limit` characters."""
    text = "" if value is None else str(value)
    if len(text) > limit:
        raise PayloadError(f"{field}: longer than {limit} characters")
    return text


def _object(value: Any, field: str) -> dict[str, Any]:
    """An object of the payload ({} for a missing one)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{field}: not an object")
    return value


def _objects(value: Any, field: str) -> list[dict[str, Any]]:
    """A list of objects of the payload ([] for a missing one)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise PayloadError(f"{field}: not a list")
    return [_object(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _count(value: Any, field: str) -> int:
    """A count such as a quantity (0 for a missing one)."""
    if value is None or value == "":
        return 0
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        raise PayloadError(f"{field}: not a whole number") from None
    if isinstance(value, bool) or not 0 <= count < 2**31:
        raise PayloadError(f"{field}: not a count")
    return count


def _time(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise PayloadError(f"{field}: missing")
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # OverflowError: past the year 9999 in UTC
        raise PayloadError(f"{field}: not an ISO 8601 time of the years 1-9999") from None


def _money(value: Any, field: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        raise PayloadError(f"{field}: not an amount") from None
    if not amount.is_finite() or amount < 0 or amount >= MAX_AMOUNT:
        raise PayloadError(f"{field}: not an amount")
    return amount


def _identifiers(payload: dict[str, Any], customer: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if customer.get("id") is not None:
        found.append(("shopify_customer_id", _id(customer["id"], "customer.id")))
    for type_, value in (
        ("email", payload.get("email")),
        ("email", payload.get("contact_email")),
        ("email", customer.get("email")),
        ("phone", payload.get("phone")),
        ("phone", customer.get("phone")),
    ):
        if isinstance(value, str) and value.strip() and (type_, value) not in found:
            found.append((type_, value))
    return found


def _storable(record: Record) -> Record:
    """The record, unless a value of it cannot be stored (a NUL, a lone surrogate): then
    nothing of the delivery is written, identity's resolution included."""
    why = unstorable(dataclasses.asdict(record))
    if why is not None:
        raise PayloadError(f"a value {why}")
    return record


def order(shop_id: str, payload: dict[str, Any]) -> Order:
    """An orders/create or orders/updated payload as an order (a guest checkout has no
    customer; a POS order carries its location)."""
    customer = _object(payload.get("customer"), "customer")
    address = _object(
        payload.get("shipping_address") or payload.get("billing_address"), "shipping_address"
    )
    source_name = str(payload.get("source_name") or "web").lower()
    source = "pos" if source_name == "pos" else "online"
    if source_name in MARKETPLACES:
        source = "marketplace"
    location = payload.get("location_id")
    placed_at = _time(payload.get("created_at") or payload.get("processed_at"), "created_at")
    return _storable(
        Order(
            shop_id=shop_id,
            order_id=_id(payload.get("id"), "id"),
            identifiers=_identifiers(payload, customer),
            placed_at=placed_at,
            updated_at=_time(payload.get("updated_at"), "updated_at")
            if payload.get("updated_at")
            else placed_at,
            total=_money(payload.get("total_price", "0"), "total_price"),
            currency=_text(payload.get("currency") or "", "currency", 3),
            source=source,
            location=_text(location, "location_id"),
            line_items=[
                {
                    "product_id": "" if item.get("product_id") is None else str(item["product_id"]),
                    "variant_id": "" if item.get("variant_id") is None else str(item["variant_id"]),
                    "sku": item.get("sku") or "",
                    "title": item.get("title") or "",
                    "quantity": _count(item.get("quantity"), f"line_items[{i}].quantity"),
                    "price": str(item.get("price") or "0"),
                }
                for i, item in enumerate(_objects(payload.get("line_items"), "line_items"))
            ],
            cancelled=payload.get("cancelled_at") is not None,
            country=_text(address.get("country_code") or "", "country_code"),
        )
    )


def refund(payload: dict[str, Any], received_at: datetime) -> tuple[str, str, Decimal, datetime]:
    """A refunds/create payload as (refund id, order id, amount, time). The amount is what its
    successful refund transactions paid back; with no refund transaction at all, the refunded
    lines with their tax."""
    transactions = _objects(payload.get("transactions"), "transactions")
    refunds = [t for t in transactions if t.get("kind") == "refund"]
    if refunds:  # what was paid back; a failed or pending refund pays nothing
        amount = sum(
            (
                _money(t.get("amount"), "transactions.amount")
                for t in refunds
                if t.get("status") in (None, "success")
            ),
            Decimal(0),
        )
    else:
        amount = sum(
            (
                _money(line.get("subtotal", 0), "refund_line_items.subtotal")
                + _money(line.get("total_tax", 0), "refund_line_items.total_tax")
                for line in _objects(payload.get("refund_line_items"), "refund_line_items")
            ),
            Decimal(0),
        )
    at = payload.get("processed_at") or payload.get("created_at")
    refund_id, order_id = _id(payload.get("id"), "id"), _id(payload.get("order_id"), "order_id")
    why = unstorable([refund_id, order_id])
    if why is not None:
        raise PayloadError(f"an id {why}")
    return refund_id, order_id, amount, _time(at, "created_at") if at else received_at


def customer(shop_id: str, payload: dict[str, Any]) -> Customer:
    """A customers/create or customers/update payload as a customer record."""
    tags = payload.get("tags") or ""
    return _storable(
        Customer(
            shop_id=shop_id,
            source="shopify",
            source_id=_id(payload.get("id"), "id"),
            identifiers=_identifiers({}, payload),
            updated_at=_time(payload.get("updated_at") or payload.get("created_at"), "updated_at"),
            first_name=_text(payload.get("first_name") or "", "first_name"),
            last_name=_text(payload.get("last_name") or "", "last_name"),
            tags=sorted({t.strip() for t in str(tags).split(",") if t.strip()}),
            country=_text(
                _object(payload.get("default_address"), "default_address").get("country_code")
                or "",
                "default_address.country_code",
            ),
        )
    )
