"""GDPR over the real mesh (identity, gate, profile with its webhook endpoint, enrichment, gdpr;
PostgreSQL and Redis): an erasure leaves none of the person's emails, phones or names in any
table, Redis key or log while the shop's revenue stays; previews equal what erasure touches; a
job survives a service being down; Shopify's GDPR webhooks run the same pipelines."""

import asyncio
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as redis
from click.testing import CliRunner, Result
from google.protobuf.json_format import MessageToDict

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.main import main
from services.profile.shopify import signature
from services.runtime.db import plain_connection
from services.runtime.server import Server
from tests.conftest import ADMIN_TOKEN, READER_TOKEN, StartService
from tests.integration.test_webhooks import fixture
from tests.polling import eventually
from tests.rpc import bearer, details

AUTH = bearer(ADMIN_TOKEN)
SECRET = "shpss_gdpr"
SERVICES = ("identity", "gate", "profile", "enrichment", "gdpr")


def free_port() -> int:
    """A port nothing listens on now (the gdpr service and the profile each need the other's
    address before either is started)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Mesh:
    profile: Any
    identity: Any
    gate: Any
    gdpr: Any
    shop: str
    webhook_url: str
    settings: dict[str, Any]
    servers: dict[str, Server]

    def person(self, email: str) -> common_pb2.PersonRef:
        return common_pb2.PersonRef(identifier=common_pb2.Identifier(type="email", value=email))

    async def shopper(self, email: str, phone: str, first: str, last: str, orders: int) -> str:
        """A shopper with orders, a consent, an event, a customer record and gate history."""
        ids = [
            common_pb2.Identifier(type="email", value=email),
            common_pb2.Identifier(type="phone", value=phone),
        ]
        for n in range(orders):
            await self.profile.IngestOrder(
                profile_pb2.IngestOrderRequest(
                    shop_id=self.shop,
                    order_id=f"{email[:4]}-{n}",
                    identifiers=ids,
                    placed_at=_stamp(datetime(2026, 10, 1 + n, tzinfo=UTC)),
                    total="25.50",
                    currency="EUR",
                    source=profile_pb2.ORDER_SOURCE_ONLINE,
                ),
                metadata=AUTH,
            )
        await self.profile.SetConsent(
            profile_pb2.SetConsentRequest(
                shop_id=self.shop,
                person=self.person(email),
                channel=common_pb2.CHANNEL_EMAIL,
                granted=True,
                consent_text=f"Yes, {first}, email me",
                source="checkout",
                at=_stamp(datetime(2026, 10, 1, tzinfo=UTC)),
            ),
            metadata=AUTH,
        )
        await self.profile.IngestEvent(
            profile_pb2.IngestEventRequest(
                shop_id=self.shop,
                event_id=f"visit-{email[:4]}",
                identifiers=ids[:1],
                kind=profile_pb2.EVENT_KIND_VISIT,
                at=_stamp(datetime(2026, 10, 2, tzinfo=UTC)),
            ),
            metadata=AUTH,
        )
        record = {
            "external_id": f"crm-{email[:4]}",
            "email": email,
            "first_name": first,
            "last_name": last,
            "phone_number": phone,
        }
        upserted = profile_pb2.UpsertCustomersRequest(shop_id=self.shop)
        upserted.customers.add().update(record)
        await self.profile.UpsertCustomers(upserted, metadata=AUTH)
        person_id = (
            await self.profile.Get(
                profile_pb2.GetRequest(shop_id=self.shop, person=self.person(email)), metadata=AUTH
            )
        ).person_id
        await self.gate.PutContactPolicy(
            gate_pb2.PutContactPolicyRequest(
                shop_id=self.shop,
                person_id=person_id,
                consents=[gate_pb2.ChannelConsent(channel=common_pb2.CHANNEL_EMAIL, granted=True)],
                time_zone="Europe/Paris",
            ),
            metadata=AUTH,
        )
        for n in range(2):
            await self.gate.Check(
                gate_pb2.CheckRequest(
                    shop_id=self.shop,
                    person_id=person_id,
                    channel=common_pb2.CHANNEL_EMAIL,
                    message_id=f"m-{email[:4]}-{n}",
                ),
                metadata=AUTH,
            )
        return str(person_id)

    async def revenue(self) -> Decimal:
        rows = await self.query(
            "profile", "SELECT sum(total) AS s FROM order_fact WHERE shop_id = $1", self.shop
        )
        return Decimal(rows[0]["s"] or 0)

    async def query(self, service: str, text: str, *args: Any) -> list[Any]:
        connection = await plain_connection(self.settings[service])
        try:
            return list(await connection.fetch(text, *args))
        finally:
            await connection.close()

    async def erasure(self, job_id: str) -> Any:
        return await self.gdpr.GetErasure(gdpr_pb2.GetErasureRequest(job_id=job_id), metadata=AUTH)

    async def deliver(self, topic: str, body: bytes) -> int:
        headers = {
            "X-Shopify-Topic": topic,
            "X-Shopify-Shop-Domain": self.shop,
            "X-Shopify-Webhook-Id": secrets.token_hex(8),
            "X-Shopify-Hmac-Sha256": signature(SECRET, body),
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.webhook_url, data=body, headers=headers) as response,
        ):
            return response.status


@pytest.fixture
async def mesh(start_service: StartService, settings_for: Any) -> AsyncIterator[Mesh]:
    identity = await start_service("identity")
    gate = await start_service("gate")
    enrichment = await start_service("enrichment")
    profile_port, gdpr_port = free_port(), free_port()
    peers = {
        "identity_addr": f"127.0.0.1:{identity.port}",
        "gate_addr": f"127.0.0.1:{gate.port}",
        "profile_addr": f"127.0.0.1:{profile_port}",
        "gdpr_addr": f"127.0.0.1:{gdpr_port}",
        "enrichment_addr": f"127.0.0.1:{enrichment.port}",
        "service_token": ADMIN_TOKEN,
    }
    gdpr = await start_service("gdpr", gdpr_port=gdpr_port, job_interval_seconds=0.1, **peers)
    profile = await start_service(
        "profile",
        profile_port=profile_port,
        webhook_port=0,
        shopify_api_secret=SECRET,
        webhook_max_attempts=3,
        **peers,
    )
    servers = {
        "identity": identity,
        "gate": gate,
        "enrichment": enrichment,
        "gdpr": gdpr,
        "profile": profile,
    }
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{profile.port}") as to_profile,
        grpc.aio.insecure_channel(f"127.0.0.1:{identity.port}") as to_identity,
        grpc.aio.insecure_channel(f"127.0.0.1:{gate.port}") as to_gate,
        grpc.aio.insecure_channel(f"127.0.0.1:{gdpr.port}") as to_gdpr,
    ):
        yield Mesh(
            profile_pb2_grpc.ProfileStub(to_profile),
            identity_pb2_grpc.IdentityStub(to_identity),
            gate_pb2_grpc.GateStub(to_gate),
            gdpr_pb2_grpc.GdprStub(to_gdpr),
            f"shop-{secrets.token_hex(4)}.myshopify.com",
            f"http://127.0.0.1:{profile.http_ports['webhooks']}/webhooks/shopify",
            {s: settings_for(s) for s in SERVICES},
            servers,
        )


def _stamp(instant: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


async def _found_in_tables(mesh: Mesh, needles: list[str]) -> list[str]:
    """Every table of every service whose rows of the test's shop (every row, for a table with
    no shop) mention a needle, in any case. Other tests of the run share the schemas and may hold
    the same fixture values under their own shops."""
    found = []
    for service in SERVICES:
        tables = await mesh.query(
            service,
            "SELECT t.table_name, bool_or(c.column_name = 'shop_id') AS by_shop"
            " FROM information_schema.tables t JOIN information_schema.columns c"
            " ON c.table_schema = t.table_schema AND c.table_name = t.table_name"
            " WHERE t.table_schema = current_schema() GROUP BY t.table_name",
        )
        for table, by_shop in tables:
            query = f'SELECT t::text AS row FROM "{table}" t'
            rows = await (
                mesh.query(service, query + " WHERE shop_id = $1", mesh.shop)
                if by_shop
                else mesh.query(service, query)
            )
            for row in rows:
                text = row["row"].lower()
                found += [f"{service}.{table}: {n}" for n in needles if n.lower() in text]
    return found


async def _found_in_redis(url: str, needles: list[str]) -> list[str]:
    client = redis.Redis.from_url(url)
    found = []
    try:
        async for key in client.scan_iter(count=1000):
            kind = await client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            values: list[Any] = [key]
            if kind == "hash":
                values += list((await client.hgetall(key)).values())
            elif kind == "string":
                values.append(await client.get(key))
            elif kind == "stream":
                values += [str(e) for e in await client.xrange(key) or []]
            elif kind == "zset":
                values += await client.zrange(key, 0, -1)
            text = " ".join(v.decode() if isinstance(v, bytes) else str(v) for v in values)
            found += [f"redis {key!r}: {n}" for n in needles if n.lower() in text.lower()]
    finally:
        await client.aclose()
    return found


async def test_an_erasure_leaves_no_pii_anywhere_and_keeps_the_revenue(
    mesh: Mesh, caplog: pytest.LogCaptureFixture, backing: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    tag = secrets.token_hex(3)
    email, phone = f"ziggy.{tag}@stardust.example", "+33612345678"
    first, last = f"Ziggy{tag}", f"Stardust{tag}"
    person_id = await mesh.shopper(email, phone, first, last, orders=3)
    await mesh.shopper(f"other.{tag}@stardust.example", "+33698765432", f"Ava{tag}", "Other", 2)
    await eventually(mesh.revenue, lambda r: r == Decimal("127.50"), "the orders")

    async def settled() -> tuple[int, int]:
        due = await mesh.query("profile", "SELECT 1 FROM summary_due WHERE shop_id = $1", mesh.shop)
        built = await mesh.query(
            "profile", "SELECT 1 FROM person_summary WHERE shop_id = $1", mesh.shop
        )
        return len(due), len(built)

    await eventually(settled, lambda n: n == (0, 2), "the summaries")

    preview = await mesh.gdpr.PreviewErase(
        gdpr_pb2.PreviewEraseRequest(shop_id=mesh.shop, person=mesh.person(email)), metadata=AUTH
    )
    started = await mesh.gdpr.Erase(
        gdpr_pb2.EraseRequest(
            shop_id=mesh.shop, person=mesh.person(email), reason="asked", requested_by="dpo@shop"
        ),
        metadata=AUTH,
    )
    assert started.person_id == person_id
    job = await mesh.erasure(started.job_id)
    assert job.state == gdpr_pb2.ERASURE_STATE_DONE
    assert [s.service for s in job.steps] == ["gate", "profile", "identity"]
    touched = {(s.service, t): n for s in job.steps for t, n in s.removed.items()}
    assert {(c.service, c.table): c.rows for c in preview.counts} == touched
    assert touched[("profile", "consent_fact")] == 1
    assert touched[("profile", "order_fact")] == 3
    assert touched[("identity", "identifier")] == 3  # email, phone, the CRM id
    assert touched[("gate", "message_log")] == 2

    needles = [email, phone, phone[3:], first, last]
    assert await _found_in_tables(mesh, needles) == []
    assert await _found_in_redis(backing.redis_url, needles) == []
    assert [n for n in needles if n.lower() in caplog.text.lower()] == []
    assert await mesh.revenue() == Decimal("127.50")

    for call in (
        mesh.profile.Get(
            profile_pb2.GetRequest(shop_id=mesh.shop, person=mesh.person(email)), metadata=AUTH
        ),
        mesh.identity.Lookup(
            identity_pb2.LookupRequest(
                shop_id=mesh.shop, identifier=common_pb2.Identifier(type="email", value=email)
            ),
            metadata=AUTH,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    blocked = await mesh.gate.Check(
        gate_pb2.CheckRequest(
            shop_id=mesh.shop,
            person_id=person_id,
            channel=common_pb2.CHANNEL_EMAIL,
            message_id="after",
        ),
        metadata=AUTH,
    )
    assert (blocked.allowed, blocked.reason) == (False, "global_unsubscribe")
    # A re-delivered order brings nothing back.
    await mesh.profile.IngestOrder(
        profile_pb2.IngestOrderRequest(
            shop_id=mesh.shop,
            order_id=f"{email[:4]}-0",
            identifiers=[common_pb2.Identifier(type="email", value=email)],
            placed_at=_stamp(datetime(2026, 10, 1, tzinfo=UTC)),
            total="25.50",
            currency="EUR",
            source=profile_pb2.ORDER_SOURCE_ONLINE,
        ),
        metadata=AUTH,
    )
    assert await _found_in_tables(mesh, needles) == []

    audit = await mesh.gdpr.ListAudit(gdpr_pb2.ListAuditRequest(shop_id=mesh.shop), metadata=AUTH)
    assert [e.action for e in audit.entries] == ["erase_done", "erase", "preview"]
    assert audit.entries[1].actor == "dpo@shop"
    assert dict(audit.entries[0].counts)["profile.order_fact"] == 3


async def test_an_erasure_blanks_the_held_deliveries_about_the_person_and_no_others(
    mesh: Mesh,
) -> None:
    """Dead-lettered (or pending) deliveries are searched for the person: by email or phone in
    any string, or by their full name. Another customer who shares only a first or a last name
    keeps their delivery."""
    tag = secrets.token_hex(3)
    email, first, last = f"zedq.{tag}@stardust.example", f"Zed{tag}", f"Quill{tag}"
    await mesh.shopper(email, "+33612340000", first, last, orders=1)
    held = [
        {"id": 1, "email": email.upper(), "total_price": "10.00"},
        {"id": 2, "shipping_address": {"first_name": first, "last_name": last, "city": "Lyon"}},
        {"id": 3, "customer": {"first_name": first, "last_name": "Other", "email": "o@x.example"}},
        {"id": 4, "customer": {"first_name": "Ann", "last_name": last, "phone": "+33698760000"}},
    ]
    now = datetime.now(UTC)
    for n, document in enumerate(held):
        await mesh.query(
            "profile",
            "INSERT INTO webhook_inbox (shop_id, webhook_id, topic, body, received_at, state,"
            " attempts, next_attempt_at, error) VALUES ($1, $2, 'orders/create', $3, $4, 'dead',"
            " 12, $4, 'KeyError')",
            mesh.shop, f"held-{n}", json.dumps(document).encode(), now,
        )  # fmt: skip
    started = await mesh.gdpr.Erase(
        gdpr_pb2.EraseRequest(shop_id=mesh.shop, person=mesh.person(email), reason="asked"),
        metadata=AUTH,
    )
    assert (await mesh.erasure(started.job_id)).state == gdpr_pb2.ERASURE_STATE_DONE
    rows = await mesh.query(
        "profile",
        "SELECT webhook_id, state, body FROM webhook_inbox"
        " WHERE shop_id = $1 AND webhook_id LIKE 'held-%' ORDER BY webhook_id",
        mesh.shop,
    )
    assert [(r["webhook_id"], r["state"], json.loads(r["body"] or b"null")) for r in rows] == [
        ("held-0", "erased", None),
        ("held-1", "erased", None),
        ("held-2", "dead", held[2]),
        ("held-3", "dead", held[3]),
    ]


async def test_a_consent_sent_for_an_erased_person_stores_nothing(mesh: Mesh) -> None:
    tag = secrets.token_hex(3)
    email = f"yuki.{tag}@stardust.example"
    person_id = await mesh.shopper(email, "+33612341111", f"Yuki{tag}", f"Sato{tag}", orders=1)
    started = await mesh.gdpr.Erase(
        gdpr_pb2.EraseRequest(shop_id=mesh.shop, person=mesh.person(email), reason="asked"),
        metadata=AUTH,
    )
    assert (await mesh.erasure(started.job_id)).state == gdpr_pb2.ERASURE_STATE_DONE
    answer = await mesh.profile.SetConsent(
        profile_pb2.SetConsentRequest(
            shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=person_id),
            channel=common_pb2.CHANNEL_SMS, granted=True, consent_text=f"Yes, Yuki{tag}",
            source="checkout", at=_stamp(datetime(2026, 10, 5, tzinfo=UTC)),
        ),
        metadata=AUTH,
    )  # fmt: skip
    assert answer.applied is False
    assert await _found_in_tables(mesh, [f"Yuki{tag}"]) == []


async def test_a_job_finishes_after_a_service_comes_back_and_reads_never_show_pii(
    mesh: Mesh, start_service: StartService
) -> None:
    tag = secrets.token_hex(3)
    email = f"lazarus.{tag}@example.com"
    person_id = await mesh.shopper(email, "+33611112222", f"Laz{tag}", "Arus", orders=1)
    identity = mesh.servers["identity"]
    port = identity.port
    await identity.stop(grace=0.5)

    started = await mesh.gdpr.Erase(
        gdpr_pb2.EraseRequest(shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=person_id)),
        metadata=AUTH,
    )
    job = await mesh.erasure(started.job_id)
    assert job.state == gdpr_pb2.ERASURE_STATE_RUNNING
    assert [(s.service, s.done) for s in job.steps] == [
        ("gate", True),
        ("profile", False),
        ("identity", False),
    ]
    assert job.steps[1].last_error == "UNAVAILABLE"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.profile.Get(
            profile_pb2.GetRequest(
                shop_id=mesh.shop, person=common_pb2.PersonRef(person_id=person_id)
            ),
            metadata=AUTH,
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    await start_service("identity", identity_port=port)
    done = await eventually(
        lambda: mesh.erasure(started.job_id),
        lambda j: j.state == gdpr_pb2.ERASURE_STATE_DONE,
        "the job",
    )
    assert all(s.done for s in done.steps)
    assert await _found_in_tables(mesh, [email]) == []


async def test_shopify_requests_export_then_erase_end_to_end(mesh: Mesh) -> None:
    # The fixtures' customer: john@example.com, customer 191167 (the fixtures' phone is not a
    # valid number: the customer is found by id).
    person_id = await mesh.shopper("john@example.com", "+14155550199", "John", "Fixture", 1)
    await mesh.profile.IngestOrder(
        profile_pb2.IngestOrderRequest(
            shop_id=mesh.shop,
            order_id="299938",
            identifiers=[
                common_pb2.Identifier(type="shopify_customer_id", value="191167"),
                common_pb2.Identifier(type="email", value="john@example.com"),
            ],
            placed_at=_stamp(datetime(2026, 9, 1, tzinfo=UTC)),
            total="10.00",
            currency="EUR",
            source=profile_pb2.ORDER_SOURCE_ONLINE,
        ),
        metadata=AUTH,
    )
    assert (
        await mesh.deliver("customers/data_request", fixture("customers_data_request.json")) == 200
    )

    async def actions() -> list[str]:
        audit = await mesh.gdpr.ListAudit(
            gdpr_pb2.ListAuditRequest(shop_id=mesh.shop), metadata=AUTH
        )
        return [e.action for e in audit.entries]

    await eventually(actions, lambda a: a == ["data_request"], "the data request")
    export = await mesh.gdpr.Export(
        gdpr_pb2.ExportRequest(shop_id=mesh.shop, person=mesh.person("john@example.com")),
        metadata=AUTH,
    )
    document = MessageToDict(export.data)
    assert document["customer"]["email"] == "john@example.com"
    assert document["customer"]["id"] == "191167"
    assert sorted(document["orders_requested"]) == ["299938", "john-0"]
    assert [c["consent_text"] for c in document["consents"]] == ["Yes, John, email me"]
    assert len(document["messages"]) == 2

    assert await mesh.deliver("customers/redact", fixture("customers_redact.json")) == 200
    await eventually(actions, lambda a: a[:2] == ["erase_done", "erase"], "the erasure")

    async def inbox() -> list[str]:
        rows = await mesh.query(
            "profile", "SELECT state FROM webhook_inbox WHERE shop_id = $1 ORDER BY id", mesh.shop
        )
        return [row["state"] for row in rows]

    # The redact delivery is settled (its body dropped) once the handover has answered.
    await eventually(inbox, lambda states: states == ["done", "done"], "the inbox")
    assert await _found_in_tables(mesh, ["john@example.com", "+14155550199", "Fixture"]) == []
    assert person_id


async def test_a_token_without_the_gdpr_role_is_refused(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.gdpr.Erase(
            gdpr_pb2.EraseRequest(shop_id=mesh.shop, person=mesh.person("a@b.example")),
            metadata=bearer(READER_TOKEN),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_inventory_counts_customers_contacts_retention_and_erasures(mesh: Mesh) -> None:
    now = datetime.now(UTC)
    four_years_ago, last_year = now - timedelta(days=4 * 365), now - timedelta(days=365)

    async def resolve(event: str, seen: datetime, *identifiers: tuple[str, str]) -> str:
        resolved = await mesh.identity.Resolve(
            identity_pb2.ResolveRequest(
                shop_id=mesh.shop,
                identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in identifiers],
                source="shopify",
                strength=identity_pb2.STRENGTH_AUTHORITATIVE,
                event_id=event,
                observed_at=_stamp(seen),
            ),
            metadata=AUTH,
        )
        return str(resolved.person_id)

    # Past retention: seen four years ago, never since.
    await resolve("e1", four_years_ago, ("email", "old@example.com"), ("phone", "+14155550101"))
    # Seen four years ago and again last year: within it.
    await resolve("e2", four_years_ago, ("email", "back@example.com"))
    await resolve("e3", last_year, ("email", "back@example.com"))
    await resolve("e4", now, ("phone", "+14155550102"))
    # Two persons merged count once.
    a = await resolve("e5", now, ("email", "first@example.com"))
    b = await resolve("e6", now, ("email", "second@example.com"))
    await mesh.identity.Merge(
        identity_pb2.MergeRequest(shop_id=mesh.shop, person_a_id=a, person_b_id=b), metadata=AUTH
    )
    # An erased shopper is gone from every figure but the erasures done.
    await mesh.shopper("gone@example.com", "+14155550103", "Gone", "Away", orders=1)
    erased = await mesh.gdpr.Erase(
        gdpr_pb2.EraseRequest(shop_id=mesh.shop, person=mesh.person("gone@example.com")),
        metadata=AUTH,
    )
    assert (await mesh.erasure(erased.job_id)).state == gdpr_pb2.ERASURE_STATE_DONE

    inventory = await mesh.gdpr.Inventory(
        gdpr_pb2.InventoryRequest(shop_id=mesh.shop), metadata=AUTH
    )
    assert (
        inventory.customers,
        inventory.with_email,
        inventory.with_phone,
        inventory.past_retention,
        inventory.erasures_done,
    ) == (4, 3, 2, 1, 1)
    assert inventory.oldest_record_at.ToDatetime(UTC) == four_years_ago
    retained = inventory.retained_since.ToDatetime(UTC)
    assert now - timedelta(days=1095) <= retained <= datetime.now(UTC) - timedelta(days=1095)

    # A two-year retention puts the customer last seen a year ago inside, still; six months out.
    shorter = await mesh.gdpr.Inventory(
        gdpr_pb2.InventoryRequest(shop_id=mesh.shop, retention_days=180), metadata=AUTH
    )
    assert shorter.past_retention == 2

    audit = await mesh.gdpr.ListAudit(gdpr_pb2.ListAuditRequest(shop_id=mesh.shop), metadata=AUTH)
    assert [e.action for e in audit.entries][:2] == ["inventory", "inventory"]
    assert dict(audit.entries[0].counts) == {"customers": 4, "past_retention": 2}


async def test_the_inventory_refuses_a_retention_out_of_range(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.gdpr.Inventory(
            gdpr_pb2.InventoryRequest(shop_id=mesh.shop, retention_days=-1), metadata=AUTH
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in details(refused.value)[0].field_violations] == [
        ("retention_days", "0 (the default) to 36500 days")
    ]


async def test_the_cli_previews_exports_erases_and_counts(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.shopper("cli@example.com", "+14155550104", "Cli", "User", orders=2)
    await mesh.shopper("stays@example.com", "+14155550105", "Stays", "Here", orders=1)
    gdpr_address = f"127.0.0.1:{mesh.servers['gdpr'].port}"

    def c360(*args: str) -> Result:
        return CliRunner().invoke(
            main, ["--gdpr", gdpr_address, "--token", ADMIN_TOKEN, "gdpr", *args]
        )

    person = ("--shop", mesh.shop, "--identifier", "email=cli@example.com")
    preview = await asyncio.to_thread(c360, "preview", *person)
    assert preview.exit_code == 0, preview.output
    lines = preview.output.splitlines()
    assert lines[0].split() == ["service", "table", "rows"]
    rows = {tuple(line.split()[:2]): int(line.split()[2]) for line in lines[1:-1]}
    assert rows[("identity", "identifier")] == 2
    assert rows[("profile", "consent_fact")] == 1
    assert lines[-1].split() == ["total", str(sum(rows.values()))]

    exported = tmp_path / "cli.json"
    result = await asyncio.to_thread(c360, "export", *person, "-o", str(exported))
    assert result.exit_code == 0, result.output
    document = json.loads(exported.read_text("utf-8"))
    assert document["customer"]["email"] == "cli@example.com"
    assert len(document["orders_requested"]) == 2
    assert result.output == (
        f"exported person {document['customer']['person_id']} (2 orders) to {exported}\n"
    )

    erased = await asyncio.to_thread(c360, "erase", *person, "--reason", "ticket 7")
    assert erased.exit_code == 0, erased.output
    first, *steps = erased.output.splitlines()
    assert first.endswith(f"person {document['customer']['person_id']} done")
    assert [s.split()[:2] for s in steps] == [["gate", "done:"], ["profile", "done:"],
                                              ["identity", "done:"]]  # fmt: skip

    counted = await asyncio.to_thread(c360, "inventory", "--shop", mesh.shop)
    assert counted.exit_code == 0, counted.output
    since = (datetime.now(UTC) - timedelta(days=1095)).date()
    assert [" ".join(line.split()) for line in counted.output.splitlines()] == [
        "customers 1",
        "with email 1 (100%)",
        "with phone 1 (100%)",
        "oldest record 2026-10-01",
        f"past retention 0 (0%) not seen since {since:%Y-%m-%d}",
        "erasures done 1",
    ]

    # Erased: the next preview names a person no service knows any more.
    again = await asyncio.to_thread(c360, "preview", *person)
    assert again.exit_code == 1
    assert again.output.startswith("Error: NOT_FOUND: ")


async def test_the_cli_asks_for_exactly_one_person(mesh: Mesh) -> None:
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["--token", ADMIN_TOKEN, "gdpr", "preview", "--shop", mesh.shop]
    )
    assert result.exit_code == 2
    assert "give exactly one of --person and --identifier" in result.output
