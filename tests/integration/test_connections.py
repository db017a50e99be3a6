"""Connections are recycled by age, so that clients resolving a service again reach replicas
added since; calls keep working across the recycling."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import StartService
from tests.polling import eventually


async def test_a_connection_past_its_age_is_sent_away_and_the_client_reconnects(
    start_service: StartService,
) -> None:
    server = await start_service("identity", max_connection_age_seconds=0.5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == serving
        assert channel.get_state() == grpc.ChannelConnectivity.READY

        async def state() -> grpc.ChannelConnectivity:
            return channel.get_state()

        # The server's GOAWAY leaves the channel idle until the next call.
        await eventually(state, lambda s: s == grpc.ChannelConnectivity.IDLE, "the GOAWAY", 5.0)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == serving
        assert channel.get_state() == grpc.ChannelConnectivity.READY
