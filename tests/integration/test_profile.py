"""The profile service with the real identity service and gate beside it, over real channels,
on real PostgreSQL and Redis: ingestion is idempotent, the profile is the whole group's, merges
and unmerges regroup facts exactly, and consent reaches the gate."""

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.runtime.server import Server
from tests.backing import free_port
from tests.conftest import ADMIN_TOKEN, StartService
from tests.polling import eventually
from tests.rpc import bearer, details

AUTH = bearer(ADMIN_TOKEN)
JAN = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
ONLINE, POS = profile_pb2.ORDER_SOURCE_ONLINE, profile_pb2.ORDER_SOURCE_POS


def stamp(at: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(at)
    return value


def ids(*pairs: tuple[str, str]) -> list[common_pb2.Identifier]:
    return [common_pb2.Identifier(type=t, value=v) for t, v in pairs]


@dataclass
class Mesh:
    """Profile, identity and gate running in process, and a shop of the test's own."""

    profile: Any
    identity: Any
    gate: Any
    shop: str

    async def order(
        self, order_id: str, total: str, *identifiers: tuple[str, str], **kw: Any
    ) -> Any:
        kw.setdefault("placed_at", stamp(JAN))
        kw.setdefault("currency", "EUR")
        kw.setdefault("source", ONLINE)
        return await self.profile.IngestOrder(
            profile_pb2.IngestOrderRequest(
                shop_id=self.shop, order_id=order_id, total=total, identifiers=ids(*identifiers),
                **kw,
            ),
            metadata=AUTH,
        )  # fmt: skip

    async def get(self, person_id: str = "", **identifier: str) -> Any:
        ref = common_pb2.PersonRef(person_id=person_id)
        if identifier:
            ref = common_pb2.PersonRef(identifier=common_pb2.Identifier(**identifier))
        return await self.profile.Get(
            profile_pb2.GetRequest(shop_id=self.shop, person=ref), metadata=AUTH
        )


@pytest.fixture
async def mesh(start_service: StartService) -> AsyncIterator[Mesh]:
    identity: Server = await start_service("identity")
    gate: Server = await start_service("gate")
    profile: Server = await start_service(
        "profile",
        identity_addr=f"127.0.0.1:{identity.port}",
        gate_addr=f"127.0.0.1:{gate.port}",
        service_token=ADMIN_TOKEN,
        gate_push_interval_seconds=0.05,
        identity_follow_interval_seconds=0.05,
    )
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in (profile, identity, gate)]
    yield Mesh(
        profile_pb2_grpc.ProfileStub(channels[0]),
        identity_pb2_grpc.IdentityStub(channels[1]),
        gate_pb2_grpc.GateStub(channels[2]),
        f"shop-{secrets.token_hex(4)}",
    )
    for channel in channels:
        await channel.close(None)


def totals(profile: Any) -> tuple[int, str, str, str]:
    p = profile.purchases
    return p.order_count, p.lifetime_spend, p.average_order_value, p.refunded


async def test_orders_of_one_shopper_make_one_profile_with_exact_totals(mesh: Mesh) -> None:
    first = await mesh.order(
        "820982911946154508", "100.00", ("shopify_customer_id", "115310627314723954"),
        ("email", "Ana@Mail.example"), placed_at=stamp(JAN),
    )  # fmt: skip
    await mesh.order(
        "820982911946154509", "49.95", ("email", "ana@mail.example"), ("phone", "+33612345678"),
        placed_at=stamp(JAN + timedelta(days=3)), source=POS, location="Lyon",
    )  # fmt: skip
    await mesh.order(
        "820982911946154510", "20.05", ("phone", "+33 6 12 34 56 78"),
        placed_at=stamp(JAN + timedelta(days=9)), source=POS, location="Lyon",
    )  # fmt: skip
    profile = await mesh.get(type="email", value="ANA@mail.example")
    assert profile.person_id == first.person_id
    assert totals(profile) == (3, "170.00", "56.67", "0.00")
    p = profile.purchases
    assert (p.currency, p.online_orders, p.pos_orders, p.marketplace_orders) == ("EUR", 1, 2, 0)
    assert (p.acquisition_channel, p.preferred_location) == ("online", "Lyon")
    assert p.first_order_at.ToDatetime(tzinfo=UTC) == JAN
    assert p.last_order_at.ToDatetime(tzinfo=UTC) == JAN + timedelta(days=9)
    assert (list(profile.emails), list(profile.phones), profile.shopify_customer_id) == (
        ["ana@mail.example"],
        ["+33612345678"],
        "115310627314723954",
    )


async def test_an_order_delivered_three_times_counts_once_and_versions_supersede(
    mesh: Mesh,
) -> None:
    answers = [
        await mesh.order("9001", "80.00", ("email", "bo@mail.example"), updated_at=stamp(JAN))
        for _ in range(3)
    ]
    assert [a.applied for a in answers] == [True, False, False]
    updated = await mesh.order(
        "9001", "60.00", ("email", "bo@mail.example"), updated_at=stamp(JAN + timedelta(hours=1))
    )
    stale = await mesh.order(
        "9001", "99.00", ("email", "bo@mail.example"), updated_at=stamp(JAN + timedelta(minutes=5))
    )
    assert (updated.applied, stale.applied) == (True, False)
    assert totals(await mesh.get(answers[0].person_id)) == (1, "60.00", "60.00", "0.00")


async def test_refunds_are_netted_even_when_they_arrive_first(mesh: Mesh) -> None:
    refund = profile_pb2.IngestRefundRequest(
        shop_id=mesh.shop, refund_id="r1", order_id="7001", amount="25.50",
        refunded_at=stamp(JAN + timedelta(days=1)),
    )  # fmt: skip
    early = await mesh.profile.IngestRefund(refund, metadata=AUTH)
    assert (early.person_id, early.applied) == ("", True)
    order = await mesh.order("7001", "100.00", ("email", "cy@mail.example"))
    again = await mesh.profile.IngestRefund(refund, metadata=AUTH)
    assert (again.person_id, again.applied) == (order.person_id, False)
    assert totals(await mesh.get(order.person_id)) == (1, "74.50", "74.50", "25.50")


async def test_merge_and_unmerge_regroup_facts_exactly(mesh: Mesh) -> None:
    a = await mesh.order("1", "30.00", ("email", "dee@one.example"))
    b = await mesh.order("2", "12.00", ("email", "dee@two.example"))
    await mesh.order("3", "8.00", ("email", "dee@two.example"), ("cookie", "ck-2"))
    before_a, before_b = totals(await mesh.get(a.person_id)), totals(await mesh.get(b.person_id))
    assert (before_a, before_b) == ((1, "30.00", "30.00", "0.00"), (2, "20.00", "10.00", "0.00"))
    merged = await mesh.identity.Merge(
        identity_pb2.MergeRequest(shop_id=mesh.shop, person_a_id=a.person_id,
                                  person_b_id=b.person_id),
        metadata=AUTH,
    )  # fmt: skip
    assert totals(await mesh.get(b.person_id)) == (3, "50.00", "16.67", "0.00")
    # A fact arriving while merged keeps its identifier, and follows it at unmerge.
    await mesh.order("4", "5.00", ("cookie", "ck-2"))
    await mesh.identity.Unmerge(
        identity_pb2.UnmergeRequest(shop_id=mesh.shop, merge_id=merged.merge.merge_id),
        metadata=AUTH,
    )
    assert totals(await mesh.get(a.person_id)) == before_a
    assert totals(await mesh.get(b.person_id)) == (3, "25.00", "8.33", "0.00")


async def test_engagement_is_counted_by_channel_and_kind(mesh: Mesh) -> None:
    person = await mesh.order("11", "10.00", ("email", "eve@mail.example"))
    events = [
        ("e1", profile_pb2.EVENT_KIND_OPEN, common_pb2.CHANNEL_EMAIL, 1),
        ("e2", profile_pb2.EVENT_KIND_CLICK, common_pb2.CHANNEL_EMAIL, 2),
        ("e3", profile_pb2.EVENT_KIND_OPEN, common_pb2.CHANNEL_EMAIL, 3),
        ("e3", profile_pb2.EVENT_KIND_OPEN, common_pb2.CHANNEL_EMAIL, 3),  # a retry
        ("e4", profile_pb2.EVENT_KIND_REPLY, common_pb2.CHANNEL_WHATSAPP, 4),
        ("e5", profile_pb2.EVENT_KIND_VISIT, common_pb2.CHANNEL_UNSPECIFIED, 5),
    ]
    eve = ids(("email", "eve@mail.example"))
    for event_id, kind, channel, day in events:
        await mesh.profile.IngestEvent(
            profile_pb2.IngestEventRequest(
                shop_id=mesh.shop, event_id=event_id, identifiers=eve, kind=kind,
                channel=channel, at=stamp(JAN + timedelta(days=day)),
            ),
            metadata=AUTH,
        )  # fmt: skip
    engagement = (await mesh.get(person.person_id)).engagement
    counts = {(c.channel, c.kind): c.count for c in engagement.counts}
    assert counts == {
        (common_pb2.CHANNEL_EMAIL, profile_pb2.EVENT_KIND_OPEN): 2,
        (common_pb2.CHANNEL_EMAIL, profile_pb2.EVENT_KIND_CLICK): 1,
        (common_pb2.CHANNEL_WHATSAPP, profile_pb2.EVENT_KIND_REPLY): 1,
        (common_pb2.CHANNEL_UNSPECIFIED, profile_pb2.EVENT_KIND_VISIT): 1,
    }
    assert engagement.visits == 1
    assert engagement.last_engaged_at.ToDatetime(tzinfo=UTC) == JAN + timedelta(days=5)


async def test_consent_keeps_its_exact_text_and_reaches_the_gate(mesh: Mesh) -> None:
    person = await mesh.order("21", "10.00", ("email", "fay@mail.example"))
    text = "Yes, send me offers by SMS (max 4/month). Reply STOP to opt out."
    for channel in (common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_EMAIL):
        await mesh.profile.SetConsent(
            profile_pb2.SetConsentRequest(
                shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=person.person_id),
                channel=channel, granted=True, consent_text=text, source="checkout",
                at=stamp(JAN),
            ),
            metadata=AUTH,
        )  # fmt: skip
    profile = await mesh.get(person.person_id)
    assert [(c.channel, c.granted, c.consent_text, c.source) for c in profile.consents] == [
        (common_pb2.CHANNEL_EMAIL, True, text, "checkout"),
        (common_pb2.CHANNEL_SMS, True, text, "checkout"),
    ]

    async def sms_check() -> str:
        answer = await mesh.gate.Check(
            gate_pb2.CheckRequest(shop_id=mesh.shop, person_id=person.person_id,
                                  channel=common_pb2.CHANNEL_SMS, message_id=secrets.token_hex(4),
                                  dry_run=True),
            metadata=AUTH,
        )  # fmt: skip
        return str(answer.reason) or "allowed"

    await eventually(sms_check, lambda r: r in ("allowed", "quiet_hours"), "consent at the gate")


async def test_an_uploads_permissions_reach_the_gate_each_persons_own(mesh: Mesh) -> None:
    """Permissions of one upload are pushed to the gate together (their consents read for all
    the persons at once); each person gets exactly their own."""
    wanted = {f"u{n}@mail.example": (n % 2 == 0, n % 3 == 0) for n in range(6)}
    customers = [
        json_format.ParseDict({"email": email, "can_email": e, "can_sms": s}, Struct())
        for email, (e, s) in wanted.items()
    ]
    answer = await mesh.profile.UpsertCustomers(
        profile_pb2.UpsertCustomersRequest(shop_id=mesh.shop, customers=customers), metadata=AUTH
    )
    assert answer.accepted == 6
    persons = {email: (await mesh.get(type="email", value=email)).person_id for email in wanted}

    async def checks() -> dict[str, tuple[bool, bool]]:
        found = {}
        for email, person_id in persons.items():
            allowed = []
            for channel in (common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS):
                answer = await mesh.gate.Check(
                    gate_pb2.CheckRequest(shop_id=mesh.shop, person_id=person_id, channel=channel,
                                          message_id=secrets.token_hex(4), dry_run=True),
                    metadata=AUTH,
                )  # fmt: skip
                allowed.append(answer.reason not in (f"no_consent:{c}" for c in ("email", "sms")))
            found[email] = (allowed[0], allowed[1])
        return found

    await eventually(checks, lambda found: found == wanted, "each person's consents at the gate")


async def test_an_unsubscribe_blocks_the_next_check_on_every_channel(mesh: Mesh) -> None:
    person = await mesh.order("31", "10.00", ("email", "gus@mail.example"))
    await mesh.profile.Unsubscribe(
        profile_pb2.UnsubscribeRequest(
            shop_id=mesh.shop, person=common_pb2.PersonRef(
                identifier=common_pb2.Identifier(type="email", value="GUS@mail.example")),
            source="email_footer", at=stamp(JAN),
        ),
        metadata=AUTH,
    )  # fmt: skip
    assert (await mesh.get(person.person_id)).global_unsubscribe is True
    channels = [
        common_pb2.CHANNEL_EMAIL,
        common_pb2.CHANNEL_SMS,
        common_pb2.CHANNEL_WHATSAPP,
        common_pb2.CHANNEL_PUSH,
    ]

    async def reasons() -> list[str]:
        answers = await asyncio.gather(
            *(
                mesh.gate.Check(
                    gate_pb2.CheckRequest(
                        shop_id=mesh.shop,
                        person_id=person.person_id,
                        channel=c,
                        message_id=secrets.token_hex(4),
                    ),
                    metadata=AUTH,
                )
                for c in channels
            )
        )
        return [a.reason for a in answers]

    await eventually(reasons, lambda r: r == ["global_unsubscribe"] * 4, "unsubscribe", 1.0)


async def test_bad_input_names_every_field_including_the_identifiers(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.profile.IngestOrder(
            profile_pb2.IngestOrderRequest(shop_id=mesh.shop, order_id="", total="12,50",
                                           currency="eur"),
            metadata=AUTH,
        )  # fmt: skip
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in details(raised.value)[0].field_violations]
    assert fields == ["order_id", "placed_at", "total", "currency", "source"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.order("41", "1.00", ("phone", "12"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in details(raised.value)[0].field_violations]
    assert fields == ["identifiers[0].value"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.get(type="email", value="nobody@mail.example")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_gate_pulls_the_policy_of_a_customer_it_was_never_told_about(
    start_service: StartService,
) -> None:
    identity: Server = await start_service("identity")
    # The profile cannot push (its gate address leads nowhere), so the gate must ask.
    profile: Server = await start_service(
        "profile",
        identity_addr=f"127.0.0.1:{identity.port}",
        gate_addr=f"127.0.0.1:{free_port()}",
        service_token=ADMIN_TOKEN,
    )
    gate: Server = await start_service(
        "gate", profile_addr=f"127.0.0.1:{profile.port}", service_token=ADMIN_TOKEN
    )
    shop = f"shop-{secrets.token_hex(4)}"
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{profile.port}") as to_profile,
        grpc.aio.insecure_channel(f"127.0.0.1:{gate.port}") as to_gate,
    ):
        mesh = Mesh(profile_pb2_grpc.ProfileStub(to_profile), None, None, shop)
        person = await mesh.order("51", "10.00", ("email", "hal@mail.example"))
        await mesh.profile.SetConsent(
            profile_pb2.SetConsentRequest(
                shop_id=shop, person=common_pb2.PersonRef(person_id=person.person_id),
                channel=common_pb2.CHANNEL_EMAIL, granted=True, consent_text="Yes please",
                source="checkout", at=stamp(JAN),
            ),
            metadata=AUTH,
        )  # fmt: skip
        gate_stub = gate_pb2_grpc.GateStub(to_gate)

        async def check(channel: common_pb2.Channel.ValueType) -> tuple[bool, str]:
            answer = await gate_stub.Check(
                gate_pb2.CheckRequest(
                    shop_id=shop,
                    person_id=person.person_id,
                    channel=channel,
                    message_id=secrets.token_hex(4),
                    dry_run=True,
                ),
                metadata=AUTH,
            )
            return answer.allowed, answer.reason

        # A change recorded before the pull whose push arrives after it (its transaction
        # committed after the profile's read) still replaces the pulled policy.
        recorded_before_the_pull = int(datetime.now(UTC).timestamp() * 1_000_000)
        checks = [await check(c) for c in (common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS)]
        assert checks == [(True, ""), (False, "no_consent:sms")]
        await gate_stub.PutContactPolicy(
            gate_pb2.PutContactPolicyRequest(
                shop_id=shop, person_id=person.person_id, global_unsubscribe=True,
                version=recorded_before_the_pull,
            ),
            metadata=AUTH,
        )  # fmt: skip
        assert await check(common_pb2.CHANNEL_EMAIL) == (False, "global_unsubscribe")


async def test_a_consent_given_by_identifier_follows_it_at_unmerge(mesh: Mesh) -> None:
    ann = await mesh.order("61", "30.00", ("email", "ann@one.example"))
    bob = await mesh.order("62", "12.00", ("email", "bob@two.example"))
    merged = await mesh.identity.Merge(
        identity_pb2.MergeRequest(shop_id=mesh.shop, person_a_id=ann.person_id,
                                  person_b_id=bob.person_id),
        metadata=AUTH,
    )  # fmt: skip
    await mesh.profile.Unsubscribe(
        profile_pb2.UnsubscribeRequest(
            shop_id=mesh.shop, source="footer", at=stamp(JAN),
            person=common_pb2.PersonRef(
                identifier=common_pb2.Identifier(type="email", value="BOB@two.example")
            ),
        ),
        metadata=AUTH,
    )  # fmt: skip
    assert (await mesh.get(ann.person_id)).global_unsubscribe is True  # one person while merged
    await mesh.identity.Unmerge(
        identity_pb2.UnmergeRequest(shop_id=mesh.shop, merge_id=merged.merge.merge_id),
        metadata=AUTH,
    )
    assert (await mesh.get(bob.person_id)).global_unsubscribe is True
    assert (await mesh.get(ann.person_id)).global_unsubscribe is False


async def test_an_overlong_location_is_invalid_argument(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.order("L1", "1.00", ("email", "loc@mail.example"), location="x" * 300)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(raised.value)[0].field_violations] == ["location"]


async def test_a_merge_in_identity_reaches_the_gate(mesh: Mesh) -> None:
    cat = await mesh.order("71", "30.00", ("email", "cat@one.example"))
    kit = await mesh.order("72", "12.00", ("email", "kit@two.example"))
    await mesh.profile.SetConsent(
        profile_pb2.SetConsentRequest(
            shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=cat.person_id),
            channel=common_pb2.CHANNEL_EMAIL, granted=True, consent_text="yes",
            source="checkout", at=stamp(JAN),
        ),
        metadata=AUTH,
    )  # fmt: skip
    await mesh.profile.Unsubscribe(
        profile_pb2.UnsubscribeRequest(
            shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=kit.person_id),
            source="footer", at=stamp(JAN + timedelta(days=1)),
        ),
        metadata=AUTH,
    )  # fmt: skip

    async def reason(person_id: str) -> str:
        answer = await mesh.gate.Check(
            gate_pb2.CheckRequest(
                shop_id=mesh.shop, person_id=person_id, channel=common_pb2.CHANNEL_EMAIL,
                message_id=secrets.token_hex(4), dry_run=True,
            ),
            metadata=AUTH,
        )  # fmt: skip
        return str(answer.reason) or "allowed"

    await eventually(lambda: reason(cat.person_id), lambda r: r == "allowed", "cat's consent")
    await eventually(lambda: reason(kit.person_id), lambda r: r == "global_unsubscribe", "kit")
    await mesh.identity.Merge(
        identity_pb2.MergeRequest(shop_id=mesh.shop, person_a_id=cat.person_id,
                                  person_b_id=kit.person_id),
        metadata=AUTH,
    )  # fmt: skip
    # One person now, unsubscribed after the consent: blocked under either id.
    for person_id in (cat.person_id, kit.person_id):
        await eventually(
            partial(reason, person_id), lambda r: r == "global_unsubscribe", "the merge"
        )
