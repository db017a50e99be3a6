"""The server interceptor every service runs for its c360 methods (health and reflection stay
open): the call's span, deadline, authentication and tenancy, error mapping and the request log,
applied in one wrapper built once per method.

The span is started here rather than by opentelemetry-instrumentation-grpc's server interceptor,
which wraps the method's handler and the servicer context anew on every call: measured at
~150 µs of CPU a call, a third of what a Gate.Check costs (docs/decisions.md). The span is the
same: named by the full method, kind SERVER, the rpc.* attributes, the parent from the caller's
metadata, an error status for the server-side failure codes."""

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
    RPC_GRPC_STATUS_CODE,
    RPC_METHOD,
    RPC_SERVICE,
    RPC_SYSTEM,
)

from services.runtime.auth import (
    Principal,
    TokenRegistry,
    authenticate,
    check_shops,
    current_principal,
    every_shop,
    required_role,
)
from services.runtime.errors import InvalidArgument, abort_for

log = logging.getLogger("c360.rpc")

C360_PREFIX = "/c360."
# A call slower than this is logged at INFO even when it succeeds.
SLOW_CALL_SECONDS = 1.0

# Monotonic time by which the RPC being served must finish; read by outgoing peer calls.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)

# The codes for which a server span's status is ERROR (OpenTelemetry's gRPC conventions: the
# others are the caller's doing).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class Method:
    """What a method's calls share: its name, its span's attributes, the tracer."""

    __slots__ = ("attributes", "name", "tracer")

    def __init__(self, name: str, tracer: trace.Tracer) -> None:
        service, _, rpc = name.lstrip("/").partition("/")
        self.name = name
        self.tracer = tracer
        self.attributes = {RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: rpc}


class Call:
    """The state of one call being served: its span, deadline and caller, its outcome for the
    log."""

    __slots__ = (
        "_attached",
        "_deadline",
        "_principal",
        "context",
        "metadata",
        "method",
        "span",
        "started",
    )

    def __init__(self, method: Method, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.metadata = dict(context.invocation_metadata() or ())
        parent = propagate.extract(self.metadata)
        self.span = method.tracer.start_span(
            method.name, parent, trace.SpanKind.SERVER, method.attributes
        )
        self._attached = otel_context.attach(trace.set_span_in_context(self.span, parent))
        remaining = context.time_remaining()
        self._deadline = deadline.set(None if remaining is None else time.monotonic() + remaining)
        self._principal: contextvars.Token[Principal] | None = None

    def authenticate(self, tokens: TokenRegistry, role: Any) -> None:
        """Makes the caller the call's principal: UNAUTHENTICATED without a known token,
        PERMISSION_DENIED without the role."""
        self._principal = current_principal.set(
            authenticate(tokens, self.metadata, self.method.name, role)
        )

    def finish(self) -> None:
        """Ends the span, restores the context and writes the request log line: method, code,
        duration."""
        if self._principal is not None:
            current_principal.reset(self._principal)
        deadline.reset(self._deadline)
        seconds = time.perf_counter() - self.started
        code = self.context.code() or grpc.StatusCode.OK
        ok = code in (grpc.StatusCode.OK, 0)
        if isinstance(code, grpc.StatusCode):
            self.span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
            if code in SERVER_ERRORS:
                details = self.context.details() or code.value[1]
                self.span.set_status(trace.StatusCode.ERROR, f"{code}:{details}")
        self.span.end()
        otel_context.detach(self._attached)
        level = logging.DEBUG if ok and seconds < SLOW_CALL_SECONDS else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "rpc",
                extra={
                    "rpc.method": self.method.name,
                    "rpc.code": code.name if isinstance(code, grpc.StatusCode) else str(code),
                    "duration_ms": round(seconds * 1000, 3),
                },
            )


class Undecodable:
    """The request of a call that is refused before any servicer sees it, as INVALID_ARGUMENT
    once the caller is authenticated: bytes that are not a message of the method's request
    type (cut short, a field sent with the wrong wire type, a string that is not UTF-8, nested
    too deeply; field ""), or a string field holding NUL."""

    __slots__ = ("field", "why")

    def __init__(self, why: str, field: str = "") -> None:
        self.field = field
        self.why = why


# Documents a service validates itself, record by record (Profile.UpsertCustomers' records).
DOCUMENTS = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string field (or map key) of the message holding a NUL character,
    which PostgreSQL text cannot store; None when there is none. Documents are left out."""
    for field, value in message.ListFields():
        path = prefix + field.name
        entry = field.message_type
        if entry is not None and entry.full_name in DOCUMENTS:
            continue
        if entry is not None and entry.GetOptions().map_entry:
            for key, item in value.items():
                if "\x00" in str(key) or (isinstance(item, str) and "\x00" in item):
                    return path
                if isinstance(item, Message) and (found := nul_field(item, f"{path}.")):
                    return found
            continue
        repeated = field.is_repeated
        for i, item in enumerate(value if repeated else [value]):
            at = f"{path}[{i}]" if repeated else path
            if isinstance(item, str) and "\x00" in item:
                return at
            if isinstance(item, Message) and (found := nul_field(item, f"{at}.")):
                return found
    return None


def lenient(parse: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """The method's request deserializer, answering an Undecodable for bytes it cannot parse
    (where grpc would end the call UNKNOWN, its message the parser's)."""
    if parse is None:
        return None
    full_name = method.lstrip("/").replace("/", ".")
    expected = descriptor_pool.Default().FindMethodByName(full_name).input_type.full_name

    def deserialize(raw: bytes) -> Any:
        try:
            request = parse(raw)
        except DecodeError:
            return Undecodable(f"the request is not a valid {expected}")
        # A NUL in a string is a zero byte on the wire; most requests have none to look for.
        if b"\x00" in raw and (field := nul_field(request)) is not None:
            return Undecodable("must not contain NUL characters", field)
        return request

    return deserialize


def decoded(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT for one refused while it was decoded."""
    if isinstance(request, Undecodable):
        raise InvalidArgument([(request.field, request.why)])
    return request


class RuntimeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every c360 method once: UNAUTHENTICATED without a valid token, PERMISSION_DENIED
    for another shop or a missing role, typed errors as statuses, a log line per call."""

    def __init__(self, tokens: TokenRegistry, tracer: trace.Tracer) -> None:
        self._tokens = tokens
        self._tracer = tracer
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if not method.startswith(C360_PREFIX):
            return await continuation(handler_call_details)
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._handlers[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler: Any, name: str) -> Any:
        role = required_role(name)
        all_shops = every_shop(name)
        method = Method(name, self._tracer)
        tokens = self._tokens

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                request = decoded(request)
                check_shops(current_principal.get(), request, all_shops)
                yield request

        async def unary(
            request: Any, context: grpc.aio.ServicerContext, behaviour: Any, stream_in: bool
        ) -> Any:
            call = Call(method, context)
            try:
                call.authenticate(tokens, role)
                if not stream_in:
                    request = decoded(request)
                    check_shops(current_principal.get(), request, all_shops)
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                call.span.record_exception(exc)
                await abort_for(exc, name, context)
            finally:
                call.finish()

        async def streaming(
            request: Any, context: grpc.aio.ServicerContext, behaviour: Any, stream_in: bool
        ) -> AsyncIterator[Any]:
            call = Call(method, context)
            try:
                call.authenticate(tokens, role)
                if stream_in:
                    request = checked(request)
                else:
                    request = decoded(request)
                    check_shops(current_principal.get(), request, all_shops)
                async for response in behaviour(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                call.span.record_exception(exc)
                await abort_for(exc, name, context)
            finally:
                call.finish()

        serializers = (lenient(handler.request_deserializer, name), handler.response_serializer)
        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await unary(request, context, behaviour, False)

            return grpc.unary_unary_rpc_method_handler(uu, *serializers)
        if handler.stream_unary:
            behaviour = handler.stream_unary

            async def su(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await unary(checked(requests), context, behaviour, True)

            return grpc.stream_unary_rpc_method_handler(su, *serializers)
        if handler.unary_stream:
            behaviour = handler.unary_stream

            async def us(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in streaming(request, context, behaviour, False):
                    yield response

            return grpc.unary_stream_rpc_method_handler(us, *serializers)
        behaviour = handler.stream_stream

        async def ss(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in streaming(requests, context, behaviour, True):
                yield response

        return grpc.stream_stream_rpc_method_handler(ss, *serializers)
