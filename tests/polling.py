"""Waiting for a condition with a deadline, never for a fixed time."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")
DEADLINE_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.05


async def health_becomes(address: str, status: int, seconds: float = DEADLINE_SECONDS) -> None:
    """Returns once the server's overall health is `status`, following Health/Watch (which sends
    every change); waits for the server to listen; fails after `seconds`."""
    seen: list[int] = []
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=seconds
        )
        try:
            async for update in watch:
                if update.status == status:
                    watch.cancel()
                    return
                seen.append(update.status)
        except grpc.aio.AioRpcError as error:
            raise AssertionError(f"health never became {status}; saw {seen}") from error
    raise AssertionError(f"health watch of {address} ended; saw {seen}")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    what: str,
    seconds: float = DEADLINE_SECONDS,
) -> T:
    """Asks `probe` until `done` holds for its answer, for a condition no event announces (a
    background writer, a client reconnecting); fails after `seconds` with the last answer."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        answer = await probe()
        if done(answer):
            return answer
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: still {answer!r} after {seconds}s")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)
