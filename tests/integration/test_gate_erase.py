"""Gate.Erase over a real gate server: exact counts (a dry run's equal to the erasure's), nothing of
the person left in PostgreSQL or Redis but the tombstone policy, which blocks every marketing
message to them from then on, whatever policy is pushed later."""

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from pydantic import SecretStr

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.runtime.settings import TokenConfig
from tests.backing import Backing
from tests.conftest import ADMIN_TOKEN, READER_TOKEN, SHOP_A_TOKEN, TOKENS, StartService
from tests.rpc import bearer, details
from tests.sql import sql

EMAIL: common_pb2.Channel.ValueType = common_pb2.CHANNEL_EMAIL
SMS: common_pb2.Channel.ValueType = common_pb2.CHANNEL_SMS
WHATSAPP: common_pb2.Channel.ValueType = common_pb2.CHANNEL_WHATSAPP
ERASED_VERSION = 2**63 - 1
# A data protection officer's token: the gdpr role only, on every shop.
DPO_TOKEN = "tok-dpo"
DPO = bearer(DPO_TOKEN)
ADMIN = bearer(ADMIN_TOKEN)
NOTHING = {"message_log": 0, "message_release": 0, "contact_policy": 0, "redis_keys": 0}


@pytest.fixture
def shop() -> str:
    """A shop of the test's own: Redis outlives test runs, so no two tests share a customer."""
    return f"shop-{secrets.token_hex(4)}"


@pytest.fixture
async def redis_client(backing: Backing) -> AsyncIterator[redis.Redis]:
    """The Redis the gate runs on, to look at its keys."""
    client = redis.from_url(backing.redis_url)
    yield client
    await client.aclose()


async def start_gate(start_service: StartService, **overrides: Any) -> Any:
    """A gate server (and a stub on it) that also accepts the DPO's token."""
    dpo = TokenConfig(name="dpo", token=SecretStr(DPO_TOKEN), shops=["*"], roles=["gdpr"])
    server = await start_service("gate", tokens=[*TOKENS, dpo], **overrides)
    return gate_pb2_grpc.GateStub(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))


class Person:
    """One customer of the test's shop, as the gate's callers see them."""

    def __init__(self, gate: Any, shop: str, person: str) -> None:
        self.gate, self.shop, self.person = gate, shop, person

    async def consent(self, *channels: common_pb2.Channel.ValueType, version: int = 0) -> None:
        await self.gate.PutContactPolicy(
            gate_pb2.PutContactPolicyRequest(
                shop_id=self.shop,
                person_id=self.person,
                consents=[gate_pb2.ChannelConsent(channel=c, granted=True) for c in channels],
                version=version,
            ),
            metadata=ADMIN,
        )

    async def check(
        self,
        message: str,
        channel: common_pb2.Channel.ValueType = EMAIL,
        transactional: bool = False,
    ) -> tuple[bool, str]:
        answer = await self.gate.Check(
            gate_pb2.CheckRequest(
                shop_id=self.shop,
                person_id=self.person,
                channel=channel,
                message_id=message,
                message_class=gate_pb2.MESSAGE_CLASS_TRANSACTIONAL
                if transactional
                else gate_pb2.MESSAGE_CLASS_MARKETING,
            ),
            metadata=ADMIN,
        )
        return answer.allowed, answer.reason

    async def release(self, message: str) -> bool:
        answer = await self.gate.Release(
            gate_pb2.ReleaseRequest(shop_id=self.shop, person_id=self.person, message_id=message),
            metadata=ADMIN,
        )
        return bool(answer.released)

    async def history(self) -> Any:
        return await self.gate.GetContactHistory(
            gate_pb2.GetContactHistoryRequest(
                shop_id=self.shop, person_id=self.person, include_log=True
            ),
            metadata=ADMIN,
        )

    async def erase(
        self, dry_run: bool = False, metadata: tuple[tuple[str, str], ...] = DPO
    ) -> dict[str, int]:
        answer = await self.gate.Erase(
            gate_pb2.EraseRequest(shop_id=self.shop, person_id=self.person, dry_run=dry_run),
            metadata=metadata,
        )
        return dict(answer.removed)


async def keys_of(client: redis.Redis, shop: str, person: str) -> list[bytes]:
    """Every Redis key of one customer: those of their {shop:person} hash tag."""
    return sorted([key async for key in client.scan_iter(match=f"*{{{shop}:{person}}}*")])


async def with_a_history(person: Person) -> None:
    """Two allowed messages (one released), two blocked: 4 log rows, 1 release, a policy and
    all four Redis keys. Quiet hours off in the shop: the run's time of day must not matter."""
    await person.gate.PutShopPolicy(
        gate_pb2.PutShopPolicyRequest(
            shop_id=person.shop, quiet_hours=gate_pb2.QuietHours(start_minute=0, end_minute=0)
        ),
        metadata=ADMIN,
    )
    await person.consent(EMAIL, SMS, version=5)
    assert await person.check("m1", EMAIL) == (True, "")
    assert await person.check("m2", SMS) == (True, "")
    assert await person.check("m3", SMS) == (False, "channel_cap_reached:sms:1/1")
    assert await person.check("m4", WHATSAPP) == (False, "no_consent:whatsapp")
    assert await person.release("m1") is True


async def test_erase_removes_exactly_what_its_dry_run_counted_and_blocks_for_good(
    start_service: StartService,
    settings_for: Callable[..., Any],
    redis_client: redis.Redis,
    shop: str,
) -> None:
    gate = await start_gate(start_service)
    person, neighbour = Person(gate, shop, "p1"), Person(gate, shop, "p2")
    await with_a_history(person)
    await neighbour.consent(EMAIL)
    assert await neighbour.check("n1") == (True, "")
    tag = f"c360:gate:{{{shop}:p1}}".encode()
    assert await keys_of(redis_client, shop, "p1") == [
        tag + b":channels",
        tag + b":log",
        tag + b":policy",
        tag + b":sent",
    ]

    expected = {"message_log": 4, "message_release": 1, "contact_policy": 1, "redis_keys": 4}
    assert await person.erase(dry_run=True) == expected
    assert await person.erase(dry_run=True) == expected  # the dry run changed nothing
    assert len((await person.history()).log) == 4
    assert len(await keys_of(redis_client, shop, "p1")) == 4
    assert await person.erase() == expected

    history = await person.history()
    assert (list(history.log), list(history.last_contact)) == ([], [])
    assert (history.counts.today_total, history.counts.last_7_days) == (0, 0)
    settings = settings_for("gate")
    for table in ("message_log", "message_release"):
        query = f"SELECT count(*) FROM {table} WHERE shop_id = $1 AND person_id = $2"
        assert (await sql(settings, query, shop, "p1"))[0][0] == 0
    [tombstone] = await sql(
        settings,
        "SELECT granted, global_unsubscribe, time_zone, suppressed, version FROM contact_policy"
        " WHERE shop_id = $1 AND person_id = $2",
        shop,
        "p1",
    )
    assert tuple(tombstone) == ("[]", True, "", "[]", ERASED_VERSION)
    # Of the counters, the pending log and the policy, only the tombstone policy is left.
    assert await keys_of(redis_client, shop, "p1") == [tag + b":policy"]
    assert await redis_client.hgetall(tag + b":policy") == {
        b"tz": b"",
        b"consent": b",,",
        b"unsub": b"1",
        b"suppressed": b",,",
        b"ver": str(ERASED_VERSION).encode(),
        b"v": b"1",
    }
    assert 7 * 24 * 3600 * 1000 < await redis_client.pttl(tag + b":policy") <= 8 * 24 * 3600 * 1000

    # Erasing again removes nothing, and the tombstone is not counted as removed.
    assert await person.erase(dry_run=True) == NOTHING
    assert await person.erase() == NOTHING

    # The neighbour keeps everything.
    assert [e.message_id for e in (await neighbour.history()).log] == ["n1"]
    assert len(await keys_of(redis_client, shop, "p2")) == 4

    # Every marketing message is blocked from now on; transactional ones follow the rules for
    # unsubscribed people (only a suppression blocks them).
    assert await person.check("m5", EMAIL) == (False, "global_unsubscribe")
    assert await person.check("receipt", SMS, transactional=True) == (True, "")
    # A later push granting consent, however new, does not reopen it, nor does a rebuild.
    await person.consent(EMAIL, SMS)
    await person.consent(EMAIL, SMS, version=ERASED_VERSION - 1)
    assert await person.check("m6", SMS) == (False, "global_unsubscribe")
    await redis_client.delete(tag + b":policy", tag + b":log")
    assert await person.check("m7", EMAIL) == (False, "global_unsubscribe")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await person.consent(EMAIL, version=ERASED_VERSION)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await person.check("m8", EMAIL) == (False, "global_unsubscribe")

    # Decisions made since are logged like any other; erasing again removes exactly those.
    assert [e.message_id for e in (await person.history()).log] == [
        "m8",
        "m7",
        "m6",
        "receipt",
        "m5",
    ]
    since = {"message_log": 5, "message_release": 0, "contact_policy": 0, "redis_keys": 1}
    assert await person.erase(dry_run=True) == since
    assert await person.erase() == since
    assert await keys_of(redis_client, shop, "p1") == [tag + b":policy"]


async def test_erasing_a_person_the_gate_never_saw_blocks_them_too(
    start_service: StartService, shop: str
) -> None:
    person = Person(await start_gate(start_service), shop, "stranger")
    assert await person.erase(dry_run=True) == NOTHING
    assert await person.erase() == NOTHING
    await person.consent(EMAIL)
    assert await person.check("m1") == (False, "global_unsubscribe")


async def test_the_embedded_store_erases_the_same(
    start_service: StartService, shop: str, tmp_path: Path
) -> None:
    gate = await start_gate(
        start_service, database_url=f"sqlite+aiosqlite:///{tmp_path}/gate.db", redis_url=None
    )
    person = Person(gate, shop, "p1")
    await with_a_history(person)
    expected = {"message_log": 4, "message_release": 1, "contact_policy": 1, "redis_keys": 4}
    assert await person.erase(dry_run=True) == expected
    assert await person.erase() == expected
    assert await person.erase() == NOTHING
    assert list((await person.history()).log) == []
    await person.consent(EMAIL, SMS)
    assert await person.check("m5") == (False, "global_unsubscribe")


@pytest.mark.parametrize("token", [SHOP_A_TOKEN, READER_TOKEN])
async def test_erase_needs_the_gdpr_role(start_service: StartService, token: str) -> None:
    person = Person(await start_gate(start_service), "shop-a", f"p-{secrets.token_hex(4)}")
    await person.consent(EMAIL)
    assert await person.check("m1") == (True, "")
    for dry_run in (True, False):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await person.erase(dry_run=dry_run, metadata=bearer(token))
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [e.message_id for e in (await person.history()).log] == ["m1"]
    assert await person.erase(metadata=ADMIN) == {
        "message_log": 1,
        "message_release": 0,
        "contact_policy": 1,
        "redis_keys": 4,
    }


async def test_bad_ids_get_every_field_violation(start_service: StartService) -> None:
    gate = await start_gate(start_service)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.Erase(gate_pb2.EraseRequest(shop_id="shop:a", person_id="{p1}"), metadata=DPO)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad_request] = details(failure.value)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("shop_id", "must be 1-128 letters, digits, '.', '_' or '-'"),
        ("person_id", "must be 1-128 letters, digits, '.', '_', ':' or '-'"),
    ]
