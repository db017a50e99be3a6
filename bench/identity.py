"""Benchmark of Identity.Resolve (make bench-identity), against a baseline measured in the same run.

The shop holds 1,000,000 identifiers (250,000 persons with a Shopify id, an email, a phone and a
session). Callers send a realistic mix: 70% of records carry identifiers of a known person, 15%
add a new session to a known person, 15% are new shoppers. The baseline is a bare SELECT by
primary key (the person row) served through the same stack: the shared runtime, the same engine
and session factory, one server process. Both are driven by the same load generator (a separate
process) at concurrency 1 and 16, and reported as ratios, because this machine is shared and noisy.

Usage: python -m bench.identity [--seconds S] [--persons N]; results in bench/results/identity.json.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.enrichment import cpu_seconds
from bench.load import (
    bench_database_url,
    drop_schema,
    free_port,
    summarize,
    wait_serving,
)
from c360.common.v1 import common_pb2
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.settings import IdentitySettings
from services.identity.store import PersonRow
from services.runtime import db
from services.runtime.process import start_service
from services.runtime.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "identity.json"
TOKEN = "bench-token"
SHOP = "bench-shop"
# Records per ResolveBatch call in the batch run (a bulk import's page).
BATCH = 100
# Callers of the batch run (an import with a couple of workers).
BATCH_CONCURRENCY = 2
TOKENS = json.dumps([{"name": "bench", "token": TOKEN, "shops": ["*"], "roles": ["admin"]}])


def identifiers_of(n: int) -> list[tuple[str, str]]:
    return [
        ("shopify_customer_id", f"{7_000_000_000 + n}"),
        ("email", f"shopper{n}@mail{n % 97}.example"),
        ("phone", f"+1415{2_000_000 + n % 7_000_000:07d}"),  # exchanges 200-899: valid
        ("cookie", f"ck-{n}"),
    ]


# --- the baseline server ------------------------------------------------------------------------


class BaselineIdentity(identity_pb2_grpc.IdentityServicer):
    """Lookup answers with one SELECT of a person row by primary key."""

    def __init__(self, sessions: Any) -> None:
        self._sessions = sessions

    async def Lookup(self, request: Any, context: Any) -> Any:
        async with self._sessions() as session:
            person = await session.get(PersonRow, (request.shop_id, request.identifier.value))
        return identity_pb2.LookupResponse(person_id=person.root_id)


async def serve_baseline() -> None:
    """The baseline through the runtime every service runs, on the identity settings."""
    from services.runtime.server import Registration

    settings = IdentitySettings()
    engine = db.create_engine(settings)
    registration = Registration(
        identity_pb2.DESCRIPTOR.services_by_name["Identity"],
        BaselineIdentity(db.session_factory(engine)),  # type: ignore[abstract]  # Lookup only
        identity_pb2_grpc.add_IdentityServicer_to_server,
    )
    server = await start_service(settings, Telemetry(), [registration], engine)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# --- the load generator -------------------------------------------------------------------------


async def load(address: str, target: str, concurrency: int, seconds: float, persons: int) -> Any:
    """Resolves (or baseline lookups) from `concurrency` callers for `seconds`."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    errors = 0
    run = secrets.token_hex(4)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityStub(channel)
        deadline = time.perf_counter() + seconds

        def request(rng: random.Random, index: int, sequence: int) -> Any:
            n = rng.randrange(persons)
            if target == "baseline":
                identifier = common_pb2.Identifier(type="person", value=f"p_{n}")
                return identity_pb2.LookupRequest(shop_id=SHOP, identifier=identifier)
            draw = rng.random()
            known = identifiers_of(n)
            if draw < 0.70:
                ids = rng.sample(known, k=rng.randint(1, 2))
            elif draw < 0.85:
                ids = [rng.choice(known[:3]), ("cookie", f"ck-{run}-{index}-{sequence}")]
            else:
                ids = [("email", f"new-{run}-{index}-{sequence}@new.example"),
                       ("cookie", f"ck-{run}-{index}-{sequence}")]  # fmt: skip
            return identity_pb2.ResolveRequest(
                shop_id=SHOP,
                identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in ids],
                source="bench",
                strength=identity_pb2.STRENGTH_AUTHORITATIVE,
                event_id=f"{run}-{index}-{sequence}",
            )

        async def caller(index: int) -> None:
            nonlocal errors
            rng = random.Random(index)
            call: Any = {"baseline": stub.Lookup, "resolve": stub.Resolve}.get(
                target, stub.ResolveBatch
            )
            sequence = 0
            while time.perf_counter() < deadline:
                sequence += 1
                message = request(rng, index, sequence)
                if target == "batch":  # BATCH records of the same mix in one call
                    records = [message]
                    for _ in range(BATCH - 1):
                        sequence += 1
                        records.append(request(rng, index, sequence))
                    message = identity_pb2.ResolveBatchRequest(shop_id=SHOP, records=records)
                started = time.perf_counter()
                try:
                    answer = await call(message, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                for result in getattr(answer, "results", [answer] if target == "resolve" else []):
                    name = identity_pb2.ResolveOutcome.Name(result.outcome)
                    outcome = name.removeprefix("RESOLVE_OUTCOME_").lower()
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        **summarize(latencies, elapsed, errors),
        "outcomes": outcomes,
        "client_cpu_ms_per_call": 1000 * cpu / max(len(latencies), 1),
    }


def drive(address: str, target: str, concurrency: int, seconds: float, persons: int) -> Any:
    """Runs the load generator in a process of its own."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.identity", "load", address, target,
         str(concurrency), str(seconds), str(persons)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout  # fmt: skip
    return json.loads(output)


# --- CPU per call -------------------------------------------------------------------------------


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (Linux; empty elsewhere)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def backends(settings: IdentitySettings, pid: int) -> list[int]:
    """The PostgreSQL backends serving a process's connections (PostgreSQL on this host)."""
    ports = local_ports(pid)
    connection = await db.plain_connection(settings)
    try:
        rows = await connection.fetch("SELECT pid, client_port FROM pg_stat_activity")
    finally:
        await connection.close()
    return [row["pid"] for row in rows if row["client_port"] in ports]


async def cpu_used(settings: IdentitySettings, pid: int) -> dict[int, float]:
    """CPU seconds so far of a server process (key 0) and of each of its backends."""
    return {0: cpu_seconds(pid)} | {b: cpu_seconds(b) for b in await backends(settings, pid)}


def cpu_ms_per_call(before: dict[int, float], after: dict[int, float], calls: int) -> Any:
    """CPU milliseconds a call cost the server process and PostgreSQL, from two cpu_used()."""
    server = after[0] - before[0]
    postgres = sum(used - before.get(pid, 0.0) for pid, used in after.items() if pid)
    calls = max(calls, 1)
    return {
        "service": 1000 * server / calls,
        "postgres": 1000 * postgres / calls,
        "total": 1000 * (server + postgres) / calls,
    }


async def measured(
    settings: IdentitySettings,
    pid: int,
    address: str,
    target: str,
    concurrency: int,
    seconds: float,
    persons: int,
) -> Any:
    """One load run, with the CPU it cost per call. The backends are sampled while it runs: a
    pool's overflow connections (and their backends) end before it does."""
    before = await cpu_used(settings, pid)
    running = asyncio.create_task(
        asyncio.to_thread(drive, address, target, concurrency, seconds, persons)
    )
    after = dict(before)
    while True:
        done, _ = await asyncio.wait({running}, timeout=0.25)
        after |= await cpu_used(settings, pid)
        if done:
            break
    result = running.result()
    return {**result, "cpu_ms_per_call": cpu_ms_per_call(before, after, result["calls"])}


# --- the run ------------------------------------------------------------------------------------


async def seed(settings: IdentitySettings, persons: int) -> None:
    """`persons` persons with four identifiers each, copied straight into the tables."""
    connection = await db.plain_connection(settings)
    now = datetime.now(UTC)
    try:
        await connection.copy_records_to_table(
            "person",
            columns=["shop_id", "person_id", "parent_id", "root_id", "created_at", "erased_at"],
            records=((SHOP, f"p_{n}", None, f"p_{n}", now, None) for n in range(persons)),
        )
        await connection.copy_records_to_table(
            "identifier",
            columns=["shop_id", "type", "match_key", "value", "raw_value", "person_id",
                     "first_seen_at", "normalizer_version", "conflicts"],
            records=(
                (SHOP, t, v, v, v, f"p_{n}", now, 1, 0)
                for n in range(persons)
                for t, v in identifiers_of(n)
            ),
        )  # fmt: skip
        await connection.execute("ANALYZE person; ANALYZE identifier")
    finally:
        await connection.close()


async def run(seconds: float, persons: int) -> dict[str, Any]:
    database_url = bench_database_url()
    prefix = f"bench{secrets.token_hex(3)}_"
    identity_port, baseline_port = free_port(), free_port()
    common = {"DATABASE_URL": database_url, "C360_DB_SCHEMA_PREFIX": prefix, "C360_TOKENS": TOKENS}
    settings = IdentitySettings(database_url=database_url, db_schema_prefix=prefix)
    await asyncio.to_thread(db.migrate, settings, ROOT / "services" / "identity" / "migrations")
    started = time.perf_counter()
    await seed(settings, persons)
    seed_seconds = time.perf_counter() - started
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C360_", "OTEL_"))}
    log = open(ROOT / "bench" / "results" / "identity-server.log", "w")  # noqa: SIM115
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "services.identity"],
            env={**env, **common, "C360_IDENTITY_PORT": str(identity_port)},
            cwd=ROOT, stderr=log, stdout=log,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "bench.identity", "baseline"],
            env={**env, **common, "C360_IDENTITY_PORT": str(baseline_port)},
            cwd=ROOT, stderr=log, stdout=log,
        ),
    ]  # fmt: skip
    try:
        resolve, baseline = f"127.0.0.1:{identity_port}", f"127.0.0.1:{baseline_port}"
        await wait_serving(resolve)
        await wait_serving(baseline)
        levels = {}
        for concurrency in (1, 16):
            base = await measured(
                settings, servers[1].pid, baseline, "baseline", concurrency, seconds, persons
            )
            resolved = await measured(
                settings, servers[0].pid, resolve, "resolve", concurrency, seconds, persons
            )
            levels[str(concurrency)] = {
                "baseline_select": base,
                "resolve": resolved,
                "throughput_ratio": resolved["per_second"] / base["per_second"],
                "p99_ratio": resolved["p99_ms"] / base["p99_ms"],
                "cpu_ratio": resolved["cpu_ms_per_call"]["total"]
                / base["cpu_ms_per_call"]["total"],
            }
        batch = await measured(
            settings, servers[0].pid, resolve, "batch", BATCH_CONCURRENCY, seconds, persons
        )
        batch["records_per_second"] = batch["per_second"] * BATCH
        batch["cpu_ms_per_record"] = {k: v / BATCH for k, v in batch.pop("cpu_ms_per_call").items()}
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
        await drop_schema(settings)
    return {
        "persons": persons,
        "identifiers": persons * 4,
        "seed_seconds": seed_seconds,
        "seconds_per_run": seconds,
        "levels": levels,
        "batch": batch,
    }


def report(results: dict[str, Any]) -> str:
    lines = [
        f"Identity.Resolve vs a primary-key SELECT through the same stack, "
        f"{results['identifiers']:,} identifiers stored, {results['seconds_per_run']}s per run",
        f"{'conc':>4} {'select/s':>9} {'resolve/s':>10} {'ratio':>6} {'p50 sel':>8} "
        f"{'p50 res':>8} {'p99 sel':>8} {'p99 res':>8} {'p99 ratio':>9}",
    ]
    for level, r in results["levels"].items():
        base, res = r["baseline_select"], r["resolve"]
        lines.append(
            f"{level:>4} {base['per_second']:>9.0f} {res['per_second']:>10.0f} "
            f"{r['throughput_ratio']:>6.2f} {base['p50_ms']:>7.2f}m {res['p50_ms']:>7.2f}m "
            f"{base['p99_ms']:>7.2f}m {res['p99_ms']:>7.2f}m {r['p99_ratio']:>9.2f}"
        )
        cpu = {name: r[name]["cpu_ms_per_call"] for name in ("baseline_select", "resolve")}
        lines.append(
            "     CPU ms/call (service + PostgreSQL): "
            + ", ".join(
                f"{name} {c['service']:.2f} + {c['postgres']:.2f} = {c['total']:.2f}"
                for name, c in cpu.items()
            )
            + f"; ratio {r['cpu_ratio']:.2f}; load generator "
            + f"{base['client_cpu_ms_per_call']:.2f} / {res['client_cpu_ms_per_call']:.2f}"
        )
        lines.append(f"     outcomes: {res['outcomes']}, errors {res['errors']}")
    batch, base = results["batch"], results["levels"]["16"]["baseline_select"]
    cpu = batch["cpu_ms_per_record"]
    lines.append(
        f"ResolveBatch of {BATCH} records, {BATCH_CONCURRENCY} callers: "
        f"{batch['records_per_second']:.0f} records/s "
        f"({batch['records_per_second'] / base['per_second']:.2f}x the SELECTs/s at 16), "
        f"p50 {batch['p50_ms']:.1f} ms, p99 {batch['p99_ms']:.1f} ms a call; CPU ms/record "
        f"{cpu['service']:.2f} + {cpu['postgres']:.2f} = {cpu['total']:.2f}"
    )
    lines.append(f"     outcomes: {batch['outcomes']}, errors {batch['errors']}")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["baseline"]:
        asyncio.run(serve_baseline())
        return
    if sys.argv[1:2] == ["load"]:
        address, target, concurrency, seconds, persons = sys.argv[2:7]
        result = asyncio.run(load(address, target, int(concurrency), float(seconds), int(persons)))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--persons", type=int, default=250_000)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.seconds, args.persons))
    RESULTS.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
