"""The whole mesh, started once per module on real PostgreSQL and Redis, for property tests that
send it many examples: each example gets a shop of its own, so that what a rejected call left
behind can be counted shop-wide."""

import itertools
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, settings

from services.runtime.db import plain_connection
from services.runtime.server import Server
from services.runtime.settings import SERVICES, RuntimeSettings, ServiceName
from tests.backing import Backing, free_port
from tests.conftest import ADMIN_TOKEN, service_settings, start_with
from tests.rpc import bearer, details

# How many examples, and which: "c360" (the default here) draws the same examples on every run,
# 30 per RPC, and prints a failure's @reproduce_failure blob; "explore" (--hypothesis-profile=
# explore) draws new ones from --hypothesis-seed (random without it), ten times as many. A
# test asks for a multiple of the profile's count where one example covers less.
settings.register_profile(
    "c360",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore", settings.get_profile("c360"), derandomize=False, max_examples=300
)
if settings.get_current_profile_name() == "default":
    settings.load_profile("c360")

SECRET = "shpss_property"
AUTH = bearer(ADMIN_TOKEN)
# How long a unary call may take, and how long a server stream is read: a stream that follows
# (the change feed) is still open when this runs out, which is an answer, not a failure.
CALL_SECONDS = 10.0
STREAM_SECONDS = 1.0
# Dependency timeouts far above any healthy answer: the properties are about what the services
# answer, and a starved machine (2 cores, other suites beside) would otherwise turn a slow Redis
# or PostgreSQL into UNAVAILABLE.
SLOW_MACHINE = {"dependency_timeout_seconds": 6.0}
SLOW_REDIS = {"redis_timeout_ms": 30_000}


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status code, message and google.rpc details, and its responses."""

    code: grpc.StatusCode
    message: str
    details: list[Any]
    responses: int
    response: Any = None


class ErrorLog(logging.Handler):
    """Keeps what the services log as going wrong while the mesh runs: every record at ERROR or
    above (the traceback of an unexpected exception, in a call or in background work), and
    each failed step of a background worker and each dependency failure (nothing is down
    here, so neither should happen)."""

    WARNINGS = frozenset(
        {
            "background step failed; retrying",
            "dependency failed in %s",
            "summary refresh failed",
            "erasure step failed",
        }
    )

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.msg in self.WARNINGS:
            self.records.append(record)

    def lines(self) -> list[str]:
        """Each record kept: its logger, message, the worker or error it names, its exception."""
        found = []
        for record in self.records:
            named = {
                k: getattr(record, k) for k in ("worker", "service", "error") if hasattr(record, k)
            }
            failure = record.exc_info[1] if record.exc_info else None
            found.append(
                f"{record.name}: {record.getMessage()} {named or ''} {failure!r:.300}".strip()
            )
        return found


class Mesh:
    """The five services over real channels, their HTTP endpoints, and a supply of fresh shops."""

    def __init__(
        self,
        servers: dict[ServiceName, Server],
        channels: dict[ServiceName, grpc.aio.Channel],
        settings: dict[ServiceName, RuntimeSettings],
        http: aiohttp.ClientSession,
        database: asyncpg.Connection,
        errors: ErrorLog,
    ) -> None:
        self.servers = servers
        self.channels = channels
        self.settings = settings
        self.http = http
        self.database = database
        self.errors = errors
        self.prefix = f"prop-{secrets.token_hex(3)}"
        self._counter = itertools.count()
        self._count_rows = ""

    def __repr__(self) -> str:
        return f"Mesh({self.prefix})"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.servers['profile'].http_ports['webhooks']}/webhooks/shopify"

    @property
    def upload_url(self) -> str:
        port = self.servers["profile"].http_ports["webhooks"]
        return f"http://127.0.0.1:{port}/api/customers/upload/"

    def fresh_shop(self) -> str:
        """A shop no example has used (a valid shop id, and a valid Shopify domain)."""
        return f"{self.prefix}-{next(self._counter)}.myshopify.com"

    async def call(self, service: ServiceName, method: MethodDescriptor, raw: bytes) -> Outcome:
        """Sends raw bytes as the request of any unary-request method, with an admin token."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        response_class = message_factory.GetMessageClass(method.output_type)
        channel = self.channels[service]
        responses, last = 0, None
        try:
            if method.server_streaming:
                stream = channel.unary_stream(
                    path, request_serializer=bytes, response_deserializer=response_class.FromString
                )(raw, metadata=AUTH, timeout=STREAM_SECONDS)
                async for response in stream:
                    responses, last = responses + 1, response
            else:
                last = await channel.unary_unary(
                    path, request_serializer=bytes, response_deserializer=response_class.FromString
                )(raw, metadata=AUTH, timeout=CALL_SECONDS)
                responses = 1
        except grpc.aio.AioRpcError as error:
            try:
                found = details(error)
            except ValueError as mismatch:  # the details' code is not the call's
                found = [mismatch]
            return Outcome(error.code(), error.details() or "", found, responses, last)
        return Outcome(grpc.StatusCode.OK, "", [], responses, last)

    async def shop_rows(self, shop_id: str) -> dict[str, int]:
        """The rows the shop has in any service's tables (every table with a shop_id, as
        ShopData.RedactShop counts them), by "service.table"; only tables with rows. The gate's
        Redis keys are left out: an expiring cache that reads fill (a policy looked up for a
        person the gate has not seen), rebuilt from the tables counted here."""
        if not self._count_rows:
            schemas = {s.schema_name: service for service, s in self.settings.items()}
            tables = await self.database.fetch(
                "SELECT table_schema, table_name FROM information_schema.columns"
                " WHERE column_name = 'shop_id' AND table_schema = ANY($1::text[])"
                " ORDER BY 1, 2",
                list(schemas),
            )
            self._count_rows = " UNION ALL ".join(
                f"SELECT '{schemas[t['table_schema']]}.{t['table_name']}' AS name, count(*) AS n"
                f' FROM "{t["table_schema"]}"."{t["table_name"]}" WHERE shop_id = $1'
                for t in tables
            )
        rows = await self.database.fetch(self._count_rows, shop_id)
        return {row["name"]: row["n"] for row in rows if row["n"]}


@pytest.fixture(scope="module")
async def mesh(backing: Backing, run_id: str, drop_schemas: None) -> AsyncIterator[Mesh]:
    """Identity, the gate, the profile (with its webhook and upload endpoint), enrichment and
    gdpr, each one server for the whole module."""
    errors = ErrorLog()
    profile_port, gdpr_port, enrichment_port = free_port(), free_port(), free_port()
    started: dict[ServiceName, Server] = {}
    settings: dict[ServiceName, RuntimeSettings] = {}

    async def start(service: ServiceName, **overrides: Any) -> Server:
        settings[service] = service_settings(
            backing, run_id, service, **{**SLOW_MACHINE, **overrides}
        )
        started[service] = await start_with(settings[service])
        return started[service]

    try:
        # Each before the services that call it from the start (enrichment follows the
        # profile), so that no background work begins by missing a peer.
        identity = await start("identity")
        gate = await start("gate", **SLOW_REDIS)
        peers = {
            "identity_addr": f"127.0.0.1:{identity.port}",
            "gate_addr": f"127.0.0.1:{gate.port}",
            "profile_addr": f"127.0.0.1:{profile_port}",
            "gdpr_addr": f"127.0.0.1:{gdpr_port}",
            "enrichment_addr": f"127.0.0.1:{enrichment_port}",
            "service_token": ADMIN_TOKEN,
        }
        await start(
            "profile",
            profile_port=profile_port,
            webhook_port=0,
            shopify_api_secret=SECRET,
            webhook_max_attempts=1,
            **peers,
        )
        await start("enrichment", enrichment_port=enrichment_port, **peers)
        await start("gdpr", gdpr_port=gdpr_port, job_interval_seconds=0.2, **peers)
        logging.getLogger().addHandler(errors)
        channels: dict[ServiceName, grpc.aio.Channel] = {
            s: grpc.aio.insecure_channel(f"127.0.0.1:{started[s].port}") for s in SERVICES
        }
        database = await plain_connection(settings["profile"])
        try:
            async with aiohttp.ClientSession() as http:
                yield Mesh(started, channels, settings, http, database, errors)
        finally:
            await database.close()
            for channel in channels.values():
                await channel.close(None)
    finally:
        logging.getLogger().removeHandler(errors)
        for service in ("gdpr", "enrichment", "profile", "gate", "identity"):
            if service in started:
                await started[service].stop(grace=1.0)
