"""A background task of a service: runs its step as soon as it is woken, at least every
interval, and again at once while the step reports work done (a backlog drains without waiting
an interval per batch); a failing step is logged and tried again at the next turn."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Worker:
    """Runs `step` in the background until stopped."""

    def __init__(self, name: str, step: Callable[[], Awaitable[int]], interval: float) -> None:
        self._name = name
        self._step = step
        self._interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        """Runs the step now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if await self._step():
                    self._wake.set()
            except Exception as exc:
                log.warning(
                    "background step failed; retrying",
                    extra={"worker": self._name, "error": type(exc).__name__},
                )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Lets the step in hand finish, then stops."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
