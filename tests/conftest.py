"""Fixtures shared by the suite: real PostgreSQL and Redis, real services on port 0."""

import asyncio
import importlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from services.runtime import db
from services.runtime.server import Server
from services.runtime.settings import RuntimeSettings, ServiceName, TokenConfig
from services.runtime.telemetry import Telemetry
from tests.backing import Backing, BackingUnavailable, provide

ADMIN_TOKEN = "tok-admin"
SHOP_A_TOKEN = "tok-shop-a"
READER_TOKEN = "tok-reader"
TOKENS = [
    TokenConfig(name="ops", token=SecretStr(ADMIN_TOKEN), shops=["*"], roles=["admin"]),
    TokenConfig(
        name="shop-a", token=SecretStr(SHOP_A_TOKEN), shops=["shop-a"], roles=["read", "write"]
    ),
    TokenConfig(
        name="agency", token=SecretStr(READER_TOKEN), shops=["shop-a", "shop-b"], roles=["read"]
    ),
]

StartService = Callable[..., Awaitable[Server]]


@pytest.fixture(scope="session")
def backing() -> Iterator[Backing]:
    """The real PostgreSQL and Redis for this run."""
    try:
        found = provide()
    except BackingUnavailable as missing:
        pytest.exit(str(missing), returncode=1)
    yield found
    found.stop()


@pytest.fixture(scope="session")
def run_id() -> str:
    """A prefix that keeps this run's PostgreSQL schemas apart from other runs and `make run`."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
async def drop_schemas(backing: Backing, run_id: str) -> AsyncIterator[None]:
    """Drops every schema this run created once the run is over."""
    yield
    url = make_url(backing.database_url).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        schemas = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{run_id}_%"
        )
        for row in schemas:
            await connection.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
    finally:
        await connection.close()


def service_module(service: ServiceName) -> Any:
    """The wiring module of a service (`python -m services.<service>`)."""
    return importlib.import_module(f"services.{service}.__main__")


def service_settings(
    backing: Backing, run_id: str, service: ServiceName, **overrides: Any
) -> RuntimeSettings:
    """Settings of a service on port 0 against the real PostgreSQL (and Redis for the gate), in
    this run's schemas."""
    module = importlib.import_module(f"services.{service}.settings")
    settings_class = getattr(module, f"{service.capitalize()}Settings")
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        f"{service}_port": 0,
        "database_url": backing.database_url,
        "db_schema_prefix": f"{run_id}_",
        "tokens": TOKENS,
        "health_interval_seconds": 0.1,
        "dependency_timeout_seconds": 0.5,
    }
    if service == "gate":
        values["redis_url"] = backing.redis_url
        # A check may wait 2 s for Redis, not 50 ms: on a busy 2-core machine (or after another
        # test made Redis forget its scripts, so that a call loads its script again) a check past
        # the budget answers gate_unavailable, and a test about what the gate decides would fail
        # on that (a CI run did). Tests of the budget itself set it back to 50 ms.
        values["redis_timeout_ms"] = 2000
    values.update(overrides)
    settings: RuntimeSettings = settings_class(**values)
    return settings


async def start_with(
    settings: RuntimeSettings,
    telemetry: Telemetry | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Server:
    """Migrates a service's schema and starts the service in process."""
    module = service_module(settings.service)
    await asyncio.to_thread(db.migrate, settings, Path(module.MIGRATIONS))
    timed = {"clock": clock} if clock else {}
    server: Server = await module.build(settings, telemetry or Telemetry(), **timed)
    return server


@pytest.fixture
def settings_for(backing: Backing, run_id: str, drop_schemas: None) -> Callable[..., Any]:
    """Settings of a service on port 0 against the real PostgreSQL (and Redis for the gate)."""

    def make(service: ServiceName, **overrides: Any) -> RuntimeSettings:
        return service_settings(backing, run_id, service, **overrides)

    return make


@pytest.fixture
async def start_service(settings_for: Callable[..., Any]) -> AsyncIterator[StartService]:
    """Migrates and starts real services in process; stops them after the test."""
    started: list[Server] = []

    async def start(
        service: ServiceName,
        telemetry: Telemetry | None = None,
        clock: Callable[[], datetime] | None = None,
        **overrides: Any,
    ) -> Server:
        server = await start_with(settings_for(service, **overrides), telemetry, clock)
        started.append(server)
        return server

    yield start
    for server in reversed(started):  # callers before the services they call
        await server.stop(grace=1.0)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Keeps the spans of `recording(exporter)` telemetry as they end."""
    return InMemorySpanExporter()


def recording(exporter: InMemorySpanExporter) -> Telemetry:
    """Telemetry whose spans go to the exporter as each ends."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(provider)
