"""`c360 import` against the running profile, identity and gate: a Klaviyo profile export and a
Shopify order export, rejected rows summarised, and an import cut off mid-way that, run again,
ends exactly where an uninterrupted one does."""

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from c360.common.v1 import common_pb2
from cli import importing
from cli.main import main
from tests.conftest import ADMIN_TOKEN
from tests.faults import TcpProxy
from tests.integration.conftest import Endpoint
from tests.polling import eventually

CUSTOMERS = 150
ORDERS = 600


def write_exports(folder: Path) -> tuple[Path, Path]:
    """A Klaviyo-style profile export and a Shopify-style order export (one row per line item,
    the order's fields on its first row only), each with one bad row."""
    customers = folder / "klaviyo_profiles.csv"
    with customers.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["Email", "First Name", "Last Name", "Phone Number",
                         "Email Marketing Consent", "City"])  # fmt: skip
        for n in range(CUSTOMERS):
            writer.writerow([f"c{n}@shoppers.example", f"First{n}", f"Last{n}", "",
                             "SUBSCRIBED" if n % 2 else "NEVER_SUBSCRIBED", "Turku"])  # fmt: skip
        writer.writerow(["", "No", "Identifier", "", "", ""])
    orders = folder / "orders_export.csv"
    columns = [
        "Name", "Email", "Currency", "Total", "Created at", "Lineitem quantity", "Lineitem name",
        "Lineitem price", "Lineitem sku", "Id", "Source", "Location",
    ]  # fmt: skip
    with orders.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for n in range(ORDERS):
            source = "pos" if n % 5 == 0 else "web"
            writer.writerow([f"#{1000 + n}", f"c{n % CUSTOMERS}@shoppers.example", "EUR",
                             f"{10 + n % 7}.50", "2026-03-01 10:00:00 +0200", "1", "Mug", "8.00",
                             "MUG-1", str(5_000_000_000_000 + n), source,
                             "Helsinki" if source == "pos" else ""])  # fmt: skip
            writer.writerow([f"#{1000 + n}", "", "", "", "", "1", "Spoon", "2.50", "SP-1", "",
                             "", ""])  # fmt: skip
        writer.writerow(["#9999", "bad@shoppers.example", "EUR", "ten euros",
                         "2026-03-01 10:00:00 +0200", "1", "Mug", "8.00", "MUG-1", "9999", "web",
                         ""])  # fmt: skip
    return customers, orders


def cli(address: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--profile", address, "--token", ADMIN_TOKEN, *args])


async def picture(endpoint: Endpoint, shop: str) -> list[tuple[Any, ...]]:
    """Every imported customer's profile, as the figures that matter."""
    found = []
    for n in range(CUSTOMERS):
        endpoint.shop, saved = shop, endpoint.shop
        try:
            p = await endpoint.get("email", f"c{n}@shoppers.example")
        finally:
            endpoint.shop = saved
        found.append(
            (p.name.first_name, p.purchases.order_count, p.purchases.lifetime_spend,
             p.purchases.pos_orders, [(c.channel, c.granted) for c in p.consents])
        )  # fmt: skip
    return found


async def test_an_interrupted_import_resumes_to_the_same_data(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 25, so that the import is cut with some of them done, some in flight and some
    # not sent yet (the 601 order records are 25 batches; at 200 done, 8 have landed and at most
    # IN_FLIGHT more were sent).
    monkeypatch.setattr(importing, "BATCH", 25)
    assert ORDERS // 25 > 200 // 25 + importing.IN_FLIGHT
    loop = asyncio.get_running_loop()
    customers, orders = write_exports(tmp_path)
    address = endpoint.profile_address
    whole = endpoint.shop
    result = await asyncio.to_thread(cli, address, "import", "customers", str(customers),
                                     "--shop", whole)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-3:] == [
        f"imported {CUSTOMERS} records, rejected 1",
        "       1  needs at least one of external_id, email, phone_number",
        f"details: klaviyo_profiles.csv.{whole}.rejected.jsonl",
    ]
    result = await asyncio.to_thread(cli, address, "import", "orders", str(orders), "--shop", whole)
    assert result.exit_code == 0, result.output
    assert f"imported {ORDERS} records, rejected 1" in result.output
    rejected = [
        json.loads(line) for line in (tmp_path / f"orders_export.csv.{whole}.rejected.jsonl").open()
    ]
    assert rejected == [
        {
            "record": ORDERS + 1,
            "reason": 'total: must be a non-negative decimal string such as "129.90"',
        }
    ]
    expected = await picture(endpoint, whole)
    mine = [n for n in range(ORDERS) if n % CUSTOMERS == 1]
    spend = sum(10 + n % 7 + 0.5 for n in mine)
    assert expected[1][:4] == ("First1", len(mine), f"{spend:.2f}", sum(n % 5 == 0 for n in mine))

    # The same files into another shop, the connection to the profile cut mid-way.
    cut = f"{whole}-cut"
    proxy = TcpProxy("127.0.0.1", int(address.rsplit(":", 1)[1]))
    await proxy.start()
    through = f"127.0.0.1:{proxy.port}"
    assert (await asyncio.to_thread(cli, through, "import", "customers", str(customers),
                                    "--shop", cut)).exit_code == 0  # fmt: skip
    checkpoint = tmp_path / f"orders_export.csv.{cut}.c360-checkpoint"
    save = importing.Importer._save

    def save_then_stall(importer: importing.Importer, done: int) -> None:
        # Once 200 records are done, the proxy holds every byte before the importer (in the
        # CLI's thread) goes on: the batches still in flight cannot land before the cut.
        save(importer, done)
        if done >= 200:
            asyncio.run_coroutine_threadsafe(stall(), loop).result()

    async def stall() -> None:
        proxy.stall()

    monkeypatch.setattr(importing.Importer, "_save", save_then_stall)
    running = asyncio.create_task(
        asyncio.to_thread(cli, through, "import", "orders", str(orders), "--shop", cut)
    )

    async def progress() -> int:
        return json.loads(checkpoint.read_text())["done"] if checkpoint.exists() else 0

    await eventually(progress, lambda done: done >= 200, "import progress", 60.0)
    await proxy.cut()
    broken = await running
    assert broken.exit_code == 1
    assert "run the same command again to resume" in broken.output
    assert 200 <= await progress() < ORDERS
    monkeypatch.setattr(importing.Importer, "_save", save)
    proxy.resume()
    await proxy.start()
    resumed = await asyncio.to_thread(cli, through, "import", "orders", str(orders), "--shop", cut)
    assert resumed.exit_code == 0, resumed.output
    assert "(resumed after record" in resumed.output
    assert not checkpoint.exists()
    assert await picture(endpoint, cut) == expected
    await proxy.cut()


async def test_a_customer_s_later_record_wins_across_batches_in_flight(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 10, up to eight in flight: a customer's records in the first and the fourth
    # batch must be applied in file order (the fourth waits for the first, which shares a key).
    monkeypatch.setattr(importing, "BATCH", 10)
    upload = tmp_path / "customers.jsonl"
    lines: list[dict[str, Any]] = [
        {"email": f"u{n}@batch.example", "first_name": f"U{n}"} for n in range(40)
    ]
    lines[2] = {"email": "kept@batch.example", "first_name": "Early", "can_sms": True}
    lines[35] = {"email": "kept@batch.example", "first_name": "Late", "can_sms": False}
    upload.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = await asyncio.to_thread(cli, endpoint.profile_address, "import", "customers",
                                     str(upload), "--shop", endpoint.shop)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "imported 40 records, rejected 0" in result.output
    found = await endpoint.get("email", "kept@batch.example")
    assert found.name.first_name == "Late"
    assert [(c.channel, c.granted) for c in found.consents] == [(common_pb2.CHANNEL_SMS, False)]
    assert (await endpoint.get("email", "u39@batch.example")).name.first_name == "U39"
