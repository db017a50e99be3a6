"""Runs the enrichment service: `python -m services.enrichment [serve|migrate]`."""

from pathlib import Path

from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from services.enrichment.settings import EnrichmentSettings
from services.runtime import db
from services.runtime.process import run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: EnrichmentSettings, telemetry: Telemetry) -> Server:
    """Wires the service: settings -> engine -> servicer -> server. Every RPC answers
    UNIMPLEMENTED until its issue (#7) lands."""
    engine = db.create_engine(settings)
    registration = Registration(
        enrichment_pb2.DESCRIPTOR.services_by_name["Enrichment"],
        enrichment_pb2_grpc.EnrichmentServicer(),  # type: ignore[abstract]  # the generated base
        enrichment_pb2_grpc.add_EnrichmentServicer_to_server,
    )
    return await start_service(settings, telemetry, [registration], engine)


if __name__ == "__main__":
    run(EnrichmentSettings(), build, MIGRATIONS)
