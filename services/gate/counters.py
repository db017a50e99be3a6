"""The gate's counters: one customer's keys under one {shop:person} hash tag, the check as one
server-side script, so a check is one Redis round trip. The same scripts run on real Redis and on
the embedded in-process store (fakeredis with Lua), so both have exactly the same semantics."""

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Connection, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from services.gate.rules import FATIGUE_WINDOW

PREFIX = "c360:gate"
# Counters, reservations and the pending log of a customer live this long after their last use.
FATIGUE_WINDOW_MS = int(FATIGUE_WINDOW.total_seconds() * 1000)
KEY_TTL_MS = FATIGUE_WINDOW_MS + 24 * 3600 * 1000

CHECK = resources.files(__package__).joinpath("check.lua").read_text()

# Replaces the customer's contact policy unless a newer one is stored; keeps the counters, and
# does not mark them present (only a rebuild does). ARGV: the policy's five fields, key ttl ms.
PUT_POLICY = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'ver') or '-1')
if stored >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], 'tz', ARGV[1], 'consent', ARGV[2], 'unsub', ARGV[3],
  'suppressed', ARGV[4], 'ver', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# Restores a customer Redis does not hold in full, unless someone restored them first: the
# policy (unless a newer one arrived meanwhile) and the reservations, then marks them present:
# v = 1, or v = c when only the counts are known (a contact history's rebuild, which does not
# ask the profile for a policy the gate lacks: a check rebuilds such a customer again, with the
# policy, and keeps the counts Redis holds). ARGV: the policy's five fields, key ttl ms, the
# mark (1|c), then (message_id, channel, ms, entry id) quads.
REBUILD = """
local marked = redis.call('HGET', KEYS[1], 'v')
if marked == '1' or (marked and ARGV[7] == 'c') then return 0 end
local stored = tonumber(redis.call('HGET', KEYS[1], 'ver') or '-1')
if stored < tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'tz', ARGV[1], 'consent', ARGV[2], 'unsub', ARGV[3],
    'suppressed', ARGV[4], 'ver', ARGV[5])
end
redis.call('HSET', KEYS[1], 'v', ARGV[7])
if not marked then
  for i = 8, #ARGV, 4 do
    redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 3])
  end
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
return 1
"""

# Gives back a reservation and records the release for the durable log. Returns the log entry
# id of the released reservation, "" when there is none, or REBUILD when Redis does not hold
# the customer in full. ARGV: message_id, now ms, log retention ms.
RELEASE = """
local reserved = redis.call('HGET', KEYS[3], ARGV[1])
if not reserved then
  if redis.call('HEXISTS', KEYS[1], 'v') == 0 then return 'REBUILD' end
  return ''
end
local entry = string.match(reserved, ' (.+)$')
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[4], 'MINID', '~', tonumber(ARGV[2]) - tonumber(ARGV[3]),
  '*', 'm', ARGV[1], 'x', 'release', 'e', entry, 't', ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return entry
"""

# Erases a customer: counts the keys Redis holds for them (the tombstone policy an earlier
# erasure left is not counted again), then, unless a dry run, replaces them all with the
# tombstone policy, marked complete, so that neither a rebuild nor a push (whose version cannot
# exceed the tombstone's) replaces it. Returns the count. ARGV: dry run (0|1), the tombstone's
# five policy fields, key ttl ms.
ERASE = """
local removed = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1
      and (i > 1 or redis.call('HGET', KEYS[1], 'ver') ~= ARGV[6]) then
    removed = removed + 1
  end
end
if ARGV[1] == '1' then return removed end
redis.call('DEL', unpack(KEYS))
redis.call('HSET', KEYS[1], 'tz', ARGV[2], 'consent', ARGV[3], 'unsub', ARGV[4],
  'suppressed', ARGV[5], 'ver', ARGV[6], 'v', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return removed
"""

# A pipelined round trip of checks is given the check timeout plus this much time per check.
BATCH_BUDGET_PER_CHECK = 0.0005


class HiredisPackedConnection(Connection):
    """A Redis connection that packs commands with hiredis (C) as redis-py's synchronous client
    does; its asyncio client packs in Python, which was the largest client cost of a check."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return [_pack(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(_pack(tuple(command)) for command in commands)]


def _pack(args: tuple[Any, ...]) -> bytes:
    # Like redis-py, a command name of several words ("SCRIPT LOAD") goes as several arguments.
    name = args[0]
    if isinstance(name, str | bytes) and (" " in name if isinstance(name, str) else b" " in name):
        args = (*name.split(), *args[1:])
    packed: bytes = hiredis.pack_command(args)
    return packed


class CountersUnavailable(ConnectionError):
    """Redis did not answer within the gate's timeout, or answered with an error (read-only
    replica after a failover, out of memory, busy script). A ConnectionError, so that outside a
    check the shared runtime answers UNAVAILABLE with a retry delay."""


@dataclass(slots=True)
class CustomerKeys:
    """The Redis keys of one customer; all in one hash slot."""

    policy: str
    sent: str
    channels: str
    log: str

    @classmethod
    def of(cls, shop_id: str, person_id: str) -> "CustomerKeys":
        """The keys of a customer, e.g. c360:gate:{shop-a:p1}:policy."""
        tag = f"{PREFIX}:{{{shop_id}:{person_id}}}"
        return cls(f"{tag}:policy", f"{tag}:sent", f"{tag}:channels", f"{tag}:log")

    def all(self) -> list[str]:
        """Every key, in the order the scripts take them."""
        return [self.policy, self.sent, self.channels, self.log]


@dataclass(frozen=True)
class ContactPolicy:
    """What the gate knows of one customer: consent per channel, global unsubscribe, zone,
    hard suppressions."""

    granted: frozenset[str] = frozenset()
    global_unsubscribe: bool = False
    time_zone: str = ""
    suppressed: frozenset[str] = frozenset()
    # Orders updates: a policy never replaces a newer one (e.g. µs since the epoch of the change).
    version: int = 0

    def as_args(self) -> list[str | int]:
        """The policy as the scripts store it."""
        return [
            self.time_zone,
            "," + ",".join(sorted(self.granted)) + ",",
            "1" if self.global_unsubscribe else "0",
            "," + ",".join(sorted(self.suppressed)) + ",",
            self.version,
        ]


# The version of an erased person's tombstone policy: the largest int64, which no push can
# exceed (a put replaces only an older version), so the tombstone blocks them for good.
ERASED_VERSION = 2**63 - 1
# What the gate keeps of an erased person: globally unsubscribed, no consent, no zone.
ERASED = ContactPolicy(global_unsubscribe=True, version=ERASED_VERSION)


@dataclass(frozen=True)
class CalendarRow:
    """One time zone's calendar at the instant of a check (times in ms since the epoch)."""

    zone: str
    day_start_ms: int
    next_midnight_ms: int
    quiet: bool
    quiet_end_ms: int

    def argv(self) -> list[str | int]:
        """The row as check.lua reads it."""
        return [
            self.zone,
            self.day_start_ms,
            self.next_midnight_ms,
            int(self.quiet),
            self.quiet_end_ms,
        ]


def encode_calendar(rows: Sequence[CalendarRow]) -> list[str | int]:
    """The calendar arguments of check.lua: its rows, flattened."""
    return [value for row in rows for value in row.argv()]


@dataclass(slots=True)
class CheckArgs:
    """One check as the script takes it; `calendar` (see encode_calendar) has a row for every
    zone the shop's customers use (the zone "" stands for customers without one), so that the
    customer's own zone is found in the same round trip."""

    mode: str
    now_ms: int
    channel: str
    message_id: str
    transactional: bool
    global_cap: int
    channel_cap: int
    fatigue_threshold: int
    calendar: Sequence[str | int]

    def argv(self, log_retention_ms: int) -> list[str | int]:
        """ARGV of check.lua, the calendar's rows flattened at its end."""
        return [
            self.mode,
            self.message_id,
            self.channel,
            self.now_ms,
            int(self.transactional),
            self.global_cap,
            self.channel_cap,
            self.fatigue_threshold,
            FATIGUE_WINDOW_MS,
            KEY_TTL_MS,
            log_retention_ms,
            *self.calendar,
        ]


@dataclass(slots=True)
class Outcome:
    """What the script answered."""

    status: str
    allowed: bool
    reason: str
    retry_at_ms: int
    today_total: int
    last_window: int
    fatigue: int
    log_entry: str
    today_by_channel: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> "Outcome":
        """Decodes the script's reply."""
        text = [v.decode() if isinstance(v, bytes) else v for v in raw]
        pairs = text[8:]
        return cls(
            status=text[0],
            allowed=int(text[1]) == 1,
            reason=text[2],
            retry_at_ms=int(text[3]),
            today_total=int(text[4]),
            last_window=int(text[5]),
            fatigue=int(text[6]),
            log_entry=text[7],
            today_by_channel={pairs[i]: int(pairs[i + 1]) for i in range(0, len(pairs), 2)},
        )


def ms(instant: datetime) -> int:
    """Milliseconds since the epoch."""
    return int(instant.timestamp() * 1000)


def from_ms(value: int) -> datetime:
    """The instant of a millisecond timestamp."""
    return datetime.fromtimestamp(value / 1000, tz=UTC)


class Counters:
    """The counter store: a Redis client (real, or fakeredis in process) and the scripts.

    Each customer's decisions also go to a log stream that keeps them for `log_retention`
    seconds: long enough for the durable log to be written, even by the next process to start
    if this one is killed first."""

    def __init__(
        self, client: Redis, timeout: float, log_retention: float = 60.0, write_timeout: float = 0.0
    ) -> None:
        self._client = client
        self._timeout = timeout
        # Policy writes are off the send path: they may wait longer than a check.
        self._write_timeout = max(timeout, write_timeout)
        self._log_retention_ms = int(log_retention * 1000)
        self._check = client.register_script(CHECK)
        self._put_policy = client.register_script(PUT_POLICY)
        self._rebuild = client.register_script(REBUILD)
        self._release = client.register_script(RELEASE)
        self._erase = client.register_script(ERASE)

    async def _bounded(self, call: Any, seconds: float = 0.0) -> Any:
        try:
            async with asyncio.timeout(seconds or self._timeout):
                return await call
        except (TimeoutError, RedisError) as e:
            raise CountersUnavailable(type(e).__name__) from e

    async def check(self, keys: CustomerKeys, args: CheckArgs) -> Outcome:
        """Runs the atomic check for one customer: one round trip. A peek (the contact history:
        a read, no decision for a sender waiting on it) may wait as long as a write."""
        argv = args.argv(self._log_retention_ms)
        seconds = self._write_timeout if args.mode == "peek" else 0.0
        return Outcome.parse(await self._bounded(self._check(keys=keys.all(), args=argv), seconds))

    async def check_pipelined(
        self, calls: Sequence[tuple[CustomerKeys, CheckArgs]]
    ) -> list[Outcome | None]:
        """Runs independent checks in one pipelined round trip, bounded by the timeout plus
        BATCH_BUDGET_PER_CHECK a check; a round trip that fails gives None for its checks."""
        try:
            async with asyncio.timeout(self._timeout + BATCH_BUDGET_PER_CHECK * len(calls)):
                replies = await self._pipelined_checks(calls)
        except (TimeoutError, RedisError):
            return [None] * len(calls)
        return [Outcome.parse(reply) for reply in replies]

    async def _pipelined_checks(self, chunk: Sequence[tuple[CustomerKeys, CheckArgs]]) -> Any:
        return await self._pipelined(
            self._check,
            [(keys.all(), args.argv(self._log_retention_ms)) for keys, args in chunk],
        )

    async def _pipelined(
        self, script: AsyncScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> Any:
        """Runs a script once per (keys, args) in one pipelined round trip: EVALSHA queued
        straight on the pipeline (the script wrapper costs more per call than a check, and on a
        pipeline asks SCRIPT EXISTS first, a round trip outside the pipeline's own cleanup: cut
        short by a timeout, it kept its connection for good); a Redis that lost its scripts
        gets it loaded and the calls again. The pipeline gives its connection back however the
        call ends."""

        async def round_trip() -> Any:
            async with self._client.pipeline(transaction=False) as pipeline:
                for keys, args in calls:
                    pipeline.evalsha(script.sha, len(keys), *keys, *args)
                return await pipeline.execute()

        try:
            return await round_trip()
        except NoScriptError:
            await self._client.script_load(script.script)
            return await round_trip()

    async def put_policy(self, keys: CustomerKeys, policy: ContactPolicy) -> None:
        """Replaces the customer's contact policy unless a newer one is there; the next check
        sees it."""
        await self.put_policies([(keys, policy)])

    async def put_policies(self, policies: Sequence[tuple[CustomerKeys, ContactPolicy]]) -> None:
        """Replaces customers' contact policies, each unless a newer one is there, in one
        pipelined round trip; the next checks see them."""
        await self._bounded(
            self._pipelined(
                self._put_policy,
                [([keys.policy], [*policy.as_args(), KEY_TTL_MS]) for keys, policy in policies],
            ),
            self._write_timeout,
        )

    async def rebuild_many(
        self,
        customers: Sequence[
            tuple[CustomerKeys, ContactPolicy | None, Sequence[tuple[str, str, int, str]]]
        ],
        for_a_read: bool = False,
    ) -> None:
        """Restores customers' policies and reservations (message_id, channel, ms, log entry id),
        each unless someone did first, in one pipelined round trip; `for_a_read` (a peek's
        rebuild) may wait as long as a write. A policy of None (only for a read) restores the
        counts alone: the customer's next check rebuilds their policy."""
        calls = [
            (
                keys.all()[:3],
                [
                    *(policy or ContactPolicy()).as_args(),
                    KEY_TTL_MS,
                    "c" if policy is None else "1",
                    *[value for reservation in reservations for value in reservation],
                ],
            )
            for keys, policy, reservations in customers
        ]
        await self._bounded(
            self._pipelined(self._rebuild, calls), self._write_timeout if for_a_read else 0.0
        )

    async def release(self, keys: CustomerKeys, message_id: str, now: datetime) -> str:
        """Gives back a reservation; returns the log entry id of the reservation, "" when there
        was none, or REBUILD when Redis does not hold the customer in full."""
        entry = await self._bounded(
            self._release(keys=keys.all(), args=[message_id, ms(now), self._log_retention_ms])
        )
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def erase(self, keys: CustomerKeys, dry_run: bool) -> int:
        """Replaces every key of the customer with the erased tombstone policy (see ERASE), in
        one atomic step; returns how many keys it removed (with `dry_run`, would remove)."""
        removed = await self._bounded(
            self._erase(keys=keys.all(), args=[int(dry_run), *ERASED.as_args(), KEY_TTL_MS]),
            self._write_timeout,
        )
        return int(removed)

    async def pending_logs(self, count: int = 1000) -> list[str]:
        """Every customer's log stream that still holds entries (after a crash)."""
        found: list[str] = []
        cursor = None
        while cursor != 0:
            cursor, keys = await self._bounded(
                self._client.scan(
                    cursor or 0, match=f"{PREFIX}:*:log", count=count, _type="stream"
                ),
                self._write_timeout,
            )
            found.extend(key.decode() if isinstance(key, bytes) else key for key in keys)
        return found

    async def read_log(self, key: str) -> list[tuple[str, dict[str, str]]]:
        """The entries of one pending log stream."""
        entries: list[Any] = await self._bounded(self._client.xrange(key), self._write_timeout)
        return [
            (entry_id.decode(), {k.decode(): v.decode() for k, v in values.items()})
            for entry_id, values in entries or []
        ]

    async def redact_shop(self, shop_id: str, dry_run: bool) -> dict[str, int]:
        """Counts or deletes a shop's keys (every customer's `{shop:person}` keys) as
        `redis_keys`, a SCAN page at a time, one UNLINK per key (keys of many hash slots)."""
        removed, cursor = 0, None
        while cursor != 0:
            cursor, keys = await self._bounded(
                self._client.scan(cursor or 0, match=f"{PREFIX}:{{{shop_id}:*", count=1000),
                self._write_timeout,
            )
            if dry_run:
                removed += len(keys)
            elif keys:
                removed += sum(await self._bounded(self._unlink(keys), self._write_timeout))
        return {"redis_keys": removed}

    async def _unlink(self, keys: Sequence[Any]) -> list[int]:
        async with self._client.pipeline(transaction=False) as pipeline:
            for key in keys:
                pipeline.unlink(key)
            removed: list[int] = await pipeline.execute()
            return removed

    async def ping(self) -> None:
        """Raises unless Redis answers within the time a write may wait."""
        await self._bounded(self._client.ping(), self._write_timeout)

    async def close(self) -> None:
        """Closes the client's connections."""
        await self._client.aclose()
