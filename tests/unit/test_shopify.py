"""Shopify payloads as the profile reads them."""

from datetime import UTC, datetime
from decimal import Decimal

from services.profile import shopify

RECEIVED = datetime(2026, 1, 1, tzinfo=UTC)


def refund(**payload: object) -> tuple[str, str, Decimal, datetime]:
    return shopify.refund({"id": 1, "order_id": 2, **payload}, RECEIVED)


def test_a_refund_is_what_its_successful_refund_transactions_paid_back() -> None:
    paid = [
        {"kind": "refund", "status": "success", "amount": "30.00"},
        {"kind": "refund", "status": "failure", "amount": "50.00"},
        {"kind": "refund", "status": "pending", "amount": "5.00"},
        {"kind": "sale", "status": "success", "amount": "99.00"},
    ]
    lines = [{"subtotal": "50.00", "total_tax": "10.00"}]
    assert refund(transactions=paid, refund_line_items=lines)[2] == Decimal("30.00")


def test_a_failed_refund_pays_back_nothing_whatever_its_lines_say() -> None:
    failed = [{"kind": "refund", "status": "failure", "amount": "50.00"}]
    lines = [{"subtotal": "50.00", "total_tax": "0"}]
    assert refund(transactions=failed, refund_line_items=lines)[2] == Decimal(0)


def test_without_refund_transactions_the_lines_and_their_tax_count() -> None:
    lines = [{"subtotal": 199, "total_tax": 0}, {"subtotal": "10.00", "total_tax": "2.10"}]
    assert refund(refund_line_items=lines)[2:] == (Decimal("211.10"), RECEIVED)


def test_ids_are_kept_exactly_above_2_to_the_53() -> None:
    order = shopify.order("s", {"id": 9007199254740993, "created_at": "2026-01-01T00:00:00Z"})
    assert order.order_id == "9007199254740993"
