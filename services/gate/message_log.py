"""The durable message log, written in batches off the hot path.

Every decision is first appended, inside the atomic check, to the customer's log stream in
Redis, which keeps it for a retention period (60 s by default), so it survives the gate process
being killed after answering. This writer copies the decisions its process made to the database
in batches; at start-up it also copies what the streams still hold, which covers whatever a
killed process had not written yet. Writes are idempotent (keyed by the stream entry id), so
copying an entry twice changes nothing.
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
        return Released(shop_id, person_id, fields["e"], at)
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
        max_buffered: int = 1_000_000,
    ) -> None:
        self._store = store
        self._counters = counters
        self._interval = interval
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        self._suspects: set[tuple[str, str]] = set()
        self._buffer: list[Decided | Released] = []
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def record(self, entry: Decided | Released) -> None:
        """Queues one entry (already kept in Redis for the retention period) for the database."""
        self._buffer.append(entry)
        if len(self._buffer) >= self._batch_size:
            self._full.set()

    @property
    def saturated(self) -> bool:
        """Whether the database has fallen so far behind that the gate must stop deciding
        (answering gate_unavailable) rather than hold more decisions in memory."""
        return len(self._buffer) >= self._max_buffered

    def suspect(self, shop_id: str, person_id: str) -> None:
        """Marks a customer whose check timed out: Redis may have decided after the gate gave up,
        so their log stream is read into the durable log at the next write."""
        self._suspects.add((shop_id, person_id))

    async def _read_suspects(self) -> None:
        suspects, self._suspects = list(self._suspects), set()
        for done, (shop_id, person_id) in enumerate(suspects):
            try:
                entries = await self._counters.read_log(CustomerKeys.of(shop_id, person_id).log)
            except Exception:
                self._suspects.update(suspects[done:])
                raise
            for entry_id, fields in entries:
                self.record(parse_entry(shop_id, person_id, entry_id, fields))

    async def flush(self) -> int:
        """Writes everything queued so far; returns how many entries were written. On a database
        failure, or when the caller is cancelled (its deadline, a timeout) while the batch is
        written, the entries stay queued (and pending in Redis) for the next attempt: a write
        that did commit is copied again, which changes nothing."""
        async with self._lock:
            batch, self._buffer = self._buffer, []
            self._full.clear()
            if not batch:
                return 0
            try:
                await self._write(batch)
            except BaseException:
                self._buffer[:0] = batch
                raise
            return len(batch)

    async def _write(self, batch: list[Decided | Released]) -> None:
        decided = [e for e in batch if isinstance(e, Decided)]
        released = [e for e in batch if isinstance(e, Released)]
        await self._store.append(decided, released)

    async def recover(self) -> int:
        """Copies what the log streams still hold (a killed process's last decisions among them)
        to the database; returns how many entries it read."""
        copied = 0
        for key in await self._counters.pending_logs():
            if self._stopping:
                break
            shop_id, person_id = customer_of(key)
            for entry_id, fields in await self._counters.read_log(key):
                self.record(parse_entry(shop_id, person_id, entry_id, fields))
                copied += 1
        await self.flush()
        return copied

    async def _recover(self) -> None:
        try:
            recovered = await self.recover()
        except Exception as exc:
            log.warning("message log recovery failed", extra={"error": type(exc).__name__})
        else:
            log.info("message log recovered", extra={"entries": recovered})

    async def _run(self) -> None:
        await self._recover()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._full.wait()
            try:
                if self._suspects:
                    await self._read_suspects()
                await self.flush()
            except Exception as exc:
                log.warning(
                    "message log write failed; retrying", extra={"error": type(exc).__name__}
                )

    def start(self) -> None:
        """Recovers what the streams hold, then writes in batches, both in the background."""
        self._task = asyncio.create_task(self._run(), name="message-log-writer")

    async def stop(self) -> None:
        """Stops the background writer after a last flush."""
        self._stopping = True
        self._full.set()
        if self._task is not None:
            await self._task
        try:
            await self.flush()
        except Exception as exc:
            # Still in the Redis log streams for the retention period: the next process to
            # start copies it.
            log.warning("message log not flushed at stop", extra={"error": type(exc).__name__})
