"""Health follows the real dependencies: NOT_SERVING while PostgreSQL or Redis is unreachable,
SERVING again when it returns. The outage is a real network cut through a TCP proxy."""

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.backing import Backing, LocalPostgres
from tests.conftest import StartService
from tests.faults import TcpProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE_SECONDS = 10.0


async def proxy_to(url: str) -> TcpProxy:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    return proxy


def through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def status_of(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    status: int = response.status
    return status


async def wait_for_status(port: int, expected: int) -> None:
    """Polls the health service until it reports `expected`, failing after the deadline."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if response.status == expected:
                return
            seen.append(response.status)
            await asyncio.sleep(0.05)
    raise AssertionError(f"health never became {expected}; last seen {seen[-3:]}")


@pytest.fixture
async def database_proxy(backing: Backing) -> AsyncIterator[TcpProxy]:
    proxy = await proxy_to(backing.database_url)
    yield proxy
    await proxy.cut()


@pytest.mark.parametrize("service", ["identity", "profile", "enrichment", "gate", "gdpr"])
async def test_database_outage_turns_health_not_serving_and_back(
    start_service: StartService, backing: Backing, database_proxy: TcpProxy, service: str
) -> None:
    server = await start_service(
        service, database_url=through(backing.database_url, database_proxy)
    )
    await wait_for_status(server.port, SERVING)
    await database_proxy.cut()
    await wait_for_status(server.port, NOT_SERVING)
    assert await status_of(server.port, "liveness") == SERVING
    await database_proxy.start()
    await wait_for_status(server.port, SERVING)


async def test_redis_outage_turns_the_gates_health_not_serving_and_back(
    start_service: StartService, backing: Backing
) -> None:
    proxy = await proxy_to(backing.redis_url)
    server = await start_service("gate", redis_url=through(backing.redis_url, proxy))
    await wait_for_status(server.port, SERVING)
    await proxy.cut()
    await wait_for_status(server.port, NOT_SERVING)
    await proxy.start()
    await wait_for_status(server.port, SERVING)
    await proxy.cut()


async def test_stopping_postgresql_turns_health_not_serving_until_it_is_back(
    start_service: StartService,
) -> None:
    """The literal outage: a PostgreSQL server of the test's own is stopped and started again."""
    postgres = await asyncio.to_thread(LocalPostgres)
    try:
        server = await start_service("identity", database_url=postgres.url)
        await wait_for_status(server.port, SERVING)
        await asyncio.to_thread(postgres.stop)
        await wait_for_status(server.port, NOT_SERVING)
        await asyncio.to_thread(postgres.start)
        await wait_for_status(server.port, SERVING)
    finally:
        await asyncio.to_thread(postgres.remove)
