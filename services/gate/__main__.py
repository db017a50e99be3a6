"""Runs the gate service: `python -m services.gate [serve|migrate]`."""

from pathlib import Path

import redis.asyncio as redis

from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.gate.settings import GateSettings
from services.runtime import db
from services.runtime.process import run, start_service
from services.runtime.server import Dependency, Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: GateSettings, telemetry: Telemetry) -> Server:
    """Wires the service: settings -> engine, Redis -> servicer -> server. Every RPC answers
    UNIMPLEMENTED until its issue (#3) lands."""
    engine = db.create_engine(settings)
    registration = Registration(
        gate_pb2.DESCRIPTOR.services_by_name["Gate"],
        gate_pb2_grpc.GateServicer(),  # type: ignore[abstract]  # the generated base
        gate_pb2_grpc.add_GateServicer_to_server,
    )
    if settings.redis_url is None:
        return await start_service(settings, telemetry, [registration], engine)
    counters = redis.from_url(
        settings.redis_url,
        socket_timeout=settings.dependency_timeout_seconds,
        socket_connect_timeout=settings.dependency_timeout_seconds,
    )

    async def ping() -> None:
        await counters.ping()

    return await start_service(
        settings,
        telemetry,
        [registration],
        engine,
        dependencies=[Dependency("redis", ping)],
        on_stop=[counters.aclose],
    )


if __name__ == "__main__":
    run(GateSettings(), build, MIGRATIONS)
