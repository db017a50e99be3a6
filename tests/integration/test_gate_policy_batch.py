"""Gate.PutContactPolicies over a real channel, on PostgreSQL and Redis and on the embedded
store: a batch ends exactly as the same policies put one call each would."""

import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as redis

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.gate.counters import CustomerKeys
from services.runtime.server import Server
from tests.backing import Backing
from tests.clock import Clock
from tests.conftest import ADMIN_TOKEN, READER_TOKEN, SHOP_A_TOKEN, StartService
from tests.rpc import bearer, details
from tests.sql import sql

EMAIL: common_pb2.Channel.ValueType = common_pb2.CHANNEL_EMAIL
SMS: common_pb2.Channel.ValueType = common_pb2.CHANNEL_SMS
WHATSAPP: common_pb2.Channel.ValueType = common_pb2.CHANNEL_WHATSAPP
PUSH: common_pb2.Channel.ValueType = common_pb2.CHANNEL_PUSH
CHANNELS = (EMAIL, SMS, WHATSAPP, PUSH)
ADMIN = bearer(ADMIN_TOKEN)
# Noon UTC today: 21:00 in Tokyo and early morning in New York (quiet hours for sms), the
# afternoon in Paris and in the shop's zone (UTC).
NOON = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


def policy(
    person: str,
    *granted: common_pb2.Channel.ValueType,
    version: int = 0,
    time_zone: str = "",
    unsubscribed: bool = False,
    suppressed: Sequence[common_pb2.Channel.ValueType] = (),
    denied: Sequence[common_pb2.Channel.ValueType] = (),
    shop_id: str = "",
) -> gate_pb2.PutContactPolicyRequest:
    return gate_pb2.PutContactPolicyRequest(
        shop_id=shop_id,
        person_id=person,
        consents=[gate_pb2.ChannelConsent(channel=c, granted=True) for c in granted]
        + [gate_pb2.ChannelConsent(channel=c, granted=False) for c in denied],
        global_unsubscribe=unsubscribed,
        time_zone=time_zone,
        suppressions=list(suppressed),
        version=version,
    )


# People of every kind, one of them twice by explicit version (the higher wins, though put
# first) and one twice without a version (the later wins, as with two calls).
POLICIES = [
    policy("paris", EMAIL, SMS, version=10, time_zone="Europe/Paris"),
    policy("tokyo", EMAIL, SMS, PUSH, version=10, time_zone="Asia/Tokyo"),
    policy("new-york", SMS, WHATSAPP, version=10, time_zone="America/New_York"),
    policy("email-only", EMAIL, version=10, denied=[SMS]),
    policy("unsubscribed", EMAIL, SMS, version=10, unsubscribed=True),
    policy("suppressed", EMAIL, SMS, version=10, suppressed=[SMS]),
    policy("nothing", version=10),
    policy("twice", WHATSAPP, version=20, time_zone="Asia/Tokyo"),
    policy("twice", EMAIL, SMS, version=15),
    policy("unversioned", EMAIL),
    policy("unversioned", SMS),
]
PEOPLE = list(dict.fromkeys(p.person_id for p in POLICIES))


@pytest.fixture(params=["redis", "embedded"])
def store(request: pytest.FixtureRequest) -> str:
    """The gate's stores: PostgreSQL and Redis, or its embedded defaults (SQLite and the
    in-process counters)."""
    return str(request.param)


@pytest.fixture
async def gate(start_service: StartService, store: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A Gate stub to the gate on `store`, its clock at NOON."""
    overrides: dict[str, Any] = (
        {"database_url": f"sqlite+aiosqlite:///{tmp_path}/gate.db", "redis_url": None}
        if store == "embedded"
        else {}
    )
    server: Server = await start_service("gate", clock=Clock(NOON), **overrides)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield gate_pb2_grpc.GateStub(channel)
    await channel.close(None)


def fresh_shop() -> str:
    """A shop of the test's own: Redis outlives test runs."""
    return f"shop-{secrets.token_hex(4)}"


async def put_batch(
    gate: Any, shop: str, policies: Sequence[gate_pb2.PutContactPolicyRequest]
) -> None:
    await gate.PutContactPolicies(
        gate_pb2.PutContactPoliciesRequest(shop_id=shop, policies=policies), metadata=ADMIN
    )


async def put_each(
    gate: Any, shop: str, policies: Sequence[gate_pb2.PutContactPolicyRequest]
) -> None:
    for item in policies:
        single = gate_pb2.PutContactPolicyRequest()
        single.CopyFrom(item)
        single.shop_id = shop
        await gate.PutContactPolicy(single, metadata=ADMIN)


async def answers(gate: Any, shop: str, person: str) -> dict[str, tuple[bool, str, bool, int]]:
    """A dry-run check on every channel: (allowed, reason, retryable, next eligible second)."""
    found = {}
    for channel in CHANNELS:
        answer = await gate.Check(
            gate_pb2.CheckRequest(
                shop_id=shop, person_id=person, channel=channel, message_id="m1", dry_run=True
            ),
            metadata=ADMIN,
        )
        found[common_pb2.Channel.Name(channel)] = (
            answer.allowed,
            answer.reason,
            answer.retryable,
            answer.next_eligible_at.seconds,
        )
    return found


def reasons(found: dict[str, tuple[bool, str, bool, int]]) -> dict[str, str]:
    return {channel: reason for channel, (_, reason, _, _) in found.items()}


async def test_a_batch_is_the_same_as_one_call_per_policy(gate: Any) -> None:
    batched, single = fresh_shop(), fresh_shop()
    await put_batch(gate, batched, POLICIES)
    await put_each(gate, single, POLICIES)

    for person in PEOPLE:
        assert await answers(gate, batched, person) == await answers(gate, single, person), person
    expected = {
        "paris": ["", "", "no_consent:whatsapp", "no_consent:push"],
        "tokyo": ["", "quiet_hours", "no_consent:whatsapp", "quiet_hours"],
        "new-york": ["no_consent:email", "quiet_hours", "quiet_hours", "no_consent:push"],
        "email-only": ["", "no_consent:sms", "no_consent:whatsapp", "no_consent:push"],
        "unsubscribed": ["global_unsubscribe"] * 4,
        "suppressed": ["", "suppressed:sms", "no_consent:whatsapp", "no_consent:push"],
        "nothing": ["no_consent:email", "no_consent:sms", "no_consent:whatsapp", "no_consent:push"],
        "twice": ["no_consent:email", "no_consent:sms", "quiet_hours", "no_consent:push"],
        "unversioned": ["no_consent:email", "", "no_consent:whatsapp", "no_consent:push"],
    }
    for person, channel_reasons in expected.items():
        found = reasons(await answers(gate, batched, person))
        assert list(found.values()) == channel_reasons, person
    # Quiet hours in Tokyo end at 09:00 there: 00:00 UTC tomorrow.
    tokyo = await answers(gate, batched, "tokyo")
    assert tokyo["CHANNEL_SMS"][2:] == (True, int(NOON.timestamp()) + 12 * 3600)


@pytest.mark.parametrize("store", ["redis"])
async def test_a_batch_stores_the_same_rows_and_keys(
    gate: Any, store: str, settings_for: Any, backing: Backing
) -> None:
    batched, single = fresh_shop(), fresh_shop()
    explicit = [p for p in POLICIES if p.version]
    await put_batch(gate, batched, explicit)
    await put_each(gate, single, explicit)

    query = (
        "SELECT person_id, granted::text, global_unsubscribe, time_zone, suppressed::text, version"
        " FROM contact_policy WHERE shop_id = $1 ORDER BY person_id"
    )
    settings = settings_for("gate")
    stored = [tuple(row) for row in await sql(settings, query, batched)]
    assert stored == [tuple(row) for row in await sql(settings, query, single)]
    assert ("twice", '["whatsapp"]', False, "Asia/Tokyo", "[]", 20) in stored
    assert ("suppressed", '["email", "sms"]', False, "", '["sms"]', 10) in stored

    client = redis.from_url(backing.redis_url)
    try:
        for person in {p.person_id for p in explicit}:
            policy_key = {shop: CustomerKeys.of(shop, person).policy for shop in (batched, single)}
            assert await client.hgetall(policy_key[batched]) == await client.hgetall(
                policy_key[single]
            )
            assert await client.pttl(policy_key[batched]) > 0
    finally:
        await client.aclose()


async def test_an_older_version_in_a_batch_does_not_replace_a_newer_one(
    gate: Any, store: str, backing: Backing
) -> None:
    shop = fresh_shop()
    await put_each(gate, shop, [policy("p1", EMAIL, version=100)])
    await put_batch(
        gate,
        shop,
        [
            policy("p1", SMS, version=50, unsubscribed=True),
            policy("p2", SMS, version=50),
            policy("p1", PUSH, version=100),  # the same version: no change either
        ],
    )
    assert reasons(await answers(gate, shop, "p1")) == {
        "CHANNEL_EMAIL": "",
        "CHANNEL_SMS": "no_consent:sms",
        "CHANNEL_WHATSAPP": "no_consent:whatsapp",
        "CHANNEL_PUSH": "no_consent:push",
    }
    assert reasons(await answers(gate, shop, "p2"))["CHANNEL_SMS"] == ""

    if store == "redis":
        # Redis loses p1: the rebuild from PostgreSQL finds the newer policy there too.
        client = redis.from_url(backing.redis_url)
        try:
            await client.delete(*CustomerKeys.of(shop, "p1").all())
        finally:
            await client.aclose()
        assert reasons(await answers(gate, shop, "p1"))["CHANNEL_EMAIL"] == ""
        assert reasons(await answers(gate, shop, "p1"))["CHANNEL_SMS"] == "no_consent:sms"

    # A newer version in a batch replaces it.
    await put_batch(gate, shop, [policy("p1", SMS, version=101)])
    assert reasons(await answers(gate, shop, "p1"))["CHANNEL_EMAIL"] == "no_consent:email"
    assert reasons(await answers(gate, shop, "p1"))["CHANNEL_SMS"] == ""


async def test_an_invalid_item_fails_the_whole_batch_and_nothing_is_written(gate: Any) -> None:
    shop = fresh_shop()
    await put_each(gate, shop, [policy("p1", EMAIL, version=100)])
    bad = [
        policy("p1", SMS, version=200),
        policy("p2", EMAIL),
        gate_pb2.PutContactPolicyRequest(
            person_id="p3",
            consents=[
                gate_pb2.ChannelConsent(
                    channel=cast(common_pb2.Channel.ValueType, 99), granted=True
                )
            ],
        ),
        policy("p4", EMAIL, time_zone="Mars/Olympus_Mons"),
        policy("p5", EMAIL, shop_id="another-shop"),
        policy("{p6}", EMAIL, version=-1),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await put_batch(gate, shop, bad)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad_request] = details(failure.value)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        (
            "policies[2].consents[0].channel",
            "must be CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_WHATSAPP or CHANNEL_PUSH",
        ),
        ("policies[3].time_zone", "unknown IANA time zone 'Mars/Olympus_Mons'"),
        ("policies[4].shop_id", "must be empty or the request's shop_id"),
        ("policies[5].person_id", "must be 1-128 letters, digits, '.', '_', ':' or '-'"),
        ("policies[5].version", "must not be negative"),
    ]
    # The old policy holds; no one else got one.
    assert reasons(await answers(gate, shop, "p1"))["CHANNEL_EMAIL"] == ""
    assert reasons(await answers(gate, shop, "p1"))["CHANNEL_SMS"] == "no_consent:sms"
    assert reasons(await answers(gate, shop, "p2"))["CHANNEL_EMAIL"] == "no_consent:email"


async def test_a_batch_holds_1_to_1000_policies(gate: Any) -> None:
    shop = fresh_shop()
    for count in (0, 1001):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await put_batch(gate, shop, [policy(f"p{i}", EMAIL) for i in range(count)])
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in details(failure.value)[0].field_violations] == ["policies"]
    await put_batch(gate, shop, [policy(f"p{i}", EMAIL, version=i + 1) for i in range(1000)])
    for person in ("p0", "p999"):
        assert reasons(await answers(gate, shop, person))["CHANNEL_EMAIL"] == ""


async def test_a_batch_needs_the_write_role_and_stays_in_its_shop(gate: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.PutContactPolicies(
            gate_pb2.PutContactPoliciesRequest(shop_id="shop-a", policies=[policy("p1", EMAIL)]),
            metadata=bearer(READER_TOKEN),
        )
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A token of shop-a cannot reach shop-b through an item.
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.PutContactPolicies(
            gate_pb2.PutContactPoliciesRequest(
                shop_id="shop-a", policies=[policy("p1", EMAIL, shop_id="shop-b")]
            ),
            metadata=bearer(SHOP_A_TOKEN),
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(failure.value)[0].field_violations] == ["policies[0].shop_id"]
