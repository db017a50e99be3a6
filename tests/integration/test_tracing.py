"""A call that crosses two services: one trace, the caller's deadline, the service's token."""

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.runtime.auth import TokenRegistry, current_principal
from services.runtime.channels import DEFAULT_TIMEOUT_SECONDS, connect
from services.runtime.server import Registration, Server, start_server
from services.runtime.settings import TokenConfig
from tests.conftest import ADMIN_TOKEN, TOKENS, recording
from tests.rpc import bearer

GATE_SERVICE_TOKEN = "tok-gate-service"
TOKENS_WITH_SERVICE = [
    *TOKENS,
    TokenConfig(
        name="gate-service", token=SecretStr(GATE_SERVICE_TOKEN), shops=["*"], roles=["read"]
    ),
]


class RecordingIdentity(identity_pb2_grpc.IdentityServicer):
    """Answers Lookup with what it saw: the caller's principal and the time it had left."""

    async def Lookup(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        remaining = context.time_remaining()
        return identity_pb2.LookupResponse(
            person_id=f"{current_principal.get().name}|{remaining:.3f}"
        )


class LookingUpGate(gate_pb2_grpc.GateServicer):
    """A gate that asks identity before answering, as services call each other."""

    def __init__(self, identity: "identity_pb2_grpc.IdentityAsyncStub") -> None:
        self._identity = identity

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        looked_up = await self._identity.Lookup(identity_pb2.LookupRequest(shop_id=request.shop_id))
        return gate_pb2.CheckResponse(reason=looked_up.person_id)


@pytest.fixture
async def gate_calling_identity(
    exporter: InMemorySpanExporter,
) -> AsyncIterator["gate_pb2_grpc.GateAsyncStub"]:
    telemetry = recording(exporter)
    tokens = TokenRegistry.from_settings_tokens(TOKENS_WITH_SERVICE)
    identity: Server = await start_server(
        "127.0.0.1:0",
        [
            Registration(
                identity_pb2.DESCRIPTOR.services_by_name["Identity"],
                RecordingIdentity(),
                identity_pb2_grpc.add_IdentityServicer_to_server,
            )
        ],
        tokens=tokens,
        telemetry=telemetry,
    )
    peer = connect(f"127.0.0.1:{identity.port}", SecretStr(GATE_SERVICE_TOKEN), telemetry)
    gate = await start_server(
        "127.0.0.1:0",
        [
            Registration(
                gate_pb2.DESCRIPTOR.services_by_name["Gate"],
                LookingUpGate(identity_pb2_grpc.IdentityStub(peer)),
                gate_pb2_grpc.add_GateServicer_to_server,
            )
        ],
        tokens=tokens,
        telemetry=telemetry,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gate.port}") as channel:
        yield gate_pb2_grpc.GateStub(channel)
    await peer.close(None)
    await gate.stop(1.0)
    await identity.stop(1.0)


async def test_spans_of_both_services_share_one_trace(
    gate_calling_identity: "gate_pb2_grpc.GateAsyncStub", exporter: InMemorySpanExporter
) -> None:
    await gate_calling_identity.Check(
        gate_pb2.CheckRequest(shop_id="shop-a", person_id="p1", message_id="m1"),
        metadata=bearer(ADMIN_TOKEN),
    )
    spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    gate_server = spans[("/c360.gate.v1.Gate/Check", SpanKind.SERVER)]
    identity_client = spans[("/c360.identity.v1.Identity/Lookup", SpanKind.CLIENT)]
    identity_server = spans[("/c360.identity.v1.Identity/Lookup", SpanKind.SERVER)]
    trace_ids = {s.context.trace_id for s in (gate_server, identity_client, identity_server)}
    assert len(trace_ids) == 1
    assert identity_client.parent is not None
    assert identity_client.parent.span_id == gate_server.context.span_id
    assert identity_server.parent is not None
    assert identity_server.parent.span_id == identity_client.context.span_id


async def test_a_peer_call_gets_the_default_deadline_when_the_caller_set_none(
    gate_calling_identity: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    response = await gate_calling_identity.Check(
        gate_pb2.CheckRequest(shop_id="shop-a", person_id="p1", message_id="m1"),
        metadata=bearer(ADMIN_TOKEN),
    )
    remaining = float(response.reason.split("|")[1])
    # The timeout travels as grpc-timeout and the peer measures from its own receipt: allow the
    # wire's rounding, not a second more.
    assert DEFAULT_TIMEOUT_SECONDS - 1.0 < remaining <= DEFAULT_TIMEOUT_SECONDS + 0.1


async def test_the_peer_call_carries_the_service_token_and_inherits_the_deadline(
    gate_calling_identity: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    response = await gate_calling_identity.Check(
        gate_pb2.CheckRequest(shop_id="shop-a", person_id="p1", message_id="m1"),
        metadata=bearer(ADMIN_TOKEN),
        timeout=0.8,
    )
    principal, remaining = response.reason.split("|")
    assert principal == "gate-service"
    assert 0.0 < float(remaining) <= 0.8 + 0.1
