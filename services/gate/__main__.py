"""Runs the gate service: `python -m services.gate [serve|migrate]`."""

from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

import fakeredis
import redis.asyncio as redis

from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1.profile_pb2_grpc import ProfileStub
from services.gate.counters import Counters, HiredisPackedConnection
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
from services.runtime.telemetry import Telemetry

MIGRATIONS = Path(__file__).parent / "migrations"


def redis_client(settings: GateSettings) -> redis.Redis:
    """Redis at REDIS_URL, or the embedded in-process store (same scripts, same semantics).
    The pool blocks for a free connection no longer than a check may wait for Redis. No socket
    timeout (redis-py's default is 5 s): every call the gate makes is bounded by its own
    deadline (Counters), and the per-read timeout cost a timer for every reply of a pipeline (a
    sixth of a CheckBatch's CPU)."""
    if settings.redis_url is None:
        return fakeredis.FakeAsyncRedis()
    timeout = settings.redis_timeout_ms / 1000
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        connection_class=HiredisPackedConnection,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=None,
        socket_connect_timeout=max(timeout, settings.dependency_timeout_seconds),
    )
    return redis.Redis(connection_pool=pool)


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
        redact_extra=counters.redact_shop,
    )


if __name__ == "__main__":
    run(GateSettings(), build, MIGRATIONS)
