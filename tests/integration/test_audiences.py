"""Audiences over the real mesh: segments against a brute-force filter, the change feed across a
consumer restart, the datasource exports, loyalty and trait lookups."""

import asyncio
import csv
import io
import json
import random
import secrets
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from c360.common.v1 import common_pb2
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from c360.profile.v1 import profile_pb2
from tests.integration.conftest import AUTH, Endpoint
from tests.integration.test_import import cli
from tests.integration.test_profile import stamp
from tests.integration.test_webhooks import fixture
from tests.polling import eventually
from tests.rpc import details
from tests.sql import sql

NOW = datetime.now(UTC).replace(microsecond=0)
CRM360_TYPES: dict[str, Any] = {
    "customer_id": str, "email": str, "lifecycle_stage": (str, type(None)),
    "purchase_count": int, "last_purchase_date": (str, type(None)),
    "first_purchase_date": (str, type(None)), "total_spend": float, "average_basket": float,
    "preferred_category": str, "locale": str, "channel_preferences": dict,
    "loyalty_member": bool, "app_installed": bool, "churn_score": (float, type(None)),
    "segment": str,
}  # fmt: skip


async def order(
    endpoint: Endpoint, order_id: str, email: str, total: str, placed_at: datetime, **kw: Any
) -> Any:
    return await endpoint.profile.IngestOrder(
        profile_pb2.IngestOrderRequest(
            shop_id=endpoint.shop, order_id=order_id,
            identifiers=[common_pb2.Identifier(type="email", value=email)],
            placed_at=stamp(placed_at), total=total, currency="EUR",
            source=profile_pb2.ORDER_SOURCE_ONLINE, **kw,
        ),
        metadata=AUTH,
    )  # fmt: skip


async def consent(
    endpoint: Endpoint, person_id: str, channel: common_pb2.Channel.ValueType, granted: bool
) -> None:
    await endpoint.profile.SetConsent(
        profile_pb2.SetConsentRequest(
            shop_id=endpoint.shop, person=common_pb2.PersonRef(person_id=person_id),
            channel=channel, granted=granted, consent_text="Yes, message me",
            source="checkout", at=stamp(NOW - timedelta(seconds=secrets.randbelow(10**6) / 10**6)),
        ),
        metadata=AUTH,
    )  # fmt: skip


async def create_segment(endpoint: Endpoint, name: str, text: str) -> Any:
    return await endpoint.profile.CreateSegment(
        profile_pb2.CreateSegmentRequest(shop_id=endpoint.shop, name=name, filter=text),
        metadata=AUTH,
    )


async def members(endpoint: Endpoint, segment_id: str, **kw: Any) -> list[str]:
    stream = endpoint.profile.StreamSegmentMembers(
        profile_pb2.StreamSegmentMembersRequest(shop_id=endpoint.shop, segment_id=segment_id, **kw),
        metadata=AUTH,
    )
    return [member.person_id async for member in stream]


async def settled(endpoint: Endpoint, expected: int, text: str = "orders >= 1") -> None:
    """Waits until the summaries hold every person the test made (counted by a segment)."""

    async def count() -> int:
        segment = await create_segment(endpoint, secrets.token_hex(4), text)
        return int(segment.member_count)

    await eventually(count, lambda n: n == expected, "the summaries")


async def export(
    endpoint: Endpoint,
    dataset: profile_pb2.ExportDataset.ValueType,
    format_: profile_pb2.ExportFormat.ValueType,
    segment_id: str = "",
) -> bytes:
    stream = endpoint.profile.Export(
        profile_pb2.ExportRequest(
            shop_id=endpoint.shop, dataset=dataset, format=format_, segment_id=segment_id
        ),
        metadata=AUTH,
    )
    return b"".join([chunk.data async for chunk in stream])


async def test_a_segment_returns_exactly_whom_a_brute_force_filter_returns(
    endpoint: Endpoint,
) -> None:
    rng = random.Random(6)  # noqa: S311  # a reproducible shop, not a secret
    people: dict[str, dict[str, Any]] = {}
    for n in range(40):
        email = f"shopper{n}@audience.example"
        orders = [
            (NOW - timedelta(days=rng.randint(0, 200), hours=1),
             Decimal(rng.randint(2000, 16000)) / 100)
            for _ in range(rng.randint(1, 4))
        ]  # fmt: skip
        for i, (placed_at, total) in enumerate(orders):
            answer = await order(endpoint, f"o{n}-{i}", email, str(total), placed_at)
        whatsapp = rng.random() < 0.5
        if whatsapp:
            await consent(endpoint, answer.person_id, common_pb2.CHANNEL_WHATSAPP, True)
        people[answer.person_id] = {"orders": orders, "whatsapp": whatsapp}
    await settled(endpoint, len(people))

    def brute_force(person: dict[str, Any]) -> bool:
        recent = [t for at, t in person["orders"] if at >= NOW - timedelta(days=90)]
        spend = sum((t for _, t in person["orders"]), Decimal(0))
        aov = (spend / len(person["orders"])).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
        return len(recent) >= 2 and person["whatsapp"] and aov > 80

    expected = sorted(p for p, person in people.items() if brute_force(person))
    segment = await create_segment(
        endpoint,
        "recent whatsapp big baskets",
        "orders(90d) >= 2 and consent.whatsapp and aov > 80",
    )
    assert 0 < len(expected) < len(people) // 2
    assert segment.member_count == len(expected)
    assert await members(endpoint, segment.segment_id) == expected
    listed = await endpoint.profile.ListSegments(
        profile_pb2.ListSegmentsRequest(shop_id=endpoint.shop), metadata=AUTH
    )
    assert "recent whatsapp big baskets" in [s.name for s in listed.segments]

    # Membership follows the facts: a new recent order moves a person in.
    outsider = next(
        p for p, person in people.items()
        if person["whatsapp"] and not brute_force(person)
        and sum(t for _, t in person["orders"]) / len(person["orders"]) > 85
    )  # fmt: skip
    email = f"shopper{list(people).index(outsider)}@audience.example"
    for i in range(2):
        await order(endpoint, f"late-{i}", email, "150.00", NOW - timedelta(days=1))
    await eventually(
        lambda: members(endpoint, segment.segment_id), lambda m: outsider in m, "the new member"
    )


@pytest.mark.parametrize(
    ("text", "description"),
    [
        (
            "orders(90d) >= 2 and consent.whatsap",
            "at position 21 ('consent.whatsap'): unknown field; known: acquisition, aov, "
            "app_installed, churn_risk, consent.email, consent.push, consent.sms, "
            "consent.whatsapp, currency, days_since_first_order, days_since_last_order, "
            "engagement, lifecycle_stage, lifetime_points, location, loyalty_member, "
            "marketplace_orders, online_orders, orders, pos_orders, preferred_category, "
            "rfm.f, rfm.m, rfm.r, spend, tags, tier, unsubscribed",
        ),
        ("orders(90) >= 2", "at position 7 ('90'): expected a window such as 90d"),
        ("aov > eighty", "at position 6 ('eighty'): 'aov' compares with a number"),
        (
            "lifecycle_stage = sleepy",
            "at position 18 ('sleepy'): expected one of new, engaged, converted, loyal, "
            "at_risk, churned",
        ),
        ("(aov > 1", "at position 8 (the end): expected ')'"),
    ],
)
async def test_a_bad_filter_is_invalid_argument_naming_the_token(
    endpoint: Endpoint, text: str, description: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await create_segment(endpoint, "bad", text)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [request] = details(failure.value)
    assert [(v.field, v.description) for v in request.field_violations] == [("filter", description)]


async def test_a_consumer_restarted_from_its_cursor_gets_every_change_once_in_order(
    endpoint: Endpoint,
) -> None:
    persons = [
        (await order(endpoint, f"feed-{n}", f"feed{n}@audience.example", "10.00", NOW)).person_id
        for n in range(5)
    ]
    sent: list[tuple[str, bool]] = []

    async def produce() -> None:
        for step in range(60):
            person_id, granted = persons[step % 5], step % 2 == 0
            await consent(endpoint, person_id, common_pb2.CHANNEL_SMS, granted)
            sent.append((person_id, granted))

    producer = asyncio.create_task(produce())
    received: list[Any] = []

    async def consume(from_cursor: str, at_most: int) -> None:
        call = endpoint.profile.WatchChanges(
            profile_pb2.WatchChangesRequest(
                shop_id=endpoint.shop, from_cursor=from_cursor, kinds=["consent_changed"]
            ),
            metadata=AUTH,
        )
        async for change in call:
            received.append(change)
            if len(received) >= at_most:
                call.cancel()  # the consumer is killed here
                return

    await consume("", 17)
    await consume(received[-1].cursor, 40)  # restarted while the producer keeps going
    await producer
    await consume(received[-1].cursor, 60)

    assert len({c.cursor for c in received}) == len(received) == 60
    got = [(c.person_id, c.data["granted"]) for c in received]
    for person_id in persons:  # in order per person
        assert [g for p, g in got if p == person_id] == [g for p, g in sent if p == person_id]
    assert {c.data["channel"] for c in received} == {"sms"}


def typed(name: str, cell: str) -> Any:
    """A CSV cell back to the JSON value it was written from (docs/audiences.md)."""
    kind = CRM360_TYPES[name]
    if cell == "":
        return None if isinstance(kind, tuple) else ""
    if kind in (dict, list):
        return json.loads(cell)
    if kind is bool:
        return cell == "true"
    if kind in (int, float):
        return kind(cell)
    if isinstance(kind, tuple) and float in kind:
        return float(cell)
    return cell


async def test_the_crm360_export_carries_the_seed_fields_and_survives_csv(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    for n, (total, category) in enumerate([("120.50", "shoes"), ("80.00", "bags")]):
        line = profile_pb2.LineItem(
            product_id="p1", title="Item", quantity=2, price="10.00", category=category
        )
        answer = await order(
            endpoint, f"x{n}", f"export{n}@audience.example", total,
            datetime(2026, 3, 4 + n, 12, tzinfo=UTC), line_items=[line],
        )  # fmt: skip
        await consent(endpoint, answer.person_id, common_pb2.CHANNEL_EMAIL, True)
    await settled(endpoint, 2)

    jsonl = await export(
        endpoint, profile_pb2.EXPORT_DATASET_CRM360, profile_pb2.EXPORT_FORMAT_JSONL
    )
    records = [json.loads(line) for line in jsonl.decode().splitlines()]
    assert len(records) == 2
    for record in records:
        assert list(record) == list(CRM360_TYPES)
        for name, kind in CRM360_TYPES.items():
            assert isinstance(record[name], kind), name
    shoes = next(r for r in records if r["preferred_category"] == "shoes")
    assert {k: shoes[k] for k in ("email", "purchase_count", "first_purchase_date",
                                  "total_spend", "average_basket", "channel_preferences")} == {
        "email": "export0@audience.example", "purchase_count": 1,
        "first_purchase_date": "2026-03-04", "total_spend": 120.5, "average_basket": 120.5,
        "channel_preferences": {"email": True, "sms": False, "whatsapp": False, "push": False},
    }  # fmt: skip

    table = await export(endpoint, profile_pb2.EXPORT_DATASET_CRM360, profile_pb2.EXPORT_FORMAT_CSV)
    path = tmp_path / "crm360.csv"
    result = await asyncio.to_thread(
        cli, endpoint.profile_address, "export", "crm360", "--shop", endpoint.shop,
        "--format", "csv", "-o", str(path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == table
    rows = list(csv.reader(io.StringIO(table.decode())))
    assert rows[0] == list(CRM360_TYPES)
    back = [
        {name: typed(name, cell) for name, cell in zip(rows[0], row, strict=True)}
        for row in rows[1:]
    ]
    assert back == records


async def test_loyalty_earns_claws_back_expires_and_ignores_replays(endpoint: Endpoint) -> None:
    await endpoint.profile.PutLoyaltyProgramme(
        profile_pb2.LoyaltyProgramme(
            shop_id=endpoint.shop,
            tiers=[
                profile_pb2.LoyaltyTier(name="Silver", threshold=0, benefits=["free_delivery"]),
                profile_pb2.LoyaltyTier(
                    name="Gold", threshold=200, benefits=["free_delivery", "early_access"]
                ),
                profile_pb2.LoyaltyTier(name="Platinum", threshold=1000),
            ],
            points_per_currency_unit="1",
            expiry_days=365,
        ),
        metadata=AUTH,
    )
    old, recent = NOW - timedelta(days=400), NOW - timedelta(days=10)

    def shopify_order(order_id: str, total: str, at: datetime) -> bytes:
        body = json.loads(fixture("orders_create.json"))
        body.update(
            id=int(order_id), total_price=total, created_at=at.isoformat(),
            updated_at=at.isoformat(), cancelled_at=None, cancel_reason=None,
        )  # fmt: skip
        return json.dumps(body).encode()

    refund = json.loads(fixture("refunds_create.json"))
    refund.update(
        id=2001, order_id=1002,
        transactions=[{"kind": "refund", "status": "success", "amount": "50.00"}],
    )  # fmt: skip
    deliveries = [
        ("orders/create", shopify_order("1001", "150.00", old)),  # expired by now
        ("orders/create", shopify_order("1002", "300.00", recent)),
        ("refunds/create", json.dumps(refund).encode()),  # partial refund: 50 back
    ]
    for topic, body in deliveries:
        webhook_id = secrets.token_hex(8)
        for delivery in (webhook_id, webhook_id, secrets.token_hex(8)):  # replayed, redelivered
            assert (await endpoint.deliver(topic, body, webhook_id=delivery))[0] == 200
    for _ in range(2):  # a return of goods worth 30, delivered twice
        await endpoint.profile.IngestRefund(
            profile_pb2.IngestRefundRequest(
                shop_id=endpoint.shop, refund_id="2002", order_id="1002", amount="30.00",
                refunded_at=stamp(NOW - timedelta(days=2)), is_return=True,
            ),
            metadata=AUTH,
        )  # fmt: skip

    expected = profile_pb2.Loyalty(
        member=True, tier="Gold", points_balance=220, points_to_next_tier=630,
        next_tier="Platinum", benefits=["free_delivery", "early_access"], points_expiring=220,
        points_expiration_date=stamp(datetime.combine((recent + timedelta(days=365)).date(),
                                                      datetime.min.time(), UTC)),
        member_since=stamp(old), lifetime_points=370,
    )  # fmt: skip

    async def standing() -> Any:
        try:
            return (await endpoint.get()).loyalty
        except grpc.aio.AioRpcError:
            return None

    await eventually(standing, lambda s: s == expected, "the ledger")
    await settled(endpoint, 1, "loyalty_member and tier = Gold")
    exported = await export(
        endpoint, profile_pb2.EXPORT_DATASET_LOYALTY, profile_pb2.EXPORT_FORMAT_JSONL
    )
    [record] = [json.loads(line) for line in exported.decode().splitlines()]
    assert {k: v for k, v in record.items() if k != "customer_id"} == {
        "member": True, "tier": "Gold", "points_balance": 220, "points_to_next_tier": 630,
        "next_tier": "Platinum", "tier_benefits": ["free_delivery", "early_access"],
        "points_expiration_date": (recent + timedelta(days=365)).date().isoformat(),
        "points_expiring": 220, "member_since": old.date().isoformat(), "lifetime_points": 370,
    }  # fmt: skip

    email = (await endpoint.get()).emails[0]
    traits = await endpoint.profile.LookupTraits(
        profile_pb2.LookupTraitsRequest(
            shop_id=endpoint.shop, identifier=common_pb2.Identifier(type="email", value=email)
        ),
        metadata=AUTH,
    )
    assert (traits.found, traits.loyalty_tier, traits.points_balance) == (True, "Gold", 220)
    assert set(traits.DESCRIPTOR.fields_by_name) == {
        "found",
        "first_name",
        "lifecycle_stage",
        "loyalty_tier",
        "points_balance",
    }


async def test_trait_lookup_of_an_unknown_email_creates_nothing(endpoint: Endpoint) -> None:
    unknown = common_pb2.Identifier(type="email", value="nobody@audience.example")
    traits = await endpoint.profile.LookupTraits(
        profile_pb2.LookupTraitsRequest(shop_id=endpoint.shop, identifier=unknown),
        metadata=AUTH,
    )
    assert traits == profile_pb2.Traits(found=False)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await endpoint.get("email", "nobody@audience.example")
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_signals_put_stage_and_risk_changes_on_the_feed_and_in_segments(
    endpoint: Endpoint,
) -> None:
    person_id = (await order(endpoint, "s1", "signals@audience.example", "40.00", NOW)).person_id
    await settled(endpoint, 1)

    async def put(stage: str, risk: float) -> int:
        answer = await endpoint.profile.PutSignals(
            profile_pb2.PutSignalsRequest(
                shop_id=endpoint.shop,
                signals=[
                    profile_pb2.PersonSignals(
                        person_id=person_id,
                        predictions=profile_pb2.Predictions(
                            lifecycle_stage=stage, churn_risk=risk,
                            rfm=profile_pb2.Rfm(r=1, f=3, m=2),
                        ),
                    )
                ],
            ),
            metadata=AUTH,
        )  # fmt: skip
        return int(answer.changes)

    assert await put("converted", 0.2) == 1
    assert await put("at_risk", 0.75) == 3  # the stage, and both thresholds crossed
    assert await put("at_risk", 0.74) == 0
    segment = await create_segment(
        endpoint, "slipping", "lifecycle_stage = at_risk and rfm.r <= 2 and rfm.f >= 3"
    )
    assert await members(endpoint, segment.segment_id) == [person_id]
    profile = await endpoint.get("email", "signals@audience.example")
    assert (profile.predictions.lifecycle_stage, profile.predictions.churn_risk) == (
        "at_risk",
        0.74,
    )

    call = endpoint.profile.WatchChanges(
        profile_pb2.WatchChangesRequest(
            shop_id=endpoint.shop, kinds=["lifecycle_stage_changed", "churn_risk_crossed"]
        ),
        metadata=AUTH,
    )
    seen = []
    async for change in call:
        seen.append((change.kind, dict(change.data)))
        if len(seen) == 4:
            call.cancel()
            break
    assert [kind for kind, _ in seen] == [
        "lifecycle_stage_changed", "lifecycle_stage_changed", "churn_risk_crossed",
        "churn_risk_crossed",
    ]  # fmt: skip
    assert seen[1][1] == {"from": "converted", "to": "at_risk"}
    assert [d["threshold"] for _, d in seen[2:]] == [0.5, 0.7]


async def test_signals_of_an_older_model_never_replace_a_newer_models(endpoint: Endpoint) -> None:
    # The daily run (a fitted model) and the follower (scoring with what it read before the fit)
    # can race: whichever lands last, the person keeps the newest model's signals.
    person_id = (await order(endpoint, "v1", "version@audience.example", "40.00", NOW)).person_id
    await settled(endpoint, 1)

    async def put(stage: str, fitted_days_ago: int | None) -> int:
        request = profile_pb2.PutSignalsRequest(
            shop_id=endpoint.shop,
            signals=[
                profile_pb2.PersonSignals(
                    person_id=person_id,
                    predictions=profile_pb2.Predictions(lifecycle_stage=stage),
                )
            ],
        )
        if fitted_days_ago is not None:
            request.model_fitted_at.FromDatetime(NOW - timedelta(days=fitted_days_ago))
        return int((await endpoint.profile.PutSignals(request, metadata=AUTH)).changes)

    assert await put("converted", 1) == 1
    assert await put("new", None) == 0
    assert await put("engaged", 2) == 0
    stage = (await endpoint.get("email", "version@audience.example")).predictions.lifecycle_stage
    assert stage == "converted"
    assert await put("loyal", 1) == 1
    assert await put("at_risk", 0) == 1
    stage = (await endpoint.get("email", "version@audience.example")).predictions.lifecycle_stage
    assert stage == "at_risk"


async def test_merges_and_erasures_reach_the_feed_and_the_summaries(endpoint: Endpoint) -> None:
    ana = (await order(endpoint, "m1", "ana@merge.example", "20.00", NOW)).person_id
    bea = (await order(endpoint, "m2", "bea@merge.example", "30.00", NOW)).person_id
    await settled(endpoint, 2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoint.identity_proxy.port}") as channel:
        identity = identity_pb2_grpc.IdentityStub(channel)
        await identity.Merge(
            identity_pb2.MergeRequest(shop_id=endpoint.shop, person_a_id=ana, person_b_id=bea),
            metadata=AUTH,
        )
        await settled(endpoint, 1, "orders = 2 and spend = 50")
        await identity.Forget(
            identity_pb2.ForgetRequest(shop_id=endpoint.shop, person_id=ana), metadata=AUTH
        )
    await settled(endpoint, 0)
    call = endpoint.profile.WatchChanges(
        profile_pb2.WatchChangesRequest(shop_id=endpoint.shop, kinds=["merged", "gdpr_erasure"]),
        metadata=AUTH,
    )
    seen = []
    async for change in call:
        seen.append((change.kind, change.person_id, dict(change.data)))
        if len(seen) == 2:
            call.cancel()
            break
    assert seen == [("merged", ana, {"other_person_id": bea}), ("gdpr_erasure", ana, {})]


async def test_members_can_be_only_those_the_gate_allows_now(endpoint: Endpoint) -> None:
    opted = (await order(endpoint, "g1", "opted@gate.example", "20.00", NOW)).person_id
    await order(endpoint, "g2", "silent@gate.example", "20.00", NOW)
    await consent(endpoint, opted, common_pb2.CHANNEL_EMAIL, True)
    await settled(endpoint, 1, "consent.email")
    segment = await create_segment(endpoint, "everyone", "orders >= 1")
    assert len(await members(endpoint, segment.segment_id)) == 2
    await eventually(
        lambda: members(endpoint, segment.segment_id, allowed_now_on=common_pb2.CHANNEL_EMAIL),
        lambda found: found == [opted],
        "the gate's answer",
    )


async def test_a_person_identity_refuses_holds_back_only_their_own_summary(
    endpoint: Endpoint,
) -> None:
    # A mark whose person id identity refuses (INVALID_ARGUMENT), older than any other, so that
    # it is in every round with the shop's other marks.
    refused = "p\x01refused"
    await sql(
        endpoint.settings,
        "INSERT INTO summary_due (shop_id, person_id, requested_at) VALUES ($1, $2, $3)",
        endpoint.shop,
        refused,
        NOW - timedelta(days=365),
    )
    try:
        await order(endpoint, "r1", "ren@refused.example", "20.00", NOW)
        await settled(endpoint, 1)
        due = await sql(
            endpoint.settings,
            "SELECT person_id FROM summary_due WHERE shop_id = $1",
            endpoint.shop,
        )
        assert [row["person_id"] for row in due] == [refused]
    finally:
        await sql(
            endpoint.settings,
            "DELETE FROM summary_due WHERE shop_id = $1 AND person_id = $2",
            endpoint.shop,
            refused,
        )
