"""Runs the identity service: `python -m services.identity [serve|migrate]`."""

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.graph import IdentityGraph
from services.identity.servicer import IdentityServicer
from services.identity.settings import IdentitySettings
from services.identity.store import IdentityStore
from services.runtime import db
from services.runtime.process import now, run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(
    settings: IdentitySettings, telemetry: Telemetry, clock: Callable[[], datetime] = now
) -> Server:
    """Wires the service: settings -> engine -> identity graph -> servicer -> server."""
    engine = db.create_engine(settings)
    graph = IdentityGraph(
        IdentityStore(db.session_factory(engine)),
        clock,
        settings.shop_policy_ttl_seconds,
    )
    registration = Registration(
        identity_pb2.DESCRIPTOR.services_by_name["Identity"],
        IdentityServicer(graph),
        identity_pb2_grpc.add_IdentityServicer_to_server,
    )
    return await start_service(settings, telemetry, [registration], engine)


if __name__ == "__main__":
    run(IdentitySettings(), build, MIGRATIONS)
