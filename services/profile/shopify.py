"""Shopify webhooks: their signature, and their payloads as the profile's own records.

Ids are kept exactly as delivered: JSON integers become Python integers (never floats, Shopify ids
exceed 2^53) and travel as decimal strings.
"""

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from services.profile.profiles import Customer, Order

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


def _id(value: Any, field: str) -> str:
    """An id as delivered (an integer or a string), as an exact decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
        raise PayloadError(f"{field}: missing or not an id")
    return str(value)


def _time(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise PayloadError(f"{field}: missing")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"{field}: not an ISO 8601 time") from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _money(value: Any, field: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        raise PayloadError(f"{field}: not an amount") from None
    if not amount.is_finite() or amount < 0:
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


def order(shop_id: str, payload: dict[str, Any]) -> Order:
    """An orders/create or orders/updated payload as an order (a guest checkout has no
    customer; a POS order carries its location)."""
    customer = payload.get("customer") or {}
    address = payload.get("shipping_address") or payload.get("billing_address") or {}
    source_name = str(payload.get("source_name") or "web").lower()
    source = "pos" if source_name == "pos" else "online"
    if source_name in MARKETPLACES:
        source = "marketplace"
    location = payload.get("location_id")
    placed_at = _time(payload.get("created_at") or payload.get("processed_at"), "created_at")
    return Order(
        shop_id=shop_id,
        order_id=_id(payload.get("id"), "id"),
        identifiers=_identifiers(payload, customer),
        placed_at=placed_at,
        updated_at=_time(payload.get("updated_at"), "updated_at")
        if payload.get("updated_at")
        else placed_at,
        total=_money(payload.get("total_price", "0"), "total_price"),
        currency=str(payload.get("currency") or ""),
        source=source,
        location="" if location is None else str(location),
        line_items=[
            {
                "product_id": "" if item.get("product_id") is None else str(item["product_id"]),
                "variant_id": "" if item.get("variant_id") is None else str(item["variant_id"]),
                "sku": item.get("sku") or "",
                "title": item.get("title") or "",
                "quantity": int(item.get("quantity") or 0),
                "price": str(item.get("price") or "0"),
            }
            for item in payload.get("line_items") or []
        ],
        cancelled=payload.get("cancelled_at") is not None,
        country=str(address.get("country_code") or ""),
    )


def refund(payload: dict[str, Any], received_at: datetime) -> tuple[str, str, Decimal, datetime]:
    """A refunds/create payload as (refund id, order id, amount, time). The amount is what its
    successful refund transactions paid back; with no refund transaction at all, the refunded
    lines with their tax."""
    refunds = [t for t in payload.get("transactions") or [] if t.get("kind") == "refund"]
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
                for line in payload.get("refund_line_items") or []
            ),
            Decimal(0),
        )
    at = payload.get("processed_at") or payload.get("created_at")
    return (
        _id(payload.get("id"), "id"),
        _id(payload.get("order_id"), "order_id"),
        amount,
        _time(at, "created_at") if at else received_at,
    )


def customer(shop_id: str, payload: dict[str, Any]) -> Customer:
    """A customers/create or customers/update payload as a customer record."""
    tags = payload.get("tags") or ""
    return Customer(
        shop_id=shop_id,
        source="shopify",
        source_id=_id(payload.get("id"), "id"),
        identifiers=_identifiers({}, payload),
        updated_at=_time(payload.get("updated_at") or payload.get("created_at"), "updated_at"),
        first_name=str(payload.get("first_name") or ""),
        last_name=str(payload.get("last_name") or ""),
        tags=sorted({t.strip() for t in str(tags).split(",") if t.strip()}),
        country=str((payload.get("default_address") or {}).get("country_code") or ""),
    )
