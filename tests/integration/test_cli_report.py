"""`c360 report` against real services (identity, profile, gate, enrichment on PostgreSQL and
Redis): a small shop's report as terminal tables and as PNG and HTML files, and the agency
roll-up flagging a shop where more than 60% of customers are at fatigue >= 0.7."""

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.main import main
from tests.conftest import ADMIN_TOKEN, READER_TOKEN, StartService
from tests.integration.test_profile import AUTH, JAN, ids, stamp
from tests.integration.test_reports import lift_caps, put_signals
from tests.polling import eventually

EMAIL = common_pb2.CHANNEL_EMAIL
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Shop:
    profile: Any
    gate: Any
    shop_id: str
    addresses: list[str]
    """--profile ADDR --gate ADDR --enrichment ADDR, for the CLI."""

    async def shopper(self, email: str, orders: int, sends: int) -> str:
        """A shopper with orders and `sends` marketing emails checked at the gate today."""
        for n in range(orders):
            placed = await self.profile.IngestOrder(
                profile_pb2.IngestOrderRequest(
                    shop_id=self.shop_id, order_id=f"{email}-{n}", total="20.00",
                    currency="EUR", source=profile_pb2.ORDER_SOURCE_ONLINE, placed_at=stamp(JAN),
                    identifiers=ids(("email", email)),
                ),
                metadata=AUTH,
            )  # fmt: skip
        person = str(placed.person_id)
        await self.gate.PutContactPolicy(
            gate_pb2.PutContactPolicyRequest(
                shop_id=self.shop_id, person_id=person,
                consents=[gate_pb2.ChannelConsent(channel=EMAIL, granted=True)],
            ),
            metadata=AUTH,
        )  # fmt: skip
        for n in range(sends):
            await self.gate.Check(
                gate_pb2.CheckRequest(
                    shop_id=self.shop_id, person_id=person, channel=EMAIL,
                    message_id=f"{person}-{n}",
                ),
                metadata=AUTH,
            )  # fmt: skip
        return person

    async def c360(self, *args: str, token: str = ADMIN_TOKEN) -> Result:
        return await asyncio.to_thread(
            CliRunner().invoke, main, [*self.addresses, "--token", token, *args]
        )


@pytest.fixture
async def shop(start_service: StartService) -> AsyncIterator[Shop]:
    identity = await start_service("identity")
    gate = await start_service("gate", log_flush_interval_seconds=0.05)
    enrichment = await start_service("enrichment")
    profile = await start_service(
        "profile",
        identity_addr=f"127.0.0.1:{identity.port}",
        gate_addr=f"127.0.0.1:{gate.port}",
        service_token=ADMIN_TOKEN,
        summary_refresh_interval_seconds=0.05,
    )
    addresses = {"profile": profile.port, "gate": gate.port, "enrichment": enrichment.port}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{profile.port}") as to_profile,
        grpc.aio.insecure_channel(f"127.0.0.1:{gate.port}") as to_gate,
    ):
        shop_id = f"shop-{secrets.token_hex(4)}"
        gate_stub = gate_pb2_grpc.GateStub(to_gate)
        await lift_caps(gate_stub, shop_id)
        yield Shop(
            profile_pb2_grpc.ProfileStub(to_profile),
            gate_stub,
            shop_id,
            [arg for name, port in addresses.items() for arg in (f"--{name}", f"127.0.0.1:{port}")],
        )


def files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def settled(shop: Shop, customers: int) -> None:
    async def report() -> Any:
        answer = await shop.profile.GetShopReports(
            profile_pb2.GetShopReportsRequest(shops=[shop.shop_id]), metadata=AUTH
        )
        return answer.reports[0]

    await eventually(
        report, lambda r: (r.customers, r.refreshing) == (customers, 0), "the summaries"
    )


async def test_a_shops_report_in_the_terminal_and_as_pictures(shop: Shop, tmp_path: Path) -> None:
    ana = await shop.shopper("ana@mail.example", orders=2, sends=7)
    bo = await shop.shopper("bo@mail.example", orders=1, sends=8)  # the 8th is blocked
    await shop.shopper("cy@mail.example", orders=1, sends=1)
    await settled(shop, 3)
    await put_signals(shop.profile, shop.shop_id, (ana, "loyal", 5, 4), (bo, "converted", 3, 1))

    shown = await shop.c360("report", "--shop", shop.shop_id, "--out", str(tmp_path / "out"))
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines() == [
        f"Shop {shop.shop_id}: 3 customers",
        "",
        "Lifecycle distribution",
        "  stage      customers  share",
        "  new                0   0.0%",
        "  engaged            0   0.0%",
        "  converted          1  33.3%",
        "  loyal              1  33.3%",
        "  at_risk            0   0.0%",
        "  churned            0   0.0%",
        "  unscored           1  33.3%",
        "",
        "RFM grid: customers by recency (R) and frequency (F), 5 = the shop's best",
        "  R \\ F  F1  F2  F3  F4  F5",
        "  R5      0   0   0   1   0",
        "  R4      0   0   0   0   0",
        "  R3      1   0   0   0   0",
        "  R2      0   0   0   0   0",
        "  R1      0   0   0   0   0",
        "  no RFM score (no order, or too few customers to rank): 1",
        "",
        "Fatigue posture",
        "  67% of the list is at fatigue >= 0.7 (2 of 3 customers); the shop's gate blocks at 0.70",
        "  fatigue  customers  share",
        "  0.00             0   0.0%",
        "  0.10             1  33.3%",
        *(f"  0.{n}0             0   0.0%" for n in range(2, 7)),
        "  0.70             2  66.7%",
        "  0.80             0   0.0%",
        "  0.90             0   0.0%",
        "  1.00             0   0.0%",
        "",
        "Profile coverage",
        "  profiles                 customers   share",
        "  with email                       3  100.0%",
        "  with an order                    3  100.0%",
        "  opted in: email                  0    0.0%",
        "  opted in: sms                    0    0.0%",
        "  opted in: whatsapp               0    0.0%",
        "  opted in: push                   0    0.0%",
        "  reachable (any channel)          0    0.0%",
        "  unsubscribed                     0    0.0%",
        "  loyalty members                  0    0.0%",
        "",
        "Churn calibration",
        f"  no model fitted yet: run `c360 enrich run --shop {shop.shop_id}`",
    ]
    out = tmp_path / "out"
    assert files(out) == [
        "coverage.png", "fatigue.png", "lifecycle.png", "report.html", "rfm.png",
    ]  # fmt: skip
    for picture in out.glob("*.png"):
        assert picture.read_bytes().startswith(PNG), picture
    page = (out / "report.html").read_text("utf-8")
    assert page.count("<svg") == 4
    assert "67% of the list is at fatigue &gt;= 0.7 (2 of 3 customers)" in page


async def test_the_agency_roll_up_flags_fatigued_shops(shop: Shop, tmp_path: Path) -> None:
    for email, sends in (("di@mail.example", 7), ("ed@mail.example", 7), ("fay@mail.example", 0)):
        await shop.shopper(email, orders=1, sends=sends)
    await settled(shop, 3)

    rolled = await shop.c360("report", "--agency", "--out", str(tmp_path))
    assert rolled.exit_code == 0, rolled.output
    lines = rolled.stdout.splitlines()
    assert lines[0].startswith("Agency roll-up: ")
    mine = [line.split() for line in lines if line.startswith(f"  {shop.shop_id} ")]
    assert mine == [
        [shop.shop_id, "3", "100.0%", "100.0%", "0.0%", "0.0%"],
        [shop.shop_id, "3", "0.0%", "0.0%", "0.0%", "0.0%", "0.0%", "0.0%", "100.0%"],
        [shop.shop_id, "3", "2", "66.7%", "FLAGGED"],
    ]
    flagged = next(line for line in lines if line.startswith("  flagged (more than 60%"))
    assert shop.shop_id in flagged.split(": ")[1].split(", ")
    assert files(tmp_path) == [
        "coverage.png", "fatigue.png", "lifecycle.png", "report.html",
    ]  # fmt: skip

    # The agency's token lists shop-a and shop-b: the roll-up covers those two and no other.
    agency = await shop.c360("report", "--agency", token=READER_TOKEN)
    assert agency.exit_code == 0, agency.output
    fatigue = agency.stdout.split("Fatigue posture by shop\n")[1].splitlines()
    assert [line.split()[0] for line in fatigue[1:4]] == ["shop-a", "shop-b", "all"]
    denied = await shop.c360("report", "--shop", shop.shop_id, token=READER_TOKEN)
    assert denied.exit_code == 1
    assert denied.output == "Error: PERMISSION_DENIED: the token is not bound to this shop\n"
    neither = await shop.c360("report")
    assert neither.exit_code == 2
    assert "give --shop SHOP or --agency" in neither.output
