"""The send-time gate: a check is one atomic step in the counter store, around which this module
brings the shop's policy, the customer's calendar, recovery from a lost Redis and the log."""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.gate.counters import (
    CalendarRow,
    CheckArgs,
    ContactPolicy,
    Counters,
    CountersUnavailable,
    CustomerKeys,
    Outcome,
    encode_calendar,
    from_ms,
    ms,
)
from services.gate.message_log import MessageLogWriter
from services.gate.rules import (
    FATIGUE_MAX,
    FATIGUE_PER_MESSAGE,
    FATIGUE_WINDOW,
    QUIET_HOURS_EXEMPT,
    ShopPolicy,
    Window,
    boundaries,
    format_fatigue,
)
from services.gate.store import Decided, GateStore, LogLine, Released
from services.runtime.errors import DEPENDENCY_ERRORS, AlreadyExists

log = logging.getLogger(__name__)

# Contact policies of customers, from whoever owns consent (the profile service): a customer left
# out is unknown there too. Raises a ConnectionError when it cannot answer.
PolicySource = Callable[[str, list[str]], Awaitable[dict[str, ContactPolicy]]]

Clock = Callable[[], datetime]
# What slow or unreachable counters or database raise (CountersUnavailable is a
# ConnectionError): a check answers gate_unavailable; other RPCs UNAVAILABLE.
UNDECIDABLE: tuple[type[BaseException], ...] = (TimeoutError, *DEPENDENCY_ERRORS)
# Customers rebuilt from the database per query.
REBUILD_CHUNK = 1000
# CheckBatch goes to Redis in pipelined round trips of this many checks, this many at a time
# (so the gate packs, parses and decides while Redis works).
BATCH_CHUNK = 1000
BATCH_IN_FLIGHT = 4
UNAVAILABLE = "gate_unavailable"


@dataclass(slots=True)
class Counts:
    """A customer's counts as the gate saw them when deciding."""

    today_by_channel: dict[str, int] = field(default_factory=dict)
    today_total: int = 0
    last_window: int = 0
    fatigue: str = "0.00"


@dataclass(slots=True)
class Decision:
    """The gate's answer for one message."""

    allowed: bool
    reason: str
    retryable: bool
    next_eligible_at: datetime | None
    counts: Counts
    replayed: bool = False


@dataclass(slots=True)
class Request:
    """One message to decide on."""

    shop_id: str
    person_id: str
    channel: str
    message_id: str
    transactional: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class History:
    """A customer's contact history."""

    counts: Counts
    last_contact: dict[str, datetime]
    log: list[LogLine]


@dataclass(frozen=True)
class Posture:
    """A shop's customers by fatigue score now (in hundredths; those at 0 left out), and the
    shop's blocking threshold."""

    customers_by_fatigue: dict[int, int]
    threshold: int
    as_of: datetime


def shop_policy_from_document(document: dict[str, Any] | None) -> ShopPolicy:
    """A stored policy document as a ShopPolicy; the defaults where it says nothing."""
    if not document:
        return ShopPolicy()
    defaults = ShopPolicy()
    return ShopPolicy(
        global_daily_cap=document.get("global_daily_cap", defaults.global_daily_cap),
        channel_caps={**defaults.channel_caps, **document.get("channel_caps", {})},
        fatigue_threshold=document.get("fatigue_threshold", defaults.fatigue_threshold),
        quiet_hours=Window(*document["quiet_hours"])
        if "quiet_hours" in document
        else defaults.quiet_hours,
        time_zone=document.get("time_zone") or defaults.time_zone,
        region_quiet_hours={
            region: Window(*window)
            for region, window in document.get("region_quiet_hours", {}).items()
        },
    )


def _counts(outcome: Outcome) -> Counts:
    return Counts(
        outcome.today_by_channel,
        outcome.today_total,
        outcome.last_window,
        format_fatigue(outcome.fatigue),
    )


def _unavailable() -> Decision:
    return Decision(False, UNAVAILABLE, True, None, Counts())


class Gate:
    """Decides, reserves and releases messages; keeps contact and shop policies."""

    def __init__(
        self,
        counters: Counters,
        store: GateStore,
        log: MessageLogWriter,
        clock: Clock,
        meter: Meter,
        shop_policy_ttl: float = 5.0,
        database_timeout: float = 1.0,
        policy_source: PolicySource | None = None,
    ) -> None:
        self._policy_source = policy_source
        self._counters = counters
        self._store = store
        self._log = log
        self._clock = clock
        self._shop_policy_ttl = shop_policy_ttl
        self._database_timeout = database_timeout
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._shop_policies: dict[str, tuple[float, ShopPolicy]] = {}
        # How many times this replica changed each shop's policy: a read that began before a
        # change does not cache what it read.
        self._shop_policy_changes: Counter[str] = Counter()
        # The zones each shop's customers use ("" = none of their own), learnt from contact
        # policies and checks; every check carries the calendar of all of them.
        self._zones: dict[str, list[str]] = {}
        self._calendars: dict[tuple[str, bool], tuple[int, ShopPolicy, int, list[str | int]]] = {}
        # Decisions so far by (channel, outcome, class), read by the metric reader when it
        # collects: a dict increment a check, where a synchronous counter's add cost ~10 µs.
        self._decided: Counter[tuple[str, str, str]] = Counter()
        meter.create_observable_counter(
            "c360.gate.decisions",
            callbacks=[self._observe_decisions],
            unit="{decision}",
            description="Gate decisions by outcome (allowed or the reason's kind) and channel.",
        )

    async def shop_policy(self, shop_id: str) -> ShopPolicy:
        """The shop's policy. Once known it is served from memory and refreshed in the background
        every few seconds (every replica sees a change within that), so a slow database never
        holds up a check; the first read is bounded by the database timeout."""
        cached = self._shop_policies.get(shop_id)
        if cached is None:
            async with asyncio.timeout(self._database_timeout):
                return await self._load_shop_policy(shop_id)
        if (
            time.monotonic() - cached[0] >= self._shop_policy_ttl
            and shop_id not in self._refreshing
        ):
            self._refreshing[shop_id] = asyncio.create_task(self._refresh_shop_policy(shop_id))
        return cached[1]

    async def _load_shop_policy(self, shop_id: str) -> ShopPolicy:
        changes = self._shop_policy_changes[shop_id]
        policy = shop_policy_from_document(await self._store.shop_policy(shop_id))
        if self._shop_policy_changes[shop_id] == changes:
            self._shop_policies[shop_id] = (time.monotonic(), policy)
        return policy

    async def _refresh_shop_policy(self, shop_id: str) -> None:
        try:
            async with asyncio.timeout(self._database_timeout):
                await self._load_shop_policy(shop_id)
        except UNDECIDABLE as exc:
            log.warning("shop policy refresh failed", extra={"error": type(exc).__name__})
        finally:
            del self._refreshing[shop_id]

    async def put_shop_policy(self, shop_id: str, document: dict[str, Any]) -> None:
        """Replaces the shop's policy; this replica applies it at once, others within the TTL."""
        await self._store.put_shop_policy(shop_id, document, self._clock())
        self._shop_policy_changes[shop_id] += 1
        self._shop_policies.pop(shop_id, None)

    async def put_contact_policy(self, shop_id: str, person_id: str, policy: ContactPolicy) -> None:
        """Stores a customer's policy durably, then in the counters, each unless a newer version
        is there: the next check sees it. A retried put (same version) completes both."""
        await self.put_contact_policies(shop_id, [(person_id, policy)])

    async def put_contact_policies(
        self, shop_id: str, policies: Sequence[tuple[str, ContactPolicy]]
    ) -> None:
        """Stores customers' policies, ending as put_contact_policy called for each in order
        would (of one customer's, the highest version counts, the first of equal ones), in bulk:
        one database statement, one Redis round trip, one rebuild. The next checks see them."""
        latest: dict[str, ContactPolicy] = {}
        for person_id, policy in policies:
            kept = latest.get(person_id)
            if kept is None or policy.version > kept.version:
                latest[person_id] = policy
        if not latest:
            return
        now = self._clock()
        await self._store.put_contact_policies(shop_id, latest, now)
        await self._counters.put_policies(
            [(CustomerKeys.of(shop_id, person_id), policy) for person_id, policy in latest.items()]
        )
        # Brings the customers' counters into Redis now (a no-op for those there), so that their
        # next check is one round trip; if Redis is slow, that check does it instead.
        with contextlib.suppress(CountersUnavailable):
            await self._rebuild(shop_id, list(latest), now)
        for _, policy in policies:
            self._learn_zone(shop_id, policy.time_zone)

    def _learn_zone(self, shop_id: str, zone: str) -> None:
        zones = self._zones.setdefault(shop_id, [""])
        if zone not in zones:
            zones.append(zone)

    def _calendar(
        self, shop_id: str, policy: ShopPolicy, now: datetime, channel: str
    ) -> list[str | int]:
        """Each known zone's local day and quiet hours now. Days and windows start on whole
        minutes, so the rows hold for the whole minute and are computed once a minute per shop."""
        exempt = channel in QUIET_HOURS_EXEMPT
        minute = int(now.timestamp() // 60)
        zones = self._zones.setdefault(shop_id, [""])
        cached = self._calendars.get((shop_id, exempt))
        if cached and cached[0] == minute and cached[1] is policy and cached[2] == len(zones):
            return cached[3]
        rows = []
        for zone in zones:
            effective = zone or policy.time_zone
            day = boundaries(now, effective, policy.quiet_hours_for(effective), channel)
            rows.append(
                CalendarRow(
                    zone,
                    ms(day.day_start),
                    ms(day.next_midnight),
                    day.quiet,
                    ms(day.quiet_end) if day.quiet_end else 0,
                )
            )
        calendar = encode_calendar(rows)
        self._calendars[(shop_id, exempt)] = (minute, policy, len(zones), calendar)
        return calendar

    def _args(self, request: Request, policy: ShopPolicy, now: datetime, mode: str) -> CheckArgs:
        return CheckArgs(
            mode=mode,
            now_ms=ms(now),
            channel=request.channel,
            message_id=request.message_id,
            transactional=request.transactional,
            global_cap=policy.global_daily_cap,
            channel_cap=policy.channel_caps[request.channel],
            fatigue_threshold=policy.fatigue_threshold,
            calendar=self._calendar(request.shop_id, policy, now, request.channel),
        )

    async def _rebuild(
        self, shop_id: str, person_ids: Sequence[str], now: datetime, peek: bool = False
    ) -> None:
        """Restores customers Redis does not hold in full (lost, or never seen) from the durable
        data, in bulk, asking for the policies of customers it has none for; for a peek (the
        contact history needs counts, not consent) without asking, and as patiently as a
        write, leaving such a policy unknown rather than empty (their next check rebuilds them
        with it: an empty policy marked complete would answer no_consent until the next push).
        This replica's decisions not yet in the database go there first, so that the
        counts include them; that write is bounded by the database timeout too."""
        async with asyncio.timeout(self._database_timeout):
            await self._log.flush()
        people = list(dict.fromkeys(person_ids))
        missing = None if peek else ContactPolicy()
        for start in range(0, len(people), REBUILD_CHUNK):
            chunk = people[start : start + REBUILD_CHUNK]
            async with asyncio.timeout(self._database_timeout):
                policies, reservations = await self._store.rebuild_reads(
                    shop_id, chunk, now - FATIGUE_WINDOW
                )
                unknown = [p for p in chunk if p not in policies]
                if unknown and not peek and self._policy_source is not None:
                    policies.update(await self._pull(shop_id, unknown, now))
            await self._counters.rebuild_many(
                [
                    (
                        CustomerKeys.of(shop_id, person_id),
                        policies.get(person_id, missing),
                        [(m, c, ms(at), e) for m, c, at, e in reservations.get(person_id, [])],
                    )
                    for person_id in chunk
                ],
                for_a_read=peek,
            )

    async def _pull(
        self, shop_id: str, person_ids: list[str], now: datetime
    ) -> dict[str, ContactPolicy]:
        """Policies of customers the gate holds none for, from their profiles, kept durably (a
        push of a later change still wins by its version)."""
        assert self._policy_source is not None
        pulled = await self._policy_source(shop_id, person_ids)
        await self._store.put_contact_policies(shop_id, pulled, now)
        return pulled

    async def _run_checks(
        self, requests: Sequence[Request], policy: ShopPolicy, now: datetime, mode: str
    ) -> list[Outcome | None]:
        calls = [
            (CustomerKeys.of(r.shop_id, r.person_id), self._args(r, policy, now, mode))
            for r in requests
        ]
        if len(calls) == 1:
            try:
                return [await self._counters.check(*calls[0])]
            except CountersUnavailable:
                return [None]
        return await self._counters.check_pipelined(calls)

    async def _outcomes(
        self, requests: Sequence[Request], policy: ShopPolicy, now: datetime, mode: str
    ) -> list[Outcome | None]:
        """Runs the checks, then settles those that found a customer to rebuild or a zone the
        calendar lacked: up to three rounds of one bulk rebuild and one pipelined re-check.
        None stands for a check the gate could not decide (counters or database unavailable)."""
        outcomes = await self._run_checks(requests, policy, now, mode)
        for _ in range(3):
            pending = [
                i for i, o in enumerate(outcomes) if o is not None and o.status in ("REBUILD", "TZ")
            ]
            if not pending:
                return outcomes
            lost = []
            for i in pending:
                outcome = outcomes[i]
                assert outcome is not None
                if outcome.status == "TZ":
                    self._learn_zone(requests[i].shop_id, outcome.reason)
                else:
                    lost.append(requests[i].person_id)
            try:
                if lost:
                    # A peek (the contact history) needs counts, not consent: no pull.
                    await self._rebuild(requests[0].shop_id, lost, now, peek=mode == "peek")
                again = await self._run_checks([requests[i] for i in pending], policy, now, mode)
            except UNDECIDABLE:
                again = [None] * len(pending)
            for i, outcome in zip(pending, again, strict=True):
                outcomes[i] = outcome
        return [o if o is None or o.status not in ("REBUILD", "TZ") else None for o in outcomes]

    def _record(
        self, request: Request, entry_id: str, allowed: bool, reason: str, now: datetime
    ) -> None:
        self._log.record(
            Decided(
                request.shop_id,
                request.person_id,
                entry_id,
                request.message_id,
                request.channel,
                request.transactional,
                allowed,
                reason,
                now,
            ),
        )

    def _decision(self, request: Request, now: datetime, outcome: Outcome) -> Decision:
        if outcome.log_entry:
            self._record(request, outcome.log_entry, outcome.allowed, outcome.reason, now)
        retry_at = from_ms(outcome.retry_at_ms) if outcome.retry_at_ms else None
        return Decision(
            allowed=outcome.allowed,
            reason=outcome.reason,
            retryable=retry_at is not None,
            next_eligible_at=retry_at,
            counts=_counts(outcome),
            replayed=outcome.status == "REPLAY",
        )

    def _count(self, requests: Sequence[Request], decisions: Sequence[Decision]) -> None:
        """Adds the decisions to the metrics' tally."""
        for request, decision in zip(requests, decisions, strict=True):
            self._decided[
                (
                    request.channel,
                    decision.reason.split(":", 1)[0] if decision.reason else "allowed",
                    "transactional" if request.transactional else "marketing",
                )
            ] += 1

    def _observe_decisions(self, options: CallbackOptions) -> list[Observation]:
        # The reader's thread: dict.copy is one step under the GIL, iterating the live tally is
        # not.
        return [
            Observation(count, {"channel": channel, "outcome": outcome, "message_class": kind})
            for (channel, outcome, kind), count in dict.copy(self._decided).items()
        ]

    async def check(self, request: Request) -> Decision:
        """Decides on one message and, when allowed (and not a dry run), reserves it."""
        [decision] = await self.check_batch([request])
        return decision

    async def check_batch(self, requests: Sequence[Request]) -> list[Decision]:
        """Decides on messages of one shop, each exactly as alone, in pipelined round trips of
        up to BATCH_CHUNK checks, BATCH_IN_FLIGHT at a time: each group is decided as soon as
        its answers are in, while Redis works on the next ones."""
        if not requests:
            return []
        now = self._clock()
        policy = None
        if not self._log.saturated:
            with contextlib.suppress(*UNDECIDABLE):
                policy = await self.shop_policy(requests[0].shop_id)
        mode = "dry" if requests[0].dry_run else "check"
        # A single group (every Check) has nothing to wait for.
        in_flight: contextlib.AbstractAsyncContextManager[Any] = (
            contextlib.nullcontext()
            if len(requests) <= BATCH_CHUNK
            else asyncio.Semaphore(BATCH_IN_FLIGHT)
        )

        async def decide(part: Sequence[Request]) -> list[Decision]:
            outcomes = None
            if policy is not None:
                async with in_flight:
                    outcomes = await self._outcomes(part, policy, now, mode)
            return self._decisions(part, outcomes, now)

        if len(requests) <= BATCH_CHUNK:
            return await decide(requests)
        parts = [requests[i : i + BATCH_CHUNK] for i in range(0, len(requests), BATCH_CHUNK)]
        decided = await asyncio.gather(*(decide(part) for part in parts))
        return [decision for part in decided for decision in part]

    def _decisions(
        self, requests: Sequence[Request], outcomes: Sequence[Outcome | None] | None, now: datetime
    ) -> list[Decision]:
        """The decisions of checks, recorded in the log and the metrics; None for checks that
        could not be made. A message_id reserved on another channel fails the call, once every
        other decision is recorded."""
        decisions = []
        conflict = None
        for request, outcome in zip(requests, outcomes or [None] * len(requests), strict=True):
            if outcome is None:
                # Redis may still have decided after the gate stopped waiting: have the durable
                # log read what this customer's log stream holds.
                self._log.suspect(request.shop_id, request.person_id)
                # The answer the caller got is logged too (with an entry id of its own: Redis
                # holds no entry for it), unless the log is what the gate is waiting on.
                if not request.dry_run and not self._log.saturated:
                    self._record(request, f"u{uuid.uuid4().hex}", False, UNAVAILABLE, now)
                decisions.append(_unavailable())
            elif outcome.status == "CONFLICT":
                conflict = conflict or AlreadyExists(
                    f"message_id {request.message_id!r} is reserved on {outcome.reason}"
                )
            else:
                decisions.append(self._decision(request, now, outcome))
        if conflict is not None:
            raise conflict
        self._count(requests, decisions)
        return decisions

    async def release(self, shop_id: str, person_id: str, message_id: str) -> bool:
        """Gives back the reservation of a message that never left."""
        now = self._clock()
        keys = CustomerKeys.of(shop_id, person_id)
        entry = await self._counters.release(keys, message_id, now)
        if entry == "REBUILD":
            await self._rebuild(shop_id, [person_id], now)
            entry = await self._counters.release(keys, message_id, now)
        if entry in ("", "REBUILD"):
            return False
        self._log.record(Released(shop_id, person_id, entry, now))
        return True

    async def history(self, shop_id: str, person_id: str, log_limit: int) -> History:
        """Counts (from the counters), last contact per channel and the log (from the database)."""
        request = Request(shop_id, person_id, "email", "")
        policy = await self.shop_policy(shop_id)
        [outcome] = await self._outcomes([request], policy, self._clock(), "peek")
        if outcome is None:
            raise CountersUnavailable("the counters did not answer")
        await self._log.flush()
        last_contact, log = await self._store.history(shop_id, person_id, log_limit)
        return History(_counts(outcome), last_contact, log)

    async def fatigue_posture(self, shop_id: str) -> Posture:
        """How many customers sit at each fatigue score now, counted from the durable message
        log as a check counts them (this replica's decisions not yet written go there first)."""
        policy = await self.shop_policy(shop_id)
        await self._log.flush()
        now = self._clock()
        by_count = await self._store.customers_by_count(shop_id, now - FATIGUE_WINDOW)
        levels: Counter[int] = Counter()
        for messages, customers in by_count.items():
            levels[min(messages * FATIGUE_PER_MESSAGE, FATIGUE_MAX)] += customers
        return Posture(dict(sorted(levels.items())), policy.fatigue_threshold, now)

    async def erase(self, shop_id: str, person_id: str, dry_run: bool) -> dict[str, int]:
        """Removes what the gate holds about a customer (message log, releases, contact policy,
        counters) and leaves a tombstone policy that blocks every marketing message to them from
        then on, whatever policy is pushed later; returns what it removed, by table and
        "redis_keys". With `dry_run` it counts the same and changes nothing. Erasing again
        removes only what came since (the decisions logged meanwhile)."""
        # This replica's decisions not yet in the message log go there first, to be erased too.
        await self._log.flush()
        removed = await self._store.erase(shop_id, person_id, self._clock(), dry_run)
        # After the database: a rebuild that read the old policy before the erasure committed
        # finds the tombstone already in place (marked complete) and leaves it.
        keys = CustomerKeys.of(shop_id, person_id)
        removed["redis_keys"] = await self._counters.erase(keys, dry_run)
        return removed
