"""Runs the profile service: `python -m services.profile [serve|migrate]`."""

from pathlib import Path

from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.settings import ProfileSettings
from services.runtime import db
from services.runtime.process import run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: ProfileSettings, telemetry: Telemetry) -> Server:
    """Wires the service: settings -> engine -> servicer -> server. Every RPC answers
    UNIMPLEMENTED until its issue (#5) lands."""
    engine = db.create_engine(settings)
    registration = Registration(
        profile_pb2.DESCRIPTOR.services_by_name["Profile"],
        profile_pb2_grpc.ProfileServicer(),  # type: ignore[abstract]  # the generated base
        profile_pb2_grpc.add_ProfileServicer_to_server,
    )
    return await start_service(settings, telemetry, [registration], engine)


if __name__ == "__main__":
    run(ProfileSettings(), build, MIGRATIONS)
