"""Channels to peer services: the service's own token, the caller's deadline, trace context."""

import time
from collections.abc import Callable
from typing import Any

import grpc
from pydantic import SecretStr

from services.runtime.interceptors import deadline
from services.runtime.telemetry import Telemetry


def _details(
    details: grpc.aio.ClientCallDetails, token: SecretStr | None
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if token is not None and "authorization" not in metadata:
        metadata.add("authorization", f"Bearer {token.get_secret_value()}")
    timeout = details.timeout
    inherited = deadline.get()
    if inherited is not None:
        remaining = max(inherited - time.monotonic(), 0.0)
        timeout = remaining if timeout is None else min(timeout, remaining)
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class PeerInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
):
    """Presents the service token and never lets a peer call outlive the call being served."""

    def __init__(self, token: SecretStr | None) -> None:
        self._token = token

    async def intercept_unary_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_details(client_call_details, self._token), request)

    async def intercept_unary_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_details(client_call_details, self._token), request)


def connect(address: str, token: SecretStr | None, telemetry: Telemetry) -> grpc.aio.Channel:
    """A channel to a peer service with tracing, the service token and deadline propagation."""
    interceptors: list[Any] = [*telemetry.client_interceptors(), PeerInterceptor(token)]
    return grpc.aio.insecure_channel(address, interceptors=interceptors)
