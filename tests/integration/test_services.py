"""Each of the five services, in process on port 0, over a real channel, on real PostgreSQL."""

import importlib
import secrets
from datetime import UTC, datetime
from functools import partial
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import text

from c360.common.v1 import common_pb2, common_pb2_grpc
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.gate.counters import PREFIX
from services.runtime import db
from services.runtime.settings import SERVICES, ServiceName
from tests.backing import Backing
from tests.conftest import ADMIN_TOKEN, SHOP_A_TOKEN, StartService
from tests.polling import eventually
from tests.rpc import FULL_NAMES, bearer, call, details, request_for, service_descriptor


@pytest.mark.parametrize("service", SERVICES)
async def test_health_is_serving_for_the_server_and_the_service(
    start_service: StartService, service: ServiceName
) -> None:
    server = await start_service(service)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", FULL_NAMES[service]):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", SERVICES)
async def test_reflection_lists_the_service_shop_data_health_and_reflection(
    start_service: StartService, service: ServiceName
) -> None:
    server = await start_service(service)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = [s.name async for r in responses for s in r.list_services_response.service]
    assert sorted(listed) == sorted(
        [
            FULL_NAMES[service],
            "c360.common.v1.ShopData",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )


# RPCs built so far; every other one must answer UNIMPLEMENTED rather than a made-up result.
BUILT = {
    "c360.profile.v1.Profile": {
        "Get",
        "IngestOrder",
        "IngestOrders",
        "IngestRefund",
        "IngestEvent",
        "SetConsent",
        "Unsubscribe",
        "ListDeadLetters",
        "ReplayDeadLetters",
        "UpsertCustomers",
        "GetContactPolicies",
        "CreateSegment",
        "ListSegments",
        "StreamSegmentMembers",
        "WatchChanges",
        "Export",
        "LookupTraits",
        "PutLoyaltyProgramme",
        "GetLoyaltyProgramme",
        "PutSignals",
        "ListHistories",
        "ListActivity",
        "Erase",
        "ExportPerson",
        "GetShopReports",
    },
    "c360.gdpr.v1.Gdpr": {
        "Erase",
        "GetErasure",
        "PreviewErase",
        "Export",
        "RedactShop",
        "HandleShopifyRequest",
        "ListAudit",
        "Inventory",
    },
    "c360.enrichment.v1.Enrichment": {
        "RunShop",
        "Recompute",
        "GetModelReport",
        "PutShopConfig",
        "GetShopConfig",
    },
    "c360.identity.v1.Identity": {
        "Resolve",
        "ResolveBatch",
        "Lookup",
        "GetPerson",
        "GetPersons",
        "LookupBatch",
        "ListMergeCandidates",
        "Merge",
        "DismissCandidate",
        "Unmerge",
        "Forget",
        "PutShopPolicy",
        "GetShopPolicy",
        "ListChanges",
        "Inventory",
    },
    "c360.gate.v1.Gate": {
        "Check",
        "CheckBatch",
        "Release",
        "PutContactPolicy",
        "PutContactPolicies",
        "PutShopPolicy",
        "GetContactHistory",
        "Erase",
        "GetFatiguePosture",
    },
}


@pytest.mark.parametrize("service", SERVICES)
async def test_every_rpc_not_built_yet_answers_unimplemented(
    start_service: StartService, service: ServiceName
) -> None:
    server = await start_service(service)
    descriptor = service_descriptor(FULL_NAMES[service])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in descriptor.methods:
            if method.name in BUILT.get(descriptor.full_name, set()):
                continue
            request = request_for(method, shop_id="shop-a", job_id="job-1")
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(channel, method, request, bearer(ADMIN_TOKEN))
            assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED, method.full_name
            assert failure.value.details() == (
                f"/{FULL_NAMES[service]}/{method.name} is not implemented yet"
            )


LATEST_REVISION: dict[ServiceName, str] = {
    "identity": "0002",
    "profile": "0006",
    "enrichment": "0002",
    "gate": "0002",
    "gdpr": "0002",
}


@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_record_their_version_in_the_service_schema(
    start_service: StartService, settings_for: object, service: ServiceName
) -> None:
    await start_service(service)
    settings = settings_for(service)  # type: ignore[operator]
    engine = db.create_engine(settings)
    try:
        async with engine.connect() as connection:
            current_schema = await connection.scalar(text("SELECT current_schema()"))
            version = await connection.scalar(
                text(f"SELECT version_num FROM alembic_version_{service}")
            )
    finally:
        await engine.dispose()
    assert current_schema == settings.schema_name
    assert version == LATEST_REVISION[service]


# The services whose tables are declared as SQLAlchemy models.
MODELLED: dict[ServiceName, str] = {
    "identity": "services.identity.store",
    "profile": "services.profile.store",
    "enrichment": "services.enrichment.store",
    "gate": "services.gate.store",
    "gdpr": "services.gdpr.store",
}


@pytest.mark.parametrize("service", sorted(MODELLED))
async def test_the_migrations_build_exactly_the_models_tables(
    start_service: StartService, settings_for: object, service: ServiceName
) -> None:
    await start_service(service)
    metadata = importlib.import_module(MODELLED[service]).Base.metadata
    engine = db.create_engine(settings_for(service))  # type: ignore[operator]

    def differences(connection: Any) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={"include_name": lambda name, kind, _: not str(name).startswith("alembic_")},
        )
        return list(compare_metadata(context, metadata))

    try:
        async with engine.connect() as connection:
            found = await connection.run_sync(differences)
    finally:
        await engine.dispose()
    assert found == []


async def redact(
    channel: grpc.aio.Channel, shop_id: str, dry_run: bool, token: str = ADMIN_TOKEN
) -> dict[str, int]:
    """ShopData.RedactShop of one service: what it removed (or would), by table or store."""
    response = await common_pb2_grpc.ShopDataStub(channel).RedactShop(
        common_pb2.RedactShopDataRequest(shop_id=shop_id, dry_run=dry_run), metadata=bearer(token)
    )
    return dict(response.removed)


@pytest.mark.parametrize("service", SERVICES)
async def test_shop_data_covers_every_shop_table_for_the_gdpr_role_only(
    start_service: StartService, service: ServiceName
) -> None:
    server = await start_service(service)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await redact(channel, "shop-a", True, SHOP_A_TOKEN)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert [d.reason for d in details(denied.value)] == ["MISSING_ROLE"]
        for bad in ("", "shop:a"):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await redact(channel, bad, True)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            [bad_request] = details(invalid.value)
            assert [v.field for v in bad_request.field_violations] == ["shop_id"]
        nobody = f"shop-{secrets.token_hex(4)}"
        counted = await redact(channel, nobody, True)
        assert await redact(channel, nobody, False) == counted
    assert set(counted.values()) <= {0}
    if service in MODELLED:
        metadata = importlib.import_module(MODELLED[service]).Base.metadata
        tables = {t.name for t in metadata.tables.values() if "shop_id" in t.c}
        assert set(counted) == tables | ({"redis_keys"} if service == "gate" else set())


async def shopper(profile: Any, gate: Any, shop: str) -> None:
    """One shopper of the shop with an order, e-mail consent, and a message checked at the
    gate: rows in the profile, identity and the gate, and keys in Redis."""
    auth = bearer(ADMIN_TOKEN)
    email = common_pb2.Identifier(type="email", value=f"ada@{shop}.example")
    placed = Timestamp()
    placed.FromDatetime(datetime(2026, 1, 10, tzinfo=UTC))
    person = await profile.IngestOrder(
        profile_pb2.IngestOrderRequest(
            shop_id=shop, order_id="1", total="10.00", currency="EUR", placed_at=placed,
            source=profile_pb2.ORDER_SOURCE_ONLINE, identifiers=[email],
        ),
        metadata=auth,
    )  # fmt: skip
    await profile.SetConsent(
        profile_pb2.SetConsentRequest(
            shop_id=shop, person=common_pb2.PersonRef(person_id=person.person_id),
            channel=common_pb2.CHANNEL_EMAIL, granted=True, consent_text="Yes", source="checkout",
            at=placed,
        ),
        metadata=auth,
    )  # fmt: skip
    await gate.Check(
        gate_pb2.CheckRequest(
            shop_id=shop, person_id=person.person_id, channel=common_pb2.CHANNEL_EMAIL,
            message_id="m1",
        ),
        metadata=auth,
    )  # fmt: skip


async def shop_keys(client: redis.Redis, shop: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"{PREFIX}:{{{shop}:*")]


async def test_redacting_a_shop_removes_what_its_dry_run_counted_and_nothing_of_another(
    start_service: StartService, backing: Backing
) -> None:
    identity = await start_service("identity")
    gate = await start_service("gate", log_flush_interval_seconds=0.05)
    profile = await start_service(
        "profile",
        identity_addr=f"127.0.0.1:{identity.port}",
        gate_addr=f"127.0.0.1:{gate.port}",
        service_token=ADMIN_TOKEN,
        gate_push_interval_seconds=0.05,
        identity_follow_interval_seconds=0.05,
        summary_refresh_interval_seconds=0.05,
    )
    servers = {"profile": profile, "gate": gate, "identity": identity}
    channels = {n: grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for n, s in servers.items()}
    client = redis.from_url(backing.redis_url)
    try:
        target, other = f"shop-{secrets.token_hex(4)}", f"shop-{secrets.token_hex(4)}"
        for shop in (target, other):
            await shopper(
                profile_pb2_grpc.ProfileStub(channels["profile"]),
                gate_pb2_grpc.GateStub(channels["gate"]),
                shop,
            )

        async def counts(shop: str) -> dict[str, dict[str, int]]:
            return {n: await redact(c, shop, dry_run=True) for n, c in channels.items()}

        def settled(found: dict[str, dict[str, int]]) -> bool:
            return (
                found["profile"]["summary_due"] == 0
                and found["profile"]["gate_push"] == 0
                and found["gate"]["contact_policy"] == 1
                and found["gate"]["message_log"] == 1
            )

        before = {s: await eventually(partial(counts, s), settled, s) for s in (target, other)}
        assert before[target]["profile"]["order_fact"] == 1
        assert before[target]["identity"]["person"] == 1
        assert before[target]["gate"]["redis_keys"] > 0
        # Callers before the services they call, so nothing is pushed back.
        for name, channel in channels.items():
            assert await redact(channel, target, dry_run=True) == before[target][name]
            assert await redact(channel, target, dry_run=False) == before[target][name]
        left = {n: {t: c for t, c in f.items() if c} for n, f in (await counts(target)).items()}
        assert left == {"profile": {}, "gate": {}, "identity": {}}
        assert await counts(other) == before[other]
        assert await shop_keys(client, target) == []
        assert len(await shop_keys(client, other)) == before[other]["gate"]["redis_keys"]
    finally:
        await client.aclose()
        for channel in channels.values():
            await channel.close(None)
