"""Runs the enrichment service: `python -m services.enrichment [serve|migrate|daily]`."""

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from c360.identity.v1 import identity_pb2_grpc
from c360.profile.v1 import profile_pb2_grpc
from services.enrichment.enrichment import Enrichment
from services.enrichment.peers import IdentityPeer, ProfilePeer
from services.enrichment.servicer import EnrichmentServicer
from services.enrichment.settings import EnrichmentSettings
from services.enrichment.store import EnrichmentStore
from services.runtime import db
from services.runtime.channels import connect
from services.runtime.process import now, run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry, telemetry_from_environment

MIGRATIONS = Path(__file__).parent / "migrations"


def wire(
    settings: EnrichmentSettings, telemetry: Telemetry, clock: Callable[[], datetime]
) -> tuple[Enrichment, AsyncEngine, Callable[[], Awaitable[None]]]:
    """Settings -> engine, peers -> the enrichment work, and what closes the peers' channels."""
    engine = db.create_engine(settings)
    profile = connect(settings.address("profile"), settings.service_token, telemetry)
    identity = connect(settings.address("identity"), settings.service_token, telemetry)
    enrichment = Enrichment(
        EnrichmentStore(db.session_factory(engine)),
        ProfilePeer(profile_pb2_grpc.ProfileStub(profile)),
        IdentityPeer(identity_pb2_grpc.IdentityStub(identity)),
        clock,
        settings.follow_interval_seconds,
        settings.publish_batch,
    )

    async def close_peers() -> None:
        await profile.close(None)
        await identity.close(None)

    return enrichment, engine, close_peers


async def build(
    settings: EnrichmentSettings, telemetry: Telemetry, clock: Callable[[], datetime] = now
) -> Server:
    """Wires the service: settings -> engine, peers -> enrichment -> servicer -> server."""
    enrichment, engine, close_peers = wire(settings, telemetry, clock)
    registration = Registration(
        enrichment_pb2.DESCRIPTOR.services_by_name["Enrichment"],
        EnrichmentServicer(enrichment),
        enrichment_pb2_grpc.add_EnrichmentServicer_to_server,
    )
    enrichment.start(settings.daily_run_hour_utc)
    return await start_service(
        settings, telemetry, [registration], engine, on_stop=[enrichment.stop, close_peers]
    )


async def daily(settings: EnrichmentSettings) -> None:
    """Runs every known shop not yet run today, then exits (a Kubernetes CronJob's command)."""
    enrichment, engine, close_peers = wire(
        settings, telemetry_from_environment(settings.service), now
    )
    try:
        await enrichment.run_due_shops(settings.daily_run_hour_utc or 0)
    finally:
        await close_peers()
        await engine.dispose()


if __name__ == "__main__":
    run(EnrichmentSettings(), build, MIGRATIONS, {"daily": daily})
