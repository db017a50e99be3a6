"""Runs the gate service: `python -m services.gate [serve|migrate]`."""

from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

import fakeredis
import redis.asyncio as redis

from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1.profile_pb2_grpc import ProfileStub
from services.gate.counters import PREFIX, Counters, HiredisPackedConnection
from services.gate.gate import Gate
from services.gate.message_log import MessageLogWriter
from services.gate.profiles import ProfilePolicies
from services.gate.servicer import GateServicer
from services.gate.settings import GateSettings
from services.gate.store import GateStore
from services.runtime import db
from services.runtime.channels import connect
from services.runtime.process import now, run, start_service
from services.runtime.server import Dependency, Registration, Server
from services.runtime.shop_data import RedactExtra
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


def redis_client(settings: GateSettings) -> redis.Redis:
    """Redis at REDIS_URL, or the embedded in-process store (same scripts, same semantics).
    The pool blocks for a free connection no longer than a check may wait for Redis."""
    if settings.redis_url is None:
        return fakeredis.FakeAsyncRedis()
    timeout = settings.redis_timeout_ms / 1000
    socket_timeout = max(timeout, settings.dependency_timeout_seconds)
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        connection_class=HiredisPackedConnection,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
    )
    return redis.Redis(connection_pool=pool)


def redact_counters(client: redis.Redis) -> RedactExtra:
    """Counts or deletes a shop's keys in Redis (every customer's `{shop:person}` keys) as
    `redis_keys`, a SCAN page at a time, one UNLINK per key (keys of many hash slots)."""

    async def redact(shop_id: str, dry_run: bool) -> dict[str, int]:
        removed, cursor = 0, None
        while cursor != 0:
            cursor, keys = await client.scan(
                cursor or 0, match=f"{PREFIX}:{{{shop_id}:*", count=1000
            )
            if dry_run:
                removed += len(keys)
            elif keys:
                pipeline = client.pipeline(transaction=False)
                for key in keys:
                    pipeline.unlink(key)
                removed += sum(await pipeline.execute())
        return {"redis_keys": removed}

    return redact


async def build(
    settings: GateSettings, telemetry: Telemetry, clock: Callable[[], datetime] = now
) -> Server:
    """Wires the service: settings -> engine, Redis -> gate -> servicer -> server."""
    engine = db.create_engine(settings)
    store = GateStore(db.session_factory(engine))
    client = redis_client(settings)
    counters = Counters(
        client,
        timeout=settings.redis_timeout_ms / 1000,
        log_retention=settings.log_retention_seconds,
        write_timeout=settings.dependency_timeout_seconds,
    )
    # Customers the gate holds no policy for are asked of their profile, when one is configured.
    profile = None
    if settings.profile_addr is not None:
        profile = connect(settings.profile_addr, settings.service_token, telemetry)
    writer = MessageLogWriter(
        store, counters, settings.log_flush_interval_seconds, settings.log_batch_size
    )
    gate = Gate(
        counters,
        store,
        writer,
        clock=clock,
        meter=telemetry.meter_provider.get_meter("c360.gate"),
        shop_policy_ttl=settings.shop_policy_ttl_seconds,
        database_timeout=settings.dependency_timeout_seconds,
        policy_source=None if profile is None else ProfilePolicies(ProfileStub(profile)),
    )
    registration = Registration(
        gate_pb2.DESCRIPTOR.services_by_name["Gate"],
        GateServicer(gate),
        gate_pb2_grpc.add_GateServicer_to_server,
    )
    writer.start()
    return await start_service(
        settings,
        telemetry,
        [registration],
        engine,
        dependencies=[Dependency("redis", counters.ping)],
        on_stop=[
            writer.stop,
            counters.close,
            *([] if profile is None else [partial(profile.close, None)]),
        ],
        redact_extra=redact_counters(client),
    )


if __name__ == "__main__":
    run(GateSettings(), build, MIGRATIONS)
