"""Audiences: persons' summaries kept current, segments evaluated in the database, the change
feed, the datasource exports, loyalty standing and trait lookups."""

import asyncio
import csv
import io
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from services.profile import loyalty, segments
from services.profile.audience_store import AudienceStore, Refreshed
from services.profile.loyalty import Earning, Programme, Standing
from services.profile.peers import GatePeer, Group, IdentityPeer
from services.profile.profiles import Profile, assemble
from services.profile.store import (
    ChangeRow,
    ProfileStore,
    SegmentRow,
    SignalRow,
    SummaryDueRow,
    SummaryRow,
    earning,
)
from services.runtime.db import utc
from services.runtime.errors import AlreadyExists, InvalidArgument, NotFound, PeerRejected
from services.runtime.worker import Worker

log = logging.getLogger(__name__)

REFRESH_BATCH = 200
REPEAT_DAYS_KEPT = 12
REFRESH_IN_FLIGHT = 16
FEED_BATCH = 1000
GATE_BATCH = 1000
EXPORT_CHUNK = 64 * 1024
CHANNELS = ("email", "sms", "whatsapp", "push")
# Every kind of change the change feed carries.
CHANGE_KINDS = frozenset(
    {"lifecycle_stage_changed", "churn_risk_crossed", "consent_changed", "merged", "unmerged",
     "replenishment_due", "gdpr_erasure"}
)  # fmt: skip
# Churn risk crossing one of these (either way) goes on the change feed.
CHURN_THRESHOLDS = (0.5, 0.7)

CRM360_FIELDS = (
    "customer_id", "email", "lifecycle_stage", "purchase_count", "last_purchase_date",
    "first_purchase_date", "total_spend", "average_basket", "preferred_category", "locale",
    "channel_preferences", "loyalty_member", "app_installed", "churn_score", "segment",
)  # fmt: skip
LOYALTY_FIELDS = (
    "customer_id", "member", "tier", "points_balance", "points_to_next_tier", "next_tier",
    "tier_benefits", "points_expiration_date", "points_expiring", "member_since",
    "lifetime_points",
)  # fmt: skip


@dataclass(frozen=True)
class Signals:
    """Enrichment's results for one person, as it hands them over."""

    person_id: str
    lifecycle_stage: str
    rfm: tuple[int, int, int] | None
    churn_risk: float | None
    engagement: float | None
    predictions: dict[str, Any]


def product_key(item: dict[str, Any]) -> str:
    """What identifies a line item's product: its product id, else its SKU, else its title."""
    return str(item.get("product_id") or item.get("sku") or item.get("title") or "")


def repeat_products(purchases: Sequence[tuple[datetime, list[Any]]]) -> dict[str, list[int]]:
    """Products bought on two or more days: their purchase days (days since 1970-01-01 UTC,
    ascending, the last REPEAT_DAYS_KEPT of them)."""
    days: dict[str, set[int]] = {}
    for placed_at, order_items in purchases:
        day = int(utc(placed_at).timestamp() // 86400)
        for item in order_items or []:
            if key := product_key(item):
                days.setdefault(key, set()).add(day)
    return {k: sorted(v)[-REPEAT_DAYS_KEPT:] for k, v in sorted(days.items()) if len(v) > 1}


def summary_of(
    profile: Profile, purchases: Sequence[tuple[datetime, list[Any]]], standing: Standing
) -> dict[str, Any]:
    """A person's summary columns from their assembled profile and the line items of their
    live orders."""
    p = profile.purchases
    emails = [value for type_, value, _ in profile.group.identifiers if type_ == "email"]
    granted = {s.channel for s in profile.consents if s.granted}
    categories: Counter[str] = Counter()
    for _, order_items in purchases:
        for item in order_items or []:
            if item.get("category"):
                categories[item["category"]] += int(item.get("quantity") or 1)
    push_engaged = any(channel == "push" for channel, _, _, _ in profile.engagement)
    locale = profile.attributes.get("locale") or profile.attributes.get("language") or ""
    return {
        "email": emails[0] if emails else "",
        "first_name": profile.name[0],
        "locale": str(locale)[:35],
        "currency": p.currency,
        "order_count": p.order_count,
        "spend": p.lifetime_spend,
        "aov": p.average_order_value,
        "first_order_at": p.first_order_at,
        "last_order_at": p.last_order_at,
        "acquisition": p.acquisition_channel,
        "online_orders": p.by_source.get("online", 0),
        "pos_orders": p.by_source.get("pos", 0),
        "marketplace_orders": p.by_source.get("marketplace", 0),
        "location": p.preferred_location,
        # Most items bought; ties go to the first name in alphabetical order.
        "preferred_category": min(categories, key=lambda c: (-categories[c], c))
        if categories
        else "",
        **{f"consent_{c}": c in granted and not profile.global_unsubscribe for c in CHANNELS},
        "unsubscribed": profile.global_unsubscribe,
        "app_installed": "push" in granted or push_engaged,
        "loyalty_member": standing.member,
        "lifetime_points": standing.lifetime_points,
        "tier": standing.tier,
        "repeat_products": repeat_products(purchases),
    }


def _day(instant: datetime | None) -> str | None:
    return instant.date().isoformat() if instant else None


def crm360(row: SummaryRow, signal: SignalRow | None, segment: str) -> dict[str, Any]:
    """The CRM 360 datasource record (seed 000) of a person."""
    return {
        "customer_id": row.person_id,
        "email": row.email,
        "lifecycle_stage": signal.lifecycle_stage if signal else None,
        "purchase_count": row.order_count,
        "last_purchase_date": _day(row.last_order_at),
        "first_purchase_date": _day(row.first_order_at),
        "total_spend": float(row.spend),
        "average_basket": float(row.aov),
        "preferred_category": row.preferred_category,
        "locale": row.locale,
        "channel_preferences": {c: bool(getattr(row, f"consent_{c}")) for c in CHANNELS},
        "loyalty_member": row.loyalty_member,
        "app_installed": row.app_installed,
        "churn_score": signal.churn_risk if signal else None,
        "segment": segment,
    }


def loyalty_record(person_id: str, standing: Standing) -> dict[str, Any]:
    """The Loyalty Programme datasource record (seed 001) of a member."""
    return {
        "customer_id": person_id,
        "member": standing.member,
        "tier": standing.tier,
        "points_balance": standing.points_balance,
        "points_to_next_tier": standing.points_to_next_tier,
        "next_tier": standing.next_tier,
        "tier_benefits": standing.benefits,
        "points_expiration_date": standing.points_expiration_date.isoformat()
        if standing.points_expiration_date
        else None,
        "points_expiring": standing.points_expiring,
        "member_since": _day(standing.member_since),
        "lifetime_points": standing.lifetime_points,
    }


class Encoder:
    """Records to JSON lines or CSV bytes (objects and arrays as JSON in their cell, booleans
    as true/false, null as an empty cell)."""

    def __init__(self, fields: Sequence[str], as_csv: bool) -> None:
        self._fields = fields
        self._csv = as_csv
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\n")
        if as_csv:
            self._writer.writerow(fields)

    def add(self, record: dict[str, Any]) -> None:
        if not self._csv:
            self._buffer.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            self._buffer.write("\n")
            return
        self._writer.writerow([_cell(record[name]) for name in self._fields])

    def take(self, at_least: int = 0) -> bytes:
        if self._buffer.tell() < at_least:
            return b""
        data = self._buffer.getvalue().encode()
        self._buffer.seek(0)
        self._buffer.truncate()
        return data


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _newer(stored: datetime | None, incoming: datetime | None) -> bool:
    """Whether stored signals come from a newer model than incoming ones (none is oldest)."""
    return stored is not None and (incoming is None or utc(stored) > incoming)


def feed_changes(
    shop_id: str, before: SignalRow | None, after: Signals, now: datetime
) -> list[dict[str, Any]]:
    """The change feed entries a new set of signals makes."""
    changes = []

    def add(kind: str, data: dict[str, Any]) -> None:
        changes.append(
            {"shop_id": shop_id, "person_id": after.person_id, "kind": kind, "data": data,
             "at": now}
        )  # fmt: skip

    old_stage = before.lifecycle_stage if before else ""
    if after.lifecycle_stage and after.lifecycle_stage != old_stage:
        add("lifecycle_stage_changed", {"from": old_stage, "to": after.lifecycle_stage})
    old_risk = before.churn_risk if before else None
    if after.churn_risk is not None:
        for threshold in CHURN_THRESHOLDS:
            was_above = old_risk is not None and old_risk >= threshold
            if was_above != (after.churn_risk >= threshold):
                add(
                    "churn_risk_crossed",
                    {"threshold": threshold, "from": old_risk, "to": after.churn_risk,
                     "direction": "up" if after.churn_risk >= threshold else "down"},
                )  # fmt: skip
    old_due = set(before.predictions.get("products_due", [])) if before else set()
    new_due = set(after.predictions.get("products_due", []))
    if new_due - old_due:
        add("replenishment_due", {"products": sorted(new_due - old_due)})
    return changes


class Audiences:
    """Summaries, segments, the change feed, exports, loyalty and traits of the profile."""

    def __init__(
        self,
        store: AudienceStore,
        facts: ProfileStore,
        identity: IdentityPeer,
        gate: GatePeer,
        clock: Callable[[], datetime],
        refresh_interval: float = 0.5,
        feed_poll_interval: float = 0.1,
    ) -> None:
        self._store = store
        self._facts = facts
        self._identity = identity
        self._gate = gate
        self._clock = clock
        self._feed_poll = feed_poll_interval
        self._refresher = Worker("summaries", self.refresh_due, refresh_interval)

    # --- summaries ------------------------------------------------------------------------------

    async def refresh_due(self) -> int:
        """Refreshes the summaries of persons whose facts or grouping changed, REFRESH_BATCH at
        a time: their groups asked of identity in one call a shop (one call a person when
        identity refuses that one), each summary built on its own (REFRESH_IN_FLIGHT at once),
        all saved by one transaction; returns how many it refreshed."""
        limit = asyncio.Semaphore(REFRESH_IN_FLIGHT)

        async def one(due: SummaryDueRow, group: Group | None, alone: bool) -> Refreshed | None:
            async with limit:
                try:
                    return await self._refresh(due, await self._group(due) if alone else group)
                except Exception as exc:
                    log.warning("summary refresh failed", extra={"error": type(exc).__name__})
                    return None

        shops: dict[str, list[SummaryDueRow]] = {}
        for row in await self._store.due_summaries(REFRESH_BATCH):
            shops.setdefault(row.shop_id, []).append(row)
        work = []
        for shop_id, rows in shops.items():
            try:
                groups = await self._identity.groups(shop_id, [row.person_id for row in rows])
            except PeerRejected:  # an id identity refuses holds back only itself
                work += [one(row, None, alone=True) for row in rows]
                continue
            except Exception as exc:  # these stay due: the next round asks again
                log.warning("summary refresh failed", extra={"error": type(exc).__name__})
                continue
            work += [one(row, group, alone=False) for row, group in zip(rows, groups, strict=True)]
        built = [found for found in await asyncio.gather(*work) if found]
        if built:
            await self._store.save_summaries(built)
        return len(built)

    async def _group(self, due: SummaryDueRow) -> Group | None:
        """A person's group asked on its own; None when identity does not know them."""
        try:
            return await self._identity.group(due.shop_id, due.person_id)
        except PeerRejected as rejected:
            if rejected.code.name != "NOT_FOUND":
                raise
            return None

    async def _refresh(self, due: SummaryDueRow, group: Group | None) -> Refreshed:
        """A person's summary from their group (None: identity does not know them)."""
        if group is None or group.erased:
            return Refreshed(due, due.person_id, [], [], None, [])
        # One statement for the facts, the erased check, the programme, the ledger and the
        # line items.
        picture = await self._facts.picture(
            due.shop_id, group.person_id, group.anchors, purchases=True
        )
        if picture.erased:
            return Refreshed(due, due.person_id, [], [], None, [])
        profile = assemble(due.shop_id, group, picture.facts, None)
        standing = loyalty.standing(picture.programme, picture.ledger, self._clock())
        summary = summary_of(profile, picture.purchases, standing)
        summary["updated_at"] = self._clock()
        gone = [m for m in {*group.members, due.person_id} if m != group.person_id]
        return Refreshed(due, group.person_id, gone, group.anchors, summary, profile.tags)

    async def standing(self, shop_id: str, group: Group) -> Standing:
        programme = await self._store.programme(shop_id)
        if programme is None:
            return Standing()
        ledger = await self._store.ledger(shop_id, group.anchors)
        return loyalty.standing(programme, ledger, self._clock())

    # --- signals --------------------------------------------------------------------------------

    async def signals(self, shop_id: str, person_id: str) -> SignalRow | None:
        return await self._store.signals(shop_id, person_id)

    async def put_signals(
        self, shop_id: str, signals: Sequence[Signals], model_fitted_at: datetime | None
    ) -> int:
        """Stores enrichment's results, except over a person's signals from a newer model (a
        daily run and the follower can race); a changed stage, a churn risk crossing a threshold
        and newly due products go on the change feed. Returns how many changes that made."""
        now = self._clock()

        def write(
            before: dict[str, SignalRow],
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            rows, changes = [], []
            for s in signals:
                old = before.get(s.person_id)
                if old is not None and _newer(old.model_fitted_at, model_fitted_at):
                    continue
                changes += feed_changes(shop_id, old, s, now)
                r, f, m = s.rfm if s.rfm else (None, None, None)
                rows.append(
                    {"person_id": s.person_id, "lifecycle_stage": s.lifecycle_stage, "rfm_r": r,
                     "rfm_f": f, "rfm_m": m, "churn_risk": s.churn_risk,
                     "engagement": s.engagement, "predictions": s.predictions,
                     "model_fitted_at": model_fitted_at, "computed_at": now}
                )  # fmt: skip
            return rows, changes

        return await self._store.put_signals(shop_id, [s.person_id for s in signals], write)

    # --- segments -------------------------------------------------------------------------------

    async def create_segment(self, shop_id: str, name: str, text: str) -> SegmentRow:
        try:
            query = segments.members(text, shop_id, self._clock())
        except segments.FilterError as bad:
            raise InvalidArgument([("filter", str(bad))]) from bad
        now = self._clock()
        row = SegmentRow(
            segment_id=secrets.token_hex(16), shop_id=shop_id, name=name, filter=text,
            member_count=await self._store.count(query), created_at=now,
        )  # fmt: skip
        if not await self._store.add_segment(row):
            raise AlreadyExists(f"the shop has a segment named {name!r} already")
        return row

    async def list_segments(self, shop_id: str) -> list[SegmentRow]:
        return await self._store.segments(shop_id)

    async def _segment(self, shop_id: str, segment_id: str) -> SegmentRow:
        row = await self._store.segment(shop_id, segment_id)
        if row is None:
            raise NotFound("segment", segment_id)
        return row

    async def members(
        self, shop_id: str, segment_id: str, allowed_on: str
    ) -> AsyncIterator[list[str]]:
        """The members of a segment now, in batches; with `allowed_on`, only those the gate
        would let a marketing message through to on that channel now."""
        row = await self._segment(shop_id, segment_id)
        query = segments.members(row.filter, shop_id, self._clock())
        count = 0
        async for batch in self._store.stream(query):
            ids = [person_id for (person_id,) in batch]
            count += len(ids)
            if allowed_on:
                ids = await self._allowed(shop_id, ids, allowed_on)
            if ids:
                yield ids
        await self._store.counted(segment_id, count)

    async def _allowed(self, shop_id: str, person_ids: list[str], channel: str) -> list[str]:
        kept = []
        for start in range(0, len(person_ids), GATE_BATCH):
            part = person_ids[start : start + GATE_BATCH]
            answers = await self._gate.allowed(shop_id, part, channel)
            kept += [p for p, ok in zip(part, answers, strict=True) if ok]
        return kept

    # --- the change feed ------------------------------------------------------------------------

    async def watch(
        self, shop_id: str, after: int, kinds: Sequence[str]
    ) -> AsyncIterator[ChangeRow]:
        """The shop's changes after a cursor, then each new one as it commits, until the caller
        goes away."""
        while True:
            rows = await self._store.changes(shop_id, after, kinds, FEED_BATCH)
            for row in rows:
                yield row
            if rows:
                after = rows[-1].seq
            if len(rows) < FEED_BATCH:
                await asyncio.sleep(self._feed_poll)

    # --- exports --------------------------------------------------------------------------------

    async def export(
        self, shop_id: str, dataset: str, as_csv: bool, segment_id: str
    ) -> AsyncIterator[bytes]:
        """A datasource file in chunks that concatenate to it."""
        persons = None
        segment_name = ""
        if segment_id:
            row = await self._segment(shop_id, segment_id)
            persons, segment_name = segments.members(row.filter, shop_id, self._clock()), row.name
        if dataset == "crm360":
            encoder = Encoder(CRM360_FIELDS, as_csv)
            records = self._crm360(shop_id, persons, segment_name)
        else:
            encoder = Encoder(LOYALTY_FIELDS, as_csv)
            records = self._loyalty(shop_id, persons)
        async for record in records:
            encoder.add(record)
            if chunk := encoder.take(EXPORT_CHUNK):
                yield chunk
        if chunk := encoder.take():
            yield chunk

    async def _crm360(
        self, shop_id: str, persons: Any, segment_name: str
    ) -> AsyncIterator[dict[str, Any]]:
        query = (
            select(SummaryRow, SignalRow)
            .outerjoin(
                SignalRow,
                (SignalRow.shop_id == SummaryRow.shop_id)
                & (SignalRow.person_id == SummaryRow.person_id),
            )
            .where(SummaryRow.shop_id == shop_id)
            .order_by(SummaryRow.person_id)
        )
        if persons is not None:
            query = query.where(SummaryRow.person_id.in_(persons.order_by(None)))
        async for batch in self._store.stream(query):
            for summary, signal in batch:
                yield crm360(summary, signal, segment_name)

    async def _loyalty(self, shop_id: str, persons: Any) -> AsyncIterator[dict[str, Any]]:
        programme = await self._store.programme(shop_id)
        if programme is None:
            return
        now = self._clock()
        current, entries = "", list[Earning]()
        async for batch in self._store.stream(self._store.ledgers(shop_id, persons)):
            for *row, person_id in batch:
                if person_id != current and entries:
                    yield loyalty_record(current, loyalty.standing(programme, entries, now))
                    entries = []
                current = person_id
                entries.append(earning(row))
        if entries:
            yield loyalty_record(current, loyalty.standing(programme, entries, now))

    # --- loyalty and traits ---------------------------------------------------------------------

    async def put_programme(self, shop_id: str, programme: Programme) -> None:
        await self._store.put_programme(shop_id, programme, self._clock())

    async def programme(self, shop_id: str) -> Programme | None:
        return await self._store.programme(shop_id)

    async def traits(
        self, shop_id: str, type_: str, value: str
    ) -> tuple[str, str, Standing] | None:
        """First name, lifecycle stage and loyalty of the person an identifier belongs to;
        None for an identifier nobody has. Read-only: creates nothing."""
        try:
            person_id = await self._identity.lookup(shop_id, type_, value)
            group = await self._identity.group(shop_id, person_id)
        except PeerRejected as rejected:
            if rejected.code.name in ("NOT_FOUND", "INVALID_ARGUMENT"):
                return None
            raise
        if group.erased or await self._facts.erased(shop_id, group.person_id):
            return None
        summary = await self._store.summary(shop_id, group.person_id)
        signal = await self._store.signals(shop_id, group.person_id)
        return (
            summary.first_name if summary else "",
            signal.lifecycle_stage if signal else "",
            await self.standing(shop_id, group),
        )

    def start(self) -> None:
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()
