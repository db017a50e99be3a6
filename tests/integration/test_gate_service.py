"""The gate service over a real channel, on real Redis and PostgreSQL: validation, the exact key
layout, concurrency, and Redis failing in each way it can."""

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import redis.asyncio as redis

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.gate.__main__ import redis_client
from services.gate.counters import ContactPolicy, Counters, CountersUnavailable, CustomerKeys
from services.gate.settings import GateSettings
from services.runtime.server import Server
from tests.backing import Backing
from tests.conftest import ADMIN_TOKEN, StartService
from tests.faults import ReadOnlyRedis, TcpProxy
from tests.polling import eventually
from tests.rpc import bearer, details

EMAIL: common_pb2.Channel.ValueType = common_pb2.CHANNEL_EMAIL
SMS: common_pb2.Channel.ValueType = common_pb2.CHANNEL_SMS


def on_db(url: str, index: int) -> str:
    """The same Redis, another logical database (so a test may flush it)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{index}"))


@pytest.fixture
async def redis_proxy(backing: Backing) -> AsyncIterator[TcpProxy]:
    """The real Redis behind a proxy the test can cut or stall."""
    proxy = await TcpProxy.before(backing.redis_url)
    yield proxy
    proxy.resume()
    await proxy.cut()


@pytest.fixture
def shop() -> str:
    """A shop of the test's own: Redis outlives test runs, so no two tests share a customer."""
    return f"shop-{secrets.token_hex(4)}"


@pytest.fixture
async def redis_db(backing: Backing) -> AsyncIterator[redis.Redis]:
    """A logical Redis database of its own, empty before and after the test."""
    client = redis.from_url(on_db(backing.redis_url, 9))
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def gate_stub(server: Server) -> Any:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return gate_pb2_grpc.GateStub(channel)


async def consent(
    gate: Any,
    shop: str,
    person: str,
    *channels: common_pb2.Channel.ValueType,
    time_zone: str = "",
    version: int = 0,
) -> None:
    await gate.PutContactPolicy(
        gate_pb2.PutContactPolicyRequest(
            shop_id=shop,
            person_id=person,
            consents=[gate_pb2.ChannelConsent(channel=c, granted=True) for c in channels],
            time_zone=time_zone,
            version=version,
        ),
        metadata=bearer(ADMIN_TOKEN),
    )


def check(
    shop: str, person: str, message: str, channel: common_pb2.Channel.ValueType = EMAIL
) -> gate_pb2.CheckRequest:
    return gate_pb2.CheckRequest(
        shop_id=shop, person_id=person, channel=channel, message_id=message
    )


async def test_bad_input_gets_every_field_violation(start_service: StartService, shop: str) -> None:
    gate = await gate_stub(await start_service("gate"))
    request = gate_pb2.CheckRequest(shop_id=shop, person_id="{p1}", message_id="")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.Check(request, metadata=bearer(ADMIN_TOKEN))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad_request] = details(failure.value)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("person_id", "must be 1-128 letters, digits, '.', '_', ':' or '-'"),
        ("channel", "must be CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_WHATSAPP or CHANNEL_PUSH"),
        ("message_id", "must be 1-256 printable characters"),
    ]


async def test_bad_policies_are_rejected_and_nothing_is_stored(
    start_service: StartService,
    shop: str,
) -> None:
    gate = await gate_stub(await start_service("gate"))
    bad_person = gate_pb2.PutContactPolicyRequest(
        shop_id=shop,
        person_id="p1",
        time_zone="Mars/Olympus_Mons",
        consents=[gate_pb2.ChannelConsent(channel=SMS, granted=True)],
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.PutContactPolicy(bad_person, metadata=bearer(ADMIN_TOKEN))
    assert details(failure.value)[0].field_violations[0].field == "time_zone"
    answer = await gate.Check(check(shop, "p1", "m1", SMS), metadata=bearer(ADMIN_TOKEN))
    assert answer.reason == "no_consent:sms"

    bad_shop = gate_pb2.PutShopPolicyRequest(
        shop_id=shop,
        fatigue_threshold="1.50",
        global_daily_cap=-1,
        quiet_hours=gate_pb2.QuietHours(start_minute=1440, end_minute=540),
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.PutShopPolicy(bad_shop, metadata=bearer(ADMIN_TOKEN))
    assert [v.field for v in details(failure.value)[0].field_violations] == [
        "global_daily_cap",
        "fatigue_threshold",
        "quiet_hours.start_minute",
    ]


async def test_the_redis_key_layout_is_exactly_this(
    start_service: StartService, backing: Backing, redis_db: redis.Redis
) -> None:
    gate = await gate_stub(await start_service("gate", redis_url=on_db(backing.redis_url, 9)))
    await consent(gate, "shop-a", "p1", EMAIL, SMS, time_zone="Europe/Paris", version=7)
    await gate.Check(check("shop-a", "p1", "m1"), metadata=bearer(ADMIN_TOKEN))
    tag = b"c360:gate:{shop-a:p1}"
    assert sorted(await redis_db.keys("*")) == [
        tag + b":channels",
        tag + b":log",
        tag + b":policy",
        tag + b":sent",
    ]
    assert await redis_db.hgetall(tag + b":policy") == {
        b"v": b"1",
        b"tz": b"Europe/Paris",
        b"consent": b",email,sms,",
        b"unsub": b"0",
        b"suppressed": b",,",
        b"ver": b"7",
    }
    sent: Any = await redis_db.zrange(tag + b":sent", 0, -1, withscores=True)
    assert [member for member, _ in sent] == [b"m1"]
    log: Any = await redis_db.xrange(tag + b":log")
    [(entry_id, entry)] = log
    assert await redis_db.hgetall(tag + b":channels") == {b"m1": b"email " + entry_id}
    assert sorted(entry) == [b"a", b"c", b"k", b"m", b"r", b"t"]
    assert (entry[b"m"], entry[b"c"], entry[b"k"], entry[b"a"], entry[b"r"]) == (
        b"m1",
        b"email",
        b"m",
        b"1",
        b"",
    )
    for key in (b":policy", b":sent", b":channels"):
        assert 7 * 24 * 3600 * 1000 < await redis_db.pttl(tag + key) <= 8 * 24 * 3600 * 1000
    assert 0 < await redis_db.pttl(tag + b":log") <= 60_000


async def test_two_hundred_concurrent_checks_over_grpc_allow_exactly_three(
    start_service: StartService,
    shop: str,
) -> None:
    gate = await gate_stub(await start_service("gate"))
    await consent(gate, shop, "p1", EMAIL)
    answers = await asyncio.gather(
        *(gate.Check(check(shop, "p1", f"m{i}"), metadata=bearer(ADMIN_TOKEN)) for i in range(200))
    )
    assert Counter((a.allowed, a.reason) for a in answers) == {
        (True, ""): 3,
        (False, "global_cap_reached:3/3"): 197,
    }


async def test_redis_cut_mid_run_answers_gate_unavailable(
    start_service: StartService, backing: Backing, shop: str, redis_proxy: TcpProxy
) -> None:
    gate = await gate_stub(
        await start_service("gate", redis_url=redis_proxy.url_through(backing.redis_url))
    )
    await consent(gate, shop, "p1", EMAIL)
    assert (await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN))).allowed
    await redis_proxy.cut()
    answer = await gate.Check(check(shop, "p1", "m2"), metadata=bearer(ADMIN_TOKEN))
    assert (answer.allowed, answer.reason, answer.retryable) == (False, "gate_unavailable", True)
    await redis_proxy.start()
    answer = await eventually(
        lambda: gate.Check(check(shop, "p1", "m3"), metadata=bearer(ADMIN_TOKEN)),
        lambda answer: answer.reason != "gate_unavailable",
        "a decision once Redis is back",
    )
    assert (answer.allowed, answer.counts.today_total) == (True, 1)


async def test_a_redis_that_stops_answering_is_gate_unavailable_not_a_hang(
    start_service: StartService, backing: Backing, shop: str, redis_proxy: TcpProxy
) -> None:
    # Socket timeouts of five seconds: only the gate's own 50 ms budget (its default) can answer
    # within the caller's one-second deadline.
    gate = await gate_stub(
        await start_service(
            "gate",
            redis_url=redis_proxy.url_through(backing.redis_url),
            dependency_timeout_seconds=5.0,
            redis_timeout_ms=50,
        )
    )
    await consent(gate, shop, "p1", EMAIL)
    redis_proxy.stall()
    answer = await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN), timeout=1.0)
    assert (answer.allowed, answer.reason, answer.retryable) == (False, "gate_unavailable", True)
    batch = await gate.CheckBatch(
        gate_pb2.CheckBatchRequest(
            shop_id=shop,
            channel=EMAIL,
            items=[gate_pb2.BatchItem(person_id="p1", message_id="b1")],
        ),
        metadata=bearer(ADMIN_TOKEN),
        timeout=1.0,
    )
    assert [r.reason for r in batch.results] == ["gate_unavailable"]
    redis_proxy.resume()


async def test_redis_flushed_counts_are_rebuilt_from_the_log_and_caps_hold(
    start_service: StartService, backing: Backing, redis_db: redis.Redis, shop: str
) -> None:
    gate = await gate_stub(await start_service("gate", redis_url=on_db(backing.redis_url, 9)))
    await consent(gate, shop, "p1", EMAIL)
    for i in range(3):
        assert (await gate.Check(check(shop, "p1", f"m{i}"), metadata=bearer(ADMIN_TOKEN))).allowed
    await redis_db.flushdb()
    answer = await gate.Check(check(shop, "p1", "m3"), metadata=bearer(ADMIN_TOKEN))
    assert (answer.allowed, answer.reason) == (False, "global_cap_reached:3/3")
    assert dict(answer.counts.today_by_channel) == {"email": 3}


async def test_contact_history_has_counts_last_contact_and_the_log(
    start_service: StartService,
    shop: str,
) -> None:
    gate = await gate_stub(await start_service("gate"))
    await consent(gate, shop, "p1", EMAIL)
    await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN))
    await gate.Check(check(shop, "p1", "m2", SMS), metadata=bearer(ADMIN_TOKEN))
    history = await gate.GetContactHistory(
        gate_pb2.GetContactHistoryRequest(shop_id=shop, person_id="p1", include_log=True),
        metadata=bearer(ADMIN_TOKEN),
    )
    assert (history.counts.today_total, history.counts.fatigue) == (1, "0.10")
    assert [c.channel for c in history.last_contact] == [EMAIL]
    assert [(e.message_id, e.allowed, e.reason) for e in history.log] == [
        ("m2", False, "no_consent:sms"),
        ("m1", True, ""),
    ]


async def test_a_shop_policy_applies_to_the_next_check(
    start_service: StartService, shop: str
) -> None:
    gate = await gate_stub(await start_service("gate"))
    await gate.PutShopPolicy(
        gate_pb2.PutShopPolicyRequest(
            shop_id=shop,
            global_daily_cap=1,
            channel_caps=[gate_pb2.ChannelCap(channel=EMAIL, daily_cap=1)],
        ),
        metadata=bearer(ADMIN_TOKEN),
    )
    await consent(gate, shop, "p1", EMAIL)
    assert (await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN))).allowed
    before = datetime.now(UTC)
    answer = await gate.Check(check(shop, "p1", "m2"), metadata=bearer(ADMIN_TOKEN))
    after = datetime.now(UTC)
    assert answer.reason == "global_cap_reached:1/1"
    midnights = {
        datetime.combine(t.date() + timedelta(days=1), time.min, UTC) for t in (before, after)
    }
    assert answer.next_eligible_at.ToDatetime(tzinfo=UTC) in midnights


async def test_redis_answering_errors_is_gate_unavailable(
    start_service: StartService, shop: str
) -> None:
    replica = ReadOnlyRedis()
    await replica.start()
    try:
        server = await start_service("gate", redis_url=f"redis://127.0.0.1:{replica.port}/0")
        gate = await gate_stub(server)
        answer = await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN))
        assert (answer.allowed, answer.reason, answer.retryable) == (
            False,
            "gate_unavailable",
            True,
        )
    finally:
        await replica.stop()


async def test_a_decision_redis_made_after_the_gate_gave_up_still_reaches_the_log(
    start_service: StartService, backing: Backing, shop: str, redis_proxy: TcpProxy
) -> None:
    gate = await gate_stub(
        await start_service(
            "gate", redis_url=redis_proxy.url_through(backing.redis_url), redis_timeout_ms=50
        )
    )
    await consent(gate, shop, "p1", EMAIL)
    assert (await gate.Check(check(shop, "p1", "m0"), metadata=bearer(ADMIN_TOKEN))).allowed
    redis_proxy.stall()
    late = await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN))
    assert late.reason == "gate_unavailable"
    redis_proxy.resume()
    history_request = gate_pb2.GetContactHistoryRequest(
        shop_id=shop, person_id="p1", include_log=True
    )

    async def logged() -> list[tuple[str, bool, str]]:
        try:
            history = await gate.GetContactHistory(history_request, metadata=bearer(ADMIN_TOKEN))
        except grpc.aio.AioRpcError:
            return []
        return sorted((e.message_id, e.allowed, e.reason) for e in history.log)

    # Both are logged: the answer the caller got, and what Redis decided after the gate gave up.
    expected = [("m0", True, ""), ("m1", False, "gate_unavailable"), ("m1", True, "")]
    assert await eventually(logged, lambda log: log == expected, "the late decision logged") == (
        expected
    )
    again = await gate.Check(check(shop, "p1", "m1"), metadata=bearer(ADMIN_TOKEN))
    assert (again.allowed, again.replayed, again.counts.today_total) == (True, True, 2)


async def test_every_enum_and_duplicate_is_validated(
    start_service: StartService, shop: str
) -> None:
    gate = await gate_stub(await start_service("gate"))
    policy = gate_pb2.PutContactPolicyRequest(
        shop_id=shop,
        person_id="p1",
        consents=[
            gate_pb2.ChannelConsent(channel=common_pb2.CHANNEL_UNSPECIFIED, granted=False),
            gate_pb2.ChannelConsent(channel=SMS, granted=True),
            gate_pb2.ChannelConsent(channel=SMS, granted=False),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.PutContactPolicy(policy, metadata=bearer(ADMIN_TOKEN))
    assert [v.field for v in details(failure.value)[0].field_violations] == [
        "consents[0].channel",
        "consents[2]",
    ]
    shop_policy = gate_pb2.PutShopPolicyRequest(
        shop_id=shop,
        channel_caps=[
            gate_pb2.ChannelCap(channel=SMS, daily_cap=1),
            gate_pb2.ChannelCap(channel=SMS, daily_cap=2),
        ],
        fail_mode=9,  # type: ignore[arg-type]
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.PutShopPolicy(shop_policy, metadata=bearer(ADMIN_TOKEN))
    assert [v.field for v in details(failure.value)[0].field_violations] == [
        "channel_caps[1].channel",
        "fail_mode",
    ]
    request = check(shop, "p1", "m1")
    request.message_class = 7  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.Check(request, metadata=bearer(ADMIN_TOKEN))
    assert [v.field for v in details(failure.value)[0].field_violations] == ["message_class"]


async def test_redis_calls_cut_short_by_the_timeout_give_their_connections_back(
    redis_proxy: TcpProxy, backing: Backing, shop: str
) -> None:
    # One connection: a round trip abandoned mid-way that kept it would leave the gate without.
    settings = GateSettings(
        redis_url=on_db(redis_proxy.url_through(backing.redis_url), 9),
        redis_max_connections=1,
        database_url=backing.database_url,
    )
    client = redis_client(settings)
    counters = Counters(client, timeout=0.05)
    keys = [CustomerKeys.of(shop, f"p{n}") for n in range(3)]
    await client.ping()  # the connection is made
    redis_proxy.stall()
    for _ in range(4):
        with pytest.raises(CountersUnavailable):
            await counters.rebuild_many(
                [(k, ContactPolicy(frozenset({"email"})), []) for k in keys]
            )
        with pytest.raises(CountersUnavailable):
            await counters.put_policy(keys[0], ContactPolicy(frozenset({"email"})))
    redis_proxy.resume()
    await counters.rebuild_many([(k, ContactPolicy(frozenset({"email"})), []) for k in keys])
    await counters.ping()
    await client.aclose()
