"""Bad input, generated: every RPC of the five services (found by walking their descriptors),
the Shopify webhook endpoint and the customer upload, each sent malformed, oversized and
mistyped input by hypothesis against the running mesh.

Properties: no call ends INTERNAL or UNKNOWN; bad input is INVALID_ARGUMENT naming the request's
own fields, or another deliberate status; a rejected write leaves nothing behind (each example
has a shop of its own, counted everywhere by ShopData.RedactShop in dry run); a signed webhook is
answered 200, 400 or 401, never 500, and ends processed or a dead letter with a deliberate error;
nothing is logged as an unexpected failure, in the background either.

Examples are derandomized (the same on every run); see docs/decisions.md to explore further or
to reproduce a failure.
"""

import importlib
import json
import re
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from hypothesis import event, given, settings
from hypothesis import strategies as st

from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2
from services.profile import custobar
from services.profile.shopify import signature
from services.runtime.auth import required_role
from services.runtime.settings import SERVICES, ServiceName
from tests.polling import eventually
from tests.property.conftest import AUTH, SECRET, Mesh, Outcome
from tests.property.messages import (
    json_bodies,
    json_values,
    odd_text,
    payloads,
    plausible_id,
    texts,
)
from tests.rpc import FULL_NAMES, service_descriptor

# Statuses a caller can act on: fix the input, or look elsewhere. (No example is too large to
# send, so RESOURCE_EXHAUSTED would be a status that did not fit its trailers.)
DELIBERATE = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
FIELD_ROOT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The profile's count (see conftest.py), per RPC; more for the HTTP bodies, each of which
# covers one endpoint.
EXAMPLES = settings().max_examples


def every_method() -> list[str]:
    """Each RPC of each service's own gRPC service, and of the ShopData service each one
    serves, as "service:full method name"."""
    found: list[str] = []
    for service in SERVICES:  # the generated module registers the service's descriptors
        importlib.import_module(f"c360.{service}.v1.{service}_pb2")
        for full_name in (FULL_NAMES[service], "c360.common.v1.ShopData"):
            found.extend(f"{service}:{m.full_name}" for m in service_descriptor(full_name).methods)
    return found


def violations(outcome: Outcome) -> list[Any]:
    return [
        v
        for detail in outcome.details
        if isinstance(detail, error_details_pb2.BadRequest)
        for v in detail.field_violations
    ]


@pytest.mark.parametrize("target", every_method())
@given(data=st.data())
async def test_any_request_is_answered_deliberately_and_a_rejected_one_writes_nothing(
    mesh: Mesh, target: str, data: st.DataObject
) -> None:
    service, full_name = target.split(":")
    method = descriptor_pool.Default().FindMethodByName(full_name)
    shop = mesh.fresh_shop()
    payload = data.draw(payloads(method.input_type, shop), label="request")
    outcome = await mesh.call(cast(ServiceName, service), method, payload.raw)
    deliberate = DELIBERATE | (
        {grpc.StatusCode.DEADLINE_EXCEEDED} if method.server_streaming else set()
    )
    event(f"{payload.how}: {outcome.code.name}")
    assert outcome.code in deliberate, outcome
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        found = violations(outcome)
        assert found, f"INVALID_ARGUMENT without field violations: {outcome}"
        fields = set(method.input_type.fields_by_name)
        for violation in found:
            match = FIELD_ROOT.match(violation.field)
            assert (match is not None and match.group() in fields) or (
                violation.field == "" and payload.how != "message"
            ), f"{violation.field!r} is no field of {method.input_type.full_name}: {outcome}"
    path = f"/{method.containing_service.full_name}/{method.name}"
    if outcome.code != grpc.StatusCode.OK and required_role(path) != common_pb2.ROLE_READ:
        assert await mesh.shop_rows(shop) == {}, f"half-written after {outcome}"


# --- the Shopify webhook endpoint ---------------------------------------------------------------

FIXTURES = Path(__file__).parents[1] / "fixtures" / "shopify"
# Each topic with the real payload its odd bodies are made from.
TOPIC_PAYLOADS = {
    "orders/create": "orders_create.json",
    "orders/updated": "orders_create.json",
    "refunds/create": "refunds_create.json",
    "customers/create": "customers_create.json",
    "customers/update": "customers_create.json",
    "customers/redact": "customers_redact.json",
    "customers/data_request": "customers_data_request.json",
    "shop/redact": "shop_redact.json",
}
# What a dead letter may say: the payload is unusable, as the profile or a peer decided.
DELIBERATE_DEAD = tuple(
    f"{name}: "
    for name in (
        "PayloadError", "JSONDecodeError", "UnicodeDecodeError", "UnreadableJson",
        "InvalidArgument", "PeerRejected", "FailedPrecondition", "NotFound",
    )
)  # fmt: skip


def shaped(topic: str) -> st.SearchStrategy[tuple[str, bytes]]:
    name = TOPIC_PAYLOADS.get(topic)
    shape = json.loads((FIXTURES / name).read_text()) if name else {}
    return st.tuples(st.just(topic), json_bodies((shape,)))


deliveries = st.sampled_from([*sorted(TOPIC_PAYLOADS), "orders/paid", "app/uninstalled"]).flatmap(
    shaped
)


@settings(max_examples=2 * EXAMPLES)
@given(delivery=deliveries)
async def test_a_signed_webhook_is_answered_200_400_or_401_and_settles_deliberately(
    mesh: Mesh, delivery: tuple[str, bytes]
) -> None:
    topic, template = delivery
    shop = mesh.fresh_shop()
    body = template.replace(b"{shop}.myshopify.com", shop.encode())
    headers = {
        "X-Shopify-Topic": topic,
        "X-Shopify-Shop-Domain": shop,
        "X-Shopify-Webhook-Id": f"w-{shop}",
        "X-Shopify-Hmac-Sha256": signature(SECRET, body),
        "Content-Type": "application/json",
    }
    async with mesh.http.post(mesh.webhook_url, data=body, headers=headers) as response:
        status, answer = response.status, await response.json()
    assert status in (200, 400, 401), (status, answer)
    if status != 200 or not answer.get("accepted"):
        event(f"{status}")
        assert await mesh.shop_rows(shop) == {}
        return

    async def delivery_row() -> Any:
        return await mesh.database.fetchrow(
            "SELECT state, error FROM webhook_inbox WHERE shop_id = $1", shop
        )

    row = await eventually(delivery_row, lambda r: r["state"] != "pending", "processing")
    event(f"{topic}: {row['state']} {(row['error'] or '').split(':')[0]}")
    assert row["state"] in ("done", "dead"), row
    if row["state"] == "dead":
        assert row["error"].startswith(DELIBERATE_DEAD), row["error"]
        left = await mesh.shop_rows(shop)
        assert left == {"profile.webhook_inbox": 1}, f"half-written by a dead letter: {left}"


# --- customer uploads ---------------------------------------------------------------------------

# The upload format's own example record.
RECORD: dict[str, Any] = {
    "external_id": "3619490226", "first_name": "James", "last_name": "Carroll",
    "email": "james.carroll@example.org", "can_email": True, "phone_number": "+447757138957",
    "can_sms": True, "date_joined": "2015-11-23T13:11:23Z", "language": "EN",
    "tags": ["kitchenware", "vip"], "COMPANY__customer_group": 1,
}  # fmt: skip
UPLOAD_KEYS = st.sampled_from(
    sorted(
        custobar.KNOWN
        | {f"{s}.{a}" for s in custobar.SETS for a in ("add", "remove")}
        | {"COMPANY__group", "COMPANY__"}
    )
)
upload_values = st.one_of(
    json_values(4),
    st.emails().map(str),
    plausible_id,
    odd_text,
    st.sampled_from(("", True, False, 0, 1.5, 1e300, "2015-11-23T13:11:23Z", ["a", ""])),
)
upload_records = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from((RECORD, {"email": "ada@example.org"}, {})),
    st.dictionaries(UPLOAD_KEYS | texts, upload_values, max_size=4),
)


def answered_every_record(accepted: int, errors: list[tuple[int, str]], records: int) -> None:
    """Each record is accepted or reported, by its index, never both."""
    indices = {index for index, _ in errors}
    assert indices <= set(range(records)), errors
    assert accepted + len(indices) == records, (accepted, errors, records)


@settings(max_examples=2 * EXAMPLES)
@given(records=st.lists(upload_records, max_size=4))
async def test_every_uploaded_record_is_accepted_or_reported_and_a_rejected_one_stores_nothing(
    mesh: Mesh, records: list[dict[str, Any]]
) -> None:
    shop = mesh.fresh_shop()
    request = profile_pb2.UpsertCustomersRequest(shop_id=shop)
    for record in records:
        request.customers.add().update(record)
    method = service_descriptor(FULL_NAMES["profile"]).methods_by_name["UpsertCustomers"]
    outcome = await mesh.call("profile", method, request.SerializeToString())
    assert outcome.code == grpc.StatusCode.OK, outcome
    answer = outcome.response
    event(f"{len(records)} records, {answer.accepted} accepted")
    answered_every_record(
        answer.accepted, [(e.index, e.field) for e in answer.errors], len(records)
    )
    if answer.accepted == 0:
        assert await mesh.shop_rows(shop) == {}


@settings(max_examples=2 * EXAMPLES)
@given(body=json_bodies(({"customers": [RECORD, {"email": "ada@example.org"}]},)))
async def test_an_upload_body_is_answered_200_400_or_413_and_a_rejected_one_stores_nothing(
    mesh: Mesh, body: bytes
) -> None:
    shop = mesh.fresh_shop()
    async with mesh.http.post(
        mesh.upload_url, params={"shop_id": shop}, data=body, headers=dict(AUTH)
    ) as response:
        status, answer = response.status, await response.json()
    event(f"{status}" + (f", {answer['accepted']} accepted" if status == 200 else ""))
    assert status in (200, 400, 413), (status, answer)
    if status == 200:
        records = json.loads(body)["customers"]
        errors = [(e["index"], e["field"]) for e in answer["errors"]]
        answered_every_record(answer["accepted"], errors, len(records))
    if status != 200 or answer["accepted"] == 0:
        assert await mesh.shop_rows(shop) == {}


# --- last ---------------------------------------------------------------------------------------


async def test_nothing_went_wrong_in_the_background(mesh: Mesh) -> None:
    """Last, once the profile's queues are drained (summaries to refresh, contact policies to
    push to the gate): no traceback, failed background step or dependency failure was logged
    while the examples above ran and what they wrote was processed."""

    async def queued() -> int:
        count: int = await mesh.database.fetchval(
            "SELECT (SELECT count(*) FROM summary_due) + (SELECT count(*) FROM gate_push)"
        )
        return count

    drained = True
    try:
        await eventually(queued, lambda n: n == 0, "the profile's queues drained", seconds=30)
    except AssertionError:
        drained = False
    found = mesh.errors.lines()
    assert not found, "\n".join(found)
    assert drained, "the profile's queues did not drain in 30 s, with nothing logged"
