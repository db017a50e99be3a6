"""The whole mesh on one machine (`make run`): migrates and starts the five services as separate
processes, waits until each reports SERVING, prints how to call them, stops them on Ctrl-C."""

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.profile.settings import ProfileSettings
from services.runtime.settings import SERVICES, RuntimeSettings, ServiceName

READY_TIMEOUT_SECONDS = 60.0


class MeshSettings(RuntimeSettings):
    """The shared settings, read by the launcher for ports and the shutdown grace."""

    host: str = "localhost"


async def _migrate(service: ServiceName, env: Mapping[str, str]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{service}", "migrate", env=dict(env)
    )
    if await process.wait() != 0:
        raise SystemExit(f"migrations of {service} failed")


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def _wait_ready(
    settings: MeshSettings, processes: Mapping[ServiceName, asyncio.subprocess.Process]
) -> None:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_SECONDS
    waiting = set(SERVICES)
    while waiting:
        for service in sorted(waiting):
            if processes[service].returncode is not None:
                raise SystemExit(f"{service} exited with code {processes[service].returncode}")
            if await _serving(f"localhost:{settings.port(service)}"):
                waiting.discard(service)
        if asyncio.get_running_loop().time() > deadline:
            raise SystemExit(f"not SERVING after {READY_TIMEOUT_SECONDS:.0f}s: {sorted(waiting)}")
        await asyncio.sleep(0.1)


def _banner(settings: MeshSettings, token: str, env: Mapping[str, str]) -> str:
    storage = "PostgreSQL" if env.get("DATABASE_URL") else f"SQLite files in {settings.data_dir}/"
    counters = "Redis" if env.get("REDIS_URL") else "in process"
    lines = [f"  {s:<11} localhost:{settings.port(s)}" for s in SERVICES]
    profile = ProfileSettings()
    webhooks = f"  {'webhooks':<11} http://localhost:{profile.webhook_port}/webhooks/shopify"
    if profile.shopify_api_secret is None:
        webhooks += " (refused until SHOPIFY_API_SECRET is set)"
    return "\n".join(
        [
            "c360 mesh",
            *lines,
            webhooks,
            f"  data: {storage}; gate counters: {counters}",
            f"token: {token}",
            "try:",
            f"  grpcurl -plaintext -H 'authorization: Bearer {token}' "
            f"localhost:{settings.port('gate')} list",
            "ready",
        ]
    )


async def _stop(processes: Mapping[ServiceName, asyncio.subprocess.Process], grace: float) -> int:
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    worst = 0
    for service, process in processes.items():
        try:
            code = await asyncio.wait_for(process.wait(), grace + 5)
        except TimeoutError:
            print(f"{service} did not stop within {grace + 5:.0f}s; killing it", file=sys.stderr)
            process.kill()
            code = await process.wait()
        worst = worst or code
    return worst


async def run_mesh() -> int:
    """Runs the mesh until SIGINT/SIGTERM or until one service dies; returns the exit code."""
    settings = MeshSettings()
    token = (
        settings.dev_token.get_secret_value() if settings.dev_token else secrets.token_urlsafe(24)
    )
    env = {
        **os.environ,
        "C360_HOST": settings.host,
        "C360_DEV_TOKEN": token,
        "C360_SERVICE_TOKEN": os.environ.get("C360_SERVICE_TOKEN", token),
        # The gate asks the profile for the consent of customers it has not been told about.
        "C360_PROFILE_ADDR": settings.address("profile"),
        # Enrichment's daily run of every shop, in process (Kubernetes uses a CronJob).
        "C360_DAILY_RUN_HOUR_UTC": os.environ.get("C360_DAILY_RUN_HOUR_UTC", "3"),
    }
    await asyncio.gather(*(_migrate(service, env) for service in SERVICES))
    processes: dict[ServiceName, asyncio.subprocess.Process] = {}
    for service in SERVICES:
        processes[service] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{service}", env=env
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await _wait_ready(settings, processes)
    except SystemExit as failure:
        await _stop(processes, settings.shutdown_grace_seconds)
        print(failure, file=sys.stderr)
        return 1
    print(_banner(settings, token, env), flush=True)
    died = asyncio.create_task(
        asyncio.wait(
            [asyncio.create_task(p.wait()) for p in processes.values()],
            return_when=asyncio.FIRST_COMPLETED,
        )
    )
    stop_requested = asyncio.create_task(stopping.wait())
    await asyncio.wait([died, stop_requested], return_when=asyncio.FIRST_COMPLETED)
    failed = [s for s, p in processes.items() if p.returncode is not None]
    code = await _stop(processes, settings.shutdown_grace_seconds)
    died.cancel()
    if failed and not stopping.is_set():
        print(f"stopped: {', '.join(failed)} exited unexpectedly", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(run_mesh()))
