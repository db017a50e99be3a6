"""Benchmark of audiences (make bench-audience), each figure against a plain SQL scan of the same
rows measured in the same run, because this machine is shared and noisy:

- segment evaluation: Profile.CreateSegment (which counts the members in the database) and
  Profile.StreamSegmentMembers received in full, for `orders(90d) >= 2 and consent.whatsapp and
  aov > 80` over 1,000,000 profiles (about two orders each), against `count(*)` of the shop's
  summaries plus `count(*)` of its orders;
- the change feed: one Profile.WatchChanges consumer from the beginning until it has received
  200,000 changes, against `SELECT *` of the shop's changes in sequence order;
- the CRM 360 export (JSON lines) of the whole shop through Profile.Export, against `SELECT *`
  of the shop's summaries read through a cursor.

The profiles, their anchors and orders and the changes are copied straight into the tables.
Targets (issue #6): segment evaluation <= 5 s, change feed >= 5,000 changes/s, export <= 60 s.

Usage: python -m bench.audience [--profiles N] [--events E]; results in
bench/results/audience.json.
"""

import argparse
import asyncio
import json
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc

from bench.load import (
    bench_database_url,
    drop_schema,
    free_port,
    mesh_env,
    wait_serving,
)
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.gate.settings import GateSettings
from services.identity.settings import IdentitySettings
from services.profile.settings import ProfileSettings
from services.runtime import db

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "audience.json"
TOKEN = "bench-token"
SHOP = "bench-shop"
TOKENS = json.dumps([{"name": "bench", "token": TOKEN, "shops": ["*"], "roles": ["admin"]}])
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICES = ("identity", "profile", "gate")
FILTER = "orders(90d) >= 2 and consent.whatsapp and aov > 80"
TARGETS = {"segment_seconds": 5.0, "feed_per_second": 5000.0, "export_seconds": 60.0}
SEED = 6  # the number: the same profiles in every run
CALL_TIMEOUT = 1800.0
SOURCES = ("online", "online", "online", "pos", "marketplace")
FEED = (
    ("lifecycle_stage_changed", {"from": "engaged", "to": "at_risk"}),
    ("churn_risk_crossed", {"threshold": 0.5, "from": 0.42, "to": 0.61, "direction": "up"}),
    ("consent_changed", {"channel": "email", "granted": True, "source": "checkout",
                         "at": "2026-03-01T10:00:00+00:00"}),
    ("replenishment_due", {"products": ["sku-1", "sku-2"]}),
)  # fmt: skip


# --- the seeded profiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """One seeded person: their orders (placed at, total, source) and consents."""

    n: int
    orders: list[tuple[datetime, Decimal, str]]
    whatsapp: bool
    email: bool
    sms: bool

    @property
    def person_id(self) -> str:
        return f"p_{self.n}"

    @property
    def anchor(self) -> str:
        return f"p{self.n}@bench.example"

    @property
    def spend(self) -> Decimal:
        return sum((total for _, total, _ in self.orders), Decimal(0))

    @property
    def aov(self) -> Decimal:
        return (self.spend / len(self.orders)).quantize(Decimal("0.0001"))


def people(count: int, now: datetime) -> Iterator[Person]:
    """The same `count` persons on every call: one to three orders each (two on average), over
    the last 365 days, and 20% with a WhatsApp consent. Orders are placed half a day (give or
    take six hours) off whole days ago, so a window of whole days counts the same orders however
    long the run takes."""
    rng = random.Random(SEED)
    for n in range(count):
        orders = []
        for _ in range(rng.choice((1, 2, 3))):
            ago = timedelta(days=rng.randrange(365) + 0.5, seconds=rng.uniform(-21600, 21600))
            total = Decimal(rng.randrange(500, 20000)) / 100
            orders.append((now - ago, total, rng.choice(SOURCES)))
        yield Person(n, orders, rng.random() < 0.2, rng.random() < 0.5, rng.random() < 0.1)


def summary_of(person: Person, now: datetime) -> tuple[Any, ...]:
    """A person's `person_summary` row, as the refresher would have written it."""
    placed = sorted(at for at, _, _ in person.orders)
    first_source = min(person.orders)[2]
    by_source = {s: sum(1 for *_, o in person.orders if o == s) for s in set(SOURCES)}
    return (
        SHOP, person.person_id, person.anchor, f"F{person.n}", "fi-FI", "EUR",
        len(person.orders), person.spend, person.aov,
        placed[0], placed[-1], first_source, by_source["online"], by_source["pos"],
        by_source["marketplace"], "", "", person.email, person.sms, person.whatsapp, False,
        False, False, False, 0, "", now,
    )  # fmt: skip


SUMMARY_COLUMNS = [
    "shop_id", "person_id", "email", "first_name", "locale", "currency", "order_count", "spend",
    "aov", "first_order_at", "last_order_at", "acquisition", "online_orders", "pos_orders",
    "marketplace_orders", "location", "preferred_category", "consent_email", "consent_sms",
    "consent_whatsapp", "consent_push", "unsubscribed", "app_installed", "loyalty_member",
    "lifetime_points", "tier", "updated_at",
]  # fmt: skip
ORDER_COLUMNS = [
    "shop_id", "order_id", "updated_at", "placed_at", "anchor_type", "anchor_key", "total",
    "currency", "source", "location", "cancelled", "line_items", "received_at",
]  # fmt: skip


def matches(person: Person, now: datetime) -> bool:
    """Whether the person matches FILTER, computed here from what was seeded."""
    since = now - timedelta(days=90)
    recent = sum(1 for at, _, _ in person.orders if at >= since)
    return recent >= 2 and person.whatsapp and person.aov > 80


async def seed(profile: ProfileSettings, count: int, events: int, now: datetime) -> int:
    """Copies `count` persons (summary, anchor, orders) and `events` changes into the profile's
    tables; returns how many persons match FILTER."""
    connection = await db.plain_connection(profile)
    try:
        await connection.copy_records_to_table(
            "person_summary",
            columns=SUMMARY_COLUMNS,
            records=(summary_of(p, now) for p in people(count, now)),
        )
        await connection.copy_records_to_table(
            "person_anchor",
            columns=["shop_id", "anchor_type", "anchor_key", "person_id"],
            records=((SHOP, "email", p.anchor, p.person_id) for p in people(count, now)),
        )
        await connection.copy_records_to_table(
            "order_fact",
            columns=ORDER_COLUMNS,
            records=((SHOP, f"{p.n}-{k}", now, at, "email", p.anchor, total, "EUR", source, "",
                      False, "[]", now)
                     for p in people(count, now)
                     for k, (at, total, source) in enumerate(p.orders)),
        )  # fmt: skip
        await connection.copy_records_to_table(
            "profile_change",
            columns=["shop_id", "person_id", "kind", "data", "at"],
            records=((SHOP, f"p_{e % count}", FEED[e % len(FEED)][0],
                      json.dumps(FEED[e % len(FEED)][1]), now) for e in range(events)),
        )  # fmt: skip
        await connection.execute(
            "ANALYZE person_summary; ANALYZE person_anchor; ANALYZE order_fact;"
            "ANALYZE profile_change"
        )
    finally:
        await connection.close()
    return sum(matches(p, now) for p in people(count, now))


# --- the baselines: plain SQL scans of the same rows --------------------------------------------


async def timed_scans(profile: ProfileSettings) -> dict[str, float]:
    """Seconds of each baseline scan, on one plain asyncpg connection."""
    connection = await db.plain_connection(profile)
    try:
        started = time.perf_counter()
        await connection.fetchval("SELECT count(*) FROM person_summary WHERE shop_id = $1", SHOP)
        await connection.fetchval("SELECT count(*) FROM order_fact WHERE shop_id = $1", SHOP)
        counted = time.perf_counter() - started
        started = time.perf_counter()
        changes = await connection.fetch(
            "SELECT * FROM profile_change WHERE shop_id = $1 ORDER BY seq", SHOP
        )
        fetched = time.perf_counter() - started
        rows = 0
        started = time.perf_counter()
        async with connection.transaction():
            async for _ in connection.cursor(
                "SELECT * FROM person_summary WHERE shop_id = $1", SHOP, prefetch=1000
            ):
                rows += 1
        scanned = time.perf_counter() - started
    finally:
        await connection.close()
    return {
        "count_seconds": counted,
        "changes_seconds": fetched,
        "changes": len(changes),
        "summaries_seconds": scanned,
        "summaries": rows,
    }


# --- the measurements through the service -------------------------------------------------------


async def segment(stub: Any) -> dict[str, Any]:
    started = time.perf_counter()
    created = await stub.CreateSegment(
        profile_pb2.CreateSegmentRequest(shop_id=SHOP, name=f"bench-{secrets.token_hex(4)}",
                                         filter=FILTER),
        metadata=AUTH, timeout=CALL_TIMEOUT,
    )  # fmt: skip
    create_seconds = time.perf_counter() - started
    streamed = 0
    started = time.perf_counter()
    async for _ in stub.StreamSegmentMembers(
        profile_pb2.StreamSegmentMembersRequest(shop_id=SHOP, segment_id=created.segment_id),
        metadata=AUTH, timeout=CALL_TIMEOUT,
    ):  # fmt: skip
        streamed += 1
    return {
        "create_seconds": create_seconds,
        "member_count": created.member_count,
        "stream_seconds": time.perf_counter() - started,
        "streamed": streamed,
    }


async def feed(stub: Any, events: int) -> dict[str, Any]:
    """One consumer from the beginning until it has `events` changes; the stream never ends
    by itself (it follows new changes), so it is cancelled then."""
    received, last = 0, ""
    started = time.perf_counter()
    call = stub.WatchChanges(
        profile_pb2.WatchChangesRequest(shop_id=SHOP, from_cursor=""),
        metadata=AUTH, timeout=CALL_TIMEOUT,
    )  # fmt: skip
    try:
        async for change in call:
            received, last = received + 1, change.cursor
            if received == events:
                break
    finally:
        call.cancel()
    seconds = time.perf_counter() - started
    return {"received": received, "last_cursor": last, "seconds": seconds,
            "per_second": received / seconds}  # fmt: skip


async def export(stub: Any) -> dict[str, Any]:
    size = lines = chunks = 0
    started = time.perf_counter()
    async for chunk in stub.Export(
        profile_pb2.ExportRequest(
            shop_id=SHOP, dataset=profile_pb2.EXPORT_DATASET_CRM360,
            format=profile_pb2.EXPORT_FORMAT_JSONL,
        ),
        metadata=AUTH, timeout=CALL_TIMEOUT,
    ):  # fmt: skip
        chunks += 1
        size += len(chunk.data)
        lines += chunk.data.count(b"\n")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": size, "lines": lines, "chunks": chunks,
            "rows_per_second": lines / seconds}  # fmt: skip


# --- the run ------------------------------------------------------------------------------------


async def run(count: int, events: int) -> dict[str, Any]:
    database_url = bench_database_url()
    prefix = f"bench{secrets.token_hex(3)}_"
    identity = IdentitySettings(database_url=database_url, db_schema_prefix=prefix)
    profile = ProfileSettings(database_url=database_url, db_schema_prefix=prefix)
    gate = GateSettings(database_url=database_url, db_schema_prefix=prefix)
    results: dict[str, Any] = {
        "profiles": count, "events": events, "filter": FILTER, "targets": TARGETS,
    }  # fmt: skip
    log = open(ROOT / "bench" / "results" / "audience-server.log", "w")  # noqa: SIM115
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for settings in (identity, profile, gate):
            migrations = ROOT / "services" / settings.service / "migrations"
            await asyncio.to_thread(db.migrate, settings, migrations)
        started = time.perf_counter()
        expected = await seed(profile, count, events, datetime.now(UTC))
        results["seed_seconds"] = time.perf_counter() - started
        ports = {name: free_port() for name in (*SERVICES, "webhooks")}
        env = mesh_env(ports, SERVICES, prefix, TOKENS, TOKEN)
        servers = [
            subprocess.Popen([sys.executable, "-m", f"services.{s}"], env=env, cwd=ROOT,
                             stdout=log, stderr=log)
            for s in ("identity", "gate", "profile")
        ]  # fmt: skip
        for service in ("identity", "gate", "profile"):
            await wait_serving(f"127.0.0.1:{ports[service]}")
        scans = await timed_scans(profile)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['profile']}") as channel:
            stub = profile_pb2_grpc.ProfileStub(channel)
            segmented = await segment(stub)
            fed = await feed(stub, events)
            exported = await export(stub)
    finally:
        for server in reversed(servers):  # callers before the services they call
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
        for settings in (identity, profile, gate):
            await drop_schema(settings)
    slowest = max(segmented["create_seconds"], segmented["stream_seconds"])
    results["segment"] = {
        **segmented,
        "expected_members": expected,
        "baseline_seconds": scans["count_seconds"],
        "create_ratio": segmented["create_seconds"] / scans["count_seconds"],
        "stream_ratio": segmented["stream_seconds"] / scans["count_seconds"],
        "target_seconds": TARGETS["segment_seconds"],
        "met": slowest <= TARGETS["segment_seconds"] and segmented["member_count"] == expected,
    }
    baseline_rate = scans["changes"] / scans["changes_seconds"]
    results["feed"] = {
        **fed,
        "baseline_seconds": scans["changes_seconds"],
        "baseline_per_second": baseline_rate,
        "ratio": baseline_rate / fed["per_second"],
        "target_per_second": TARGETS["feed_per_second"],
        "met": fed["received"] == events and fed["per_second"] >= TARGETS["feed_per_second"],
    }
    results["export"] = {
        **exported,
        "baseline_seconds": scans["summaries_seconds"],
        "baseline_rows": scans["summaries"],
        "baseline_rows_per_second": scans["summaries"] / scans["summaries_seconds"],
        "ratio": exported["seconds"] / scans["summaries_seconds"],
        "target_seconds": TARGETS["export_seconds"],
        "met": exported["lines"] == count and exported["seconds"] <= TARGETS["export_seconds"],
    }
    return results


def report(r: dict[str, Any]) -> str:
    s, f, e = r["segment"], r["feed"], r["export"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return "\n".join([
        f"Audiences over {r['profiles']:,} profiles and {r['events']:,} changes "
        f"(seeded by COPY in {r['seed_seconds']:.1f}s); ratios are service time / SQL scan time",
        f"{'measurement':<34} {'service':>12} {'SQL scan':>12} {'ratio':>8}  target",
        f"{'CreateSegment (counts members)':<34} {s['create_seconds']:>11.2f}s "
        f"{s['baseline_seconds']:>11.2f}s {s['create_ratio']:>7.1f}x  <= 5 s "
        f"{met(s['create_seconds'] <= s['target_seconds'])}",
        f"{'StreamSegmentMembers, all':<34} {s['stream_seconds']:>11.2f}s "
        f"{s['baseline_seconds']:>11.2f}s {s['stream_ratio']:>7.1f}x  <= 5 s "
        f"{met(s['stream_seconds'] <= s['target_seconds'])}",
        f"{'':<34} members {s['member_count']:,} counted, {s['streamed']:,} streamed, "
        f"{s['expected_members']:,} expected",
        f"{'WatchChanges, one consumer':<34} {f['per_second']:>10,.0f}/s "
        f"{f['baseline_per_second']:>10,.0f}/s {f['ratio']:>7.1f}x  >= 5,000/s "
        f"{met(f['met'])}",
        f"{'':<34} {f['received']:,} changes in {f['seconds']:.2f}s "
        f"(SQL {f['baseline_seconds']:.2f}s)",
        f"{'Export CRM 360, JSON lines':<34} {e['seconds']:>11.2f}s "
        f"{e['baseline_seconds']:>11.2f}s {e['ratio']:>7.1f}x  <= 60 s {met(e['met'])}",
        f"{'':<34} {e['lines']:,} lines, {e['bytes'] / 1e6:,.1f} MB, "
        f"{e['rows_per_second']:,.0f} rows/s (SQL {e['baseline_rows_per_second']:,.0f} rows/s)",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.profiles, args.events))
    RESULTS.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
