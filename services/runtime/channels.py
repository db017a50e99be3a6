"""Channels to peer services: the service's own token, the caller's deadline, trace context."""

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from pydantic import SecretStr

from services.runtime.errors import PeerRejected, as_c360_error
from services.runtime.interceptors import deadline
from services.runtime.telemetry import Telemetry

DEFAULT_TIMEOUT_SECONDS = 5.0
# Spread calls over every address the peer's name resolves to (one connection each), instead of
# gRPC's default of one connection to the first address: with a headless Kubernetes Service and a
# `dns:///name.namespace.svc.cluster.local:port` address, every ready replica gets calls
# (docs/operations.md). A name with one address behaves as before.
PEER_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
T = TypeVar("T")


def _details(
    details: grpc.aio.ClientCallDetails, token: SecretStr | None, default_timeout: float
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if token is not None and "authorization" not in metadata:
        metadata.add("authorization", f"Bearer {token.get_secret_value()}")
    timeout = details.timeout if details.timeout is not None else default_timeout
    inherited = deadline.get()
    if inherited is not None:
        timeout = min(timeout, max(inherited - time.monotonic(), 0.0))
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class PeerInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
):
    """Presents the service token and gives every peer call a deadline: the caller's own when
    set, never later than the deadline of the call being served."""

    def __init__(self, token: SecretStr | None, default_timeout: float) -> None:
        self._token = token
        self._default_timeout = default_timeout

    async def intercept_unary_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        details = _details(client_call_details, self._token, self._default_timeout)
        return await continuation(details, request)

    async def intercept_unary_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        details = _details(client_call_details, self._token, self._default_timeout)
        return await continuation(details, request)


def connect(
    address: str,
    token: SecretStr | None,
    telemetry: Telemetry,
    default_timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> grpc.aio.Channel:
    """A channel to a peer service with tracing, the service token and deadline propagation."""
    interceptors: list[Any] = [
        *telemetry.client_interceptors(),
        PeerInterceptor(token, default_timeout),
    ]
    return grpc.aio.insecure_channel(
        address,
        options=[("grpc.service_config", PEER_SERVICE_CONFIG)],
        interceptors=interceptors,
    )


async def peer_answer(call: Awaitable[T]) -> T:
    """A peer's answer; a refusal of the caller's input (INVALID_ARGUMENT, NOT_FOUND, …) as the
    PeerRejected it will be passed on as."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        error = as_c360_error(exc)
        if isinstance(error, PeerRejected):
            raise error from exc
        raise
