"""Bearer tokens, shops and roles, enforced by the shared runtime, through a real channel."""

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from tests.conftest import ADMIN_TOKEN, READER_TOKEN, SHOP_A_TOKEN, StartService
from tests.rpc import bearer, details


@pytest.fixture
async def gate(start_service: StartService) -> AsyncIterator["gate_pb2_grpc.GateAsyncStub"]:
    server = await start_service("gate")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield gate_pb2_grpc.GateStub(channel)


def check(shop_id: str) -> gate_pb2.CheckRequest:
    return gate_pb2.CheckRequest(
        shop_id=shop_id, person_id="p1", channel=common_pb2.CHANNEL_SMS, message_id="m1"
    )


async def failure_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return failure.value


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing bearer token in `authorization` metadata"),
        (bearer("not-a-token"), "unknown bearer token"),
        (
            (("authorization", f"Basic {ADMIN_TOKEN}"),),
            "missing bearer token in `authorization` metadata",
        ),
        ((("authorization", "Bearer "),), "missing bearer token in `authorization` metadata"),
    ],
)
async def test_no_valid_token_is_unauthenticated(
    gate: "gate_pb2_grpc.GateAsyncStub", metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    error = await failure_of(gate.Check(check("shop-a"), metadata=metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == message
    assert details(error) == [error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain="c360")]


async def test_a_token_on_another_shops_data_is_permission_denied(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    error = await failure_of(gate.Check(check("shop-b"), metadata=bearer(SHOP_A_TOKEN)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(error) == [
        error_details_pb2.ErrorInfo(
            reason="OTHER_SHOP", domain="c360", metadata={"shop_id": "shop-b"}
        )
    ]


async def test_a_token_on_its_own_shop_reaches_the_method(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    response = await gate.Check(check("shop-a"), metadata=bearer(SHOP_A_TOKEN))
    assert (response.allowed, response.reason) == (False, "no_consent:sms")


async def test_an_agency_token_reads_each_of_its_shops_and_no_other(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    for shop in ("shop-a", "shop-b"):
        request = gate_pb2.GetContactHistoryRequest(shop_id=shop, person_id="p1")
        history = await gate.GetContactHistory(request, metadata=bearer(READER_TOKEN))
        assert history.counts.today_total == 0
    request = gate_pb2.GetContactHistoryRequest(shop_id="shop-c", person_id="p1")
    error = await failure_of(gate.GetContactHistory(request, metadata=bearer(READER_TOKEN)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_token_without_the_methods_role_is_permission_denied(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    error = await failure_of(gate.Check(check("shop-a"), metadata=bearer(READER_TOKEN)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "the token lacks the ROLE_WRITE role for /c360.gate.v1.Gate/Check"
    assert details(error) == [
        error_details_pb2.ErrorInfo(
            reason="MISSING_ROLE", domain="c360", metadata={"role": "ROLE_WRITE"}
        )
    ]


async def test_a_request_without_shop_id_is_invalid_argument(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    error = await failure_of(gate.Check(check(""), metadata=bearer(ADMIN_TOKEN)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == [
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="shop_id", description="required")
            ]
        )
    ]


async def test_health_needs_no_token(start_service: StartService) -> None:
    server = await start_service("gate")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING
