"""Typed errors become statuses with details; anything else a generic INTERNAL, logged only."""

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from services.runtime.auth import TokenRegistry
from services.runtime.errors import FailedPrecondition, NotFound
from services.runtime.server import Registration, start_server
from tests.conftest import ADMIN_TOKEN, TOKENS, recording
from tests.rpc import bearer, details

SECRET = "sarah@example.com"


class FailingGate(gate_pb2_grpc.GateServicer):
    """A gate whose handlers fail in each of the ways the runtime must map."""

    async def Check(self, request: Any, context: Any) -> Any:
        raise RuntimeError(f"bug while handling {SECRET}")

    async def Release(self, request: Any, context: Any) -> Any:
        raise FailedPrecondition("UNMERGE_WINDOW", "merge/m1", "the unmerge window has passed")

    async def GetContactHistory(self, request: Any, context: Any) -> Any:
        raise ConnectionError("redis at 10.0.0.1:6379 refused")

    async def Erase(self, request: Any, context: Any) -> Any:
        raise NotFound("person", "p404")


@pytest.fixture
async def gate(exporter: InMemorySpanExporter) -> AsyncIterator["gate_pb2_grpc.GateAsyncStub"]:
    server = await start_server(
        "127.0.0.1:0",
        [
            Registration(
                gate_pb2.DESCRIPTOR.services_by_name["Gate"],
                FailingGate(),
                gate_pb2_grpc.add_GateServicer_to_server,
            )
        ],
        tokens=TokenRegistry.from_settings_tokens(TOKENS),
        telemetry=recording(exporter),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield gate_pb2_grpc.GateStub(channel)
    await server.stop(grace=1.0)


async def test_an_unknown_exception_is_a_generic_internal_with_the_traceback_in_the_log(
    gate: "gate_pb2_grpc.GateAsyncStub", caplog: pytest.LogCaptureFixture
) -> None:
    request = gate_pb2.CheckRequest(shop_id="shop-a", person_id="p1", message_id="m1")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.Check(request, metadata=bearer(ADMIN_TOKEN))
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert failure.value.details() == "internal error"
    assert SECRET not in str(failure.value.debug_error_string())
    assert details(failure.value) == []
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].getMessage() == "unhandled error in /c360.gate.v1.Gate/Check"
    assert isinstance(logged[0].exc_info[1], RuntimeError)  # type: ignore[index]


async def test_failed_precondition_carries_its_violation(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    request = gate_pb2.ReleaseRequest(shop_id="shop-a", person_id="p1", message_id="m1")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.Release(request, metadata=bearer(ADMIN_TOKEN))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.value.details() == "the unmerge window has passed"
    assert details(failure.value) == [
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="UNMERGE_WINDOW",
                    subject="merge/m1",
                    description="the unmerge window has passed",
                )
            ]
        )
    ]


async def test_a_dependency_failure_is_unavailable_with_a_retry_delay(
    gate: "gate_pb2_grpc.GateAsyncStub",
) -> None:
    request = gate_pb2.GetContactHistoryRequest(shop_id="shop-a", person_id="p1")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.GetContactHistory(request, metadata=bearer(ADMIN_TOKEN))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "a dependency of the service is unavailable; retry"
    delay = duration_pb2.Duration()
    delay.FromTimedelta(timedelta(seconds=1))
    assert details(failure.value) == [error_details_pb2.RetryInfo(retry_delay=delay)]


async def test_not_found_names_the_resource(gate: "gate_pb2_grpc.GateAsyncStub") -> None:
    request = gate_pb2.EraseRequest(shop_id="shop-a", person_id="p404")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gate.Erase(request, metadata=bearer(ADMIN_TOKEN))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(failure.value) == [
        error_details_pb2.ResourceInfo(resource_type="person", resource_name="p404")
    ]


async def test_each_call_has_a_server_span_with_its_code_and_an_error_only_for_server_failures(
    gate: "gate_pb2_grpc.GateAsyncStub", exporter: InMemorySpanExporter
) -> None:
    calls: list[tuple[Any, Any, Any]] = [
        (gate.Release, gate_pb2.ReleaseRequest(shop_id="shop-a"), bearer(ADMIN_TOKEN)),
        (
            gate.GetContactHistory,
            gate_pb2.GetContactHistoryRequest(shop_id="shop-a"),
            bearer(ADMIN_TOKEN),
        ),
        (gate.Check, gate_pb2.CheckRequest(shop_id="shop-a"), bearer(ADMIN_TOKEN)),
        (gate.Check, gate_pb2.CheckRequest(shop_id="shop-a"), ()),
    ]
    codes = []
    for method, request, metadata in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await method(request, metadata=metadata)
        codes.append(refused.value.code())

    assert codes == [
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
    ]
    spans = exporter.get_finished_spans()
    methods = ["Release", "GetContactHistory", "Check", "Check"]
    assert [(s.name, s.kind) for s in spans] == [
        (f"/c360.gate.v1.Gate/{m}", SpanKind.SERVER) for m in methods
    ]
    assert [dict(s.attributes or {}) for s in spans] == [
        {
            "rpc.system": "grpc",
            "rpc.service": "c360.gate.v1.Gate",
            "rpc.method": m,
            "rpc.grpc.status_code": code.value[0],
        }
        for m, code in zip(methods, codes, strict=True)
    ]
    assert [s.status.status_code for s in spans] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [[e.attributes["exception.type"] for e in s.events] for s in spans] == [  # type: ignore[index]
        ["services.runtime.errors.FailedPrecondition"],
        ["ConnectionError"],
        ["RuntimeError"],
        ["services.runtime.errors.Unauthenticated"],
    ]
