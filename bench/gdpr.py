"""Benchmark of GDPR (make bench-gdpr), each figure against a baseline measured in the same run,
because this machine is shared and noisy:

- erasure end to end (Gdpr.Erase until GetErasure says DONE: the gate, the profile's tombstone
  and scrub, identity's forget) of persons holding 1,000 orders and 10,000 events each, among
  a shop of other customers, against the floor of the same work: one plain SQL transaction
  re-anchoring a twin person's 11,000 fact rows;
- unsubscribe -> gate block: Profile.Unsubscribe, then Gate.Check until it answers
  `global_unsubscribe`, over 100 persons, against the gate's own floor: Gate.PutContactPolicy
  with the unsubscribe, then Gate.Check until blocked.

The whole mesh runs as processes on PostgreSQL and Redis, as in production.

Usage: python -m bench.gdpr [--erasures N] [--trials N] [--people N]; results in
bench/results/gdpr.json.
"""

import argparse
import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
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
    summarize,
    wait_serving,
)
from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.enrichment.settings import EnrichmentSettings
from services.gate.settings import GateSettings
from services.gdpr.settings import GdprSettings
from services.identity.settings import IdentitySettings
from services.profile.settings import ProfileSettings
from services.runtime import db
from services.runtime.settings import RuntimeSettings
from services.runtime.validation import timestamp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gdpr.json"
TOKEN = "bench-token"
SHOP = "bench-shop"
TOKENS = json.dumps([{"name": "bench", "token": TOKEN, "shops": ["*"], "roles": ["admin"]}])
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICES = ("identity", "profile", "gate", "gdpr", "enrichment")
ORDERS, EVENTS = 1_000, 10_000
DEADLINE_SECONDS = 60.0


def email(person: str) -> str:
    return f"{person}@mail.example"


async def seed(settings: dict[str, RuntimeSettings], people: int, heavy: list[str]) -> None:
    """`people` customers with three orders and an email consent each, and the heavy persons
    with 1,000 orders, 10,000 events and the evidence of every order, copied into the tables."""
    now = datetime.now(UTC)
    persons = [f"p_{n}" for n in range(people)] + heavy
    ids = await db.plain_connection(settings["identity"])
    try:
        await ids.copy_records_to_table(
            "person",
            columns=["shop_id", "person_id", "parent_id", "root_id", "created_at", "erased_at"],
            records=((SHOP, p, None, p, now, None) for p in persons),
        )
        await ids.copy_records_to_table(
            "identifier",
            columns=["shop_id", "type", "match_key", "value", "raw_value", "person_id",
                     "first_seen_at", "normalizer_version", "conflicts"],
            records=((SHOP, "email", email(p), email(p), email(p), p, now, 1, 0)
                     for p in persons),
        )  # fmt: skip
        evidence = [(h, k, 10_000_000 + i * ORDERS + k) for i, h in enumerate(heavy)
                    for k in range(ORDERS)]  # fmt: skip
        await ids.copy_records_to_table(
            "evidence",
            columns=["id", "shop_id", "event_id", "source", "strength", "observed_at",
                     "recorded_at", "person_id", "anchor_type", "anchor_key", "outcome"],
            records=((n, SHOP, f"order:{h}-{k}", "order_online", "authoritative", now, now, h,
                      "email", email(h), "linked") for h, k, n in evidence),
        )  # fmt: skip
        await ids.copy_records_to_table(
            "evidence_identifier",
            columns=["evidence_id", "position", "shop_id", "type", "raw_value", "match_key"],
            records=((n, 0, SHOP, "email", email(h), email(h)) for h, _, n in evidence),
        )
        await ids.execute("ANALYZE")
    finally:
        await ids.close()
    facts = await db.plain_connection(settings["profile"])
    try:
        orders = [(p, k) for p in persons[:people] for k in range(3)]
        orders += [(h, k) for h in heavy for k in range(ORDERS)]
        await facts.copy_records_to_table(
            "order_fact",
            columns=["shop_id", "order_id", "updated_at", "placed_at", "anchor_type",
                     "anchor_key", "total", "currency", "source", "location", "cancelled",
                     "line_items", "received_at"],
            records=((SHOP, f"{p}-{k}", now, now - timedelta(days=k % 700), "email", email(p),
                      Decimal("19.90"), "EUR", "online", "", False, "[]", now)
                     for p, k in orders),
        )  # fmt: skip
        await facts.copy_records_to_table(
            "event_fact",
            columns=["shop_id", "event_id", "anchor_type", "anchor_key", "kind", "channel", "at"],
            records=((SHOP, f"{h}-e{k}", "email", email(h), "open", "email",
                      now - timedelta(minutes=k)) for h in heavy for k in range(EVENTS)),
        )  # fmt: skip
        await facts.copy_records_to_table(
            "consent_fact",
            columns=["shop_id", "consent_id", "anchor_type", "anchor_key", "channel", "granted",
                     "consent_text", "source", "at"],
            records=((SHOP, f"c_{p}", "person", p, "email", True, "Yes, email me", "checkout",
                      now) for p in persons),
        )  # fmt: skip
        # The heavy persons' summaries are built by the profile, as they would have been.
        await facts.copy_records_to_table(
            "summary_due",
            columns=["shop_id", "person_id", "requested_at"],
            records=((SHOP, h, now) for h in heavy),
        )
        await facts.execute("ANALYZE")
    finally:
        await facts.close()


async def until(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    """Waits for a probe to hold, polling; a benchmark that never sees it stops."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await probe():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} never happened")
        await asyncio.sleep(0.01)


async def summaries_built(profile: RuntimeSettings, heavy: list[str]) -> None:
    async def built() -> bool:
        connection = await db.plain_connection(profile)
        try:
            found = await connection.fetchval(
                "SELECT count(*) FROM person_summary WHERE shop_id = $1 AND person_id = ANY($2)",
                SHOP, heavy,
            )  # fmt: skip
        finally:
            await connection.close()
        return bool(found == len(heavy))

    await until(built, "the heavy persons' summaries")


async def erase(gdpr: Any, person: str) -> float:
    """Seconds from Gdpr.Erase to the job's DONE."""
    started = time.perf_counter()
    job = await gdpr.Erase(
        gdpr_pb2.EraseRequest(
            shop_id=SHOP, person=common_pb2.PersonRef(person_id=person), reason="bench"
        ),
        metadata=AUTH,
    )

    async def done() -> bool:
        erasure = await gdpr.GetErasure(
            gdpr_pb2.GetErasureRequest(job_id=job.job_id), metadata=AUTH
        )
        return bool(erasure.state == gdpr_pb2.ERASURE_STATE_DONE)

    await until(done, f"the erasure of {person}")
    return time.perf_counter() - started


async def reanchor(profile: RuntimeSettings, person: str) -> float:
    """The floor: one transaction moving a person's orders and events onto their person id."""
    connection = await db.plain_connection(profile)
    try:
        started = time.perf_counter()
        async with connection.transaction():
            for table in ("order_fact", "event_fact"):
                await connection.execute(
                    f"UPDATE {table} SET anchor_type = 'person', anchor_key = $3 "  # noqa: S608
                    "WHERE shop_id = $1 AND anchor_type = 'email' AND anchor_key = $2",
                    SHOP, email(person), person,
                )  # fmt: skip
        return time.perf_counter() - started
    finally:
        await connection.close()


async def remaining(profile: RuntimeSettings, person: str) -> int:
    """Fact rows still carrying the person's email (0 after an erasure)."""
    connection = await db.plain_connection(profile)
    try:
        return int(
            await connection.fetchval(
                "SELECT (SELECT count(*) FROM order_fact WHERE shop_id = $1 AND anchor_key = $2)"
                " + (SELECT count(*) FROM event_fact WHERE shop_id = $1 AND anchor_key = $2)",
                SHOP, email(person),
            )
        )  # fmt: skip
    finally:
        await connection.close()


async def blocked_after(gate: Any, person: str, change: Callable[[str], Awaitable[Any]]) -> float:
    """Seconds from the start of a change to the first Gate.Check that blocks with
    global_unsubscribe; the person's email consent is put first (and checked allowed)."""
    await gate.PutContactPolicy(
        gate_pb2.PutContactPolicyRequest(
            shop_id=SHOP, person_id=person, time_zone="Europe/Helsinki",
            consents=[gate_pb2.ChannelConsent(channel=common_pb2.CHANNEL_EMAIL, granted=True)],
        ),
        metadata=AUTH,
    )  # fmt: skip

    async def reason() -> str:
        answer = await gate.Check(
            gate_pb2.CheckRequest(
                shop_id=SHOP, person_id=person, channel=common_pb2.CHANNEL_EMAIL,
                message_id=secrets.token_hex(8), dry_run=True,
            ),
            metadata=AUTH,
        )  # fmt: skip
        return str(answer.reason)

    if await reason() != "":
        raise SystemExit(f"{person} is blocked before the unsubscribe")
    started = time.perf_counter()
    await change(person)
    deadline = started + DEADLINE_SECONDS
    while await reason() != "global_unsubscribe":
        if time.perf_counter() > deadline:
            raise SystemExit(f"{person} was never blocked")
    return time.perf_counter() - started


async def run(erasures: int, trials: int, people: int) -> dict[str, Any]:
    database_url = bench_database_url()
    prefix = f"bench{secrets.token_hex(3)}_"
    kinds: dict[str, type[RuntimeSettings]] = {
        "identity": IdentitySettings, "profile": ProfileSettings, "gate": GateSettings,
        "gdpr": GdprSettings, "enrichment": EnrichmentSettings,
    }  # fmt: skip
    settings = {
        name: kind(database_url=database_url, db_schema_prefix=prefix)
        for name, kind in kinds.items()
    }
    for one in settings.values():
        await asyncio.to_thread(db.migrate, one, ROOT / "services" / one.service / "migrations")
    heavy = [f"heavy_{n}" for n in range(erasures)]
    twins = [f"twin_{n}" for n in range(erasures)]
    await seed(settings, people, heavy + twins)
    ports = {name: free_port() for name in (*SERVICES, "webhooks")}
    env = mesh_env(ports, SERVICES, prefix, TOKENS, TOKEN)
    log = open(ROOT / "bench" / "results" / "gdpr-server.log", "w")  # noqa: SIM115
    servers = [
        subprocess.Popen([sys.executable, "-m", f"services.{s}"], env=env, cwd=ROOT, stdout=log,
                         stderr=log)
        for s in SERVICES
    ]  # fmt: skip
    results: dict[str, Any] = {"people": people, "orders": ORDERS, "events": EVENTS}
    try:
        for service in SERVICES:
            await wait_serving(f"127.0.0.1:{ports[service]}")
        await summaries_built(settings["profile"], heavy + twins)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['gdpr']}") as to_gdpr,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['profile']}") as to_profile,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['gate']}") as to_gate,
        ):
            gdpr = gdpr_pb2_grpc.GdprStub(to_gdpr)
            profile = profile_pb2_grpc.ProfileStub(to_profile)
            gate = gate_pb2_grpc.GateStub(to_gate)
            erased, floor = [], []
            for person, twin in zip(heavy, twins, strict=True):
                floor.append(await reanchor(settings["profile"], twin))
                erased.append(await erase(gdpr, person))
                left = await remaining(settings["profile"], person)
                if left:
                    raise SystemExit(f"{left} fact rows still carry {person}'s email")
            results["erasure"] = {
                "erase_seconds": erased, "sql_floor_seconds": floor,
                "max_seconds": max(erased), "median_ratio": sorted(
                    e / f for e, f in zip(erased, floor, strict=True))[len(erased) // 2],
            }  # fmt: skip

            async def unsubscribe(person: str) -> None:
                await profile.Unsubscribe(
                    profile_pb2.UnsubscribeRequest(
                        shop_id=SHOP, person=common_pb2.PersonRef(person_id=person),
                        source="email_footer", at=timestamp(datetime.now(UTC)),
                    ),
                    metadata=AUTH,
                )  # fmt: skip

            async def put_unsubscribed(person: str) -> None:
                await gate.PutContactPolicy(
                    gate_pb2.PutContactPolicyRequest(
                        shop_id=SHOP, person_id=person, global_unsubscribe=True,
                        time_zone="Europe/Helsinki",
                    ),
                    metadata=AUTH,
                )  # fmt: skip

            direct: list[float] = []
            through: list[float] = []
            for n in range(trials):
                a, b = f"p_{2 * n}", f"p_{2 * n + 1}"
                direct.append(1000 * await blocked_after(gate, a, put_unsubscribed))
                through.append(1000 * await blocked_after(gate, b, unsubscribe))
            floor_figures = summarize(direct, sum(direct) / 1000, 0)
            figures = summarize(through, sum(through) / 1000, 0)
            results["unsubscribe"] = {
                "trials": trials, "gate_put": floor_figures, "through_profile": figures,
                "p99_ratio": figures["p99_ms"] / floor_figures["p99_ms"],
            }  # fmt: skip
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
        for one in settings.values():
            await drop_schema(one)
    return results


def report(r: dict[str, Any]) -> str:
    e, u = r["erasure"], r["unsubscribe"]
    seconds = ", ".join(f"{s:.2f}" for s in e["erase_seconds"])
    floors = ", ".join(f"{s:.2f}" for s in e["sql_floor_seconds"])
    return "\n".join(
        [
            f"erasure of a person with {r['orders']:,} orders and {r['events']:,} events among "
            f"{r['people']:,} customers, end to end: {seconds} s (max {e['max_seconds']:.2f} s) "
            f"vs re-anchoring the same rows in plain SQL: {floors} s "
            f"(median ratio x{e['median_ratio']:.1f})",
            f"unsubscribe -> gate block over {u['trials']} persons: p50 "
            f"{u['through_profile']['p50_ms']:.1f} ms, p99 {u['through_profile']['p99_ms']:.1f} ms"
            f" vs the gate's own put: p50 {u['gate_put']['p50_ms']:.1f} ms, p99 "
            f"{u['gate_put']['p99_ms']:.1f} ms (p99 x{u['p99_ratio']:.1f})",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--erasures", type=int, default=5)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--people", type=int, default=20_000)
    args = parser.parse_args()
    if args.people < 2 * args.trials:
        parser.error("--people must be at least twice --trials")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.erasures, args.trials, args.people))
    RESULTS.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
