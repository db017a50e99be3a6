"""The generated demo shop: reproducible from its seed, every shopper exactly one person once
resolved (their records always meet on an identifier, no two shoppers share one), duplicates that
raise merge candidates, and history that ends before the shop's day."""

from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta

import pytest

from cli.demo_shop import DemoShop, Shopper, generate

DAY = date(2026, 6, 1)
MIDNIGHT = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def shop() -> DemoShop:
    return generate(seed=1, customers=1000, today=DAY)


def records(shopper: Shopper) -> list[tuple[tuple[str, str], ...]]:
    """The identifiers of each record of a shopper, in the order the demo loads them."""
    return [o.identifiers for o in shopper.orders] + [e.identifiers for e in shopper.events]


def test_the_same_seed_gives_the_same_shop_and_another_seed_another(shop: DemoShop) -> None:
    assert asdict(generate(seed=1, customers=1000, today=DAY)) == asdict(shop)
    other = generate(seed=2, customers=1000, today=DAY)
    assert [s.email for s in other.shoppers] != [s.email for s in shop.shoppers]


def test_another_day_moves_every_instant_by_whole_days(shop: DemoShop) -> None:
    later = generate(seed=1, customers=1000, today=DAY + timedelta(days=3))
    moved = {
        b.placed_at - a.placed_at
        for x, y in zip(shop.shoppers, later.shoppers, strict=True)
        for a, b in zip(x.orders, y.orders, strict=True)
    }
    assert moved == {timedelta(days=3)}


def test_customers_are_the_shoppers_and_a_few_duplicates(shop: DemoShop) -> None:
    assert len(shop.shoppers) == 1000
    assert [s.index for s in shop.shoppers] == list(range(1000))
    assert len(shop.duplicates) == 4  # one in 250
    assert len(generate(seed=1, customers=200, today=DAY).duplicates) == 2  # at least 2
    assert shop.shoppers[-4:] == shop.duplicates


def test_each_shoppers_records_meet_and_no_two_shoppers_share_an_identifier(
    shop: DemoShop,
) -> None:
    owners: dict[tuple[str, str], set[int]] = {}
    for shopper in shop.shoppers:
        seen: set[tuple[str, str]] = set()
        for n, carried in enumerate(records(shopper)):
            assert n == 0 or seen & set(carried), (shopper.index, carried)
            seen |= set(carried)
        if shopper.duplicate_of is None:
            for identifier in seen:
                owners.setdefault(identifier, set()).add(shopper.index)
    assert [i for i, holders in owners.items() if len(holders) > 1] == []
    assert shop.shoppers[0].key == ("shopify_customer_id", "7000000000000")


def test_each_duplicate_shares_an_email_under_a_new_shopify_account_or_a_phone(
    shop: DemoShop,
) -> None:
    shared = []
    for twin in shop.duplicates:
        assert twin.duplicate_of is not None
        original = shop.shoppers[twin.duplicate_of]
        [order] = twin.orders
        if order.identifiers[0][0] == "shopify_customer_id":  # a second account: two Shopify ids
            assert order.identifiers == (
                ("shopify_customer_id", str(7_100_000_000_000 + twin.index)),
                ("email", original.email),
            )
            shared.append("email")
        else:  # a guest checkout with someone else's email: a link by phone alone
            assert order.identifiers == (("email", twin.email), ("phone", original.phone))
            assert twin.email != original.email != ""
            shared.append("phone")
    assert sorted(shared) == ["email", "email", "phone", "phone"]
    assert len({t.duplicate_of for t in shop.duplicates}) == 4


def test_history_ends_before_the_shops_day(shop: DemoShop) -> None:
    two_years_ago = MIDNIGHT - timedelta(days=731)
    for shopper in shop.shoppers:
        instants = [o.placed_at for o in shopper.orders] + [e.at for e in shopper.events]
        instants += [r.refunded_at for r in shopper.refunds] + [c.at for c in shopper.consents]
        assert all(two_years_ago < at < MIDNIGHT for at in instants), shopper.index
        placed = {o.order_id: o.placed_at for o in shopper.orders}
        assert all(r.refunded_at > placed[r.order_id] for r in shopper.refunds)
        assert [o.placed_at for o in shopper.orders] == sorted(o.placed_at for o in shopper.orders)


def test_only_opted_in_shoppers_get_this_weeks_emails(shop: DemoShop) -> None:
    for shopper in shop.shoppers:
        if shopper.emails_this_week:
            assert "email" in {c.channel for c in shopper.consents if c.granted}
            assert shopper.unsubscribed_at is None
    assert max(s.emails_this_week for s in shop.shoppers) == 8
