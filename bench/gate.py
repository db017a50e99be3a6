"""Benchmark of Gate.Check (make bench-gate), against a baseline measured in the same run.

The baseline is a bare grpc.aio server whose Check handler does one EVALSHA of a trivial script
on the same Redis and replies; a second baseline serves the same handler through the runtime
every c360 service runs (tracing, auth, tenancy, errors, request log), which splits the gap into
what the shared runtime costs and what the gate's own work costs. Each runs as one server
process, all are driven by the same load generator (a separate process) at concurrency 1, 16 and
64, and reported as ratios, because this machine is shared and noisy. Also measured: Redis
commands per check (INFO commandstats) and CheckBatch of 50,000 people against a client-side
pipeline of 50,000 trivial EVALSHAs.

Usage: python -m bench.gate [--seconds S] [--customers N]; results in bench/results/gate.json.
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import redis.asyncio as redis
from pydantic import SecretStr

from bench.load import (
    bench_database_url,
    drop_schema,
    free_port,
    summarize,
    wait_listening,
    wait_serving,
)
from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.gate.counters import ContactPolicy, Counters, CustomerKeys
from services.gate.settings import GateSettings
from services.runtime import db
from services.runtime.auth import TokenRegistry
from services.runtime.server import Registration, start_server
from services.runtime.settings import TokenConfig
from services.runtime.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gate.json"
TOKEN = "bench-token"
SHOP = "bench-shop"
CHANNELS = [
    (common_pb2.CHANNEL_EMAIL, 60),
    (common_pb2.CHANNEL_WHATSAPP, 15),
    (common_pb2.CHANNEL_PUSH, 15),
    (common_pb2.CHANNEL_SMS, 10),
]
TRIVIAL = "return 1"


def on_db(url: str, index: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{index}"))


# --- the baseline server ------------------------------------------------------------------------


class BaselineGate(gate_pb2_grpc.GateServicer):
    """One EVALSHA of a trivial script, then an empty answer."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(TRIVIAL)

    async def Check(self, request: Any, context: Any) -> Any:
        await self._script(keys=[f"c360:bench:{{{request.shop_id}:{request.person_id}}}"])
        return gate_pb2.CheckResponse(allowed=True)


async def serve_baseline(port: int, redis_url: str, stack: bool) -> None:
    """The bare baseline, or (stack) the same handler behind the runtime every c360 service
    runs: OpenTelemetry, authentication, tenancy, error mapping, the request log."""
    client = redis.from_url(redis_url, max_connections=256)
    servicer = BaselineGate(client)  # type: ignore[abstract]  # Check only
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if stack:
        tokens = TokenRegistry.from_settings_tokens(
            [TokenConfig(name="bench", token=SecretStr(TOKEN), shops=["*"], roles=["admin"])]
        )
        registration = Registration(
            gate_pb2.DESCRIPTOR.services_by_name["Gate"],
            servicer,
            gate_pb2_grpc.add_GateServicer_to_server,
        )
        runtime = await start_server(
            f"127.0.0.1:{port}", [registration], tokens=tokens, telemetry=Telemetry()
        )
        await stop.wait()
        await runtime.stop(1)
        return
    server = grpc.aio.server()
    gate_pb2_grpc.add_GateServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await stop.wait()
    await server.stop(1)


# --- the load generator -------------------------------------------------------------------------


async def load(address: str, concurrency: int, seconds: float, customers: int) -> dict[str, Any]:
    """Checks from `concurrency` callers for `seconds`; latencies in ms, answers by reason."""
    channels, weights = zip(*CHANNELS, strict=True)
    latencies: list[float] = []
    reasons: dict[str, int] = {}
    errors = 0
    run = secrets.token_hex(4)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gate_pb2_grpc.GateStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        await stub.Check(
            gate_pb2.CheckRequest(
                shop_id=SHOP,
                person_id="p0",
                channel=common_pb2.CHANNEL_EMAIL,
                message_id="warm",
            ),
            metadata=metadata,
        )
        deadline = time.perf_counter() + seconds

        async def caller(index: int) -> None:
            nonlocal errors
            rng = random.Random(index)
            sequence = 0
            while time.perf_counter() < deadline:
                sequence += 1
                request = gate_pb2.CheckRequest(
                    shop_id=SHOP,
                    person_id=f"p{rng.randrange(customers)}",
                    channel=rng.choices(channels, weights)[0],
                    message_id=f"{run}-{index}-{sequence}",
                )
                started = time.perf_counter()
                try:
                    answer = await stub.Check(request, metadata=metadata, timeout=5)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                key = answer.reason.split(":")[0] if answer.reason else "allowed"
                reasons[key] = reasons.get(key, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {**summarize(latencies, elapsed, errors), "answers": reasons}


def drive(address: str, concurrency: int, seconds: float, customers: int) -> dict[str, Any]:
    """Runs the load generator in a process of its own."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.gate", "load", address, str(concurrency), str(seconds),
         str(customers)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(output)
    return result


# --- the run ------------------------------------------------------------------------------------


async def seed(redis_url: str, customers: int) -> None:
    """`customers` people the gate knows, with their contact policies, as the gate stores them
    after PutContactPolicy."""
    client = redis.from_url(redis_url)
    counters = Counters(client, timeout=30.0)
    granted = frozenset({"email", "sms", "whatsapp", "push"})
    zones = ["", "Europe/Paris", "America/New_York", "Asia/Tokyo"]
    for start in range(0, customers, 5000):
        await counters.rebuild_many(
            [
                (
                    CustomerKeys.of(SHOP, f"p{n}"),
                    ContactPolicy(granted, time_zone=zones[n % len(zones)], version=1),
                    [],
                )
                for n in range(start, min(start + 5000, customers))
            ]
        )
    await client.aclose()


async def commandstats(redis_url: str) -> dict[str, int]:
    client = redis.from_url(redis_url)
    stats = await client.info("commandstats")
    await client.aclose()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def batch(gate: str, redis_url: str, people: int) -> dict[str, float]:
    """CheckBatch of `people` through the gate, and the same number of trivial EVALSHAs
    pipelined by a client straight to Redis."""
    async with grpc.aio.insecure_channel(gate) as channel:
        stub = gate_pb2_grpc.GateStub(channel)
        request = gate_pb2.CheckBatchRequest(
            shop_id=SHOP,
            channel=common_pb2.CHANNEL_EMAIL,
            items=[
                gate_pb2.BatchItem(person_id=f"p{n}", message_id=f"batch-{n}")
                for n in range(people)
            ],
        )
        started = time.perf_counter()
        answer = await stub.CheckBatch(
            request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60
        )
        gate_seconds = time.perf_counter() - started
    assert len(answer.results) == people
    client = redis.from_url(redis_url)
    script = client.register_script(TRIVIAL)
    started = time.perf_counter()
    pipeline = client.pipeline(transaction=False)
    for n in range(people):
        await script(keys=[f"c360:bench:{{{SHOP}:p{n}}}"], client=pipeline)
    await pipeline.execute()
    baseline_seconds = time.perf_counter() - started
    await client.aclose()
    return {
        "people": people,
        "gate_seconds": gate_seconds,
        "baseline_pipeline_seconds": baseline_seconds,
        "ratio": gate_seconds / baseline_seconds,
        "allowed": sum(r.allowed for r in answer.results),
    }


async def run(seconds: float, customers: int) -> dict[str, Any]:
    redis_url = on_db(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), 12)
    database_url = bench_database_url()
    prefix = f"bench{secrets.token_hex(3)}_"
    settings = GateSettings(database_url=database_url, db_schema_prefix=prefix)
    await asyncio.to_thread(db.migrate, settings, ROOT / "services" / "gate" / "migrations")
    flush = redis.from_url(redis_url)
    await flush.flushdb()
    await flush.aclose()
    await seed(redis_url, customers)

    gate_port, baseline_port, stack_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("C360_", "OTEL_"))},
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "C360_DB_SCHEMA_PREFIX": prefix,
        "C360_HOST": "127.0.0.1",
        "C360_GATE_PORT": str(gate_port),
        "C360_TOKENS": json.dumps(
            [{"name": "bench", "token": TOKEN, "shops": ["*"], "roles": ["admin"]}]
        ),
    }
    log = open(ROOT / "bench" / "results" / "gate-server.log", "w")  # noqa: SIM115
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "services.gate"], env=env, cwd=ROOT, stderr=log, stdout=log
        ),
        subprocess.Popen(
            [sys.executable, "-m", "bench.gate", "baseline", str(baseline_port), redis_url],
            cwd=ROOT,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "bench.gate", "baseline-stack", str(stack_port), redis_url],
            cwd=ROOT,
        ),
    ]
    try:
        gate, baseline = f"127.0.0.1:{gate_port}", f"127.0.0.1:{baseline_port}"
        stack = f"127.0.0.1:{stack_port}"
        await wait_serving(gate)
        await wait_serving(stack)
        await wait_listening(baseline_port)  # the bare baseline has no health service
        async with grpc.aio.insecure_channel(gate) as channel:
            await gate_pb2_grpc.GateStub(channel).PutShopPolicy(
                gate_pb2.PutShopPolicyRequest(  # quiet hours off: the run may be at night
                    shop_id=SHOP, quiet_hours=gate_pb2.QuietHours(start_minute=0, end_minute=0)
                ),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
        levels = {}
        for concurrency in (1, 16, 64):
            base = drive(baseline, concurrency, seconds, customers)
            stacked = drive(stack, concurrency, seconds, customers)
            before = await commandstats(redis_url)
            checked = drive(gate, concurrency, seconds, customers)
            after = await commandstats(redis_url)
            calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            checks = checked["calls"] + checked["errors"] + 1
            levels[str(concurrency)] = {
                "baseline": base,
                "baseline_through_runtime": stacked,
                "gate": checked,
                "throughput_ratio": checked["per_second"] / base["per_second"],
                "p50_ratio": checked["p50_ms"] / base["p50_ms"],
                "p99_ratio": checked["p99_ms"] / base["p99_ms"],
                "runtime_throughput_ratio": stacked["per_second"] / base["per_second"],
                "gate_vs_runtime_throughput_ratio": checked["per_second"] / stacked["per_second"],
                "gate_vs_runtime_p99_ratio": checked["p99_ms"] / stacked["p99_ms"],
                "redis_evalsha_per_check": calls.get("evalsha", 0) / checks,
                "redis_top_level_commands_per_check": (
                    calls.get("evalsha", 0) + calls.get("eval", 0) + calls.get("ping", 0)
                )
                / checks,
                "redis_calls_by_command": {k: v for k, v in calls.items() if v},
            }
        batched = await batch(gate, redis_url, 50_000)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
        await drop_schema(settings)
    return {"customers": customers, "seconds_per_run": seconds, "levels": levels, "batch": batched}


def report(results: dict[str, Any]) -> str:
    lines = [
        f"Gate.Check vs baseline (one EVALSHA), {results['customers']:,} customers, "
        f"{results['seconds_per_run']}s per run",
        f"{'conc':>4} {'baseline/s':>11} {'gate/s':>9} {'ratio':>6} "
        f"{'p50 base':>9} {'p50 gate':>9} {'p99 base':>9} {'p99 gate':>9} {'p99 ratio':>9} "
        f"{'evalsha/check':>13}",
    ]
    for level, r in results["levels"].items():
        lines.append(
            f"{level:>4} {r['baseline']['per_second']:>11.0f} {r['gate']['per_second']:>9.0f} "
            f"{r['throughput_ratio']:>6.2f} {r['baseline']['p50_ms']:>8.2f}m "
            f"{r['gate']['p50_ms']:>8.2f}m {r['baseline']['p99_ms']:>8.2f}m "
            f"{r['gate']['p99_ms']:>8.2f}m {r['p99_ratio']:>9.2f} "
            f"{r['redis_evalsha_per_check']:>13.2f}"
        )
        lines.append(
            f"     same handler through the runtime: "
            f"{r['baseline_through_runtime']['per_second']:.0f}/s "
            f"(x{r['runtime_throughput_ratio']:.2f} of bare); gate vs it: "
            f"x{r['gate_vs_runtime_throughput_ratio']:.2f} throughput, "
            f"x{r['gate_vs_runtime_p99_ratio']:.2f} p99"
        )
        lines.append(f"     gate answers: {r['gate']['answers']}, errors {r['gate']['errors']}")
    b = results["batch"]
    lines.append(
        f"CheckBatch of {b['people']:,}: {b['gate_seconds']:.2f}s "
        f"(client pipeline of trivial EVALSHAs: {b['baseline_pipeline_seconds']:.2f}s, "
        f"ratio {b['ratio']:.2f}); allowed {b['allowed']:,}"
    )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("baseline", "baseline-stack"):
        asyncio.run(serve_baseline(int(sys.argv[2]), sys.argv[3], sys.argv[1] == "baseline-stack"))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        address, concurrency, seconds, customers = sys.argv[2:6]
        result = asyncio.run(load(address, int(concurrency), float(seconds), int(customers)))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--customers", type=int, default=100_000)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.seconds, args.customers))
    RESULTS.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
