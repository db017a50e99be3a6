"""Enrichment over the real mesh (identity, gate, profile, enrichment; PostgreSQL and Redis): a
run lands stages, RFM, churn risk, LTV and next order on the profile; time alone moves stages,
each move on the change feed; recompute and configuration."""

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from c360.common.v1 import common_pb2
from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.main import main
from services.enrichment.__main__ import wire
from services.enrichment.settings import EnrichmentSettings
from services.enrichment.signals import MIN_RANKED
from services.runtime.telemetry import Telemetry
from tests.clock import Clock
from tests.conftest import ADMIN_TOKEN, StartService
from tests.integration.test_profile import stamp
from tests.polling import eventually
from tests.rpc import bearer, details

AUTH = bearer(ADMIN_TOKEN)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


# The profile refreshes summaries in the background; a busy machine may take a while.
SUMMARIES_SECONDS = 60.0


@dataclass
class Mesh:
    profile: Any
    enrichment: Any
    clock: Clock
    shop: str
    settings: EnrichmentSettings
    addresses: tuple[str, str]
    """Of the profile and the enrichment services."""

    async def order(self, order_id: str, email: str, total: str, days_ago: float) -> None:
        await self.profile.IngestOrder(
            profile_pb2.IngestOrderRequest(
                shop_id=self.shop, order_id=order_id,
                identifiers=[common_pb2.Identifier(type="email", value=email)],
                placed_at=stamp(self.clock() - timedelta(days=days_ago)), total=total,
                currency="EUR", source=profile_pb2.ORDER_SOURCE_ONLINE,
                line_items=[profile_pb2.LineItem(product_id="coffee-1kg", quantity=1, price=total)],
            ),
            metadata=AUTH,
        )  # fmt: skip

    async def get(self, email: str) -> Any:
        return await self.profile.Get(
            profile_pb2.GetRequest(
                shop_id=self.shop,
                person=common_pb2.PersonRef(
                    identifier=common_pb2.Identifier(type="email", value=email)
                ),
            ),
            metadata=AUTH,
        )

    async def persons(self) -> int:
        """Persons with a summary: what a run reads."""
        page = await self.profile.ListHistories(
            profile_pb2.ListHistoriesRequest(shop_id=self.shop), metadata=AUTH
        )
        return len(page.person_ids)

    async def product_days(self) -> list[int]:
        """Purchase days of every repeat product in the shop, as a run reads them."""
        page = await self.profile.ListHistories(
            profile_pb2.ListHistoriesRequest(shop_id=self.shop), metadata=AUTH
        )
        return list(page.product_days)

    async def run(self, **kw: Any) -> list[Any]:
        call = self.enrichment.RunShop(
            enrichment_pb2.RunShopRequest(shop_id=self.shop, **kw), metadata=AUTH
        )
        return [progress async for progress in call]


@pytest.fixture
async def mesh(
    start_service: StartService, settings_for: Callable[..., Any]
) -> AsyncIterator[Mesh]:
    clock = Clock(NOW)
    identity = await start_service("identity", clock=clock)
    gate = await start_service("gate")
    profile = await start_service(
        "profile", clock=clock, identity_addr=f"127.0.0.1:{identity.port}",
        gate_addr=f"127.0.0.1:{gate.port}", service_token=ADMIN_TOKEN, webhook_port=0,
    )  # fmt: skip
    peers = {
        "identity_addr": f"127.0.0.1:{identity.port}", "profile_addr": f"127.0.0.1:{profile.port}",
        "service_token": ADMIN_TOKEN, "follow_interval_seconds": 0.05,
    }  # fmt: skip
    enrichment = await start_service("enrichment", clock=clock, **peers)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{profile.port}") as to_profile,
        grpc.aio.insecure_channel(f"127.0.0.1:{enrichment.port}") as to_enrichment,
    ):
        yield Mesh(
            profile_pb2_grpc.ProfileStub(to_profile),
            enrichment_pb2_grpc.EnrichmentStub(to_enrichment),
            clock,
            f"shop-{secrets.token_hex(4)}",
            settings_for("enrichment", **peers),
            (f"127.0.0.1:{profile.port}", f"127.0.0.1:{enrichment.port}"),
        )


async def test_a_run_lands_stage_rfm_churn_ltv_and_next_order_on_the_profile(mesh: Mesh) -> None:
    # 24 one-order buyers long ago and a regular: three orders 30 days apart, the last 10 days ago.
    for i in range(MIN_RANKED + 4):
        await mesh.order(f"o-{i}", f"once{i}@example.com", "20.00", days_ago=200 + i)
    for n, days_ago in enumerate((70, 40, 10)):
        await mesh.order(f"r-{n}", "regular@example.com", "45.50", days_ago=days_ago)
    await eventually(
        mesh.persons, lambda n: n == MIN_RANKED + 5, "the summaries", SUMMARIES_SECONDS
    )
    # A run reads repeat products from the summaries: the regular's must show all three days
    # (the follower would otherwise race the run with fresher products due).
    await eventually(
        mesh.product_days, lambda days: days == [3], "the regular's summary", SUMMARIES_SECONDS
    )

    progress = await mesh.run()

    assert [p.phase for p in progress] == ["read", "fit", "publish", "done"]
    assert (progress[-2].done, progress[-2].total) == (MIN_RANKED + 5, MIN_RANKED + 5)
    regular = (await mesh.get("regular@example.com")).predictions
    assert regular.lifecycle_stage == "loyal"
    assert (regular.rfm.r, regular.rfm.f, regular.rfm.m) == (5, 5, 5)
    assert regular.historical_ltv == "136.50"
    # Every 30 days, last 10 days ago: due in 20 days (a day, 00:00 UTC).
    due = (NOW + timedelta(days=20)).replace(hour=0, minute=0)
    assert regular.predicted_next_order_at.ToDatetime(UTC) == due
    assert not regular.next_order_overdue
    assert list(regular.products_due) == []
    assert 0 <= regular.churn_risk < 0.5
    assert regular.HasField("p_order_90d")
    lapsed = (await mesh.get("once0@example.com")).predictions
    assert (lapsed.lifecycle_stage, lapsed.rfm.r, lapsed.rfm.f) == ("churned", 1, 1)
    assert lapsed.churn_risk > regular.churn_risk

    report = await mesh.enrichment.GetModelReport(
        enrichment_pb2.GetModelReportRequest(shop_id=mesh.shop), metadata=AUTH
    )
    assert (report.customers, report.repeat_customers) == (MIN_RANKED + 5, 1)
    assert report.ltv_model == "heuristic"
    assert not report.HasField("bgnbd")
    # The back-test: the 24 who had bought 90 days before now, all of whom bought nothing
    # since; one outcome only, so the seed score stays uncalibrated.
    assert report.calibration.samples == MIN_RANKED + 4
    assert report.calibration.method == "uncalibrated"
    assert [(b.observed_rate, b.count) for b in report.calibration.reliability] == [(1.0, 24)]


async def test_time_alone_moves_stages_and_each_move_is_on_the_change_feed(mesh: Mesh) -> None:
    await mesh.order("o-1", "ana@example.com", "30.00", days_ago=1)
    # The follower picks the new order up from the profile's activity, without a run.
    await eventually(
        lambda: mesh.get("ana@example.com"),
        lambda p: p.predictions.lifecycle_stage == "converted",
        "converted",
    )
    mesh.clock.set(NOW + timedelta(days=29))
    mesh.clock.set(NOW + timedelta(days=29, hours=1))
    await eventually(
        lambda: mesh.get("ana@example.com"),
        lambda p: p.predictions.lifecycle_stage == "at_risk",
        "at risk 30 days after the order",
    )
    mesh.clock.set(NOW + timedelta(days=89, hours=1))
    await eventually(
        lambda: mesh.get("ana@example.com"),
        lambda p: p.predictions.lifecycle_stage == "churned",
        "churned 90 days after the order",
    )
    call = mesh.profile.WatchChanges(
        profile_pb2.WatchChangesRequest(shop_id=mesh.shop, kinds=["lifecycle_stage_changed"]),
        metadata=AUTH,
    )
    moves = []
    async for change in call:
        moves.append((change.data["from"], change.data["to"]))
        if len(moves) == 3:
            call.cancel()
            break
    assert moves == [("", "converted"), ("converted", "at_risk"), ("at_risk", "churned")]


async def test_recompute_answers_for_one_person_and_knows_nobody_it_was_not_told_of(
    mesh: Mesh,
) -> None:
    await mesh.order("o-1", "bo@example.com", "12.00", days_ago=40)
    person = (await mesh.get("bo@example.com")).person_id
    await eventually(mesh.persons, lambda n: n == 1, "the summary", SUMMARIES_SECONDS)
    by_email = common_pb2.PersonRef(
        identifier=common_pb2.Identifier(type="email", value="bo@example.com")
    )
    answer = await mesh.enrichment.Recompute(
        enrichment_pb2.RecomputeRequest(shop_id=mesh.shop, person=by_email), metadata=AUTH
    )
    assert (answer.person_id, answer.lifecycle_stage) == (person, "at_risk")
    assert not answer.HasField("churn_risk")  # no model before the shop's first run
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.enrichment.Recompute(
            enrichment_pb2.RecomputeRequest(
                shop_id=mesh.shop, person=common_pb2.PersonRef(person_id="p-nobody")
            ),
            metadata=AUTH,
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as no_model:
        await mesh.enrichment.GetModelReport(
            enrichment_pb2.GetModelReportRequest(shop_id=mesh.shop), metadata=AUTH
        )
    assert no_model.value.code() == grpc.StatusCode.NOT_FOUND


async def test_shop_windows_are_validated_and_move_stages(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await mesh.enrichment.PutShopConfig(
            enrichment_pb2.ShopConfig(
                shop_id=mesh.shop, at_risk_days=60, churned_days=30, recency_bands=[30, 20]
            ),
            metadata=AUTH,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = [(v.field, v.description) for v in details(bad.value)[0].field_violations]
    assert violations == [
        ("recency_bands", "four ascending positive day limits (or none)"),
        ("churned_days", "must be more than at_risk_days"),
    ]
    stored = await mesh.enrichment.PutShopConfig(
        enrichment_pb2.ShopConfig(shop_id=mesh.shop, at_risk_days=14, churned_days=60),
        metadata=AUTH,
    )
    assert (stored.at_risk_days, stored.churned_days, list(stored.recency_bands)) == (
        14, 60, [30, 60, 90, 180],
    )  # fmt: skip
    await mesh.order("o-1", "cy@example.com", "12.00", days_ago=20)
    await eventually(
        lambda: mesh.get("cy@example.com"),
        lambda p: p.predictions.lifecycle_stage == "at_risk",
        "at risk after the shop's 14 days",
    )


async def test_an_interrupted_run_resumes_after_the_last_published_batch(mesh: Mesh) -> None:
    for i in range(25):
        await mesh.order(f"o-{i}", f"p{i}@example.com", "20.00", days_ago=10 + i)
    await eventually(mesh.persons, lambda n: n == 25, "the summaries", SUMMARIES_SECONDS)
    # A run publishing 2 persons a call (8 a group of four calls), stopped after its first group.
    enrichment, engine, close_peers = wire(
        mesh.settings.model_copy(update={"publish_batch": 2}), Telemetry(), mesh.clock
    )
    interrupted = enrichment.run_shop(mesh.shop, None)
    async for progress in interrupted:
        if progress.phase == "publish":
            break
    await interrupted.aclose()
    await close_peers()
    await engine.dispose()
    assert (progress.done, progress.total, progress.resumed) == (8, 25, False)

    resumed = await mesh.run()

    assert {p.resumed for p in resumed} == {True}
    assert [(p.phase, p.done, p.total) for p in resumed[-2:]] == [
        ("publish", 17, 17), ("done", 17, 17),
    ]  # fmt: skip
    scored = await mesh.profile.CreateSegment(
        profile_pb2.CreateSegmentRequest(
            shop_id=mesh.shop, name="scored", filter="churn_risk >= 0"
        ),
        metadata=AUTH,
    )
    assert scored.member_count == 25


async def test_a_back_test_reports_but_never_scores_anyone(mesh: Mesh) -> None:
    await mesh.order("o-1", "dee@example.com", "20.00", days_ago=40)
    await eventually(mesh.persons, lambda n: n == 1, "the summary", SUMMARIES_SECONDS)

    progress = await mesh.run(as_of=stamp(NOW - timedelta(days=30)))

    assert [p.phase for p in progress] == ["read", "fit", "done"]
    report = await mesh.enrichment.GetModelReport(
        enrichment_pb2.GetModelReportRequest(shop_id=mesh.shop), metadata=AUTH
    )
    assert (report.as_of.ToDatetime(UTC), report.customers) == (NOW - timedelta(days=30), 1)
    by_email = common_pb2.PersonRef(
        identifier=common_pb2.Identifier(type="email", value="dee@example.com")
    )
    answer = await mesh.enrichment.Recompute(
        enrichment_pb2.RecomputeRequest(shop_id=mesh.shop, person=by_email), metadata=AUTH
    )
    assert answer.lifecycle_stage == "at_risk"
    assert not answer.HasField("churn_risk")  # the shop has no live model yet


async def test_the_cli_runs_a_shop_and_draws_its_calibration(mesh: Mesh, tmp_path: Path) -> None:
    for i in range(MIN_RANKED + 4):
        await mesh.order(f"o-{i}", f"once{i}@example.com", "20.00", days_ago=200 + i)
    await mesh.order("r-0", "regular@example.com", "45.50", days_ago=10)
    await eventually(
        mesh.persons, lambda n: n == MIN_RANKED + 5, "the summaries", SUMMARIES_SECONDS
    )
    profile, enrichment = mesh.addresses

    def c360(*args: str) -> Result:
        return CliRunner().invoke(
            main,
            ["--profile", profile, "--enrichment", enrichment, "--token", ADMIN_TOKEN, *args],
        )

    ran = await asyncio.to_thread(c360, "enrich", "run", "--shop", mesh.shop)
    assert ran.exit_code == 0, ran.output
    assert "done: 25 persons" in ran.output
    png, page = tmp_path / "calibration.png", tmp_path / "calibration.html"
    report = ("enrich", "report", "--shop", mesh.shop, "--plot")
    shown = await asyncio.to_thread(c360, *report, str(png))
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].endswith("25 customers (0 repeat), LTV model heuristic")
    assert lines[1:] == [
        "churn calibration (uncalibrated, 90-day horizon, 24 customers): Brier 0.0000 "
        "(seed score 0.0000), ECE 0.0000",
        " predicted   observed  customers",
        "     1.000      1.000         24",
    ]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    await asyncio.to_thread(c360, *report, str(page))
    drawn = page.read_text()
    assert "<svg" in drawn
    assert "Brier 0.0000 (seed score 0.0000)" in drawn
