"""The durable message log, written in batches off the hot path.

Every decision is first appended, inside the atomic check, to the customer's pending log stream
in Redis, so it survives the gate process being killed after answering. This writer copies
pending decisions to the database in batches and then trims the streams; at start-up it also
copies whatever a killed process left behind. Writes are idempotent (keyed by stream entry id).
"""

import asyncio
import contextlib
import logging

from services.gate.counters import PREFIX, Counters, CustomerKeys, from_ms
from services.gate.store import Decided, GateStore, Released

log = logging.getLogger(__name__)


def customer_of(log_key: str) -> tuple[str, str]:
    """(shop_id, person_id) of a customer's key, e.g. c360:gate:{shop-a:p1}:log."""
    tag = log_key[len(PREFIX) + 2 : log_key.rindex("}")]
    shop_id, _, person_id = tag.partition(":")
    return shop_id, person_id


def parse_entry(
    shop_id: str, person_id: str, entry_id: str, fields: dict[str, str]
) -> Decided | Released:
    """A pending log stream entry as a decision or a release."""
    at = from_ms(int(fields["t"]))
    if fields.get("x") == "release":
        return Released(shop_id, person_id, entry_id, fields["m"], at)
    return Decided(
        shop_id=shop_id,
        person_id=person_id,
        entry_id=entry_id,
        message_id=fields["m"],
        channel=fields["c"],
        transactional=fields["k"] == "t",
        allowed=fields["a"] == "1",
        reason=fields["r"],
        decided_at=at,
    )


class MessageLogWriter:
    """Buffers decisions this process made and writes them to the database in batches."""

    def __init__(
        self,
        store: GateStore,
        counters: Counters,
        interval: float,
        batch_size: int,
    ) -> None:
        self._store = store
        self._counters = counters
        self._interval = interval
        self._batch_size = batch_size
        self._buffer: list[tuple[CustomerKeys, Decided | Released]] = []
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def record(self, keys: CustomerKeys, entry: Decided | Released) -> None:
        """Queues one pending entry (already durable in Redis) for the database."""
        self._buffer.append((keys, entry))
        if len(self._buffer) >= self._batch_size:
            self._full.set()

    async def flush(self) -> int:
        """Writes everything queued so far; returns how many entries were written. On a database
        failure the entries stay queued (and pending in Redis) for the next attempt."""
        async with self._lock:
            batch, self._buffer = self._buffer, []
            self._full.clear()
            if not batch:
                return 0
            try:
                await self._write(batch)
            except Exception:
                self._buffer[:0] = batch
                raise
            return len(batch)

    async def _write(self, batch: list[tuple[CustomerKeys, Decided | Released]]) -> None:
        decided = [e for _, e in batch if isinstance(e, Decided)]
        released = [e for _, e in batch if isinstance(e, Released)]
        await self._store.append(decided, released)
        newest: dict[CustomerKeys, str] = {}
        for keys, entry in batch:
            newest[keys] = max(newest.get(keys, entry.entry_id), entry.entry_id, key=_order)
        if newest:
            await self._counters.ack(list(newest.items()))

    async def recover(self) -> int:
        """Copies what pending log streams still hold (a killed process's last decisions) to the
        database; returns how many entries it copied."""
        copied = 0
        for key in await self._counters.pending_logs():
            shop_id, person_id = customer_of(key)
            keys = CustomerKeys.of(shop_id, person_id)
            for entry_id, fields in await self._counters.read_log(key):
                self.record(keys, parse_entry(shop_id, person_id, entry_id, fields))
                copied += 1
        await self.flush()
        return copied

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._interval)
            try:
                await self.flush()
            except Exception as exc:
                log.warning(
                    "message log write failed; retrying", extra={"error": type(exc).__name__}
                )

    async def start(self) -> None:
        """Recovers what a previous process left, then writes in the background."""
        try:
            recovered = await self.recover()
        except Exception as exc:
            log.warning("message log recovery failed", extra={"error": type(exc).__name__})
        else:
            if recovered:
                log.info("message log recovered", extra={"entries": recovered})
        self._task = asyncio.create_task(self._run(), name="message-log-writer")

    async def stop(self) -> None:
        """Stops the background writer after a last flush."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.flush()
        except Exception as exc:
            # Still pending in Redis: the next process to start copies it.
            log.warning("message log not flushed at stop", extra={"error": type(exc).__name__})


def _order(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence)
