"""The send-time gate: a check is one atomic step in the counter store, around which this module
brings the shop's policy, the customer's calendar, recovery from a lost Redis and the log."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry.metrics import Meter

from services.gate.counters import (
    CalendarRow,
    CheckArgs,
    ContactPolicy,
    Counters,
    CountersUnavailable,
    CustomerKeys,
    Outcome,
    from_ms,
    ms,
)
from services.gate.message_log import MessageLogWriter
from services.gate.rules import (
    FATIGUE_WINDOW,
    QUIET_HOURS_EXEMPT,
    ShopPolicy,
    Window,
    boundaries,
    format_fatigue,
)
from services.gate.store import Decided, GateStore, MessageLogRow, Released

Clock = Callable[[], datetime]
UNAVAILABLE = "gate_unavailable"


@dataclass(frozen=True)
class Counts:
    """A customer's counts as the gate saw them when deciding."""

    today_by_channel: dict[str, int] = field(default_factory=dict)
    today_total: int = 0
    last_window: int = 0
    fatigue: str = "0.00"


@dataclass(frozen=True)
class Decision:
    """The gate's answer for one message."""

    allowed: bool
    reason: str
    retryable: bool
    next_eligible_at: datetime | None
    counts: Counts
    replayed: bool = False


@dataclass(frozen=True)
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
    log: list[MessageLogRow]


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
    ) -> None:
        self._counters = counters
        self._store = store
        self._log = log
        self._clock = clock
        self._shop_policy_ttl = shop_policy_ttl
        self._shop_policies: dict[str, tuple[float, ShopPolicy]] = {}
        # The zones each shop's customers use ("" = none of their own), learnt from contact
        # policies and checks; every check carries the calendar of all of them.
        self._zones: dict[str, list[str]] = {}
        self._calendars: dict[tuple[str, bool], tuple[int, ShopPolicy, int, list[CalendarRow]]] = {}
        self._decisions = meter.create_counter(
            "c360.gate.decisions",
            unit="{decision}",
            description="Gate decisions by outcome (allowed or the reason's kind) and channel.",
        )

    async def shop_policy(self, shop_id: str) -> ShopPolicy:
        """The shop's policy, cached for a few seconds (every replica sees a change within)."""
        cached = self._shop_policies.get(shop_id)
        if cached is not None and time.monotonic() - cached[0] < self._shop_policy_ttl:
            return cached[1]
        policy = shop_policy_from_document(await self._store.shop_policy(shop_id))
        self._shop_policies[shop_id] = (time.monotonic(), policy)
        return policy

    async def put_shop_policy(self, shop_id: str, document: dict[str, Any]) -> None:
        """Replaces the shop's policy; this replica applies it at once, others within the TTL."""
        await self._store.put_shop_policy(shop_id, document, self._clock())
        self._shop_policies.pop(shop_id, None)

    async def put_contact_policy(self, shop_id: str, person_id: str, policy: ContactPolicy) -> None:
        """Stores a customer's policy durably, then in the counters: the next check sees it."""
        await self._store.put_contact_policy(shop_id, person_id, policy, self._clock())
        try:
            await self._counters.put_policy(CustomerKeys.of(shop_id, person_id), policy)
        except CountersUnavailable:
            raise ConnectionError("the gate's counter store is unavailable") from None
        self._learn_zone(shop_id, policy.time_zone)

    def _learn_zone(self, shop_id: str, zone: str) -> None:
        zones = self._zones.setdefault(shop_id, [""])
        if zone not in zones:
            zones.append(zone)

    def _calendar(
        self, shop_id: str, policy: ShopPolicy, now: datetime, channel: str
    ) -> list[CalendarRow]:
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
        self._calendars[(shop_id, exempt)] = (minute, policy, len(zones), rows)
        return rows

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

    async def _rebuild(self, shop_id: str, person_id: str, now: datetime) -> None:
        """Restores a customer Redis does not know (lost, or never seen) from the durable data."""
        await self._log.flush()
        policy = await self._store.contact_policy(shop_id, person_id) or ContactPolicy()
        reservations = await self._store.reservations_since(
            shop_id, person_id, now - FATIGUE_WINDOW
        )
        await self._counters.rebuild(
            CustomerKeys.of(shop_id, person_id),
            policy,
            [(message_id, channel, ms(at)) for message_id, channel, at in reservations],
        )

    async def _settle(
        self, request: Request, policy: ShopPolicy, now: datetime, mode: str, outcome: Outcome
    ) -> Outcome:
        """Retries a check whose first round trip found a lost customer or another time zone."""
        keys = CustomerKeys.of(request.shop_id, request.person_id)
        for _ in range(3):
            if outcome.status == "REBUILD":
                await self._rebuild(request.shop_id, request.person_id, now)
            elif outcome.status == "TZ":
                self._learn_zone(request.shop_id, outcome.reason)
            else:
                return outcome
            outcome = await self._counters.check(keys, self._args(request, policy, now, mode))
        raise CountersUnavailable(f"check did not settle: {outcome.status}")

    def _decision(self, request: Request, now: datetime, outcome: Outcome) -> Decision:
        if outcome.log_entry:
            self._log.record(
                Decided(
                    request.shop_id,
                    request.person_id,
                    outcome.log_entry,
                    request.message_id,
                    request.channel,
                    request.transactional,
                    outcome.allowed,
                    outcome.reason,
                    now,
                ),
            )
        retry_at = from_ms(outcome.retry_at_ms) if outcome.retry_at_ms else None
        self._count(request, outcome.reason)
        return Decision(
            allowed=outcome.allowed,
            reason=outcome.reason,
            retryable=retry_at is not None,
            next_eligible_at=retry_at,
            counts=_counts(outcome),
            replayed=outcome.status == "REPLAY",
        )

    def _count(self, request: Request, reason: str) -> None:
        self._decisions.add(
            1,
            {
                "channel": request.channel,
                "outcome": reason.split(":", 1)[0] if reason else "allowed",
                "message_class": "transactional" if request.transactional else "marketing",
            },
        )

    async def check(self, request: Request) -> Decision:
        """Decides on one message and, when allowed (and not a dry run), reserves it."""
        mode = "dry" if request.dry_run else "check"
        try:
            policy = await self.shop_policy(request.shop_id)
            now = self._clock()
            keys = CustomerKeys.of(request.shop_id, request.person_id)
            outcome = await self._counters.check(keys, self._args(request, policy, now, mode))
            outcome = await self._settle(request, policy, now, mode, outcome)
        except CountersUnavailable:
            self._count(request, UNAVAILABLE)
            return _unavailable()
        return self._decision(request, now, outcome)

    async def check_batch(self, requests: Sequence[Request]) -> list[Decision]:
        """Decides on many messages in pipelined round trips; each exactly as `check` would."""
        if not requests:
            return []
        try:
            policy = await self.shop_policy(requests[0].shop_id)
            now = self._clock()
            mode = "dry" if requests[0].dry_run else "check"
            outcomes = await self._counters.check_many(
                [
                    (CustomerKeys.of(r.shop_id, r.person_id), self._args(r, policy, now, mode))
                    for r in requests
                ]
            )
            settled = [
                await self._settle(r, policy, now, mode, o)
                for r, o in zip(requests, outcomes, strict=True)
            ]
        except CountersUnavailable:
            for request in requests:
                self._count(request, UNAVAILABLE)
            return [_unavailable() for _ in requests]
        return [self._decision(r, now, o) for r, o in zip(requests, settled, strict=True)]

    async def release(self, shop_id: str, person_id: str, message_id: str) -> bool:
        """Gives back the reservation of a message that never left."""
        now = self._clock()
        keys = CustomerKeys.of(shop_id, person_id)
        try:
            entry = await self._counters.release(keys, message_id, now)
        except CountersUnavailable:
            raise ConnectionError("the gate's counter store is unavailable") from None
        if not entry:
            return False
        self._log.record(Released(shop_id, person_id, entry, message_id, now))
        return True

    async def history(self, shop_id: str, person_id: str, log_limit: int) -> History:
        """Counts (from the counters), last contact per channel and the log (from the database)."""
        request = Request(shop_id, person_id, "email", "")
        try:
            policy = await self.shop_policy(shop_id)
            now = self._clock()
            keys = CustomerKeys.of(shop_id, person_id)
            outcome = await self._counters.check(keys, self._args(request, policy, now, "peek"))
            outcome = await self._settle(request, policy, now, "peek", outcome)
        except CountersUnavailable:
            raise ConnectionError("the gate's counter store is unavailable") from None
        await self._log.flush()
        last_contact = await self._store.last_contact(shop_id, person_id)
        log = await self._store.log(shop_id, person_id, log_limit) if log_limit else []
        return History(_counts(outcome), last_contact, log)
