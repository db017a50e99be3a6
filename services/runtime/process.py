"""One service process: `python -m services.<name> [serve|migrate|job]`, until SIGTERM or
SIGINT."""

import argparse
import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import db
from services.runtime.auth import TokenRegistry
from services.runtime.server import Dependency, Registration, Server, start_server
from services.runtime.settings import RuntimeSettings
from services.runtime.shop_data import RedactExtra, shop_data
from services.runtime.telemetry import Telemetry, configure_logging, telemetry_from_environment

log = logging.getLogger(__name__)


async def start_service(
    settings: RuntimeSettings,
    telemetry: Telemetry,
    registrations: Sequence[Registration],
    engine: AsyncEngine,
    dependencies: Sequence[Dependency] = (),
    on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
    redact_extra: RedactExtra | None = None,
) -> Server:
    """Starts a service that owns a database: it also serves ShopData over that database (and
    over its other stores through `redact_extra`); its health follows the database and every
    other dependency; stopping it disposes of the engine."""
    return await start_server(
        settings.listen_address,
        [*registrations, shop_data(engine, redact_extra)],
        tokens=TokenRegistry.from_settings(settings),
        telemetry=telemetry,
        dependencies=[Dependency("database", partial(db.ping, engine)), *dependencies],
        health_interval=settings.health_interval_seconds,
        dependency_timeout=settings.dependency_timeout_seconds,
        max_connection_age=settings.max_connection_age_seconds,
        on_stop=[*on_stop, engine.dispose],
    )


S = TypeVar("S", bound=RuntimeSettings)


def now() -> datetime:
    """The services' clock: the current time in UTC (tests pass their own clock instead)."""
    return datetime.now(UTC)


async def serve(settings: S, build: Callable[[S, Telemetry], Awaitable[Server]]) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    telemetry = telemetry_from_environment(settings.service)
    server = await build(settings, telemetry)
    # What start-up made (modules, descriptors, mappers, the wiring) lives as long as the
    # process: the collector stops walking it at every full collection (a fifth of a bulk
    # call's CPU went to collections walking it).
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("serving", extra={"address": settings.listen_address, "port": server.port})
    await stopping.wait()
    log.info("stopping", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await server.stop(settings.shutdown_grace_seconds, settings.shutdown_drain_seconds)
    telemetry.shutdown()
    log.info("stopped")


def run(
    settings: S,
    build: Callable[[S, Telemetry], Awaitable[Server]],
    migrations: Path,
    jobs: Mapping[str, Callable[[S], Coroutine[Any, Any, None]]] | None = None,
) -> None:
    """The command line of a service: `serve` (default), `migrate`, or one of its one-shot
    `jobs` (e.g. the enrichment's daily run, for a Kubernetes CronJob)."""
    jobs = jobs or {}
    parser = argparse.ArgumentParser(prog=f"python -m services.{settings.service}")
    parser.add_argument("command", nargs="?", choices=["serve", "migrate", *jobs], default="serve")
    command = parser.parse_args().command
    configure_logging(settings.service, settings.log_level)
    if command == "migrate":
        db.migrate(settings, migrations)
        log.info("migrated")
        return
    if command in jobs:
        asyncio.run(jobs[command](settings))
        return
    asyncio.run(serve(settings, build))
