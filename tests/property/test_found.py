"""Inputs the property tests (test_bad_input.py) found answered wrongly, each pinned here as a
plain example against the real service, so that the fix stays whatever hypothesis draws."""

import grpc
import pytest

from c360.profile.v1 import profile_pb2
from tests.conftest import ADMIN_TOKEN, StartService
from tests.rpc import bearer, call, details, service_descriptor


async def test_bytes_that_are_no_request_are_invalid_argument_once_authenticated(
    start_service: StartService,
) -> None:
    # Was UNKNOWN, its message the parser's ("Unexpected <class 'DecodeError'>: ...").
    server = await start_service("profile")
    get = service_descriptor("c360.profile.v1.Profile").methods_by_name["Get"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        cut_short = profile_pb2.GetRequest(shop_id="shop-a").SerializeToString()[:-1]
        for raw in (cut_short, b"\x0a\x02\xff\xfe", b"\x08"):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await call(channel, get, RawRequest(raw), bearer(ADMIN_TOKEN))
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            [bad_request] = details(invalid.value)
            assert [(v.field, v.description) for v in bad_request.field_violations] == [
                ("", "the request is not a valid c360.profile.v1.GetRequest")
            ]
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await call(channel, get, RawRequest(cut_short))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


class RawRequest:
    """Bytes sent as they are, where tests.rpc.call expects a message."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def SerializeToString(self) -> bytes:
        return self.raw
