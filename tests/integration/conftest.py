"""The profile with identity and the gate beside it, and its HTTP endpoints, for the tests of
webhooks and uploads."""

import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.shopify import signature
from services.runtime.server import Server
from tests.conftest import ADMIN_TOKEN, StartService
from tests.faults import TcpProxy
from tests.rpc import bearer
from tests.sql import sql

SECRET = "shpss_current"
PREVIOUS = "shpss_previous"
AUTH = bearer(ADMIN_TOKEN)
# The fixture order's customer, as the fixture carries it (its id rounded once, long ago).
CUSTOMER_ID = "115310627314723950"


@dataclass
class Endpoint:
    """The running profile (with its webhook URL), identity's proxy, and a shop of the test."""

    url: str
    profile: Any
    shop: str
    identity_proxy: TcpProxy
    http: aiohttp.ClientSession
    settings: Any
    profile_address: str

    async def deliver(
        self,
        topic: str,
        body: bytes,
        webhook_id: str | None = None,
        secret: str = SECRET,
        **headers: str,
    ) -> tuple[int, dict[str, Any]]:
        sent = {
            "X-Shopify-Topic": topic,
            "X-Shopify-Shop-Domain": self.shop,
            "X-Shopify-Webhook-Id": webhook_id or secrets.token_hex(8),
            "X-Shopify-Hmac-Sha256": signature(secret, body),
            "Content-Type": "application/json",
            **headers,
        }
        async with self.http.post(self.url, data=body, headers=sent) as response:
            return response.status, await response.json()

    async def get(self, type_: str = "shopify_customer_id", value: str = CUSTOMER_ID) -> Any:
        return await self.profile.Get(
            profile_pb2.GetRequest(
                shop_id=self.shop,
                person=common_pb2.PersonRef(
                    identifier=common_pb2.Identifier(type=type_, value=value)
                ),
            ),
            metadata=AUTH,
        )

    async def purchases(self) -> tuple[int, str, str] | None:
        try:
            p = (await self.get()).purchases
        except grpc.aio.AioRpcError:
            return None
        return p.order_count, p.lifetime_spend, p.refunded

    async def inbox(self) -> list[tuple[str, str]]:
        """(topic, state) of every delivery of the shop, in arrival order."""
        rows = await sql(
            self.settings,
            "SELECT topic, state FROM webhook_inbox WHERE shop_id = $1 ORDER BY id",
            self.shop,
        )
        return [(row["topic"], row["state"]) for row in rows]

    async def customer_rows(self) -> list[dict[str, Any]]:
        """The shop's customer records as stored."""
        rows = await sql(self.settings, "SELECT * FROM customer_fact WHERE shop_id = $1", self.shop)
        return [dict(row) for row in rows]

    async def dead_letters(self) -> list[Any]:
        answer = await self.profile.ListDeadLetters(
            profile_pb2.ListDeadLettersRequest(shop_id=self.shop), metadata=AUTH
        )
        return list(answer.dead_letters)


@pytest.fixture
async def endpoint(
    start_service: StartService, settings_for: Callable[..., Any]
) -> AsyncIterator[Endpoint]:
    identity: Server = await start_service("identity")
    gate: Server = await start_service("gate")
    proxy = TcpProxy("127.0.0.1", identity.port)
    await proxy.start()
    profile: Server = await start_service(
        "profile",
        identity_addr=f"127.0.0.1:{proxy.port}",
        gate_addr=f"127.0.0.1:{gate.port}",
        service_token=ADMIN_TOKEN,
        webhook_port=0,
        shopify_api_secret=SECRET,
        shopify_api_secret_previous=PREVIOUS,
        webhook_max_attempts=1,
    )
    url = f"http://127.0.0.1:{profile.http_ports['webhooks']}/webhooks/shopify"
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{profile.port}") as channel,
        aiohttp.ClientSession() as http,
    ):
        yield Endpoint(
            url,
            profile_pb2_grpc.ProfileStub(channel),
            f"shop-{secrets.token_hex(4)}.myshopify.com",
            proxy,
            http,
            settings_for("profile"),
            f"127.0.0.1:{profile.port}",
        )
    await proxy.cut()
