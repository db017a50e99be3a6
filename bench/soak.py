"""Proof under load and faults (make soak; not part of make test): the whole mesh as processes,
on a PostgreSQL and a Redis of its own (throwaway servers on loopback, so restarting them harms
nothing else), under a mixed load of Shopify webhooks (with re-deliveries), Gate.Check,
Profile.Get and Identity.Resolve, with erasures along the way, while Redis is restarted (losing
everything it held), PostgreSQL is restarted, and the profile service is killed (SIGKILL) and
started again. Then, once the mesh has settled, it counts:

- over-sent messages: per person and day, messages the gate allowed beyond the global cap (3)
  or the SMS cap (1), as the callers saw them and as the gate's own message log holds them;
- lost webhooks: deliveries answered 200 whose order is neither in the profile nor a dead letter;
- duplicated orders: order rows beyond one per order id, and orders counted twice in summaries;
- unfinished erasures.

Usage: python -m bench.soak [--seconds S]; the report in bench/results/soak.json. Exits 1 when
any count is not zero.
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench.load import free_port, mesh_env, wait_serving
from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.enrichment.settings import EnrichmentSettings
from services.gate.settings import GateSettings
from services.gdpr.settings import GdprSettings
from services.identity.settings import IdentitySettings
from services.profile.settings import ProfileSettings
from services.profile.shopify import signature
from services.runtime import db
from services.runtime.settings import RuntimeSettings
from tests.backing import LocalPostgres, LocalRedis

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "soak.json"
FIXTURE = ROOT / "tests" / "fixtures" / "shopify" / "orders_create.json"
TOKEN = "soak-token"
SECRET = "soak-shopify-secret"
SHOP = "soak-shop.myshopify.com"
TOKENS = json.dumps([{"name": "soak", "token": TOKEN, "shops": ["*"], "roles": ["admin"]}])
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICES = ("identity", "profile", "gate", "gdpr", "enrichment")
SETTINGS: dict[str, type[RuntimeSettings]] = {
    "identity": IdentitySettings, "profile": ProfileSettings, "gate": GateSettings,
    "gdpr": GdprSettings, "enrichment": EnrichmentSettings,
}  # fmt: skip
GLOBAL_CAP, SMS_CAP = 3, 1
SHOPPERS = 400
RECIPIENTS = 200
ERASABLE = 6
SETTLE_SECONDS = 600.0
# Per sender (4 senders): a busy shop's peak, well above a day's average.
ORDERS_PER_SECOND = 10.0
CALL_TIMEOUT = 5.0


@dataclass
class Tally:
    """What the load saw."""

    accepted: set[int] = field(default_factory=set)
    deliveries: Counter[str] = field(default_factory=Counter)
    allowed: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    persons: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


class Mesh:
    """The five services as processes; one can be killed and started again on its port."""

    def __init__(self, env: dict[str, str], log: Any) -> None:
        self._env, self._log = env, log
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, service: str) -> None:
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=self._env, cwd=ROOT,
            stdout=self._log, stderr=self._log,
        )  # fmt: skip

    def kill(self, service: str) -> None:
        self.processes[service].send_signal(signal.SIGKILL)
        self.processes[service].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            process.wait(timeout=30)


def order_body(template: dict[str, Any], order_id: int, shopper: int) -> bytes:
    """The fixture's order as a new, open order of one of the shoppers (email only: the
    fixture's phone would be every shopper's)."""
    email = f"shopper{shopper}@soak.example"
    order = {**template, "id": order_id, "name": f"#{order_id}", "cancelled_at": None,
             "email": email, "contact_email": email, "phone": None}  # fmt: skip
    for address in ("billing_address", "shipping_address"):
        if order.get(address):
            order[address] = {**order[address], "phone": None}
    order["customer"] = {**template["customer"], "id": 7_000_000 + shopper, "email": email,
                         "phone": None, "default_address": None}  # fmt: skip
    return json.dumps(order).encode()


async def webhooks(url: str, stop: asyncio.Event, tally: Tally, index: int) -> None:
    """Sends orders/create as Shopify does: each until answered 200 (the same webhook id on every
    attempt), and one in ten delivered a second time after its 200."""
    template = json.loads(FIXTURE.read_text())
    rng = random.Random(index)
    sequence = 0
    paced = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)) as http:
        while not stop.is_set():
            paced += 1 / ORDERS_PER_SECOND
            await asyncio.sleep(max(0.0, paced - time.monotonic()))
            sequence += 1
            order_id = 8_000_000_000_000 + index * 10_000_000 + sequence
            body = order_body(template, order_id, rng.randrange(SHOPPERS))
            headers = {
                "X-Shopify-Topic": "orders/create",
                "X-Shopify-Shop-Domain": SHOP,
                "X-Shopify-Webhook-Id": f"soak-{order_id}",
                "X-Shopify-Hmac-Sha256": signature(SECRET, body),
            }
            for _ in range(2 if rng.random() < 0.1 else 1):
                while True:
                    try:
                        async with http.post(url, data=body, headers=headers) as response:
                            tally.deliveries[str(response.status)] += 1
                            if response.status == 200:
                                tally.accepted.add(order_id)
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        tally.deliveries["no answer"] += 1
                    if stop.is_set():
                        return
                    await asyncio.sleep(0.2)


async def rpcs(
    name: str, stop: asyncio.Event, tally: Tally, call: Callable[[random.Random], Awaitable[None]]
) -> None:
    """Calls in a loop; failures (expected while a fault lasts) are counted by status."""
    rng = random.Random(name)
    while not stop.is_set():
        try:
            await call(rng)
            tally.calls[name] += 1
        except grpc.aio.AioRpcError as error:
            tally.failures[f"{name}: {error.code().name}"] += 1
            await asyncio.sleep(0.05)


async def fault(
    after: float, what: str, act: Callable[[], Any], log: list[dict[str, Any]], started: float
) -> None:
    """Brings a fault about `after` seconds into the run, and notes when and for how long."""
    await asyncio.sleep(max(0.0, started + after - time.monotonic()))
    began = time.monotonic()
    await asyncio.to_thread(act)
    log.append({"fault": what, "at_seconds": round(began - started, 1),
                "took_seconds": round(time.monotonic() - began, 2)})  # fmt: skip


async def settled(probe: Callable[[], Awaitable[bool]]) -> bool:
    """Whether the probe holds within the settling time (polled)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while not await probe():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def query(settings: RuntimeSettings, text: str, *args: Any) -> list[Any]:
    connection = await db.plain_connection(settings)
    try:
        return list(await connection.fetch(text, *args))
    finally:
        await connection.close()


async def run(seconds: float) -> dict[str, Any]:
    postgres, redis = LocalPostgres(), LocalRedis()
    os.environ["DATABASE_URL"], os.environ["REDIS_URL"] = postgres.url, redis.url
    settings = {name: kind(database_url=postgres.url) for name, kind in SETTINGS.items()}
    for one in settings.values():
        await asyncio.to_thread(db.migrate, one, ROOT / "services" / one.service / "migrations")
    ports = {name: free_port() for name in (*SERVICES, "webhooks")}
    env = mesh_env(ports, SERVICES, "", TOKENS, TOKEN, SHOPIFY_API_SECRET=SECRET)
    log = open(ROOT / "bench" / "results" / "soak-server.log", "w")  # noqa: SIM115
    mesh = Mesh(env, log)
    tally = Tally()
    faults: list[dict[str, Any]] = []
    try:
        for service in SERVICES:
            mesh.start(service)
        for service in SERVICES:
            await wait_serving(f"127.0.0.1:{ports[service]}")
        channels = {s: grpc.aio.insecure_channel(f"127.0.0.1:{ports[s]}") for s in SERVICES}
        gate = gate_pb2_grpc.GateStub(channels["gate"])
        profile = profile_pb2_grpc.ProfileStub(channels["profile"])
        identity = identity_pb2_grpc.IdentityStub(channels["identity"])
        gdpr = gdpr_pb2_grpc.GdprStub(channels["gdpr"])
        await gate.PutShopPolicy(
            gate_pb2.PutShopPolicyRequest(
                shop_id=SHOP, global_daily_cap=GLOBAL_CAP,
                channel_caps=[
                    gate_pb2.ChannelCap(channel=common_pb2.CHANNEL_SMS, daily_cap=SMS_CAP)
                ],
                fatigue_threshold="1.00", time_zone="UTC",
                quiet_hours=gate_pb2.QuietHours(start_minute=0, end_minute=0),
            ),
            metadata=AUTH,
        )  # fmt: skip
        recipients = [f"recipient-{n}" for n in range(RECIPIENTS)]
        for person in recipients:
            await gate.PutContactPolicy(
                gate_pb2.PutContactPolicyRequest(
                    shop_id=SHOP, person_id=person, time_zone="UTC",
                    consents=[gate_pb2.ChannelConsent(channel=c, granted=True)
                              for c in (common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS)],
                ),
                metadata=AUTH,
            )  # fmt: skip
        erasable = []
        for n in range(ERASABLE):
            placed = profile_pb2.IngestOrderRequest(
                shop_id=SHOP, order_id=f"erasable-{n}", total="10.00", currency="EUR",
                source=profile_pb2.ORDER_SOURCE_ONLINE,
                identifiers=[common_pb2.Identifier(type="email", value=f"erase{n}@soak.example")],
            )  # fmt: skip
            placed.placed_at.GetCurrentTime()
            erasable.append((await profile.IngestOrder(placed, metadata=AUTH)).person_id)

        async def check(rng: random.Random) -> None:
            person = rng.choice(recipients)
            channel = rng.choice((common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS))
            answer = await gate.Check(
                gate_pb2.CheckRequest(shop_id=SHOP, person_id=person, channel=channel,
                                      message_id=secrets.token_hex(8)),
                metadata=AUTH, timeout=CALL_TIMEOUT,
            )  # fmt: skip
            if answer.allowed:
                day = time.strftime("%Y-%m-%d", time.gmtime())
                tally.allowed[(person, day, common_pb2.Channel.Name(channel))] += 1

        async def get(rng: random.Random) -> None:
            email = f"shopper{rng.randrange(SHOPPERS)}@soak.example"
            person = common_pb2.PersonRef(
                identifier=common_pb2.Identifier(type="email", value=email)
            )
            await profile.Get(
                profile_pb2.GetRequest(shop_id=SHOP, person=person),
                metadata=AUTH,
                timeout=CALL_TIMEOUT,
            )

        async def resolve(rng: random.Random) -> None:
            n = rng.randrange(SHOPPERS)
            await identity.Resolve(
                identity_pb2.ResolveRequest(
                    shop_id=SHOP, source="web_form", strength=identity_pb2.STRENGTH_ASSERTED,
                    event_id=f"form-{secrets.token_hex(6)}",
                    identifiers=[
                        common_pb2.Identifier(type="email", value=f"shopper{n}@soak.example"),
                        common_pb2.Identifier(type="cookie", value=f"c-{n}-{rng.randrange(3)}"),
                    ],
                ),
                metadata=AUTH, timeout=CALL_TIMEOUT,
            )  # fmt: skip

        async def erase_next() -> None:
            person = erasable.pop()
            while True:
                try:
                    job = await gdpr.Erase(
                        gdpr_pb2.EraseRequest(shop_id=SHOP, reason="soak",
                                              person=common_pb2.PersonRef(person_id=person)),
                        metadata=AUTH, timeout=CALL_TIMEOUT,
                    )  # fmt: skip
                    tally.jobs.append(job.job_id)
                    return
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.5)

        def restart_redis() -> None:
            redis.remove()
            redis.start()

        def restart_postgres() -> None:
            postgres.stop()
            postgres.start()

        def restart_profile() -> None:
            mesh.kill("profile")
            mesh.start("profile")

        stop = asyncio.Event()
        started = time.monotonic()
        url = f"http://127.0.0.1:{ports['webhooks']}/webhooks/shopify"
        load = [
            *(asyncio.create_task(webhooks(url, stop, tally, i)) for i in range(4)),
            *(asyncio.create_task(rpcs(f"check-{i}", stop, tally, check)) for i in range(4)),
            *(asyncio.create_task(rpcs(f"get-{i}", stop, tally, get)) for i in range(2)),
            *(asyncio.create_task(rpcs(f"resolve-{i}", stop, tally, resolve)) for i in range(2)),
        ]
        plan: list[tuple[float, str, Callable[[], Any]]] = [
            (0.2, "redis restarted, empty", restart_redis),
            (0.45, "postgresql restarted", restart_postgres),
            (0.7, "profile killed (SIGKILL) and started again", restart_profile),
        ]
        erasures = [
            asyncio.create_task(_after(started + share * seconds, erase_next))
            for share in (0.1, 0.19, 0.35, 0.44, 0.6, 0.69)
        ]
        await asyncio.gather(
            *(fault(share * seconds, what, act, faults, started) for share, what, act in plan),
            *erasures,
        )
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
        stop.set()
        await asyncio.gather(*load)
        for service in SERVICES:
            await wait_serving(f"127.0.0.1:{ports[service]}")
        results = await verify(settings, gdpr, tally)
        results.update(
            seconds=seconds, faults=faults, calls=dict(tally.calls),
            failures=dict(tally.failures), deliveries=dict(tally.deliveries),
        )  # fmt: skip
        for channel in channels.values():
            await channel.close(None)
        return results
    finally:
        mesh.stop()
        log.close()
        postgres.remove()
        redis.remove()


async def _after(at: float, work: Callable[[], Awaitable[None]]) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    await work()


async def verify(settings: dict[str, RuntimeSettings], gdpr: Any, tally: Tally) -> dict[str, Any]:
    """The counts that must be zero, once every accepted webhook is processed or dead."""
    profile, gate = settings["profile"], settings["gate"]

    async def drained() -> bool:
        rows = await query(
            profile,
            "SELECT (SELECT count(*) FROM webhook_inbox WHERE state = 'pending')"
            " + (SELECT count(*) FROM summary_due) AS n",
        )
        return bool(rows[0]["n"] == 0)

    began = time.monotonic()
    if not await settled(drained):
        raise SystemExit(f"webhooks or summaries still pending after {SETTLE_SECONDS:.0f} s")
    drained_after = time.monotonic() - began

    async def unfinished() -> int:
        states = [
            (await gdpr.GetErasure(gdpr_pb2.GetErasureRequest(job_id=j), metadata=AUTH)).state
            for j in tally.jobs
        ]
        return sum(s != gdpr_pb2.ERASURE_STATE_DONE for s in states)

    async def erased() -> bool:
        return await unfinished() == 0

    await settled(erased)
    stored = {
        int(r["order_id"])
        for r in await query(
            profile, "SELECT order_id FROM order_fact WHERE order_id NOT LIKE 'erasable-%'"
        )
    }
    dead = {
        int(json.loads(r["body"])["id"])
        for r in await query(profile, "SELECT body FROM webhook_inbox WHERE state = 'dead'")
    }
    duplicated_rows = await query(
        profile,
        "SELECT count(*) - count(DISTINCT (shop_id, order_id)) AS n FROM order_fact",
    )
    summed = await query(profile, "SELECT coalesce(sum(order_count), 0) AS n FROM person_summary")
    # Every stored order once in its shopper's summary; the erasable persons' orders left
    # the summaries with them.
    expected = len(stored) + ERASABLE - len(tally.jobs)
    log_allowed = await query(
        gate,
        "SELECT person_id, (decided_at AT TIME ZONE 'UTC')::date AS day, channel, count(*) AS n "
        "FROM message_log "
        "WHERE allowed AND NOT transactional GROUP BY 1, 2, 3",
    )
    per_day: Counter[tuple[str, str]] = Counter()
    for (person, day, _), n in tally.allowed.items():
        per_day[(person, day)] += n
    seen_over = sum(max(0, n - GLOBAL_CAP) for n in per_day.values()) + sum(
        max(0, n - SMS_CAP) for (_, _, c), n in tally.allowed.items() if c == "CHANNEL_SMS"
    )
    logged: Counter[tuple[str, str]] = Counter()
    for r in log_allowed:
        logged[(r["person_id"], str(r["day"]))] += r["n"]
    logged_over = sum(max(0, n - GLOBAL_CAP) for n in logged.values()) + sum(
        max(0, r["n"] - SMS_CAP) for r in log_allowed if r["channel"] == "sms"
    )
    return {
        "settled_after_seconds": round(drained_after, 1),
        "accepted_webhooks": len(tally.accepted),
        "orders_stored": len(stored),
        "dead_letters": len(dead),
        "lost_webhooks": len(tally.accepted - stored - dead),
        "orders_in_summaries": int(summed[0]["n"]),
        "orders_expected_in_summaries": expected,
        "duplicated_orders": int(duplicated_rows[0]["n"]) + max(0, int(summed[0]["n"]) - expected),
        "allowed_messages": sum(tally.allowed.values()),
        "over_sent_as_seen": seen_over,
        "over_sent_in_log": logged_over,
        "erasures": len(tally.jobs),
        "unfinished_erasures": await unfinished(),
    }


def report(r: dict[str, Any]) -> str:
    lines = [f"soak of {r['seconds']:.0f} s; faults:"]
    lines += [f"  at {f['at_seconds']:>5.1f} s: {f['fault']} ({f['took_seconds']} s)"
              for f in r["faults"]]  # fmt: skip
    lines.append("calls answered: " + ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items())))
    lines.append(
        "calls failed during faults: "
        + (", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "none")
    )
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["deliveries"].items()))
    lines.append(f"webhook answers: {answers}")
    lines.append(
        f"{r['accepted_webhooks']} webhooks accepted: {r['orders_stored']} orders stored, "
        f"{r['dead_letters']} dead letters; lost {r['lost_webhooks']}, duplicated "
        f"{r['duplicated_orders']}"
    )
    lines.append(
        f"{r['allowed_messages']} messages allowed; over-sent {r['over_sent_as_seen']} as the "
        f"callers saw, {r['over_sent_in_log']} in the gate's log"
    )
    lines.append(f"{r['erasures']} erasures, {r['unfinished_erasures']} unfinished")
    lines.append(
        f"after the load: inbox and summaries caught up in {r['settled_after_seconds']} s; "
        f"{r['orders_in_summaries']} orders in summaries for {r['orders_expected_in_summaries']} "
        "expected"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=240.0)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.seconds))
    RESULTS.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    zero = ("lost_webhooks", "duplicated_orders", "over_sent_as_seen", "over_sent_in_log",
            "unfinished_erasures")  # fmt: skip
    if any(results[k] for k in zero):
        sys.exit(1)


if __name__ == "__main__":
    main()
