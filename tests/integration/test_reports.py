"""The read RPCs behind `c360 report`, on real services, PostgreSQL and Redis: a shop's
customers by lifecycle stage, RFM grid and coverage (Profile.GetShopReports, with the token's
shop scope), and its fatigue posture (Gate.GetFatiguePosture)."""

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1 import profile_pb2
from tests.clock import Clock
from tests.conftest import ADMIN_TOKEN, READER_TOKEN, StartService
from tests.integration.test_profile import AUTH, Mesh, ids, mesh, stamp
from tests.polling import eventually
from tests.rpc import bearer, details

__all__ = ["mesh"]  # the fixture, shared with the profile's tests
EMAIL = common_pb2.CHANNEL_EMAIL
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


async def reports(mesh: Mesh, *shops: str, token: str = ADMIN_TOKEN) -> list[Any]:
    answer = await mesh.profile.GetShopReports(
        profile_pb2.GetShopReportsRequest(shops=list(shops)), metadata=bearer(token)
    )
    return list(answer.reports)


async def put_signals(profile: Any, shop_id: str, *scored: tuple[str, str, int, int]) -> None:
    """Enrichment's signals as PutSignals stores them: (person, lifecycle stage, R, F)."""
    await profile.PutSignals(
        profile_pb2.PutSignalsRequest(
            shop_id=shop_id,
            signals=[
                profile_pb2.PersonSignals(
                    person_id=person,
                    predictions=profile_pb2.Predictions(
                        lifecycle_stage=stage, rfm=profile_pb2.Rfm(r=r, f=f, m=3)
                    ),
                )
                for person, stage, r, f in scored
            ],
        ),
        metadata=AUTH,
    )


async def lift_caps(gate: Any, shop_id: str) -> None:
    """A week's worth of campaigns in one day: the daily caps lifted to 20, fatigue still
    blocking at 0.70."""
    await gate.PutShopPolicy(
        gate_pb2.PutShopPolicyRequest(
            shop_id=shop_id, global_daily_cap=20,
            channel_caps=[gate_pb2.ChannelCap(channel=EMAIL, daily_cap=20)],
        ),
        metadata=AUTH,
    )  # fmt: skip


async def order(mesh: Mesh, order_id: str, *identifiers: tuple[str, str]) -> str:
    return str((await mesh.order(order_id, "30.00", *identifiers)).person_id)


async def test_a_shop_report_counts_stages_the_rfm_grid_and_coverage(mesh: Mesh) -> None:
    ana = await order(mesh, "1", ("email", "ana@mail.example"))
    await order(mesh, "2", ("email", "ana@mail.example"))
    bo = await order(mesh, "3", ("email", "bo@mail.example"), ("phone", "+447911123456"))
    visitor = await mesh.profile.IngestEvent(
        profile_pb2.IngestEventRequest(
            shop_id=mesh.shop, event_id="v1", kind=profile_pb2.EVENT_KIND_VISIT,
            identifiers=ids(("phone", "+447911123457")),
            at=stamp(NOON),
        ),
        metadata=AUTH,
    )  # fmt: skip
    for person, channel in ((ana, EMAIL), (bo, common_pb2.CHANNEL_SMS)):
        await mesh.profile.SetConsent(
            profile_pb2.SetConsentRequest(
                shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=person),
                channel=channel, granted=True, consent_text="Yes", source="checkout",
                at=stamp(NOON),
            ),
            metadata=AUTH,
        )  # fmt: skip
    await mesh.profile.Unsubscribe(
        profile_pb2.UnsubscribeRequest(
            shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=bo), source="footer",
            at=stamp(NOON + timedelta(hours=1)),
        ),
        metadata=AUTH,
    )  # fmt: skip
    await put_signals(mesh.profile, mesh.shop, (ana, "loyal", 5, 4), (bo, "converted", 3, 1))

    [report] = await eventually(
        lambda: reports(mesh, mesh.shop),
        lambda r: r[0].refreshing == 0 and r[0].coverage.unsubscribed == 1,
        "the summaries",
    )
    assert report == profile_pb2.ShopReport(
        shop_id=mesh.shop,
        customers=3,
        lifecycle={"new": 0, "engaged": 0, "converted": 1, "loyal": 1, "at_risk": 0,
                   "churned": 0, "unscored": 1},
        rfm=[profile_pb2.RfmCell(r=3, f=1, customers=1),
             profile_pb2.RfmCell(r=5, f=4, customers=1)],
        rfm_unscored=1,
        coverage=profile_pb2.Coverage(
            with_email=2, with_order=2, opted_in={"email": 1, "sms": 0, "whatsapp": 0, "push": 0},
            reachable=1, unsubscribed=1, loyalty_members=0,
        ),
        refreshing=0,
    )  # fmt: skip
    assert visitor.person_id not in (ana, bo)


async def test_reports_cover_the_shops_the_token_may_read(mesh: Mesh) -> None:
    await order(mesh, "1", ("email", "cy@mail.example"))
    await eventually(lambda: reports(mesh, mesh.shop), lambda r: r[0].customers == 1, "the summary")
    # A token bound to every shop: every shop the profile holds customers of.
    everything = {r.shop_id: r.customers for r in await reports(mesh)}
    assert everything[mesh.shop] == 1
    # The agency's token lists shop-a and shop-b: those, whether they have customers or not.
    agency = await reports(mesh, token=READER_TOKEN)
    assert [r.shop_id for r in agency] == ["shop-a", "shop-b"]
    assert [r.shop_id for r in await reports(mesh, "shop-b", token=READER_TOKEN)] == ["shop-b"]
    empty = await reports(mesh, "shop-nobody-has")
    assert empty == [profile_pb2.ShopReport(
        shop_id="shop-nobody-has",
        lifecycle={"new": 0, "engaged": 0, "converted": 0, "loyal": 0, "at_risk": 0,
                   "churned": 0, "unscored": 0},
        coverage=profile_pb2.Coverage(opted_in={"email": 0, "sms": 0, "whatsapp": 0, "push": 0}),
    )]  # fmt: skip

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await reports(mesh, "shop-a", mesh.shop, token=READER_TOKEN)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    [info] = details(denied.value)
    assert (info.reason, dict(info.metadata)) == ("OTHER_SHOP", {"shop_id": mesh.shop})

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await reports(mesh, "shop-a", "shop:b", "")
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad_request] = details(invalid.value)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("shops[1]", "must be 1-128 letters, digits, '.', '_' or '-'"),
        ("shops[2]", "must be 1-128 letters, digits, '.', '_' or '-'"),
    ]


async def test_the_fatigue_posture_counts_what_a_check_counts(start_service: StartService) -> None:
    clock = Clock(NOON)
    server = await start_service("gate", clock=clock, log_flush_interval_seconds=0.05)
    shop_id = f"shop-{secrets.token_hex(4)}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        gate = gate_pb2_grpc.GateStub(channel)
        await lift_caps(gate, shop_id)

        async def send(person: str, message: str, **kw: Any) -> Any:
            return await gate.Check(
                gate_pb2.CheckRequest(
                    shop_id=shop_id, person_id=person, channel=EMAIL, message_id=message, **kw
                ),
                metadata=AUTH,
            )

        async def posture() -> Any:
            return await gate.GetFatiguePosture(
                gate_pb2.GetFatiguePostureRequest(shop_id=shop_id), metadata=AUTH
            )

        for person in ("tired", "fresh", "released", "receipts"):
            await gate.PutContactPolicy(
                gate_pb2.PutContactPolicyRequest(
                    shop_id=shop_id, person_id=person,
                    consents=[gate_pb2.ChannelConsent(channel=EMAIL, granted=True)],
                ),
                metadata=AUTH,
            )  # fmt: skip
        answers = [await send("tired", f"t{n}") for n in range(8)]
        assert [a.reason for a in answers] == [""] * 7 + ["fatigue:0.70/0.70"]
        for n in range(2):
            await send("fresh", f"f{n}")
        await send("released", "r1")
        await gate.Release(
            gate_pb2.ReleaseRequest(shop_id=shop_id, person_id="released", message_id="r1"),
            metadata=AUTH,
        )
        await send("receipts", "o1", message_class=gate_pb2.MESSAGE_CLASS_TRANSACTIONAL)
        await send("fresh", "dry", dry_run=True)

        assert await posture() == gate_pb2.FatiguePosture(
            shop_id=shop_id,
            levels=[gate_pb2.FatigueLevel(fatigue="0.20", customers=1),
                    gate_pb2.FatigueLevel(fatigue="0.70", customers=1)],
            threshold="0.70",
            as_of=stamp(NOON),
        )  # fmt: skip
        # The first seven leave the window 7 x 24 h after they were counted (the end excluded).
        clock.set(NOON + timedelta(days=7) - timedelta(microseconds=1))
        assert [(level.fatigue, level.customers) for level in (await posture()).levels] == [
            ("0.20", 1),
            ("0.70", 1),
        ]
        clock.set(NOON + timedelta(days=7))
        assert (await posture()).levels == []

        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await gate.GetFatiguePosture(
                gate_pb2.GetFatiguePostureRequest(shop_id="shop:x"), metadata=AUTH
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
