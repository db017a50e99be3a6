"""Graceful shutdown: NOT_SERVING first, in-flight calls finish, then the server stops."""

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.runtime.auth import TokenRegistry
from services.runtime.server import Registration, start_server
from services.runtime.telemetry import Telemetry
from tests.conftest import ADMIN_TOKEN, TOKENS
from tests.rpc import bearer

DEADLINE_SECONDS = 5.0


class HeldGate(gate_pb2_grpc.GateServicer):
    """A gate whose Check answers only once the test lets it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def Check(self, request: Any, context: Any) -> Any:
        self.entered.set()
        await self.release.wait()
        return gate_pb2.CheckResponse(allowed=True)


async def test_stop_reports_not_serving_lets_in_flight_calls_finish_then_refuses_calls() -> None:
    servicer = HeldGate()
    server = await start_server(
        "127.0.0.1:0",
        [
            Registration(
                gate_pb2.DESCRIPTOR.services_by_name["Gate"],
                servicer,
                gate_pb2_grpc.add_GateServicer_to_server,
            )
        ],
        tokens=TokenRegistry.from_settings_tokens(TOKENS),
        telemetry=Telemetry(),
    )
    address = f"127.0.0.1:{server.port}"
    request = gate_pb2.CheckRequest(shop_id="shop-a", person_id="p1", message_id="m1")
    async with grpc.aio.insecure_channel(address) as channel:
        gate = gate_pb2_grpc.GateStub(channel)
        in_flight = asyncio.ensure_future(gate.Check(request, metadata=bearer(ADMIN_TOKEN)))
        await asyncio.wait_for(servicer.entered.wait(), DEADLINE_SECONDS)

        stopping = asyncio.create_task(server.stop(grace=DEADLINE_SECONDS, drain=2.0))
        health = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
        status = health_pb2.HealthCheckResponse.SERVING
        while status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert asyncio.get_running_loop().time() < deadline, "never NOT_SERVING"
            status = (await health.Check(health_pb2.HealthCheckRequest())).status

        servicer.release.set()
        response = await asyncio.wait_for(in_flight, DEADLINE_SECONDS)
        assert response.allowed is True
        await asyncio.wait_for(stopping, DEADLINE_SECONDS * 2)

    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gate_pb2_grpc.GateStub(channel).Check(
                request, metadata=bearer(ADMIN_TOKEN), timeout=1.0
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
