"""Runs the identity service: `python -m services.identity [serve|migrate]`."""

from pathlib import Path

from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.settings import IdentitySettings
from services.runtime import db
from services.runtime.process import run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: IdentitySettings, telemetry: Telemetry) -> Server:
    """Wires the service: settings -> engine -> servicer -> server. Every RPC answers
    UNIMPLEMENTED until its issue (#4) lands."""
    engine = db.create_engine(settings)
    registration = Registration(
        identity_pb2.DESCRIPTOR.services_by_name["Identity"],
        identity_pb2_grpc.IdentityServicer(),  # type: ignore[abstract]  # the generated base
        identity_pb2_grpc.add_IdentityServicer_to_server,
    )
    return await start_service(settings, telemetry, [registration], engine)


if __name__ == "__main__":
    run(IdentitySettings(), build, MIGRATIONS)
