"""The profile's GDPR transactions: one person's erasure (tombstone and scrub at once) and the
reads of their export."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.profile.store import (
    Anchor,
    ConsentRow,
    CustomerRow,
    ErasedPersonRow,
    EventRow,
    GatePushRow,
    OrderRow,
    PersonAnchorRow,
    RefundRow,
    SummaryDueRow,
    SummaryRow,
    TagRow,
    WebhookRow,
    anchored,
)
from services.runtime.db import Rehearsal, dialect_of, hold_lock
from services.runtime.validation import json_value

# Deliveries still holding their body (processed ones keep none: see Webhooks).
HELD = ("pending", "dead")


@dataclass(frozen=True)
class Subject:
    """Who is erased: the person (root and merged members), the anchors their facts carry, and
    what their personal data looks like in a delivery's body."""

    shop_id: str
    person_id: str
    members: list[str]
    anchors: list[Anchor]
    mentioned_in: Callable[[Any], bool]
    hide: Callable[[str], str]
    """The stand-in of a customer record key made of an identifier (a Custobar record's)."""

    @property
    def tombstone(self) -> Anchor:
        return ("person", self.person_id)


class GdprStore:
    """Erasure in one transaction, and the reads of a person's export."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def erase(
        self, subject: Subject, order_ids: Sequence[str], now: datetime, dry_run: bool
    ) -> dict[str, int]:
        """Tombstones the person and scrubs what the profile holds of them, in one transaction
        (with dry_run, the same transaction rolled back); returns the rows touched by table.
        Facts stay, under the person's id only, so the shop's totals do not change."""
        try:
            async with self._sessions.begin() as session:
                counts = await _erase(session, subject, order_ids, now)
                if dry_run:
                    raise Rehearsal(counts)
                return counts
        except Rehearsal as rehearsal:
            return dict(rehearsal.result)

    async def names(self, shop_id: str, anchors: Sequence[Anchor]) -> list[tuple[str, str]]:
        """The full names (first, last) the person's customer records give."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(CustomerRow.first_name, CustomerRow.last_name).where(
                    CustomerRow.shop_id == shop_id, anchored(CustomerRow, anchors)
                )
            )
            return [(first, last) for first, last in rows if first and last]

    async def export(self, shop_id: str, anchors: Sequence[Anchor]) -> dict[str, list[Any]]:
        """Every order, refund, event, opt-in and customer record under the anchors."""
        async with self._sessions() as session:
            orders = list(
                await session.scalars(
                    select(OrderRow)
                    .where(OrderRow.shop_id == shop_id, anchored(OrderRow, anchors))
                    .order_by(OrderRow.placed_at, OrderRow.order_id)
                )
            )
            refunds = await session.scalars(
                select(RefundRow)
                .where(
                    RefundRow.shop_id == shop_id,
                    RefundRow.order_id.in_([o.order_id for o in orders]),
                )
                .order_by(RefundRow.refunded_at, RefundRow.refund_id)
            )
            events = await session.scalars(
                select(EventRow)
                .where(EventRow.shop_id == shop_id, anchored(EventRow, anchors))
                .order_by(EventRow.at, EventRow.event_id)
            )
            consents = await session.scalars(
                select(ConsentRow)
                .where(ConsentRow.shop_id == shop_id, anchored(ConsentRow, anchors))
                .order_by(ConsentRow.at, ConsentRow.consent_id)
            )
            customers = await session.scalars(
                select(CustomerRow)
                .where(CustomerRow.shop_id == shop_id, anchored(CustomerRow, anchors))
                .order_by(CustomerRow.source, CustomerRow.source_id)
            )
            return {
                "orders": [
                    {"order_id": o.order_id, "placed_at": o.placed_at, "total": o.total,
                     "currency": o.currency, "source": o.source, "location": o.location,
                     "cancelled": o.cancelled, "line_items": o.line_items}
                    for o in orders
                ],
                "refunds": [
                    {"refund_id": r.refund_id, "order_id": r.order_id, "amount": r.amount,
                     "refunded_at": r.refunded_at, "is_return": r.is_return}
                    for r in refunds
                ],
                "events": [
                    {"event_id": e.event_id, "kind": e.kind, "channel": e.channel, "at": e.at}
                    for e in events
                ],
                "consents": [
                    {"channel": c.channel, "granted": c.granted, "consent_text": c.consent_text,
                     "source": c.source, "at": c.at}
                    for c in consents
                ],
                "customer_records": [
                    {"source": c.source, "source_id": c.source_id, "first_name": c.first_name,
                     "last_name": c.last_name, "tags": c.tags, "attributes": c.attributes,
                     "updated_at": c.updated_at}
                    for c in customers
                ],
            }  # fmt: skip


async def _erase(
    session: AsyncSession, subject: Subject, order_ids: Sequence[str], now: datetime
) -> dict[str, int]:
    shop_id, persons = subject.shop_id, [subject.person_id, *subject.members]
    counts: dict[str, int] = {}

    async def run(table: str, statement: Any) -> None:
        result = await session.execute(statement)
        counts[table] = counts.get(table, 0) + int(getattr(result, "rowcount", 0))

    # A summary being saved meanwhile finishes first, or sees the tombstone (see save_summary).
    await hold_lock(session, "person", shop_id, subject.person_id)
    insert = dialect_of(session).insert(ErasedPersonRow)
    await run(
        "erased_person",
        insert.values(shop_id=shop_id, person_id=subject.person_id, erased_at=now)
        .on_conflict_do_nothing(),
    )  # fmt: skip
    identifiers = [a for a in subject.anchors if a[0] != "person"]
    await run(
        "consent_fact",
        delete(ConsentRow).where(
            ConsentRow.shop_id == shop_id,
            anchored(ConsentRow, [*subject.anchors, subject.tombstone]),
        ),
    )
    for table, model in (("order_fact", OrderRow), ("event_fact", EventRow)):
        await run(
            table,
            update(model)
            .where(model.shop_id == shop_id, anchored(model, identifiers))
            .values(anchor_type="person", anchor_key=subject.person_id),
        )
    if order_ids:
        await run(
            "order_fact",
            update(OrderRow)
            .where(
                OrderRow.shop_id == shop_id,
                OrderRow.order_id.in_(order_ids),
                OrderRow.anchor_type != "person",
            )
            .values(anchor_type="person", anchor_key=subject.person_id),
        )
    keyed = await session.scalars(
        select(CustomerRow).where(
            CustomerRow.shop_id == shop_id,
            anchored(CustomerRow, [*subject.anchors, subject.tombstone]),
            CustomerRow.source == "custobar",
            CustomerRow.forgotten.is_(False),
        )
    )
    for row in keyed:
        row.source_id = subject.hide(row.source_id)
    await session.flush()
    await run(
        "customer_fact",
        update(CustomerRow)
        .where(
            CustomerRow.shop_id == shop_id,
            anchored(CustomerRow, [*subject.anchors, subject.tombstone]),
            CustomerRow.forgotten.is_(False),
        )
        .values(
            anchor_type="person", anchor_key=subject.person_id, first_name="", last_name="",
            tags=[], attributes={"is_forgotten": True}, forgotten=True,
        ),
    )  # fmt: skip
    keyed_by_person: tuple[tuple[str, Any], ...] = (
        ("person_summary", SummaryRow), ("person_tag", TagRow), ("person_anchor", PersonAnchorRow),
        ("gate_push", GatePushRow), ("summary_due", SummaryDueRow),
    )  # fmt: skip
    for table, keyed_model in keyed_by_person:
        await run(
            table,
            delete(keyed_model).where(
                keyed_model.shop_id == shop_id, keyed_model.person_id.in_(persons)
            ),
        )
    held = await session.execute(
        select(WebhookRow.id, WebhookRow.body).where(
            WebhookRow.shop_id == shop_id, WebhookRow.state.in_(HELD)
        )
    )
    mentioning = [row_id for row_id, body in held if subject.mentioned_in(_parsed(body))]
    counts["webhook_inbox"] = 0
    if mentioning:
        await run(
            "webhook_inbox",
            update(WebhookRow)
            .where(WebhookRow.id.in_(mentioning))
            .values(body=b"", state="erased", error=None),
        )
    return counts


def _parsed(body: bytes) -> Any:
    try:
        return json_value(body)
    except ValueError:
        return body.decode("utf-8", "replace")
