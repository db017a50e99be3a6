"""Customer uploads in Custobar's format (seed 004) through the profile's HTTP endpoint and its
gRPC twin: partial updates, removals, set edits, per-record errors, forgetting and deleting."""

from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2
from tests.conftest import ADMIN_TOKEN, SHOP_A_TOKEN
from tests.integration.conftest import AUTH, Endpoint

# The seed's own example upload.
JAMES: dict[str, Any] = {
    "external_id": "3619490226",
    "first_name": "James",
    "last_name": "Carroll",
    "email": "james.carroll@example.org",
    "can_email": True,
    "phone_number": "+447757138957",
    "can_sms": True,
    "date_joined": "2015-11-23T13:11:23Z",
    "last_login": "2015-11-25T13:11:23Z",
    "language": "EN",
    "tags": ["kitchenware", "vip"],
    "COMPANY__customer_group": 1,
}
JOSHUA: dict[str, Any] = {
    "external_id": "2319490132",
    "first_name": "Joshua",
    "last_name": "Stewart",
    "email": "josh@example.org",
    "street_address": "42 Red Lane",
    "date_joined": "2015-06-03T13:11:23Z",
    "last_login": "2017-10-15T03:01:13Z",
    "zip_code": "OX15 3PW",
    "city": "Epwell",
    "can_sms": False,
    "country": "GB",
    "language": "EN",
    "COMPANY__customer_group": 2,
}


async def upload(
    endpoint: Endpoint, customers: list[Any], token: str = ADMIN_TOKEN, shop: str = ""
) -> tuple[int, dict[str, Any]]:
    async with endpoint.http.post(
        endpoint.url.replace("/webhooks/shopify", "/api/customers/upload/"),
        params={"shop_id": shop or endpoint.shop},
        json={"customers": customers},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        return response.status, await response.json()


async def test_an_upload_then_a_partial_one_keeps_what_it_does_not_name(
    endpoint: Endpoint,
) -> None:
    assert await upload(endpoint, [JAMES, JOSHUA]) == (200, {"accepted": 2, "errors": []})
    james = await endpoint.get("email", "James.Carroll@example.org")
    assert (james.name.first_name, james.name.last_name) == ("James", "Carroll")
    assert list(james.tags) == ["kitchenware", "vip"]
    assert james.attributes["COMPANY__customer_group"] == 1
    assert james.attributes["can_push"] is False  # permissions default to false
    granted = {(c.channel, c.granted) for c in james.consents}
    assert granted == {(common_pb2.CHANNEL_EMAIL, True), (common_pb2.CHANNEL_SMS, True)}

    partial = {
        "external_id": "3619490226",
        "last_name": "Carroll-Smith",
        "language": "",
        "tags.add": ["gold"],
        "tags.remove": ["kitchenware"],
        "mailing_lists.add": "weekly",
    }
    assert await upload(endpoint, [partial]) == (200, {"accepted": 1, "errors": []})
    james = await endpoint.get("phone", "+447757138957")
    assert (james.name.first_name, james.name.last_name) == ("James", "Carroll-Smith")
    assert list(james.tags) == ["gold", "vip"]
    assert "language" not in james.attributes
    assert list(james.attributes["mailing_lists"]) == ["weekly"]
    assert james.attributes["email"] == "james.carroll@example.org"
    josh = await endpoint.get("email", "josh@example.org")
    assert (josh.name.last_name, josh.attributes["city"]) == ("Stewart", "Epwell")
    assert josh.person_id != james.person_id


async def test_each_bad_record_is_reported_and_the_good_ones_are_kept(endpoint: Endpoint) -> None:
    status, answer = await upload(
        endpoint,
        [
            {"first_name": "Nobody"},
            {"external_id": "not valid!", "email": "a@mail.example"},
            {"email": "kept@mail.example", "can_email": "yes"},
            {"email": "ok@mail.example"},
            {"phone_number": "12"},
            "not an object",
        ],
    )
    assert (status, answer["accepted"]) == (200, 1)
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [
        (0, ""),
        (1, "external_id"),
        (2, "can_email"),
        (4, "phone_number"),
        (5, ""),
    ]
    assert (await endpoint.get("email", "ok@mail.example")).attributes["email"] == "ok@mail.example"


async def test_a_canonical_id_groups_records_into_one_person(endpoint: Endpoint) -> None:
    records = [
        {"external_id": "A-1", "canonical_id": "C9", "email": "one@mail.example"},
        {"external_id": "B-2", "canonical_id": "C9", "phone_number": "+447757138000"},
    ]
    assert (await upload(endpoint, records))[1]["accepted"] == 2
    one = await endpoint.get("email", "one@mail.example")
    assert one.person_id == (await endpoint.get("phone", "+447757138000")).person_id


async def test_is_forgotten_leaves_no_pii_and_cannot_be_undone(endpoint: Endpoint) -> None:
    assert (await upload(endpoint, [JAMES]))[1]["accepted"] == 1
    forget = {"external_id": "3619490226", "is_forgotten": True}
    assert await upload(endpoint, [forget]) == (200, {"accepted": 1, "errors": []})
    for type_, value in (("email", "james.carroll@example.org"), ("phone", "+447757138957")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await endpoint.get(type_, value)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    rows = await endpoint.customer_rows()
    # One detail-less marker per key the customer had (external id, email, phone).
    assert [r["forgotten"] for r in rows] == [True, True, True]
    for pii in ("James", "Carroll", "3619490226", "james.carroll", "7757138957"):
        assert pii not in str(rows)
    # The same identifiers again restore nothing.
    assert (await upload(endpoint, [JAMES]))[1]["accepted"] == 1
    with pytest.raises(grpc.aio.AioRpcError):
        await endpoint.get("email", "james.carroll@example.org")


async def test_is_deleted_removes_the_record_for_good(endpoint: Endpoint) -> None:
    assert (await upload(endpoint, [JOSHUA]))[1]["accepted"] == 1
    deleted = {"external_id": "2319490132", "is_deleted": True}
    assert (await upload(endpoint, [deleted]))[1]["accepted"] == 1
    assert (await endpoint.get("email", "josh@example.org")).name.first_name == ""
    revived = {"external_id": "2319490132", "is_deleted": False, "first_name": "Josh"}
    assert (await upload(endpoint, [revived]))[1]["accepted"] == 1
    assert (await endpoint.get("email", "josh@example.org")).name.first_name == ""


@pytest.mark.parametrize(
    ("token", "shop", "status"),
    [("", "", 401), ("not-a-token", "", 401), (SHOP_A_TOKEN, "", 403), (ADMIN_TOKEN, "-", 400)],
)
async def test_uploads_need_a_token_with_write_access_to_the_shop(
    endpoint: Endpoint, token: str, shop: str, status: int
) -> None:
    assert (await upload(endpoint, [JAMES], token=token, shop=shop))[0] == status


async def test_the_grpc_twin_takes_the_same_records(endpoint: Endpoint) -> None:
    record = Struct()
    record.update(JOSHUA)
    answer = await endpoint.profile.UpsertCustomers(
        profile_pb2.UpsertCustomersRequest(shop_id=endpoint.shop, customers=[record, Struct()]),
        metadata=AUTH,
    )
    assert answer.accepted == 1
    assert [(e.index, e.field) for e in answer.errors] == [(1, "")]
    josh = await endpoint.get("email", "josh@example.org")
    assert josh.attributes["COMPANY__customer_group"] == 2


async def test_is_forgotten_through_any_identifier_of_the_record(endpoint: Endpoint) -> None:
    assert (await upload(endpoint, [JAMES]))[1]["accepted"] == 1
    forget = {"email": "james.carroll@example.org", "is_forgotten": True}
    assert (await upload(endpoint, [forget]))[1]["accepted"] == 1
    assert "Carroll" not in str(await endpoint.customer_rows())
    with pytest.raises(grpc.aio.AioRpcError):
        await endpoint.get("phone", "+447757138957")


async def test_a_partial_update_through_another_identifier_edits_the_same_record(
    endpoint: Endpoint,
) -> None:
    assert (await upload(endpoint, [JAMES]))[1]["accepted"] == 1
    edit = {"email": "james.carroll@example.org", "tags.remove": ["vip"], "language": ""}
    assert (await upload(endpoint, [edit]))[1]["accepted"] == 1
    james = await endpoint.get("email", "james.carroll@example.org")
    assert list(james.tags) == ["kitchenware"]
    assert "language" not in james.attributes
    assert len(await endpoint.customer_rows()) == 1


async def test_overlong_values_are_per_record_errors(endpoint: Endpoint) -> None:
    long_email = "a" * 320 + "@mail.example"
    status, answer = await upload(
        endpoint, [{"email": "ok@mail.example"}, {"email": long_email}, {"external_id": "A" * 70}]
    )
    assert (status, answer["accepted"]) == (200, 2)
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [(1, "email")]


async def test_records_of_one_upload_sharing_an_identifier_apply_in_order(
    endpoint: Endpoint,
) -> None:
    records = [
        {"external_id": "X-1", "email": "ord@mail.example", "tags": ["first"]},
        *({"email": f"other{n}@mail.example"} for n in range(20)),
        {"email": "ord@mail.example", "tags.add": ["second"], "first_name": "Ord"},
        {"external_id": "X-1", "tags.remove": ["first"]},
    ]
    assert await upload(endpoint, records) == (200, {"accepted": 23, "errors": []})
    ord_ = await endpoint.get("email", "ord@mail.example")
    assert (list(ord_.tags), ord_.name.first_name) == (["second"], "Ord")
    assert len(await endpoint.customer_rows()) == 21
