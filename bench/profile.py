"""Benchmark of the profile service (make bench-profile), each figure against a baseline measured
in the same run, because this machine is shared and noisy:

- Profile.Get with 100,000 people stored (three orders and a consent each), at concurrency 1 and
  16, against a bare grpc.aio server that answers Get with an empty profile (the echo baseline);
- Shopify orders/create webhooks accepted durably (stored, then 200), 16 senders, against an
  aiohttp server on the same machine that answers 200 without storing anything;
- backfill through `c360 import` (customers, then orders), against PostgreSQL COPY of the same
  rows: the target's 50,000 customers and 200,000 orders by default (--backfill F runs a
  fraction F of that, the full-size time projected from the measured rate); each phase with the
  CPU every service and the importer spent, and how long the background work the import queued
  (summaries, contact policies pushed to the gate) took to finish after it.

Usage: python -m bench.profile [--seconds S] [--people N] [--backfill F] [--only get|backfill];
results in bench/results/profile.json (with --only, that measurement's figures only, in
bench/results/profile-<name>.json, so the full run's file keeps the other measurements).
"""

import argparse
import asyncio
import csv
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web

from bench.load import (
    bench_database_url,
    drop_schema,
    free_port,
    mesh_env,
    summarize,
    wait_listening,
    wait_serving,
)
from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.importing import Importer
from services.gate.settings import GateSettings
from services.identity.settings import IdentitySettings
from services.profile.settings import ProfileSettings
from services.profile.shopify import signature
from services.runtime import db

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "profile.json"
TOKEN = "bench-token"
SECRET = "bench-shopify-secret"
SHOP = "bench-shop"
TOKENS = json.dumps([{"name": "bench", "token": TOKEN, "shops": ["*"], "roles": ["admin"]}])
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICES = ("identity", "profile", "gate")


# --- baselines ----------------------------------------------------------------------------------


class EchoProfile(profile_pb2_grpc.ProfileServicer):
    """Answers Get with an empty profile naming the person asked for."""

    async def Get(self, request: Any, context: Any) -> Any:
        return profile_pb2.CustomerProfile(
            shop_id=request.shop_id, person_id=request.person.person_id
        )


async def serve_echo(port: int) -> None:
    server = grpc.aio.server()
    profile_pb2_grpc.add_ProfileServicer_to_server(EchoProfile(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


async def serve_ok(port: int) -> None:
    """An HTTP server that answers every POST 200 with the same JSON, storing nothing."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": True, "duplicate": False})

    app = web.Application()
    app.router.add_post("/webhooks/shopify", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


# --- load generators (each in a process of its own) --------------------------------------------


async def load_get(address: str, concurrency: int, seconds: float, people: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    without_history = 0  # answers the gate's contact history was missing from
    async with grpc.aio.insecure_channel(address) as channel:
        stub = profile_pb2_grpc.ProfileStub(channel)
        deadline = time.perf_counter() + seconds

        async def caller(index: int) -> None:
            nonlocal errors, without_history
            rng = random.Random(index)
            while time.perf_counter() < deadline:
                request = profile_pb2.GetRequest(
                    shop_id=SHOP,
                    person=common_pb2.PersonRef(person_id=f"p_{rng.randrange(people)}"),
                )
                started = time.perf_counter()
                try:
                    answer = await stub.Get(request, metadata=AUTH, timeout=5)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                without_history += not answer.HasField("contact_history")

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        summary = summarize(latencies, time.perf_counter() - started, errors)
        return {**summary, "without_contact_history": without_history}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load_webhooks(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    order = json.loads((ROOT / "tests" / "fixtures" / "shopify" / "orders_create.json").read_text())
    latencies: list[float] = []
    errors = 0
    run = secrets.token_hex(4)
    async with aiohttp.ClientSession() as http:
        deadline = time.perf_counter() + seconds

        async def sender(index: int) -> None:
            nonlocal errors
            sequence = 0
            while time.perf_counter() < deadline:
                sequence += 1
                order["id"] = 6_000_000_000_000 + index * 1_000_000 + sequence
                body = json.dumps(order).encode()
                headers = {
                    "X-Shopify-Topic": "orders/create",
                    "X-Shopify-Shop-Domain": SHOP,
                    "X-Shopify-Webhook-Id": f"{run}-{index}-{sequence}",
                    "X-Shopify-Hmac-Sha256": signature(SECRET, body),
                }
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        continue
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(sender(i) for i in range(concurrency)))
        return summarize(latencies, time.perf_counter() - started, errors)


def drive(*args: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-m", "bench.profile", *args],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(output)
    return result


# --- seeding ------------------------------------------------------------------------------------


async def seed(identity: IdentitySettings, profile: ProfileSettings, people: int) -> None:
    """`people` persons with an email each in identity; three orders and a consent each in the
    profile, copied straight into the tables."""
    now = datetime.now(UTC)
    ids = await db.plain_connection(identity)
    try:
        await ids.copy_records_to_table(
            "person",
            columns=["shop_id", "person_id", "parent_id", "root_id", "created_at", "erased_at"],
            records=((SHOP, f"p_{n}", None, f"p_{n}", now, None) for n in range(people)),
        )
        await ids.copy_records_to_table(
            "identifier",
            columns=["shop_id", "type", "match_key", "value", "raw_value", "person_id",
                     "first_seen_at", "normalizer_version", "conflicts"],
            records=((SHOP, "email", f"s{n}@mail.example", f"s{n}@mail.example",
                      f"s{n}@mail.example", f"p_{n}", now, 1, 0) for n in range(people)),
        )  # fmt: skip
        await ids.execute("ANALYZE person; ANALYZE identifier")
    finally:
        await ids.close()
    facts = await db.plain_connection(profile)
    try:
        await facts.copy_records_to_table(
            "order_fact",
            columns=["shop_id", "order_id", "updated_at", "placed_at", "anchor_type",
                     "anchor_key", "total", "currency", "source", "location", "cancelled",
                     "line_items", "received_at"],
            records=((SHOP, f"{n}-{k}", now, now, "email", f"s{n}@mail.example",
                      Decimal("19.90"), "EUR",
                      "pos" if k == 2 else "online", "Turku" if k == 2 else "", False, "[]", now)
                     for n in range(people) for k in range(3)),
        )  # fmt: skip
        await facts.copy_records_to_table(
            "consent_fact",
            columns=["shop_id", "consent_id", "anchor_type", "anchor_key", "channel", "granted",
                     "consent_text", "source", "at"],
            records=((SHOP, f"c{n}", "person", f"p_{n}", "email", True, "Yes", "checkout", now)
                     for n in range(people)),
        )  # fmt: skip
        await facts.execute("ANALYZE order_fact; ANALYZE consent_fact")
    finally:
        await facts.close()


def write_backfill(folder: Path, customers: int, orders: int) -> tuple[Path, Path]:
    customer_file = folder / "customers.csv"
    with customer_file.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["Email", "First Name", "Last Name", "Email Marketing Consent"])
        for n in range(customers):
            writer.writerow([f"b{n}@backfill.example", f"F{n}", f"L{n}", "SUBSCRIBED"])
    order_file = folder / "orders.jsonl"
    with order_file.open("w") as out:
        for n in range(orders):
            out.write(json.dumps({
                "order_id": str(7_000_000_000_000 + n),
                "identifiers": [{"type": "email", "value": f"b{n % customers}@backfill.example"}],
                "placed_at": "2026-03-01T10:00:00Z", "total": "24.90", "currency": "EUR",
                "source": "online",
            }) + "\n")  # fmt: skip
    return customer_file, order_file


async def copy_baseline(profile: ProfileSettings, customers: int, orders: int) -> float:
    """Seconds PostgreSQL takes to COPY the same rows into tables of the same shape."""
    connection = await db.plain_connection(profile)
    try:
        await connection.execute(
            "CREATE TEMP TABLE copy_orders (LIKE order_fact INCLUDING ALL);"
            "CREATE TEMP TABLE copy_customers (LIKE customer_fact INCLUDING ALL)"
        )
        now = datetime.now(UTC)
        started = time.perf_counter()
        await connection.copy_records_to_table(
            "copy_customers",
            columns=["shop_id", "source", "source_id", "updated_at", "anchor_type", "anchor_key",
                     "first_name", "last_name", "tags", "attributes", "deleted", "forgotten"],
            records=((SHOP, "custobar", f"email:b{n}@backfill.example", now, "email",
                      f"b{n}@backfill.example", f"F{n}", f"L{n}", "[]", "{}", False, False)
                     for n in range(customers)),
        )  # fmt: skip
        await connection.copy_records_to_table(
            "copy_orders",
            columns=["shop_id", "order_id", "updated_at", "placed_at", "anchor_type",
                     "anchor_key", "total", "currency", "source", "location", "cancelled",
                     "line_items", "received_at"],
            records=((SHOP, str(7_000_000_000_000 + n), now, now, "email",
                      f"b{n % customers}@backfill.example", Decimal("24.90"),
                      "EUR", "online", "", False, "[]", now) for n in range(orders)),
        )  # fmt: skip
        return time.perf_counter() - started
    finally:
        await connection.close()


async def backfill(
    profile: ProfileSettings, port: int, mesh: dict[str, Any], scale: float
) -> dict[str, Any]:
    """`c360 import` of customers, then orders, timed each (and the CPU each service spent),
    against COPY of the same rows."""
    customers, orders = int(50_000 * scale), int(200_000 * scale)
    folder = ROOT / "bench" / "results"
    files = dict(zip(("customers", "orders"), write_backfill(folder, customers, orders),
                     strict=True))  # fmt: skip
    phases: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = profile_pb2_grpc.ProfileStub(channel)
        for kind, path in files.items():
            before = {name: cpu_seconds(p.pid) for name, p in mesh.items()}
            client = time.process_time()  # the importer runs in this process
            started = time.perf_counter()
            await Importer(stub, TOKEN, SHOP, path, lambda _: None).run(kind)
            phases[kind] = {
                "seconds": time.perf_counter() - started,
                "cpu_seconds": {
                    **{n: round(cpu_seconds(p.pid) - before[n], 2) for n, p in mesh.items()},
                    "importer": round(time.process_time() - client, 2),
                },
            }
    imported = sum(phase["seconds"] for phase in phases.values())
    drained = await drain(profile)
    copied = await copy_baseline(profile, customers, orders)
    return {
        "customers": customers, "orders": orders, "import_seconds": imported,
        "phases": phases, "background_seconds_after": drained, "copy_seconds": copied,
        "ratio": imported / copied, "projected_full_seconds": imported / scale,
    }  # fmt: skip


async def drain(profile: ProfileSettings, limit: float = 900.0) -> float:
    """Seconds until the profile's background work the import queued is done: every summary
    refreshed, every contact policy pushed to the gate (at most `limit`)."""
    connection = await db.plain_connection(profile)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < limit:
            left = await connection.fetchval(
                "SELECT (SELECT count(*) FROM summary_due) + (SELECT count(*) FROM gate_push)"
            )
            if not left:
                break
            await asyncio.sleep(0.5)
        return time.perf_counter() - started
    finally:
        await connection.close()


# --- the run ------------------------------------------------------------------------------------


async def run(seconds: float, people: int, backfill_scale: float, only: str = "") -> dict[str, Any]:
    database_url = bench_database_url()
    prefix = f"bench{secrets.token_hex(3)}_"
    identity = IdentitySettings(database_url=database_url, db_schema_prefix=prefix)
    profile = ProfileSettings(database_url=database_url, db_schema_prefix=prefix)
    gate = GateSettings(database_url=database_url, db_schema_prefix=prefix)
    for settings in (identity, profile, gate):
        migrations = ROOT / "services" / settings.service / "migrations"
        await asyncio.to_thread(db.migrate, settings, migrations)
    if only != "backfill":
        await seed(identity, profile, people)
    ports = {
        name: free_port() for name in ("identity", "profile", "gate", "echo", "webhooks", "ok")
    }
    env = mesh_env(ports, SERVICES, prefix, TOKENS, TOKEN, SHOPIFY_API_SECRET=SECRET)
    log = open(ROOT / "bench" / "results" / "profile-server.log", "w")  # noqa: SIM115
    servers = [
        subprocess.Popen([sys.executable, "-m", f"services.{s}"], env=env, cwd=ROOT, stdout=log,
                         stderr=log)
        for s in ("identity", "gate", "profile")
    ] + [
        subprocess.Popen([sys.executable, "-m", "bench.profile", "echo", str(ports["echo"])],
                         cwd=ROOT),
        subprocess.Popen([sys.executable, "-m", "bench.profile", "ok", str(ports["ok"])],
                         cwd=ROOT),
    ]  # fmt: skip
    results: dict[str, Any] = {"people": people}
    try:
        for service in ("identity", "gate", "profile"):
            await wait_serving(f"127.0.0.1:{ports[service]}")
        for bare in ("echo", "ok"):  # the bare baselines have no health service
            await wait_listening(ports[bare])
        results["get"] = {}
        mesh = dict(zip(("identity", "gate", "profile"), servers, strict=False))
        for concurrency in () if only == "backfill" else (1, 16):
            # The services' CPU while the echo server is measured is their background work
            # (followers, outboxes, health): taken off what they use while serving Get.
            idle = {name: cpu_seconds(p.pid) for name, p in mesh.items()}
            echo = drive("load-get", f"127.0.0.1:{ports['echo']}", str(concurrency), str(seconds),
                         str(people))  # fmt: skip
            busy = {name: cpu_seconds(p.pid) for name, p in mesh.items()}
            idle = {name: busy[name] - idle[name] for name in mesh}
            got = drive("load-get", f"127.0.0.1:{ports['profile']}", str(concurrency),
                        str(seconds), str(people))  # fmt: skip
            used = {name: cpu_seconds(p.pid) - busy[name] - idle[name] for name, p in mesh.items()}
            results["get"][str(concurrency)] = {
                "echo": echo, "get": got,
                "throughput_ratio": got["per_second"] / echo["per_second"],
                "p99_ratio": got["p99_ms"] / echo["p99_ms"],
                "cpu_ms_per_get": {n: round(1000 * u / max(got["calls"], 1), 2)
                                   for n, u in used.items()},
            }  # fmt: skip
        if only == "get":
            return results
        if only != "backfill":
            ok = drive("load-webhooks", f"http://127.0.0.1:{ports['ok']}/webhooks/shopify", "16",
                       str(seconds))  # fmt: skip
            stored = drive("load-webhooks",
                           f"http://127.0.0.1:{ports['webhooks']}/webhooks/shopify", "16",
                           str(seconds))  # fmt: skip
            results["webhooks"] = {
                "ok_server": ok,
                "accepted": stored,
                "throughput_ratio": stored["per_second"] / ok["per_second"],
            }
        results["backfill"] = await backfill(profile, ports["profile"], mesh, backfill_scale)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
        for settings in (identity, profile, gate):
            await drop_schema(settings)
    return results


def report(r: dict[str, Any]) -> str:
    lines = [f"Profile.Get vs a bare echo server, {r['people']:,} people stored"]
    for level, g in r["get"].items():
        cpu = g.get("cpu_ms_per_get", {})
        lines.append(
            f"  c{level:<3} echo {g['echo']['per_second']:>7.0f}/s p99 {g['echo']['p99_ms']:6.2f}ms"
            f" | Get {g['get']['per_second']:>6.0f}/s p99 {g['get']['p99_ms']:6.2f}ms"
            f" | ratio {g['throughput_ratio']:.2f}, p99 x{g['p99_ratio']:.2f}"
            f" | CPU ms/Get {', '.join(f'{n} {v:.2f}' for n, v in cpu.items())}"
            f" | {g['get'].get('without_contact_history', 0)} without contact history"
        )
    if "webhooks" in r:
        w = r["webhooks"]
        lines.append(
            f"orders/create webhooks, 16 senders: accepted durably"
            f" {w['accepted']['per_second']:.0f}/s (p99 {w['accepted']['p99_ms']:.1f}ms) vs"
            f" {w['ok_server']['per_second']:.0f}/s from an HTTP server storing nothing"
            f" (ratio {w['throughput_ratio']:.2f})"
        )
    if "backfill" not in r:
        return "\n".join(lines)
    b = r["backfill"]
    lines.append(
        f"backfill of {b['customers']:,} customers + {b['orders']:,} orders: "
        f"{b['import_seconds']:.1f}s vs COPY {b['copy_seconds']:.2f}s (x{b['ratio']:.0f}); "
        f"projected for 50,000 + 200,000: {b['projected_full_seconds']:.0f}s"
    )
    lines.append(
        f"  background work (summaries, pushes to the gate) done"
        f" {b.get('background_seconds_after', 0):.1f}s after the import"
    )
    for kind, phase in b.get("phases", {}).items():
        cpu = ", ".join(f"{n} {v:.1f}s" for n, v in phase["cpu_seconds"].items())
        lines.append(f"  {kind}: {phase['seconds']:.1f}s; CPU {cpu}")
    return "\n".join(lines)


def main() -> None:
    role = sys.argv[1:2]
    if role == ["echo"]:
        asyncio.run(serve_echo(int(sys.argv[2])))
        return
    if role == ["ok"]:
        asyncio.run(serve_ok(int(sys.argv[2])))
        return
    if role == ["load-get"]:
        address, concurrency, seconds, people = sys.argv[2:6]
        print(
            json.dumps(
                asyncio.run(load_get(address, int(concurrency), float(seconds), int(people)))
            )
        )
        return
    if role == ["load-webhooks"]:
        url, concurrency, seconds = sys.argv[2:5]
        print(json.dumps(asyncio.run(load_webhooks(url, int(concurrency), float(seconds)))))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--backfill", type=float, default=1.0)
    parser.add_argument(
        "--only", choices=["get", "backfill"], default="", help="run only this measurement"
    )
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.seconds, args.people, args.backfill, args.only))
    written = RESULTS.with_name(f"profile-{args.only}.json") if args.only else RESULTS
    written.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"written to {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
