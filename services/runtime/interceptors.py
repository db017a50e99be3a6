"""Server interceptors shared by every service: each concern wraps c360 handlers once."""

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc

from services.runtime.errors import mapped_errors

log = logging.getLogger("c360.rpc")

C360_PREFIX = "/c360."

Around = Callable[[str, grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]
RequestCheck = Callable[[str, Any, grpc.aio.ServicerContext], Awaitable[None]]

# Monotonic time by which the RPC being served must finish; read by outgoing peer calls.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def wrap_handler(
    handler: Any,
    method: str,
    around: Around,
    check_request: RequestCheck | None = None,
) -> Any:
    """A handler that runs `around` the original one and checks every request message first."""

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if check_request is not None:
            await check_request(method, request, context)
        return request

    async def checked_stream(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield await checked(request, context)

    if handler.unary_unary:
        unary_unary = handler.unary_unary

        async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(method, context):
                return await unary_unary(await checked(request, context), context)

        return grpc.unary_unary_rpc_method_handler(
            uu, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        unary_stream = handler.unary_stream

        async def us(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(method, context):
                async for response in unary_stream(await checked(request, context), context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            us, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        stream_unary = handler.stream_unary

        async def su(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with around(method, context):
                return await stream_unary(checked_stream(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            su, handler.request_deserializer, handler.response_serializer
        )
    stream_stream = handler.stream_stream

    async def ss(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async with around(method, context):
            async for response in stream_stream(checked_stream(requests, context), context):
                yield response

    return grpc.stream_stream_rpc_method_handler(
        ss, handler.request_deserializer, handler.response_serializer
    )


class C360Interceptor(grpc.aio.ServerInterceptor):
    """Base of the interceptors that apply only to c360 methods (not health or reflection)."""

    def around(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> AbstractAsyncContextManager[None]:
        """What runs around every call of a c360 method."""
        raise NotImplementedError

    check_request: RequestCheck | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(C360_PREFIX):
            return handler
        return wrap_handler(handler, method, self.around, self.check_request)


class ErrorInterceptor(C360Interceptor):
    """Maps exceptions to statuses with rich details; never leaks a traceback to the caller."""

    def around(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> AbstractAsyncContextManager[None]:
        return mapped_errors(method, context)


class RequestLogInterceptor(C360Interceptor):
    """One JSON log line per call: method, status code, duration. Never the request's content."""

    @asynccontextmanager
    async def around(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            code = context.code() or grpc.StatusCode.OK
            log.info(
                "rpc",
                extra={
                    "rpc.method": method,
                    "rpc.code": code.name if isinstance(code, grpc.StatusCode) else str(code),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )


class DeadlineInterceptor(C360Interceptor):
    """Remembers the deadline of the call being served so that peer calls inherit it."""

    @asynccontextmanager
    async def around(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        remaining = context.time_remaining()
        token = deadline.set(None if remaining is None else time.monotonic() + remaining)
        try:
            yield
        finally:
            deadline.reset(token)
