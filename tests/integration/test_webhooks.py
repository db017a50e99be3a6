"""Shopify webhooks through the profile's real HTTP endpoint, with identity and the gate beside
it on real PostgreSQL and Redis: signatures, durability, duplicates, ordering, dead letters.

Payloads are the fixtures in tests/fixtures/shopify (copied byte for byte from the project's
shared fixtures, see tests/fixtures/README.md), plus three derived from them here (each says
how): the order's customer as a customers/create and a customers/update, and an orders/updated
of the fixture order.
"""

import json
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from c360.profile.v1 import profile_pb2
from services.profile.shopify import signature
from tests.conftest import StartService
from tests.integration.conftest import AUTH, CUSTOMER_ID, PREVIOUS, SECRET, Endpoint
from tests.polling import eventually
from tests.sql import sql

FIXTURES = Path(__file__).parents[1] / "fixtures" / "shopify"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def derived_customer(updated_at: str, tags: str) -> bytes:
    """customers_create.json made into the fixture order's customer (id, names, email)."""
    customer = json.loads(fixture("customers_create.json"))
    order = json.loads(fixture("orders_create.json"))["customer"]
    customer.update(
        id=order["id"], email=order["email"], first_name=order["first_name"],
        last_name=order["last_name"], updated_at=updated_at, tags=tags,
    )  # fmt: skip
    return json.dumps(customer).encode()


def derived_order_update() -> bytes:
    """orders_create.json as orders/updated an hour later: the cancellation was reversed."""
    order = json.loads(fixture("orders_create.json"))
    order.update(
        updated_at="2021-12-31T20:00:00-05:00", cancelled_at=None, cancel_reason=None,
        financial_status="paid",
    )  # fmt: skip
    return json.dumps(order).encode()


def test_the_hmac_test_vector_verifies() -> None:
    vector = json.loads(fixture("hmac_test_vector.json"))
    raw = vector["raw_body"].encode()
    assert signature(vector["secret"], raw) == vector["x_shopify_hmac_sha256"]


async def test_the_fixtures_land_in_one_profile_each_counted_once(endpoint: Endpoint) -> None:
    deliveries = [
        ("orders/create", fixture("orders_create.json")),
        ("customers/create", derived_customer("2021-12-31T19:00:00-05:00", "")),
        ("refunds/create", fixture("refunds_create.json")),
        ("orders/updated", derived_order_update()),
        ("customers/update", derived_customer("2022-01-02T10:00:00-05:00", "vip, newsletter")),
    ]
    for topic, body in deliveries:
        webhook_id = secrets.token_hex(8)
        answers = [await endpoint.deliver(topic, body, webhook_id) for _ in range(3)]
        assert answers == [
            (200, {"accepted": True, "duplicate": False}),
            (200, {"accepted": True, "duplicate": True}),
            (200, {"accepted": True, "duplicate": True}),
        ]
    # The reinstated order (388.00) with its refund (398.00 of lines, capped at the order).
    await eventually(endpoint.purchases, lambda p: p == (1, "0.00", "388.00"), "the profile")
    # The orders may be applied before the customers' records: wait for every delivery.
    await eventually(
        endpoint.inbox,
        lambda rows: [state for _, state in rows] == ["done"] * len(deliveries),
        "every delivery processed",
    )
    profile = await endpoint.get()
    assert (profile.name.first_name, profile.name.last_name) == ("John", "Smith")
    assert list(profile.tags) == ["newsletter", "vip"]
    assert sorted(profile.emails) == ["john@example.com", "jon@example.com"]
    assert profile.shopify_customer_id == CUSTOMER_ID
    assert profile.purchases.currency == "USD"
    assert await endpoint.dead_letters() == []


async def test_an_update_before_its_create_ends_in_the_update(endpoint: Endpoint) -> None:
    assert (await endpoint.deliver("orders/updated", derived_order_update()))[0] == 200
    await eventually(endpoint.purchases, lambda p: p == (1, "388.00", "0.00"), "the update")
    assert (await endpoint.deliver("orders/create", fixture("orders_create.json")))[0] == 200
    # The older create (cancelled) changes nothing: it is processed, and the update stands.
    processed = [("orders/updated", "done"), ("orders/create", "done")]
    await eventually(endpoint.inbox, lambda rows: rows == processed, "processing")
    assert await endpoint.purchases() == (1, "388.00", "0.00")


@pytest.mark.parametrize(
    ("tamper", "status"),
    [("body", 401), ("missing", 401), ("wrong_secret", 401)],
)
async def test_a_bad_signature_is_401_and_stores_nothing(
    endpoint: Endpoint, tamper: str, status: int
) -> None:
    body = fixture("orders_create.json")
    webhook_id = secrets.token_hex(8)
    sent = {
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Shop-Domain": endpoint.shop,
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Hmac-Sha256": signature(SECRET, body),
    }
    data = body
    if tamper == "body":
        data = body.replace(b'"388.00"', b'"1.00"')
    elif tamper == "missing":
        del sent["X-Shopify-Hmac-Sha256"]
    else:
        sent["X-Shopify-Hmac-Sha256"] = signature("not-the-secret", body)
    async with endpoint.http.post(endpoint.url, data=data, headers=sent) as response:
        assert response.status == status
    assert await endpoint.inbox() == []
    # Nothing was stored: the same webhook id, correctly signed, is new.
    assert await endpoint.deliver("orders/create", body, webhook_id) == (
        200,
        {"accepted": True, "duplicate": False},
    )


async def test_the_previous_secret_is_accepted_during_a_rotation(endpoint: Endpoint) -> None:
    status, answer = await endpoint.deliver(
        "orders/create", fixture("orders_create.json"), secret=PREVIOUS
    )
    assert (status, answer) == (200, {"accepted": True, "duplicate": False})


async def test_missing_headers_are_400(endpoint: Endpoint) -> None:
    status, answer = await endpoint.deliver(
        "orders/create", fixture("orders_create.json"), **{"X-Shopify-Webhook-Id": ""}
    )
    assert (status, answer) == (400, {"error": "missing X-Shopify-Webhook-Id"})


async def test_a_malformed_payload_becomes_a_dead_letter_that_replays_to_the_same_error(
    endpoint: Endpoint,
) -> None:
    assert (await endpoint.deliver("orders/create", b'{"id": }'))[0] == 200
    [letter] = await eventually(endpoint.dead_letters, lambda d: len(d) == 1, "dead letter")
    assert (letter.kind, letter.attempts) == ("webhook:orders/create", 1)
    assert letter.error.startswith("JSONDecodeError: ")
    replay = await endpoint.profile.ReplayDeadLetters(
        profile_pb2.ReplayDeadLettersRequest(shop_id=endpoint.shop), metadata=AUTH
    )
    assert (replay.replayed, replay.failed_again) == (0, 1)


async def test_a_delivery_that_failed_while_identity_was_down_replays(endpoint: Endpoint) -> None:
    await endpoint.identity_proxy.cut()
    assert (await endpoint.deliver("orders/create", derived_order_update()))[0] == 200
    [letter] = await eventually(endpoint.dead_letters, lambda d: len(d) == 1, "dead letter")
    assert "unavailable" in letter.error.lower()
    await endpoint.identity_proxy.start()

    async def replay() -> Any:
        return await endpoint.profile.ReplayDeadLetters(
            profile_pb2.ReplayDeadLettersRequest(shop_id=endpoint.shop, ids=[letter.id]),
            metadata=AUTH,
        )

    answer = await eventually(replay, lambda a: a.replayed == 1, "the replay")
    assert answer.failed_again == 0
    assert await endpoint.purchases() == (1, "388.00", "0.00")
    assert await endpoint.dead_letters() == []


async def test_the_endpoint_listens_on_every_address_like_the_grpc_server(
    start_service: StartService,
) -> None:
    profile = await start_service("profile", host="[::]", webhook_port=0)
    url = f"http://127.0.0.1:{profile.http_ports['webhooks']}/webhooks/shopify"
    async with aiohttp.ClientSession() as http, http.post(url, data=b"{}") as response:
        assert response.status == 503  # listening; refuses for want of a configured secret


def derived_pos_guest_order() -> bytes:
    """orders_create.json as a POS sale to a guest: no customer, source_name "pos", a location,
    not cancelled, and an id above 2^53 that must survive exactly."""
    order = json.loads(fixture("orders_create.json"))
    order.update(
        id=9007199254740993, customer=None, source_name="pos", location_id=48752903,
        cancelled_at=None, email="walkin.buyer@mail.example",
    )  # fmt: skip
    return json.dumps(order).encode()


async def test_a_pos_sale_to_a_guest_lands_by_its_email_with_its_location(
    endpoint: Endpoint,
) -> None:
    assert (await endpoint.deliver("orders/create", derived_pos_guest_order()))[0] == 200

    async def pos() -> tuple[int, int, str] | None:
        try:
            p = (await endpoint.get("email", "walkin.buyer@mail.example")).purchases
        except grpc.aio.AioRpcError:
            return None
        return p.order_count, p.pos_orders, p.preferred_location

    await eventually(pos, lambda found: found == (1, 1, "48752903"), "the POS sale")
    rows = await sql(
        endpoint.settings, "SELECT order_id FROM order_fact WHERE shop_id = $1", endpoint.shop
    )
    assert [row["order_id"] for row in rows] == ["9007199254740993"]


async def test_a_pos_sale_with_no_contact_at_all_counts_for_the_shop(endpoint: Endpoint) -> None:
    order = json.loads(fixture("orders_create.json"))
    for key in ("customer", "email", "contact_email", "phone", "billing_address",
                "shipping_address"):  # fmt: skip
        order.pop(key, None)
    order.update(source_name="pos", location_id=123, cancelled_at=None, id=5)
    assert (await endpoint.deliver("orders/create", json.dumps(order).encode()))[0] == 200
    await eventually(endpoint.inbox, lambda rows: rows == [("orders/create", "done")], "done")
    rows = await sql(
        endpoint.settings,
        "SELECT anchor_type, anchor_key FROM order_fact WHERE shop_id = $1",
        endpoint.shop,
    )
    assert [(r["anchor_type"], r["anchor_key"]) for r in rows] == [("order", "5")]


async def test_with_a_shop_map_only_mapped_domains_may_deliver(
    start_service: StartService,
) -> None:
    profile = await start_service(
        "profile", webhook_port=0, shopify_api_secret=SECRET,
        shopify_shops={"acme.myshopify.com": "acme"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{profile.http_ports['webhooks']}/webhooks/shopify"
    body = fixture("orders_create.json")
    async with aiohttp.ClientSession() as http:
        statuses = []
        for domain in ("acme.myshopify.com", "other.myshopify.com"):
            headers = {
                "X-Shopify-Topic": "orders/create", "X-Shopify-Shop-Domain": domain,
                "X-Shopify-Webhook-Id": domain, "X-Shopify-Hmac-Sha256": signature(SECRET, body),
            }  # fmt: skip
            async with http.post(url, data=body, headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [200, 401]


async def test_a_previous_secret_set_to_nothing_signs_nothing(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`SHOPIFY_API_SECRET_PREVIOUS=` left blank after a rotation is unset, not an empty HMAC key
    anyone could sign with."""
    monkeypatch.setenv("SHOPIFY_API_SECRET_PREVIOUS", "")
    profile = await start_service("profile", webhook_port=0, shopify_api_secret=SECRET)
    url = f"http://127.0.0.1:{profile.http_ports['webhooks']}/webhooks/shopify"
    body = fixture("orders_create.json")
    async with aiohttp.ClientSession() as http:
        statuses = []
        for key in ("", SECRET):
            headers = {
                "X-Shopify-Topic": "orders/create", "X-Shopify-Shop-Domain": "acme.myshopify.com",
                "X-Shopify-Webhook-Id": secrets.token_hex(8),
                "X-Shopify-Hmac-Sha256": signature(key, body),
            }  # fmt: skip
            async with http.post(url, data=body, headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [401, 200]
