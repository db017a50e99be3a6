"""Runs the profile service: `python -m services.profile [serve|migrate]`."""

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from c360.gate.v1 import gate_pb2_grpc
from c360.gdpr.v1 import gdpr_pb2_grpc
from c360.identity.v1 import identity_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.audience_store import AudienceStore
from services.profile.audiences import Audiences
from services.profile.gdpr import PersonData
from services.profile.gdpr_store import GdprStore
from services.profile.history_store import HistoryStore
from services.profile.peers import GatePeer, GdprPeer, IdentityPeer
from services.profile.profiles import Profiles
from services.profile.report_store import ReportStore
from services.profile.servicer import ProfileServicer
from services.profile.settings import ProfileSettings
from services.profile.store import Inbox, ProfileStore
from services.profile.webhooks import Webhooks
from services.runtime import db
from services.runtime.auth import TokenRegistry
from services.runtime.channels import connect
from services.runtime.process import now, run, start_service
from services.runtime.server import Registration, Server
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(
    settings: ProfileSettings, telemetry: Telemetry, clock: Callable[[], datetime] = now
) -> Server:
    """Wires the service: settings -> engine, peers -> profiles -> servicer -> server."""
    engine = db.create_engine(settings)
    identity = connect(settings.address("identity"), settings.service_token, telemetry)
    gate = connect(settings.address("gate"), settings.service_token, telemetry)
    gdpr = connect(settings.address("gdpr"), settings.service_token, telemetry)
    sessions = db.session_factory(engine)
    facts = ProfileStore(sessions)
    identity_peer = IdentityPeer(identity_pb2_grpc.IdentityStub(identity))
    gate_peer = GatePeer(gate_pb2_grpc.GateStub(gate))
    profiles = Profiles(
        facts,
        identity_peer,
        gate_peer,
        clock,
        settings.gate_push_interval_seconds,
        settings.identity_follow_interval_seconds,
    )
    audiences = Audiences(
        AudienceStore(sessions),
        facts,
        identity_peer,
        gate_peer,
        clock,
        settings.summary_refresh_interval_seconds,
        settings.feed_poll_interval_seconds,
    )
    secrets = [
        secret.get_secret_value()
        for secret in (settings.shopify_api_secret, settings.shopify_api_secret_previous)
        if secret is not None
    ]
    webhooks = Webhooks(
        Inbox(sessions),
        profiles,
        GdprPeer(gdpr_pb2_grpc.GdprStub(gdpr)),
        secrets,
        settings.shopify_shops,
        clock,
        TokenRegistry.from_settings(settings),
        settings.webhook_max_attempts,
    )
    registration = Registration(
        profile_pb2.DESCRIPTOR.services_by_name["Profile"],
        ProfileServicer(
            profiles,
            audiences,
            webhooks,
            HistoryStore(sessions),
            PersonData(GdprStore(sessions), AudienceStore(sessions), identity_peer, clock),
            ReportStore(sessions),
            clock,
        ),
        profile_pb2_grpc.add_ProfileServicer_to_server,
    )

    async def close_peers() -> None:
        await identity.close(None)
        await gate.close(None)
        await gdpr.close(None)

    profiles.start()
    audiences.start()
    webhook_port = await webhooks.start(settings.host, settings.webhook_port)
    server = await start_service(
        settings,
        telemetry,
        [registration],
        engine,
        on_stop=[webhooks.stop, audiences.stop, profiles.stop, close_peers],
    )
    server.http_ports["webhooks"] = webhook_port
    return server


if __name__ == "__main__":
    run(ProfileSettings(), build, MIGRATIONS)
