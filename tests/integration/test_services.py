"""Each of the five services, in process on port 0, over a real channel, on real PostgreSQL."""

import importlib
from typing import Any

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import text

from services.runtime import db
from services.runtime.settings import SERVICES, ServiceName
from tests.conftest import ADMIN_TOKEN, StartService
from tests.rpc import FULL_NAMES, bearer, call, request_for, service_descriptor


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
async def test_reflection_lists_the_service_health_and_reflection(
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
        [FULL_NAMES[service], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    )


# RPCs built so far; every other one must answer UNIMPLEMENTED rather than a made-up result.
BUILT = {
    "c360.profile.v1.Profile": {
        "Get",
        "IngestOrder",
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
        "Lookup",
        "GetPerson",
        "ListMergeCandidates",
        "Merge",
        "DismissCandidate",
        "Unmerge",
        "Forget",
        "PutShopPolicy",
        "GetShopPolicy",
        "ListChanges",
    },
    "c360.gate.v1.Gate": {
        "Check",
        "CheckBatch",
        "Release",
        "PutContactPolicy",
        "PutShopPolicy",
        "GetContactHistory",
        "Erase",
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
    "profile": "0004",
    "enrichment": "0002",
    "gate": "0002",
    "gdpr": "0001",
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
