"""Calling services as a client would: raw method paths, bearer tokens, rich error details."""

from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.runtime.settings import ServiceName

# The gRPC service each c360 service serves.
FULL_NAMES: dict[ServiceName, str] = {
    "identity": "c360.identity.v1.Identity",
    "profile": "c360.profile.v1.Profile",
    "enrichment": "c360.enrichment.v1.Enrichment",
    "gate": "c360.gate.v1.Gate",
    "gdpr": "c360.gdpr.v1.Gdpr",
}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


def service_descriptor(full_name: str) -> ServiceDescriptor:
    """A c360 service's descriptor, e.g. "c360.gate.v1.Gate"."""
    return descriptor_pool.Default().FindServiceByName(full_name)


def request_for(method: MethodDescriptor, **fields: Any) -> Any:
    """A request message of the method, with the given fields set where the message has them."""
    message = message_factory.GetMessageClass(method.input_type)()
    for name, value in fields.items():
        if name in method.input_type.fields_by_name:
            setattr(message, name, value)
    return message


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Any,
    metadata: tuple[tuple[str, str], ...] = (),
    wait_seconds: float = 5.0,
) -> list[Any]:
    """Calls any unary-request method; returns the responses (one for a unary response)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_class = message_factory.GetMessageClass(method.output_type)
    if method.server_streaming:
        stream = channel.unary_stream(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_class.FromString,
        )(request, metadata=metadata, timeout=wait_seconds)
        return [response async for response in stream]
    unary = channel.unary_unary(
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return [await unary(request, metadata=metadata, timeout=wait_seconds)]


def details(error: grpc.aio.AioRpcError) -> list[Any]:
    """The google.rpc error details of a failed call, unpacked."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return []
    unpacked = []
    for any_detail in status.details:
        for kind in (
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.PreconditionFailure,
            error_details_pb2.ResourceInfo,
        ):
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                unpacked.append(detail)
    return unpacked
