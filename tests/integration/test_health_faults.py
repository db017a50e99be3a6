"""Health follows the real dependencies: NOT_SERVING while PostgreSQL or Redis is unreachable,
SERVING again when it returns. The outage is a real network cut through a TCP proxy."""

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from services.runtime import db
from services.runtime.errors import Unavailable, as_c360_error
from tests.backing import Backing, LocalPostgres
from tests.conftest import StartService
from tests.faults import TcpProxy
from tests.polling import eventually, health_becomes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status_of(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    status: int = response.status
    return status


@pytest.fixture
async def database_proxy(backing: Backing) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy.before(backing.database_url)
    yield proxy
    await proxy.cut()


@pytest.mark.parametrize("service", ["identity", "profile", "enrichment", "gate", "gdpr"])
async def test_database_outage_turns_health_not_serving_and_back(
    start_service: StartService, backing: Backing, database_proxy: TcpProxy, service: str
) -> None:
    server = await start_service(
        service, database_url=database_proxy.url_through(backing.database_url)
    )
    await health_becomes(f"127.0.0.1:{server.port}", SERVING)
    await database_proxy.cut()
    await health_becomes(f"127.0.0.1:{server.port}", NOT_SERVING)
    assert await status_of(server.port, "liveness") == SERVING
    await database_proxy.start()
    await health_becomes(f"127.0.0.1:{server.port}", SERVING)


async def test_redis_outage_turns_the_gates_health_not_serving_and_back(
    start_service: StartService, backing: Backing
) -> None:
    proxy = await TcpProxy.before(backing.redis_url)
    server = await start_service("gate", redis_url=proxy.url_through(backing.redis_url))
    await health_becomes(f"127.0.0.1:{server.port}", SERVING)
    await proxy.cut()
    await health_becomes(f"127.0.0.1:{server.port}", NOT_SERVING)
    await proxy.start()
    await health_becomes(f"127.0.0.1:{server.port}", SERVING)
    await proxy.cut()


async def test_stopping_postgresql_turns_health_not_serving_until_it_is_back(
    start_service: StartService,
) -> None:
    """The literal outage: a PostgreSQL server of the test's own is stopped and started again."""
    postgres = await asyncio.to_thread(LocalPostgres)
    try:
        server = await start_service("identity", database_url=postgres.url)
        await health_becomes(f"127.0.0.1:{server.port}", SERVING)
        await asyncio.to_thread(postgres.stop)
        await health_becomes(f"127.0.0.1:{server.port}", NOT_SERVING)
        await asyncio.to_thread(postgres.start)
        await health_becomes(f"127.0.0.1:{server.port}", SERVING)
    finally:
        await asyncio.to_thread(postgres.remove)


async def test_a_connection_lost_mid_statement_is_a_dependency_failure(
    settings_for: Any,
) -> None:
    """A server that terminates a connection during a statement (a restart, a failover) gives
    DatabaseUnavailable, which callers see as UNAVAILABLE, never INTERNAL; the pool drops the
    connection and the next statement runs on a fresh one."""
    engine = db.create_engine(settings_for("identity"))
    marker = f"c360-lost-{secrets.token_hex(4)}"
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f"SET application_name = '{marker}'"))
            sleeping = asyncio.create_task(connection.execute(text("SELECT pg_sleep(30)")))

            async def terminated() -> int:
                async with engine.connect() as other:
                    found = await other.execute(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = :marker AND query LIKE 'SELECT pg_sleep%'"
                        ),
                        {"marker": marker},
                    )
                    return int(found.scalar_one())

            await eventually(terminated, lambda n: n == 1, "the sleeping statement")
            with pytest.raises(db.DatabaseUnavailable):
                await sleeping
        assert isinstance(as_c360_error(db.DatabaseUnavailable("gone")), Unavailable)
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_pooled_connections_the_server_closed_are_replaced_before_use(
    settings_for: Any,
) -> None:
    """Idle pooled connections whose backends were terminated (as by a restart or a failover)
    are replaced at checkout: every statement after runs, none fails."""
    settings = settings_for("identity")
    engine = db.create_engine(settings)
    marker = f"c360-idle-{secrets.token_hex(4)}"
    try:
        pooled = [await engine.connect() for _ in range(4)]
        drivers: list[Any] = []
        for connection in pooled:
            await connection.execute(text(f"SET application_name = '{marker}'"))
            await connection.commit()
            drivers.append((await connection.get_raw_connection()).driver_connection)
        for connection in pooled:
            await connection.close()
        other = await db.plain_connection(settings)
        try:
            terminated = await other.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                marker,
            )

            async def left() -> int:
                count: int = await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", marker
                )
                return count

            await eventually(left, lambda n: n == 0, "the backends gone")
        finally:
            await other.close()
        assert terminated == 4

        async def seen_closed() -> int:
            return sum(driver.is_closed() for driver in drivers)

        await eventually(seen_closed, lambda n: n == 4, "the pool's connections saw the close")
        for _ in range(6):
            async with engine.connect() as connection:
                assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
