"""The bulk paths against the single-record ones, over real services: a generated shop (repeat
buyers, an order's update before its creation, duplicates within a call, refunds, guest and POS
orders, a loyalty programme changed half-way, consents from an upload, invalid records) ingested
one record a call into one shop and in batches into another ends with the same profiles, the
same per-record answers and the same rejections."""

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2
from services.runtime.errors import PeerRejected
from services.runtime.validation import timestamp
from tests.integration.conftest import AUTH, Endpoint

PEOPLE = 40
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
Answer = tuple[str, bool] | list[tuple[str, str]]  # (person, applied), or the violations


def email(n: int) -> str:
    return f"p{n}@bulk.example"


def phone(n: int) -> str:
    return f"+35840{n:07d}"


def order(
    order_id: str,
    identifiers: Sequence[tuple[str, str]],
    hours: int,
    total: str,
    updated_hours: int | None = None,
    **fields: Any,
) -> profile_pb2.IngestOrderRequest:
    placed = START + timedelta(hours=hours)
    updated = placed if updated_hours is None else START + timedelta(hours=updated_hours)
    request = profile_pb2.IngestOrderRequest(
        order_id=order_id,
        identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in identifiers],
        placed_at=timestamp(placed),
        updated_at=timestamp(updated),
        total=total,
        currency=fields.pop("currency", "EUR"),
        source=fields.pop("source", profile_pb2.ORDER_SOURCE_ONLINE),
        line_items=[profile_pb2.LineItem(sku="MUG-1", title="Mug", quantity=1, price=total)],
        **fields,
    )
    return request


def generated_orders(rng: random.Random) -> tuple[list[Any], list[Any]]:
    """Two halves of a shop's order history (a loyalty programme changes between them)."""
    halves: list[list[Any]] = [[], []]
    for k in range(160):
        n = rng.randrange(PEOPLE)
        who = [("email", email(n))] + ([("phone", phone(n))] if n % 4 == 0 else [])
        if k % 17 == 0:
            who = []  # a walk-in with no contact
        elif k % 19 == 0:
            who = [("email", "noreply@bulk.example")]  # a placeholder: identifies nobody
        kind: dict[str, Any] = {}
        if k % 7 == 0:
            kind = {"source": profile_pb2.ORDER_SOURCE_POS, "location": f"Store {k % 3}"}
        elif k % 11 == 0:
            kind = {"source": profile_pb2.ORDER_SOURCE_MARKETPLACE, "location": "amazon"}
        if k % 13 == 0:
            kind["currency"] = "USD"
        total = f"{rng.randrange(5, 300)}.{rng.choice(['00', '50', '95'])}"
        half = halves[k >= 100]
        created = order(f"o{k}", who, k, total, cancelled=k % 23 == 0, **dict(kind))
        if k % 9 == 0:  # the update arrives before the creation, and wins
            half.append(order(f"o{k}", who, k, "1.00", updated_hours=k + 30, **dict(kind)))
        half.append(created)
        if k % 10 == 3:  # delivered twice in a row: one call, or one batch
            half.append(created)
        if k % 12 == 5:  # a later version, in the second half: the loyalty terms stay
            halves[1].append(order(f"o{k}", who, k, "9.99", updated_hours=k + 200, **dict(kind)))
    halves[0].insert(5, order("bad-total", [("email", email(1))], 1, "ten euros"))
    halves[0].insert(9, order("bad-currency", [("email", email(2))], 2, "5.00", currency="eur"))
    halves[1].insert(3, order("bad-phone", [("email", email(3)), ("phone", "12")], 3, "5.00"))
    halves[1].insert(7, order("", [("email", email(4))], 4, "5.00"))
    return halves[0], halves[1]


def generated_customers() -> list[dict[str, Any]]:
    """A Custobar upload: new records, updates of earlier ones, consents, invalid records."""
    records: list[dict[str, Any]] = []
    for n in range(30):
        records.append(
            {"email": email(n), "first_name": f"F{n}", "can_email": n % 2 == 0, "tags": ["a"]}
        )
        if n % 5 == 0:
            records.append({"email": email(n), "last_name": f"L{n}", "can_sms": True,
                            "tags.add": "vip"})  # fmt: skip
        if n % 4 == 0:
            records.append({"phone_number": phone(n), "email": email(n), "COMPANY__level": n})
    records.insert(3, {"first_name": "Nobody"})
    records.insert(8, {"email": "odd@bulk.example", "external_id": "not an id!"})
    records.insert(12, {"email": "q@bulk.example", "phone_number": "12"})
    records.append({"email": email(31), "first_name": "Gone", "is_deleted": True})
    records.append({"email": email(5), "can_email": False})
    return records


async def programme(endpoint: Endpoint, shop: str, rate: str) -> None:
    await endpoint.profile.PutLoyaltyProgramme(
        profile_pb2.LoyaltyProgramme(
            shop_id=shop,
            tiers=[profile_pb2.LoyaltyTier(name="base", threshold=0, benefits=["news"]),
                   profile_pb2.LoyaltyTier(name="gold", threshold=500, benefits=["ship"])],
            points_per_currency_unit=rate,
            expiry_days=365,
        ),
        metadata=AUTH,
    )  # fmt: skip


def struct(record: dict[str, Any]) -> Struct:
    found = Struct()
    found.update(record)
    return found


async def one_by_one(endpoint: Endpoint, shop: str, orders: list[Any]) -> list[Answer]:
    answers: list[Answer] = []
    for request in orders:
        request = profile_pb2.IngestOrderRequest(shop_id=shop, **_fields(request))
        try:
            answer = await endpoint.profile.IngestOrder(request, metadata=AUTH)
        except grpc.aio.AioRpcError as error:
            rejected = PeerRejected(error)
            answers.append([(rejected.code.name, ""), *rejected.field_violations()])
            continue
        answers.append((answer.person_id, answer.applied))
    return answers


async def in_batches(endpoint: Endpoint, shop: str, orders: list[Any], size: int) -> list[Answer]:
    answers: list[Answer] = []
    for start in range(0, len(orders), size):
        sent = orders[start : start + size]
        answer = await endpoint.profile.IngestOrders(
            profile_pb2.IngestOrdersRequest(shop_id=shop, orders=sent), metadata=AUTH
        )
        assert len(answer.results) == len(sent)
        errors: dict[int, list[tuple[str, str]]] = {}
        for error in answer.errors:
            found = errors.setdefault(error.index, [("INVALID_ARGUMENT", "")])
            found.append((error.field, error.description))
        for i, result in enumerate(answer.results):
            answers.append(errors.get(i, (result.person_id, result.applied)))
    return answers


def _fields(request: Any) -> dict[str, Any]:
    return {field.name: value for field, value in request.ListFields()}


def named(answers: list[Answer]) -> list[Any]:
    """The answers with person ids replaced by the order they were first seen in (the two shops'
    ids differ; who is the same person as whom must not)."""
    seen: dict[str, int] = {"": -1}
    return [
        answer if isinstance(answer, list) else (seen.setdefault(answer[0], len(seen)), answer[1])
        for answer in answers
    ]


async def profiles(endpoint: Endpoint, shop: str) -> list[Any]:
    """Every generated person's profile without the shop's own ids, by email and by phone."""
    found: list[tuple[str, Any]] = []
    for type_, value in [("email", email(n)) for n in range(PEOPLE + 2)] + [
        ("phone", phone(n)) for n in range(0, PEOPLE, 4)
    ]:
        try:
            answer = await endpoint.profile.Get(
                profile_pb2.GetRequest(
                    shop_id=shop,
                    person=common_pb2.PersonRef(
                        identifier=common_pb2.Identifier(type=type_, value=value)
                    ),
                ),
                metadata=AUTH,
            )
        except grpc.aio.AioRpcError as error:
            found.append((value, error.code()))
            continue
        for name in ("shop_id", "person_id", "contact_history"):
            answer.ClearField(name)
        for consent in answer.consents:
            if consent.source == "custobar":
                consent.ClearField("at")  # when the upload was applied, by the clock
        found.append((value, MessageToDict(answer)))
    return found


async def test_bulk_ingestion_ends_exactly_where_one_record_a_call_does(
    endpoint: Endpoint,
) -> None:
    first, second = generated_orders(random.Random(5))  # noqa: S311  # a reproducible shop, not a secret
    customers = generated_customers()
    single, bulk = endpoint.shop, f"{endpoint.shop}-bulk"
    refund_first = profile_pb2.IngestRefundRequest(
        refund_id="r-early", order_id="o110", amount="3.00", refunded_at=timestamp(START)
    )
    refunds = [
        profile_pb2.IngestRefundRequest(
            refund_id=f"r{k}", order_id=f"o{k}", amount=f"{k % 40}.25",
            refunded_at=timestamp(START + timedelta(days=10)), is_return=k % 2 == 0,
        )
        for k in range(0, 160, 6)
    ]  # fmt: skip

    answers = {}
    for shop in (single, bulk):
        if shop == single:
            uploads = [
                await endpoint.profile.UpsertCustomers(
                    profile_pb2.UpsertCustomersRequest(shop_id=shop, customers=[struct(record)]),
                    metadata=AUTH,
                )
                for record in customers
            ]
            upload_errors = [
                (i, e.field, e.description) for i, u in enumerate(uploads) for e in u.errors
            ]
        else:
            upload = await endpoint.profile.UpsertCustomers(
                profile_pb2.UpsertCustomersRequest(
                    shop_id=shop, customers=[struct(record) for record in customers]
                ),
                metadata=AUTH,
            )
            upload_errors = [(e.index, e.field, e.description) for e in upload.errors]
        await programme(endpoint, shop, "1")
        stored = await (one_by_one(endpoint, shop, first) if shop == single
                        else in_batches(endpoint, shop, first, 25))  # fmt: skip
        await programme(endpoint, shop, "2.5")
        await endpoint.profile.IngestRefund(
            profile_pb2.IngestRefundRequest(shop_id=shop, **_fields(refund_first)), metadata=AUTH
        )
        stored += await (one_by_one(endpoint, shop, second) if shop == single
                         else in_batches(endpoint, shop, second, 40))  # fmt: skip
        for refund in refunds:
            await endpoint.profile.IngestRefund(
                profile_pb2.IngestRefundRequest(shop_id=shop, **_fields(refund)), metadata=AUTH
            )
        answers[shop] = (named(stored), upload_errors, await profiles(endpoint, shop))

    orders, upload_errors, pictures = answers[bulk]
    assert orders == answers[single][0]
    assert upload_errors == answers[single][1]
    assert pictures == answers[single][2]
    # Every invalid record is reported, named as in the record; the valid ones are kept.
    rejected = [(i, a) for i, a in enumerate(orders) if isinstance(a, list)]
    assert [violations[1:] for _, violations in rejected] == [
        [
            ("total", 'must be a non-negative decimal string such as "129.90"'),
            ("line_items[0].price", 'must be a non-negative decimal string such as "129.90"'),
        ],
        [("currency", "must be an ISO 4217 code such as EUR")],
        rejected[2][1][1:],
        [("order_id", "must be 1-64 printable characters")],
    ]
    assert rejected[2][1][1][0] == "identifiers[1].value"
    assert [i for i, *_ in upload_errors] == [3, 8, 12]
    by_value = dict(pictures)
    assert by_value[email(0)]["name"] == {"firstName": "F0", "lastName": "L0"}
    assert by_value[email(0)]["tags"] == ["a", "vip"]
