"""Runs the gdpr service: `python -m services.gdpr [serve|migrate]`."""

from pathlib import Path

from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from services.gdpr.settings import GdprSettings
from services.runtime import db
from services.runtime.process import run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: GdprSettings, telemetry: Telemetry) -> Server:
    """Wires the service: settings -> engine -> servicer -> server. Every RPC answers
    UNIMPLEMENTED until its issue (#8) lands."""
    engine = db.create_engine(settings)
    registration = Registration(
        gdpr_pb2.DESCRIPTOR.services_by_name["Gdpr"],
        gdpr_pb2_grpc.GdprServicer(),  # type: ignore[abstract]  # the generated base
        gdpr_pb2_grpc.add_GdprServicer_to_server,
    )
    return await start_service(settings, telemetry, [registration], engine)


if __name__ == "__main__":
    run(GdprSettings(), build, MIGRATIONS)
