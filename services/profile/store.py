"""The profile service's facts and the queries that assemble a profile from them.

Facts are immutable and keep the identifier they arrived with (their *anchor*: the record's
strongest identifier as the identity service matches it, or the person id a request named). A
profile is the facts whose anchors the identity service groups under one person, so merges and
unmerges regroup facts without rewriting any.
"""

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal_column,
    null,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column

from services.profile.loyalty import Earning, Programme, Tier
from services.runtime.db import append_to_outbox, dialect_of, utc

BIGINT = BigInteger().with_variant(Integer, "sqlite")
MONEY = Numeric(20, 4)
Anchor = tuple[str, str]


class Base(DeclarativeBase):
    """Tables of the profile service."""


class OrderRow(Base):
    """An order as of its newest version (`updated_at`)."""

    __tablename__ = "order_fact"
    __table_args__ = (
        Index("order_fact_anchor", "shop_id", "anchor_type", "anchor_key"),
        Index("order_fact_placed", "shop_id", "placed_at"),
    )
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    anchor_type: Mapped[str] = mapped_column(String(32))
    anchor_key: Mapped[str] = mapped_column(String(320))
    total: Mapped[Decimal] = mapped_column(MONEY)
    currency: Mapped[str] = mapped_column(String(3))
    source: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(String(256))
    cancelled: Mapped[bool] = mapped_column(Boolean)
    line_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RefundRow(Base):
    """A refund or return against an order (which may arrive after it)."""

    __tablename__ = "refund_fact"
    __table_args__ = (Index("refund_fact_order", "shop_id", "order_id"),)
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    refund_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(MONEY)
    refunded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    is_return: Mapped[bool] = mapped_column(Boolean)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EventRow(Base):
    """A storefront visit or a message engagement (open, click, reply, dismiss)."""

    __tablename__ = "event_fact"
    __table_args__ = (
        Index("event_fact_anchor", "shop_id", "anchor_type", "anchor_key"),
        Index("event_fact_at", "shop_id", "at"),
    )
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    anchor_type: Mapped[str] = mapped_column(String(32))
    anchor_key: Mapped[str] = mapped_column(String(320))
    kind: Mapped[str] = mapped_column(String(16))
    channel: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsentRow(Base):
    """A consent given or withdrawn on a channel, or a global unsubscribe (channel `all`)."""

    __tablename__ = "consent_fact"
    __table_args__ = (Index("consent_fact_anchor", "shop_id", "anchor_type", "anchor_key"),)
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # A digest of everything below: the same consent delivered twice is stored once.
    consent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    anchor_type: Mapped[str] = mapped_column(String(32))
    anchor_key: Mapped[str] = mapped_column(String(320))
    channel: Mapped[str] = mapped_column(String(16))
    granted: Mapped[bool] = mapped_column(Boolean)
    consent_text: Mapped[str] = mapped_column(String(4000))
    source: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class GatePushRow(Base):
    """A person whose contact policy the gate must be given (the consent outbox)."""

    __tablename__ = "gate_push"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # A consent change goes first; a regrouping after a merge may queue many people at once.
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)


class CustomerRow(Base):
    """A customer record of a source system (a Shopify customer, a Custobar upload) as of its
    newest version, with every attribute the source gave."""

    __tablename__ = "customer_fact"
    __table_args__ = (Index("customer_fact_anchor", "shop_id", "anchor_type", "anchor_key"),)
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(String(32), primary_key=True)
    source_id: Mapped[str] = mapped_column(String(400), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    anchor_type: Mapped[str] = mapped_column(String(32))
    anchor_key: Mapped[str] = mapped_column(String(320))
    first_name: Mapped[str] = mapped_column(String(256))
    last_name: Mapped[str] = mapped_column(String(256))
    tags: Mapped[list[str]] = mapped_column(JSON)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Removed from use for good (is_deleted); anonymised for good (is_forgotten).
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    forgotten: Mapped[bool] = mapped_column(Boolean, default=False)


class WebhookRow(Base):
    """A webhook delivery, stored before it is answered and processed after (the inbox); a
    delivery that keeps failing stays here as a dead letter."""

    __tablename__ = "webhook_inbox"
    __table_args__ = (
        UniqueConstraint("shop_id", "webhook_id", name="webhook_inbox_delivery"),
        Index("webhook_inbox_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    webhook_id: Mapped[str] = mapped_column(String(128))
    topic: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    triggered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # pending, done, dead
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(String(1000))
    first_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CursorRow(Base):
    """How far the profile has followed another service's change outbox."""

    __tablename__ = "follow_cursor"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)


class PersonAnchorRow(Base):
    """Which person an anchor belongs to now, as identity grouped it when the person's summary
    was last refreshed: what segments and exports join facts to persons through."""

    __tablename__ = "person_anchor"
    __table_args__ = (Index("person_anchor_person", "shop_id", "person_id"),)
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    anchor_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    anchor_key: Mapped[str] = mapped_column(String(320), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64))


class SummaryRow(Base):
    """One person's profile in columns (refreshed whenever their facts or grouping change):
    what segments filter on and exports read."""

    __tablename__ = "person_summary"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    first_name: Mapped[str] = mapped_column(String(256))
    locale: Mapped[str] = mapped_column(String(35))
    currency: Mapped[str] = mapped_column(String(3))
    order_count: Mapped[int] = mapped_column(Integer)
    spend: Mapped[Decimal] = mapped_column(MONEY)
    aov: Mapped[Decimal] = mapped_column(MONEY)
    first_order_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_order_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    acquisition: Mapped[str] = mapped_column(String(16))
    online_orders: Mapped[int] = mapped_column(Integer)
    pos_orders: Mapped[int] = mapped_column(Integer)
    marketplace_orders: Mapped[int] = mapped_column(Integer)
    location: Mapped[str] = mapped_column(String(256))
    preferred_category: Mapped[str] = mapped_column(String(256))
    consent_email: Mapped[bool] = mapped_column(Boolean)
    consent_sms: Mapped[bool] = mapped_column(Boolean)
    consent_whatsapp: Mapped[bool] = mapped_column(Boolean)
    consent_push: Mapped[bool] = mapped_column(Boolean)
    unsubscribed: Mapped[bool] = mapped_column(Boolean)
    app_installed: Mapped[bool] = mapped_column(Boolean)
    loyalty_member: Mapped[bool] = mapped_column(Boolean)
    lifetime_points: Mapped[int] = mapped_column(BIGINT)
    tier: Mapped[str] = mapped_column(String(64))
    repeat_products: Mapped[dict[str, list[int]]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TagRow(Base):
    """A tag of a person (from any of their customer records), for segments."""

    __tablename__ = "person_tag"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tag: Mapped[str] = mapped_column(String(256), primary_key=True)


class SignalRow(Base):
    """What the enrichment service computed for a person (absent until it has run)."""

    __tablename__ = "person_signal"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    lifecycle_stage: Mapped[str] = mapped_column(String(16))
    rfm_r: Mapped[int | None] = mapped_column(Integer)
    rfm_f: Mapped[int | None] = mapped_column(Integer)
    rfm_m: Mapped[int | None] = mapped_column(Integer)
    churn_risk: Mapped[float | None] = mapped_column(Float)
    engagement: Mapped[float | None] = mapped_column(Float)
    predictions: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_fitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Of the shop model that computed them (None: no fitted model yet)."""
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ErasedPersonRow(Base):
    """A person erased under GDPR: from the moment this row commits no read returns them, and
    their summary is never rebuilt."""

    __tablename__ = "erased_person"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SummaryDueRow(Base):
    """A person whose summary must be refreshed (their facts or their grouping changed)."""

    __tablename__ = "summary_due"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # How often it was asked for: a refresh settles the request it read only while this has not
    # moved (a time can repeat: two facts in one clock tick, or a record's own older time).
    requests: Mapped[int] = mapped_column(BigInteger, server_default="1")


class ChangeRow(Base):
    """The change feed: a transactional outbox, in commit order (see `append_to_outbox`)."""

    __tablename__ = "profile_change"
    __table_args__ = (Index("profile_change_shop", "shop_id", "seq"),)
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    person_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ActivityRow(Base):
    """Persons whose summary was rebuilt from changed facts, in commit order: what enrichment
    follows to keep lifecycle stages current (see `append_to_outbox`)."""

    __tablename__ = "person_activity"
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    person_id: Mapped[str] = mapped_column(String(64))


class SegmentRow(Base):
    """A segment: a named filter over profiles, evaluated in the database when read."""

    __tablename__ = "segment"
    __table_args__ = (UniqueConstraint("shop_id", "name", name="segment_name"),)
    segment_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    filter: Mapped[str] = mapped_column(String(2000))
    # As of the segment's last evaluation (its creation, or its last member stream).
    member_count: Mapped[int] = mapped_column(BIGINT)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProgrammeRow(Base):
    """A shop's loyalty programme."""

    __tablename__ = "loyalty_programme"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # [{"name", "threshold", "benefits"}], lowest threshold first.
    tiers: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    points_per_unit: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    expiry_days: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EarningRow(Base):
    """The loyalty ledger's terms for one order, fixed when the order first arrived under a
    programme: its rate and when its points expire. The points are the order's total net of
    its refunds and returns times the rate, rounded down, so a clawback is always against the
    original order and a replayed order or refund changes nothing."""

    __tablename__ = "loyalty_earning"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rate: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    earned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class OrderTotals:
    """Orders of one currency, source and location."""

    currency: str
    source: str
    location: str
    orders: int
    spend: Decimal
    first_at: datetime
    last_at: datetime


@dataclass(frozen=True)
class Facts:
    """What a profile is assembled from."""

    orders: list[OrderTotals]
    refunded: dict[str, Decimal]
    engagement: list[tuple[str, str, int, datetime]]
    consents: list[ConsentRow]
    customers: list[CustomerRow]


@dataclass(frozen=True)
class Picture:
    """What one read of the profile's tables returns (see `ProfileStore.picture`)."""

    facts: Facts
    erased: bool = False
    signals: SignalRow | None = None
    programme: Programme | None = None
    ledger: list[Earning] = field(default_factory=list)
    # When each live order was placed, and its line items (read for summaries only).
    purchases: list[tuple[datetime, list[Any]]] = field(default_factory=list)


def _earning(shop_id: str, order: dict[str, Any], programme: "ProgrammeRow") -> dict[str, Any]:
    """An order's loyalty terms under a programme: its rate, and when its points expire."""
    expiry = programme.expiry_days
    return {
        "shop_id": shop_id,
        "order_id": order["order_id"],
        "rate": programme.points_per_unit,
        "earned_at": order["placed_at"],
        "expires_at": order["placed_at"] + timedelta(days=expiry) if expiry else None,
    }


def earning(row: Sequence[Any]) -> Earning:
    """A ledger entry from (total, refunded, rate, earned_at, expires_at)."""
    total, refunded, rate, earned_at, expires_at = row
    return Earning(
        Decimal(total),
        Decimal(refunded),
        Decimal(rate),
        utc(earned_at),
        utc(expires_at) if expires_at else None,
    )


def programme_of(tiers: list[dict[str, Any]], points_per_unit: Any, expiry_days: int) -> Programme:
    """A loyalty programme from its stored row's columns."""
    return Programme(
        [Tier(t["name"], int(t["threshold"]), list(t["benefits"])) for t in tiers],
        Decimal(points_per_unit),
        expiry_days,
    )


# One read of a profile is one statement: a UNION ALL of small selects, each row tagged with
# its kind and its values in the columns below (NULL where a kind has none), so that the
# database is asked once and answers in one round trip. Core tables, not ORM entities: the rows
# are decoded by hand (`_picture`).
_SLOTS: list[tuple[str, Any]] = [
    ("a", String()), ("b", String()), ("c", String()), ("d", String()), ("n", BigInteger()),
    ("x", MONEY), ("y", Numeric(20, 6)), ("z", Numeric(20, 6)), ("t", DateTime(timezone=True)),
    ("u", DateTime(timezone=True)), ("flag", Boolean()), ("j", JSON()), ("k", JSON()),
    ("f", Float()),
]  # fmt: skip


def _tagged(kind: str, **values: Any) -> Any:
    """A select of one kind of row, its values in their slots."""
    columns = [literal_column(f"'{kind}'", String()).label("kind")]
    columns += [
        (values.pop(name) if name in values else cast(null(), type_)).label(name)
        for name, type_ in _SLOTS
    ]
    assert not values, f"no slot for {sorted(values)}"
    return select(*columns)


def _picture_statement(purchases: bool) -> Any:
    """The statement of `ProfileStore.picture`, with each live order's time and line items
    when `purchases`."""
    shop_id: Any = bindparam("shop_id")
    person_id: Any = bindparam("person_id")
    anchors: Any = bindparam("anchors", expanding=True)

    def of(table: Any) -> Any:
        return (table.c.shop_id == shop_id) & tuple_(table.c.anchor_type, table.c.anchor_key).in_(
            anchors
        )

    o, r, e = OrderRow.__table__, RefundRow.__table__, EventRow.__table__
    c, u = ConsentRow.__table__, CustomerRow.__table__
    x, s = ErasedPersonRow.__table__, SignalRow.__table__
    p, g = ProgrammeRow.__table__, EarningRow.__table__
    live = of(o) & o.c.cancelled.is_(False)
    mine = (
        select(o.c.order_id, o.c.currency, o.c.source, o.c.location, o.c.total, o.c.placed_at)
        .where(live)
        .cte("mine")
    )
    # What was refunded of each of their orders.
    refunds = (
        select(r.c.order_id, func.sum(r.c.amount).label("amount"))
        .where(r.c.shop_id == shop_id, r.c.order_id.in_(select(mine.c.order_id)))
        .group_by(r.c.order_id)
        .cte("refunds")
    )
    capped = case((refunds.c.amount > mine.c.total, mine.c.total), else_=refunds.c.amount)
    parts = [
        _tagged(
            "order", a=mine.c.currency, b=mine.c.source, c=mine.c.location, n=func.count(),
            x=func.sum(mine.c.total), t=func.min(mine.c.placed_at), u=func.max(mine.c.placed_at),
        ).group_by(mine.c.currency, mine.c.source, mine.c.location),
        # Refunds per currency, never more of an order than the order itself.
        _tagged("refunded", a=mine.c.currency, x=func.sum(capped))
        .select_from(mine.join(refunds, refunds.c.order_id == mine.c.order_id))
        .group_by(mine.c.currency),
        _tagged("event", a=e.c.channel, b=e.c.kind, n=func.count(), t=func.max(e.c.at))
        .where(of(e))
        .group_by(e.c.channel, e.c.kind),
        _tagged(
            "consent", a=c.c.channel, b=c.c.source, c=c.c.consent_id, d=c.c.consent_text,
            flag=c.c.granted, t=c.c.at,
        ).where(of(c)),
        _tagged(
            "customer", a=u.c.first_name, b=u.c.last_name, c=u.c.source, d=u.c.source_id,
            j=u.c.tags, k=u.c.attributes, t=u.c.updated_at,
        ).where(of(u), u.c.deleted.is_(False)),
        _tagged("erased").where(x.c.shop_id == shop_id, x.c.person_id == person_id),
        _tagged("signals", j=s.c.predictions, f=s.c.engagement).where(
            s.c.shop_id == shop_id, s.c.person_id == person_id
        ),
        _tagged("programme", j=p.c.tiers, y=p.c.points_per_unit, n=p.c.expiry_days).where(
            p.c.shop_id == shop_id
        ),
        # Their earning orders, with all that was refunded of each.
        _tagged(
            "ledger", x=mine.c.total, y=func.coalesce(refunds.c.amount, literal_column("0")),
            z=g.c.rate, t=g.c.earned_at, u=g.c.expires_at,
        ).select_from(
            mine.join(g, (g.c.shop_id == shop_id) & (g.c.order_id == mine.c.order_id))
            .outerjoin(refunds, refunds.c.order_id == mine.c.order_id)
        ),
    ]  # fmt: skip
    if purchases:
        parts.append(_tagged("purchase", t=o.c.placed_at, j=o.c.line_items).where(live))
    return union_all(*parts)


def _picture(rows: Sequence[Any]) -> Picture:
    """The rows of `_picture_statement`, decoded."""
    orders: list[OrderTotals] = []
    refunded: dict[str, Decimal] = {}
    engagement: list[tuple[str, str, int, datetime]] = []
    consents: list[ConsentRow] = []
    customers: list[CustomerRow] = []
    erased, signals, programme, ledger, purchases = False, None, None, [], []
    for kind, a, b, c, d, n, x, y, z, t, u, flag, j, k, f in rows:
        if kind == "order":
            orders.append(OrderTotals(a, b, c, n, x, utc(t), utc(u)))
        elif kind == "refunded":
            refunded[a] = x
        elif kind == "event":
            engagement.append((a, b, n, utc(t)))
        elif kind == "consent":
            consents.append(
                ConsentRow(
                    consent_id=c, channel=a, granted=flag, consent_text=d, source=b, at=utc(t)
                )
            )
        elif kind == "customer":
            customers.append(
                CustomerRow(
                    source=c, source_id=d, first_name=a, last_name=b, tags=j, attributes=k,
                    updated_at=utc(t),
                )
            )  # fmt: skip
        elif kind == "erased":
            erased = True
        elif kind == "signals":
            signals = SignalRow(predictions=j, engagement=f)
        elif kind == "programme":
            programme = programme_of(j, y, n)
        elif kind == "ledger":
            ledger.append(earning((x, y, z, t, u)))
        elif kind == "purchase":
            purchases.append((utc(t), j))
    # In the order the separate queries gave them: groups by their key, consents oldest first,
    # customer records oldest first.
    orders.sort(key=lambda o: (o.currency, o.source, o.location))
    engagement.sort(key=lambda e: (e[0], e[1]))
    consents.sort(key=lambda c: (c.at, c.consent_id))
    customers.sort(key=lambda c: (c.updated_at, c.source, c.source_id))
    facts = Facts(orders, refunded, engagement, consents, customers)
    return Picture(facts, erased, signals, programme, ledger, purchases)


def _postgres(session: AsyncSession) -> bool:
    return bool(session.get_bind().dialect.name == "postgresql")


def _array(values: Sequence[Any], type_: Any) -> Any:
    return cast(bindparam(None, list(values), type_=ARRAY(type_)), ARRAY(type_))


def _among(session: AsyncSession, column: Any, values: Sequence[Any]) -> Any:
    """`column` is one of `values`: on PostgreSQL one array parameter (the same statement
    whatever the number of values, prepared once), elsewhere an IN list."""
    if _postgres(session):
        return column == any_(_array(values, column.type))
    return column.in_(list(values))


def bulk_insert(session: AsyncSession, model: Any, rows: Sequence[dict[str, Any]]) -> Any:
    """An INSERT of many rows (every row with the keys of the first), for a conflict clause and
    RETURNING to be added. On PostgreSQL the rows travel as one array a column, unnested (one
    statement whatever the number of rows, a few parameters, prepared once); elsewhere as a
    multi-row VALUES."""
    insert = dialect_of(session).insert(model)
    if not _postgres(session):
        return insert.values(list(rows))
    table = model.__table__
    columns = list(rows[0])
    arrays = []
    for name in columns:
        type_ = table.c[name].type
        if isinstance(type_, JSON):  # as text, made JSON again in the select
            arrays.append(_array([json.dumps(row[name]) for row in rows], Text()))
        else:
            arrays.append(_array([row[name] for row in rows], type_))
    source = func.unnest(*arrays).table_valued(*columns).render_derived()
    values = [
        cast(source.c[name], JSON) if isinstance(table.c[name].type, JSON) else source.c[name]
        for name in columns
    ]
    return insert.from_select(columns, select(*values))


async def _request_push(
    session: AsyncSession, shop_id: str, person_id: str, now: datetime, urgent: bool
) -> None:
    """Queues a person's contact policy for the gate (once, however often it is asked)."""
    await _request_pushes(session, shop_id, [person_id], now, urgent)


async def _request_pushes(
    session: AsyncSession, shop_id: str, person_ids: Sequence[str], now: datetime, urgent: bool
) -> None:
    """Queues persons' contact policies for the gate (once, however often it is asked)."""
    if not person_ids:
        return
    push = bulk_insert(
        session,
        GatePushRow,
        [
            {"shop_id": shop_id, "person_id": person_id, "requested_at": now, "attempts": 0,
             "not_before": now, "urgent": urgent}
            for person_id in sorted(set(person_ids))
        ],
    )  # fmt: skip
    await session.execute(
        push.on_conflict_do_update(
            index_elements=["shop_id", "person_id"],
            set_={
                "requested_at": now,
                "attempts": 0,
                "not_before": now,
                "urgent": GatePushRow.urgent | push.excluded.urgent,
            },
        )
    )


async def _mark_due(session: AsyncSession, shop_id: str, person_id: str, now: datetime) -> None:
    """Asks for a person's summary to be refreshed (once, however often it is asked)."""
    await _mark_all_due(session, shop_id, [person_id], now)


async def _mark_all_due(
    session: AsyncSession, shop_id: str, person_ids: Sequence[str], now: datetime
) -> None:
    """Asks for persons' summaries to be refreshed (once each; "" is nobody)."""
    persons = sorted({person_id for person_id in person_ids if person_id})
    if not persons:
        return
    due = bulk_insert(
        session,
        SummaryDueRow,
        [{"shop_id": shop_id, "person_id": p, "requested_at": now} for p in persons],
    )
    await session.execute(
        due.on_conflict_do_update(
            index_elements=["shop_id", "person_id"],
            set_={
                "requested_at": due.excluded.requested_at,
                "requests": SummaryDueRow.requests + 1,
            },
        )
    )


def anchored(model: Any, anchors: Sequence[Anchor]) -> Any:
    """Rows of `model` anchored on any of these anchors."""
    return tuple_(model.anchor_type, model.anchor_key).in_(anchors)


def _consents_looked_up(shop_id: str, anchors: Sequence[Anchor]) -> Any:
    """On PostgreSQL: the consent rows of anchors given as two arrays (one statement whatever
    their number, prepared once), one index lookup an anchor. The lookup is LATERAL with OFFSET
    0 so that the planner cannot make it a join: as `IN (SELECT unnest ...)` it hashed every
    consent row of the shop."""
    types, keys = zip(*anchors, strict=True) if anchors else ((), ())
    arrays = func.unnest(_array(types, Text()), _array(keys, Text()))
    wanted = arrays.table_valued("t", "k").render_derived()
    one = aliased(
        ConsentRow,
        select(ConsentRow)
        .where(
            ConsentRow.shop_id == shop_id,
            ConsentRow.anchor_type == wanted.c.t,
            ConsentRow.anchor_key == wanted.c.k,
        )
        .offset(0)
        .lateral(),
    )
    return select(one).select_from(wanted).join(one, true())


def _change(
    shop_id: str, person_id: str, kind: str, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {"shop_id": shop_id, "person_id": person_id, "kind": kind, "data": data, "at": now}


class ProfileStore:
    """Writes of facts (idempotent) and the reads that assemble a profile."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def put_orders(
        self, shop_id: str, orders: Sequence[tuple[dict[str, Any], str]], now: datetime
    ) -> list[bool]:
        """Stores orders (their values, and the person each belongs to), each unless a version
        as new is stored or comes before it in `orders`; returns whether each was applied, as if
        they had been stored one after the other. The first time an order arrives under a
        loyalty programme its earning terms are fixed. One transaction, a few statements
        whatever the number of orders."""
        ids = sorted({values["order_id"] for values, _ in orders})
        async with self._sessions.begin() as session:
            stored = await session.execute(
                select(OrderRow.order_id, OrderRow.updated_at).where(
                    OrderRow.shop_id == shop_id, _among(session, OrderRow.order_id, ids)
                )
            )
            newest = {order_id: utc(at) for order_id, at in stored}
            newer: list[bool] = []
            first: dict[str, dict[str, Any]] = {}  # the first version applied of each order
            last: dict[str, dict[str, Any]] = {}  # and the last: the one that stays
            for values, _ in orders:
                order_id = values["order_id"]
                known = newest.get(order_id)
                newer.append(known is None or values["updated_at"] > known)
                if newer[-1]:
                    newest[order_id] = values["updated_at"]
                    first.setdefault(order_id, values)
                    last[order_id] = values
            if not last:
                return newer
            insert = bulk_insert(session, OrderRow, list(last.values()))
            written = set(
                await session.scalars(
                    insert.on_conflict_do_update(
                        index_elements=["shop_id", "order_id"],
                        set_={
                            k: insert.excluded[k]
                            for k in orders[0][0]
                            if k not in ("shop_id", "order_id")
                        },
                        where=OrderRow.updated_at < insert.excluded.updated_at,
                    ).returning(OrderRow.order_id)
                )
            )
            # A version as new stored meanwhile by another call: nothing of this one applied.
            applied = [
                is_newer and values["order_id"] in written
                for is_newer, (values, _) in zip(newer, orders, strict=True)
            ]
            programme = await session.get(ProgrammeRow, shop_id)
            if programme is not None and written:
                await session.execute(
                    bulk_insert(
                        session,
                        EarningRow,
                        [
                            _earning(shop_id, first[order_id], programme)
                            for order_id in sorted(written)
                        ],
                    ).on_conflict_do_nothing()
                )
            persons = [person for ok, (_, person) in zip(applied, orders, strict=True) if ok]
            await _mark_all_due(session, shop_id, persons, now)
            return applied

    async def put_customer(self, values: dict[str, Any], person_id: str, now: datetime) -> bool:
        """Stores a customer record unless a version as new is stored; returns whether it did."""
        async with self._sessions.begin() as session:
            insert = dialect_of(session).insert(CustomerRow).values(values)
            keys = ("shop_id", "source", "source_id")
            result = await session.execute(
                insert.on_conflict_do_update(
                    index_elements=list(keys),
                    set_={k: insert.excluded[k] for k in values if k not in keys},
                    where=CustomerRow.updated_at < insert.excluded.updated_at,
                )
            )
            applied = bool(getattr(result, "rowcount", 0))
            if applied:
                await _mark_due(session, values["shop_id"], person_id, now)
            return applied

    async def customer(self, shop_id: str, source: str, source_id: str) -> CustomerRow | None:
        async with self._sessions() as session:
            return await session.get(CustomerRow, (shop_id, source, source_id))

    async def replace_customer(self, values: dict[str, Any], person_id: str) -> None:
        """Writes a customer record whatever its version (an upload is always the newest)."""
        async with self._sessions.begin() as session:
            await session.merge(CustomerRow(**values))
            await _mark_due(session, values["shop_id"], person_id, values["updated_at"])

    async def newest_customer(
        self, shop_id: str, source: str, anchors: Sequence[Anchor]
    ) -> CustomerRow | None:
        """The newest record of a source under any of these anchors."""
        async with self._sessions() as session:
            return (
                await session.scalars(
                    select(CustomerRow)
                    .where(
                        CustomerRow.shop_id == shop_id,
                        CustomerRow.source == source,
                        anchored(CustomerRow, anchors),
                    )
                    .order_by(CustomerRow.updated_at.desc())
                    .limit(1)
                )
            ).first()

    async def scrub_customers(
        self, shop_id: str, anchor: Anchor, hide: Callable[[str], str]
    ) -> None:
        """Wipes the details of every customer record under an anchor; a key made of an
        identifier (a Custobar record's) is replaced by its hash."""
        async with self._sessions.begin() as session:
            rows = await session.scalars(
                select(CustomerRow).where(
                    CustomerRow.shop_id == shop_id,
                    CustomerRow.anchor_type == anchor[0],
                    CustomerRow.anchor_key == anchor[1],
                )
            )
            for row in rows:
                row.first_name, row.last_name, row.tags = "", "", []
                row.attributes, row.forgotten = {"is_forgotten": True}, True
                if row.source == "custobar" and not row.source_id.startswith("forgotten-"):
                    row.source_id = hide(row.source_id)

    async def forget_customer_keys(
        self, shop_id: str, source: str, old_keys: Sequence[str], markers: Sequence[str],
        now: datetime,
    ) -> None:  # fmt: skip
        """Replaces a source's records under `old_keys` by detail-less markers under `markers`
        (hashes of every key the forgotten record had)."""
        async with self._sessions.begin() as session:
            if old_keys:
                await session.execute(
                    delete(CustomerRow).where(
                        CustomerRow.shop_id == shop_id,
                        CustomerRow.source == source,
                        CustomerRow.source_id.in_(old_keys),
                    )
                )
            for marker in markers:
                await session.merge(
                    CustomerRow(
                        shop_id=shop_id, source=source, source_id=marker, updated_at=now,
                        anchor_type="customer", anchor_key=marker, first_name="", last_name="",
                        tags=[], attributes={"is_forgotten": True}, deleted=False, forgotten=True,
                    )
                )  # fmt: skip

    async def reanchor(
        self, shop_id: str, anchors: Sequence[Anchor], to: Anchor, now: datetime
    ) -> int:
        """Moves every fact anchored on one of `anchors` to `to` (forgetting a person keeps
        their facts, anonymous, under the tombstone); returns how many moved."""
        moved = 0
        async with self._sessions.begin() as session:
            await _mark_due(session, shop_id, to[1], now)
            for model in (OrderRow, EventRow, ConsentRow, CustomerRow):
                result = await session.execute(
                    update(model)
                    .where(model.shop_id == shop_id, anchored(model, anchors))
                    .values(anchor_type=to[0], anchor_key=to[1])
                )
                moved += getattr(result, "rowcount", 0)
        return moved

    async def add_fact(
        self, model: Any, values: dict[str, Any], person_id: str, now: datetime
    ) -> bool:
        """Stores a refund or an event unless stored already; returns whether it did."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                dialect_of(session).insert(model).values(values).on_conflict_do_nothing()
            )
            applied = bool(getattr(result, "rowcount", 0))
            if applied:
                await _mark_due(session, values["shop_id"], person_id, now)
            return applied

    async def add_consents(
        self, shop_id: str, consents: Sequence[tuple[dict[str, Any], str]], now: datetime
    ) -> list[bool]:
        """Stores consents (their values, and the person each is about) unless stored already
        and, in the same transaction, asks for the gate to be told of each person and puts each
        stored consent on the change feed; returns whether each was stored."""
        fresh: dict[str, dict[str, Any]] = {}
        for values, _ in consents:
            fresh.setdefault(values["consent_id"], values)
        async with self._sessions.begin() as session:
            stored = set(
                await session.scalars(
                    bulk_insert(session, ConsentRow, list(fresh.values()))
                    .on_conflict_do_nothing()
                    .returning(ConsentRow.consent_id)
                )
            )
            applied = []
            for values, _ in consents:
                applied.append(values["consent_id"] in stored)
                stored.discard(values["consent_id"])  # twice in the call: the second is a repeat
            persons = [person_id for _, person_id in consents]
            await _request_pushes(session, shop_id, persons, now, urgent=True)
            await _mark_all_due(session, shop_id, persons, now)
            changes = [
                _change(
                    shop_id, person_id, "consent_changed",
                    {"channel": values["channel"], "granted": values["granted"],
                     "source": values["source"], "at": values["at"].isoformat()},
                    now,
                )
                for ok, (values, person_id) in zip(applied, consents, strict=True)
                if ok
            ]  # fmt: skip
            await append_to_outbox(session, ChangeRow, changes)
            return applied

    async def custobar_records(
        self, shop_id: str, source: str, source_ids: Sequence[str]
    ) -> dict[str, CustomerRow]:
        """A source's customer records under any of these keys, by key."""
        if not source_ids:
            return {}
        async with self._sessions() as session:
            rows = await session.scalars(
                select(CustomerRow).where(
                    CustomerRow.shop_id == shop_id,
                    CustomerRow.source == source,
                    _among(session, CustomerRow.source_id, sorted(set(source_ids))),
                )
            )
            return {row.source_id: row for row in rows}

    async def replace_customers(
        self, shop_id: str, records: Sequence[tuple[dict[str, Any], str]], now: datetime
    ) -> None:
        """Writes customer records (each key at most once) whatever their version (an upload
        is always the newest), and asks for their persons' summaries to be refreshed."""
        if not records:
            return
        keys = ("shop_id", "source", "source_id")
        async with self._sessions.begin() as session:
            insert = bulk_insert(session, CustomerRow, [values for values, _ in records])
            await session.execute(
                insert.on_conflict_do_update(
                    index_elements=list(keys),
                    set_={k: insert.excluded[k] for k in records[0][0] if k not in keys},
                )
            )
            await _mark_all_due(session, shop_id, [person for _, person in records], now)

    async def order_anchor(self, shop_id: str, order_id: str) -> Anchor | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(OrderRow.anchor_type, OrderRow.anchor_key).where(
                        OrderRow.shop_id == shop_id, OrderRow.order_id == order_id
                    )
                )
            ).one_or_none()
            return None if row is None else (row[0], row[1])

    async def erased(self, shop_id: str, person_id: str) -> bool:
        """Whether the person was erased under GDPR."""
        return bool(await self.erased_among(shop_id, [person_id]))

    async def erased_among(self, shop_id: str, person_ids: Sequence[str]) -> set[str]:
        """Which of these persons were erased under GDPR."""
        if not person_ids:
            return set()
        async with self._sessions() as session:
            return set(
                await session.scalars(
                    select(ErasedPersonRow.person_id).where(
                        ErasedPersonRow.shop_id == shop_id,
                        _among(session, ErasedPersonRow.person_id, sorted(set(person_ids))),
                    )
                )
            )

    async def consents(
        self, shop_id: str, anchors: Sequence[Anchor]
    ) -> dict[Anchor, list[ConsentRow]]:
        """The consent records anchored on each of these anchors (many persons' at once), read by
        one statement."""
        found: dict[Anchor, list[ConsentRow]] = {}
        async with self._sessions() as session:
            query = (
                _consents_looked_up(shop_id, anchors)
                if _postgres(session)
                else select(ConsentRow).where(
                    ConsentRow.shop_id == shop_id, anchored(ConsentRow, anchors)
                )
            )
            for row in await session.scalars(query):
                found.setdefault((row.anchor_type, row.anchor_key), []).append(row)
        return found

    async def picture(
        self, shop_id: str, person_id: str, anchors: Sequence[Anchor], purchases: bool = False
    ) -> Picture:
        """Everything of a person's profile this service holds, read by one statement (one
        snapshot, one round trip): the facts anchored on any of these anchors, whether the
        person was erased, their signals, the shop's loyalty programme and their ledger; with
        `purchases`, also each live order's time and line items."""
        parameters = {"shop_id": shop_id, "person_id": person_id, "anchors": list(anchors)}
        async with self._sessions() as session:
            rows = (await session.execute(PICTURES[purchases], parameters)).all()
        return _picture(rows)

    async def cursor(self, name: str) -> int:
        async with self._sessions() as session:
            row = await session.get(CursorRow, name)
            return 0 if row is None else row.position

    async def regrouped(
        self,
        pushes: Sequence[tuple[str, str]],
        changes: Sequence[dict[str, Any]],
        cursor: tuple[str, int],
        now: datetime,
    ) -> None:
        """After identity regrouped or forgot people: asks for the gate to be given the
        policies of (shop, person) pairs, for every changed person's summary to be refreshed,
        puts the changes on the change feed and moves the follow cursor, in one transaction."""
        async with self._sessions.begin() as session:
            for shop_id, person_id in pushes:
                await _request_push(session, shop_id, person_id, now, urgent=False)
            for shop_id, person_id in {*pushes, *((c["shop_id"], c["person_id"]) for c in changes)}:
                await _mark_due(session, shop_id, person_id, now)
            await session.merge(CursorRow(name=cursor[0], position=cursor[1]))
            await append_to_outbox(session, ChangeRow, changes)

    async def pending_pushes(self, now: datetime, limit: int) -> list[GatePushRow]:
        """Persons whose contact policy is due to be pushed to the gate."""
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(GatePushRow)
                    .where(GatePushRow.not_before <= now)
                    .order_by(GatePushRow.urgent.desc(), GatePushRow.requested_at)
                    .limit(limit)
                )
            )

    async def pushed(self, rows: Sequence[GatePushRow]) -> None:
        """Done, each unless the person's consent changed again meanwhile."""
        if not rows:
            return
        push: Any = GatePushRow.__table__
        async with self._sessions.begin() as session:
            await (await session.connection()).execute(
                delete(push).where(
                    push.c.shop_id == bindparam("s"),
                    push.c.person_id == bindparam("p"),
                    push.c.requested_at == bindparam("r"),
                ),
                [{"s": r.shop_id, "p": r.person_id, "r": r.requested_at} for r in rows],
            )

    async def push_failed(self, row: GatePushRow, retry_at: datetime) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(GatePushRow)
                .where(
                    GatePushRow.shop_id == row.shop_id,
                    GatePushRow.person_id == row.person_id,
                    GatePushRow.requested_at == row.requested_at,
                )
                .values(attempts=GatePushRow.attempts + 1, not_before=retry_at)
            )


class Inbox:
    """The webhook inbox: deliveries stored durably before they are answered, processed after,
    kept as dead letters when they keep failing. Deliveries that arrive together are stored in
    one transaction (a group commit), each answered once it is committed."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], batch: int = 200) -> None:
        self._sessions = sessions
        self._batch = batch
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def accept(self, values: dict[str, Any]) -> bool:
        """Stores a delivery unless its webhook id was seen; returns whether it was new."""
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((values, stored))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="webhook-inbox-writer")
        return await stored

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._batch], self._waiting[self._batch :]
            try:
                new = await self._insert([values for values, _ in batch])
            except Exception as exc:
                for _, stored in batch:
                    if not stored.done():
                        stored.set_exception(exc)
                continue
            for values, stored in batch:
                key = (values["shop_id"], values["webhook_id"])
                if not stored.done():
                    stored.set_result(key in new)
                new.discard(key)  # the same delivery twice in one batch: the second is a repeat

    async def _insert(self, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
        async with self._sessions.begin() as session:
            inserted = await session.execute(
                dialect_of(session)
                .insert(WebhookRow)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["shop_id", "webhook_id"])
                .returning(WebhookRow.shop_id, WebhookRow.webhook_id)
            )
            return {(shop_id, webhook_id) for shop_id, webhook_id in inserted}

    async def due(self, now: datetime, limit: int) -> list[WebhookRow]:
        """Pending deliveries whose time has come, oldest first."""
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(WebhookRow)
                    .where(WebhookRow.state == "pending", WebhookRow.next_attempt_at <= now)
                    .order_by(WebhookRow.id)
                    .limit(limit)
                )
            )

    async def settle(self, row_id: int, values: dict[str, Any]) -> None:
        async with self._sessions.begin() as session:
            await session.execute(update(WebhookRow).where(WebhookRow.id == row_id).values(values))

    async def dead(self, shop_id: str, after_id: int, limit: int) -> list[WebhookRow]:
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(WebhookRow)
                    .where(
                        WebhookRow.shop_id == shop_id,
                        WebhookRow.state == "dead",
                        WebhookRow.id > after_id,
                    )
                    .order_by(WebhookRow.id)
                    .limit(limit)
                )
            )

    async def revive(self, shop_id: str, ids: Sequence[int], now: datetime) -> list[int]:
        """Puts dead letters (all of the shop's when `ids` is empty) back in the queue."""
        async with self._sessions.begin() as session:
            query = select(WebhookRow.id).where(
                WebhookRow.shop_id == shop_id, WebhookRow.state == "dead"
            )
            if ids:
                query = query.where(WebhookRow.id.in_(ids))
            revived = list(await session.scalars(query))
            if revived:
                await session.execute(
                    update(WebhookRow)
                    .where(WebhookRow.id.in_(revived))
                    .values(state="pending", attempts=0, next_attempt_at=now)
                )
            return revived

    async def get(self, row_id: int) -> WebhookRow | None:
        async with self._sessions() as session:
            return await session.get(WebhookRow, row_id)


PICTURES = {purchases: _picture_statement(purchases) for purchases in (False, True)}
