"""What every benchmark's load generator shares: free ports, readiness, latency figures."""

import asyncio
import os
import socket
import statistics
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime import db


def bench_database_url() -> str:
    """The PostgreSQL a benchmark runs against (DATABASE_URL, else the local one)."""
    return os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def bench_redis_url() -> str:
    """The Redis a benchmark runs against, in a database (13) of its own."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/13"


def mesh_env(
    ports: dict[str, int], services: tuple[str, ...], prefix: str, tokens: str, token: str,
    **extra: str,
) -> dict[str, str]:  # fmt: skip
    """The environment of service processes started by a benchmark: the caller's, minus its c360
    and OpenTelemetry settings, plus the benchmark's backing stores, schemas, tokens and ports."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("C360_", "OTEL_"))},
        "DATABASE_URL": bench_database_url(),
        "REDIS_URL": bench_redis_url(),
        "C360_DB_SCHEMA_PREFIX": prefix,
        "C360_TOKENS": tokens,
        "C360_SERVICE_TOKEN": token,
        "C360_WEBHOOK_PORT": str(ports["webhooks"]),
        **{f"C360_{s.upper()}_PORT": str(ports[s]) for s in services},
        **{f"C360_{s.upper()}_ADDR": f"127.0.0.1:{ports[s]}" for s in services},
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_serving(address: str) -> None:
    """Waits (at most a minute) until the server's health says SERVING."""
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{address} never became SERVING")


async def wait_listening(port: int) -> None:
    """Waits (at most a minute) until something accepts connections on the local port."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise SystemExit(f"nothing ever listened on port {port}")


def summarize(latencies_ms: list[float], elapsed: float, errors: int) -> dict[str, Any]:
    """Calls per second, p50 and p99 of the successful calls."""
    latencies_ms.sort()
    return {
        "calls": len(latencies_ms),
        "errors": errors,
        "per_second": len(latencies_ms) / elapsed,
        "p50_ms": statistics.median(latencies_ms),
        "p99_ms": latencies_ms[int(len(latencies_ms) * 0.99) - 1],
    }


async def drop_schema(settings: Any) -> None:
    """Drops the schema a benchmark ran in (its seeded data is large and of no further use)."""
    connection = await db.plain_connection(settings)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{settings.schema_name}" CASCADE')
    finally:
        await connection.close()
