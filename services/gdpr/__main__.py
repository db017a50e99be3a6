"""Runs the gdpr service: `python -m services.gdpr [serve|migrate]`."""

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import grpc

from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from services.gdpr.gdpr import SHOP_STEPS, Gdpr, Peers
from services.gdpr.servicer import GdprServicer
from services.gdpr.settings import GdprSettings
from services.gdpr.store import GdprStore
from services.runtime import db
from services.runtime.channels import connect
from services.runtime.process import now, run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(
    settings: GdprSettings, telemetry: Telemetry, clock: Callable[[], datetime] = now
) -> Server:
    """Wires the service: settings -> engine, peers -> jobs -> servicer -> server."""
    engine = db.create_engine(settings)
    channels: dict[str, grpc.aio.Channel] = {
        name: connect(settings.address(name), settings.service_token, telemetry)
        for name in SHOP_STEPS
    }
    gdpr = Gdpr(
        GdprStore(db.session_factory(engine)),
        Peers.over(channels),
        clock,
        settings.job_interval_seconds,
        timedelta(days=settings.shop_redaction_grace_days),
    )
    registration = Registration(
        gdpr_pb2.DESCRIPTOR.services_by_name["Gdpr"],
        GdprServicer(gdpr, settings.retention_days),
        gdpr_pb2_grpc.add_GdprServicer_to_server,
    )

    async def close_peers() -> None:
        for channel in channels.values():
            await channel.close(None)

    gdpr.start()
    return await start_service(
        settings, telemetry, [registration], engine, on_stop=[gdpr.stop, close_peers]
    )


if __name__ == "__main__":
    run(GdprSettings(), build, MIGRATIONS)
