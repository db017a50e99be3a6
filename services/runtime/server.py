"""The grpc.aio server every service runs: interceptors, health with real states, reflection,
graceful shutdown."""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.auth import TokenRegistry
from services.runtime.interceptors import RuntimeInterceptor
from services.runtime.telemetry import Telemetry

log = logging.getLogger(__name__)

# Reported SERVING from start to shutdown whatever the dependencies do: the liveness probe's
# service name, so that a database outage takes replicas out of rotation without restarting them.
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How long calls in flight on a connection past its age may still run: long enough for the
# longest stream a client opens (an enrichment run follows its progress for up to an hour).
CONNECTION_AGE_GRACE = 3600.0

Probe = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Registration:
    """A servicer and the generated function that adds it to a server."""

    descriptor: ServiceDescriptor
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class Dependency:
    """Something the service cannot serve without (its database, Redis), probed for health."""

    name: str
    probe: Probe


class HealthMonitor:
    """Keeps the standard health service truthful: SERVING only while every dependency answers,
    NOT_SERVING from the first failed probe and during shutdown. The `liveness` name stays
    SERVING until shutdown."""

    def __init__(
        self,
        servicer: Any,
        services: Sequence[str],
        dependencies: Sequence[Dependency],
        interval: float,
        timeout: float,
    ) -> None:
        self._servicer = servicer
        self._services = ["", *services]
        self._dependencies = dependencies
        self._interval = interval
        self._timeout = timeout
        self._status: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def _probe(self, dependency: Dependency) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await dependency.probe()
        except Exception as exc:
            log.warning(
                "dependency down",
                extra={"dependency": dependency.name, "error": type(exc).__name__},
            )
            return False
        return True

    async def check(self) -> int:
        """Probes every dependency once and publishes the resulting status."""
        results = await asyncio.gather(*(self._probe(d) for d in self._dependencies))
        status: int = SERVING if all(results) else NOT_SERVING
        await self.publish(status)
        return status

    async def publish(self, status: int) -> None:
        """Sets the status of the server and of each of its services."""
        if status != self._status:
            log.info(
                "health",
                extra={"status": health_pb2.HealthCheckResponse.ServingStatus.Name(status)},
            )
        self._status = status
        for service in self._services:
            await self._servicer.set(service, status)

    async def _run(self) -> None:
        await self._servicer.set(LIVENESS, SERVING)
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        """Starts probing in the background."""
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def stop(self) -> None:
        """Stops probing and reports NOT_SERVING for good."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._servicer.enter_graceful_shutdown()


class Server:
    """A started c360 server: its port, its health, and a graceful stop."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health: HealthMonitor,
        on_stop: Sequence[Callable[[], Awaitable[None]]],
    ) -> None:
        self.grpc_server = server
        self.port = port
        self.health = health
        self._on_stop = on_stop
        # Other listeners of the process by name (the profile's webhook endpoint), once bound.
        self.http_ports: dict[str, int] = {}

    async def stop(self, grace: float, drain: float = 0.0) -> None:
        """NOT_SERVING first (still taking calls for `drain` seconds, so load balancers notice),
        then in-flight calls get `grace` seconds, then resources close."""
        await self.health.stop()
        await asyncio.sleep(drain)
        await self.grpc_server.stop(grace)
        for close in self._on_stop:
            await close()

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped."""
        await self.grpc_server.wait_for_termination()


async def start_server(
    address: str,
    registrations: Sequence[Registration],
    *,
    tokens: TokenRegistry,
    telemetry: Telemetry,
    dependencies: Sequence[Dependency] = (),
    health_interval: float = 2.0,
    dependency_timeout: float = 1.0,
    max_connection_age: float = 300.0,
    on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
) -> Server:
    """Builds and starts a server on `address` (port 0 picks a free port) with the shared
    interceptors, the health service and reflection; returns once dependencies were probed.
    Connections are recycled after `max_connection_age` seconds (clients reconnect through
    name resolution, reaching new replicas; calls in flight get CONNECTION_AGE_GRACE)."""
    server = grpc.aio.server(
        interceptors=[RuntimeInterceptor(tokens, telemetry.tracer("c360.server"))],
        options=[
            ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(CONNECTION_AGE_GRACE * 1000)),
        ],
    )
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [r.descriptor.full_name for r in registrations]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    monitor = HealthMonitor(
        health_servicer, names, dependencies, health_interval, dependency_timeout
    )
    await monitor.check()
    await server.start()
    monitor.start()
    return Server(server, port, monitor, on_stop)
