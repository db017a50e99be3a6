"""The one error hierarchy: each error knows its gRPC code and rich details."""

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import NoReturn

import grpc
import redis.exceptions
import sqlalchemy.exc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

DOMAIN = "c360"

# Failures of a dependency (database, Redis, network) that a retry may cure.
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


# A status travels in the call's trailers, which gRPC refuses past 8 KiB (the caller then sees
# RESOURCE_EXHAUSTED "metadata size exceeds soft limit", not the error): what input makes an
# error say is clipped, and a request's field violations are listed up to a budget (the first
# always), the message saying how many more there are.
MAX_MESSAGE_BYTES = 512
MAX_VIOLATIONS = 8
MAX_FIELD_BYTES = 96
MAX_WHY_BYTES = 1024
MAX_VIOLATIONS_BYTES = 2048


def clipped(text: str, limit: int) -> str:
    """The text cut to at most `limit` bytes of UTF-8, "…" marking a cut."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "…"


class C360Error(Exception):
    """An error a caller should see: a gRPC status code, a message and typed details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        self.message = clipped(message, MAX_MESSAGE_BYTES)
        super().__init__(self.message)

    def details(self) -> Sequence[Message]:
        """The google.rpc error details attached to the status."""
        return ()

    def to_status(self) -> status_pb2.Status:
        """This error as a google.rpc.Status."""
        packed = []
        for detail in self.details():
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=packed
        )


class InvalidArgument(C360Error):
    """Bad input: every offending field with what is wrong with it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        self.shown: list[tuple[str, str]] = []
        used = 0
        for field, why in self.violations[:MAX_VIOLATIONS]:
            shown = (clipped(field, MAX_FIELD_BYTES), clipped(why, MAX_WHY_BYTES))
            used += len(shown[0].encode()) + len(shown[1].encode())
            if self.shown and used > MAX_VIOLATIONS_BYTES:
                break
            self.shown.append(shown)
        more = len(self.violations) - len(self.shown)
        listed = "; ".join(f"{field}: {why}" for field, why in self.shown)
        tail = f" (and {more} more)" if more else ""
        super().__init__(clipped(listed, MAX_MESSAGE_BYTES - len(tail)) + tail)

    def details(self) -> Sequence[Message]:
        return (
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=why)
                    for field, why in self.shown
                ]
            ),
        )


class NotFound(C360Error):
    """The named resource does not exist (or is not visible to the caller)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource_type: str, resource_name: str) -> None:
        super().__init__(f"{resource_type} not found")
        self.resource_type = resource_type
        self.resource_name = clipped(resource_name, MAX_MESSAGE_BYTES)

    def details(self) -> Sequence[Message]:
        return (
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type, resource_name=self.resource_name
            ),
        )


class AlreadyExists(C360Error):
    """The resource to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(C360Error):
    """The system is not in a state that allows the operation (e.g. unmerge after its window)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, kind: str, subject: str, description: str) -> None:
        super().__init__(description)
        self.kind = kind
        self.subject = subject

    def details(self) -> Sequence[Message]:
        return (
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.kind, subject=self.subject, description=self.message
                    )
                ]
            ),
        )


class Unauthenticated(C360Error):
    """No valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    def details(self) -> Sequence[Message]:
        return (error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain=DOMAIN),)


class PermissionDenied(C360Error):
    """A valid token without the right to this shop or method."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = {key: clipped(value, MAX_FIELD_BYTES) for key, value in metadata.items()}

    def details(self) -> Sequence[Message]:
        return (
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata),
        )


class Unavailable(C360Error):
    """A dependency is down; retry after the suggested delay."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after: timedelta = timedelta(seconds=1)) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> Sequence[Message]:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(self.retry_after)
        return (error_details_pb2.RetryInfo(retry_delay=delay),)


# A peer's answer to a request that carried the caller's input: passed on as the peer gave it.
PASSED_ON = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
# A peer that could not answer: the caller may retry.
PEER_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class PeerRejected(C360Error):
    """A peer service refused the caller's input (say, an invalid identifier): its status and
    details, passed on unchanged."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details() or "")
        self.code = error.code()
        self._status: status_pb2.Status | None = None
        trailing = error.trailing_metadata()
        value = (
            trailing.get(STATUS_DETAILS_KEY) if isinstance(trailing, grpc.aio.Metadata) else None
        )
        if isinstance(value, bytes):
            self._status = status_pb2.Status.FromString(value)

    def to_status(self) -> status_pb2.Status:
        return self._status if self._status is not None else super().to_status()

    def under(self, field: str) -> C360Error:
        """The refusal as the caller's own, when the peer's request was made from the caller's
        `field`: each field violation's field put under it (identity's `identifier.value` is
        the caller's `person.identifier.value`). Without field violations, unchanged."""
        violations = self.field_violations()
        if self.code != grpc.StatusCode.INVALID_ARGUMENT or not violations:
            return self
        return InvalidArgument([(f"{field}.{name}".rstrip("."), why) for name, why in violations])

    def field_violations(self) -> list[tuple[str, str]]:
        """The peer's BadRequest field violations, as (field, description)."""
        found: list[tuple[str, str]] = []
        for detail in self._status.details if self._status is not None else ():
            request = error_details_pb2.BadRequest()
            if detail.Unpack(request):
                found.extend((v.field, v.description) for v in request.field_violations)
        return found


def as_c360_error(exc: BaseException) -> C360Error | None:
    """The caller-facing error for an exception, or None when it must stay hidden (INTERNAL)."""
    if isinstance(exc, C360Error):
        return exc
    if isinstance(exc, DEPENDENCY_ERRORS):
        return Unavailable("a dependency of the service is unavailable; retry")
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in PASSED_ON:
            return PeerRejected(exc)
        if exc.code() in PEER_UNAVAILABLE:
            return Unavailable("a peer service is unavailable; retry")
    return None


async def abort_for(exc: Exception, method: str, context: grpc.aio.ServicerContext) -> NoReturn:
    """Ends the call with the status an exception stands for.

    Typed errors become their status with details; dependency failures UNAVAILABLE; a method not
    built yet UNIMPLEMENTED; anything else a generic INTERNAL whose traceback goes to the log
    only.
    """
    if isinstance(exc, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    error = as_c360_error(exc)
    if isinstance(exc, DEPENDENCY_ERRORS):
        log.warning(
            "dependency failed in %s", method, extra={"error": type(exc).__name__}, exc_info=exc
        )
    if error is None:
        log.error("unhandled error in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    status = rpc_status.to_status(error.to_status())
    await context.abort(status.code, status.details, status.trailing_metadata)
