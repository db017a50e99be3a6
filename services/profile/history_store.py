"""Persons' histories as enrichment reads them: purchase days, recent engagement and repeat
purchases up to an instant, a page of persons at a time; and the activity it follows."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from services.profile.store import (
    ActivityRow,
    EventRow,
    OrderRow,
    PersonAnchorRow,
    RefundRow,
    SummaryRow,
)
from services.runtime.db import utc

DAY_SECONDS = 86400


class epoch_day(FunctionElement[int]):  # a SQL function, named as one
    """The UTC day (since 1970-01-01) of a timestamp column."""

    type = Integer()
    inherit_cache = True


@compiles(epoch_day, "postgresql")
def _epoch_day_postgresql(element: epoch_day, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"CAST(floor(extract(epoch FROM {column}) / 86400) AS INTEGER)"


@compiles(epoch_day, "sqlite")
def _epoch_day_sqlite(element: epoch_day, compiler: Any, **kw: Any) -> str:
    return f"CAST(julianday({compiler.process(element.clauses, **kw)}) - 2440587.5 AS INTEGER)"


@dataclass
class Histories:
    """A page of histories, columnar as HistoryPage in profile.proto describes them."""

    person_ids: list[str] = field(default_factory=list)
    order_days: list[int] = field(default_factory=list)
    order_day: list[int] = field(default_factory=list)
    order_count: list[int] = field(default_factory=list)
    order_value: list[float] = field(default_factory=list)
    last_order_at: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    event_at: list[int] = field(default_factory=list)
    event_kind: list[str] = field(default_factory=list)
    repeat_products: list[int] = field(default_factory=list)
    product: list[str] = field(default_factory=list)
    product_days: list[int] = field(default_factory=list)
    product_first_day: list[int] = field(default_factory=list)
    product_last_day: list[int] = field(default_factory=list)


class HistoryStore:
    """Reads the facts enrichment models on."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def page(
        self,
        shop_id: str,
        as_of: datetime,
        person_ids: Sequence[str],
        after: str,
        limit: int,
        engagement_days: int,
    ) -> Histories:
        """The histories of the given persons, or of the shop's next `limit` persons after
        `after`, counting facts up to `as_of`. Persons are those with a summary: one merged
        away, forgotten or not known is left out."""
        async with self._sessions() as session:
            paging = not person_ids
            query = select(SummaryRow.person_id).where(SummaryRow.shop_id == shop_id)
            if paging:
                query = query.where(SummaryRow.person_id > after).limit(limit)
            else:
                query = query.where(SummaryRow.person_id.in_(person_ids))
            persons = list(await session.scalars(query.order_by(SummaryRow.person_id)))
            if not persons:
                return Histories()
            owner = PersonAnchorRow.person_id
            chosen: ColumnElement[bool] = (
                owner.between(persons[0], persons[-1]) if paging else owner.in_(persons)
            )
            orders = await session.execute(_orders(shop_id, as_of, chosen))
            events = await session.execute(
                _events(shop_id, as_of - timedelta(days=engagement_days), as_of, chosen)
            )
            products = await session.execute(
                select(SummaryRow.person_id, SummaryRow.repeat_products).where(
                    SummaryRow.shop_id == shop_id, SummaryRow.person_id.in_(persons)
                )
            )
            return _columns(
                persons, orders, events, {person: repeats for person, repeats in products}, as_of
            )

    async def activity(self, shop_id: str, after: int, limit: int) -> list[ActivityRow]:
        query = select(ActivityRow).where(ActivityRow.seq > after)
        if shop_id:
            query = query.where(ActivityRow.shop_id == shop_id)
        async with self._sessions() as session:
            return list(await session.scalars(query.order_by(ActivityRow.seq).limit(limit)))


def anchored(model: Any) -> Any:
    return (
        (PersonAnchorRow.shop_id == model.shop_id)
        & (PersonAnchorRow.anchor_type == model.anchor_type)
        & (PersonAnchorRow.anchor_key == model.anchor_key)
    )


def _orders(shop_id: str, as_of: datetime, chosen: ColumnElement[bool]) -> Any:
    """Per person and purchase day: orders, their total net of refunds made by as_of, and the
    last placing instant."""
    refunded = (
        select(func.coalesce(func.sum(RefundRow.amount), 0))
        .where(
            RefundRow.shop_id == OrderRow.shop_id,
            RefundRow.order_id == OrderRow.order_id,
            RefundRow.refunded_at <= as_of,
        )
        .scalar_subquery()
    )
    day = epoch_day(OrderRow.placed_at)
    return (
        select(
            PersonAnchorRow.person_id,
            day,
            func.count(),
            func.sum(OrderRow.total - refunded),
            func.max(OrderRow.placed_at),
        )
        .join(PersonAnchorRow, anchored(OrderRow))
        .where(
            OrderRow.shop_id == shop_id,
            chosen,
            OrderRow.placed_at <= as_of,
            OrderRow.cancelled.is_(False),
        )
        .group_by(PersonAnchorRow.person_id, day)
        .order_by(PersonAnchorRow.person_id, day)
    )


def _events(shop_id: str, since: datetime, as_of: datetime, chosen: ColumnElement[bool]) -> Any:
    return (
        select(PersonAnchorRow.person_id, EventRow.at, EventRow.kind)
        .join(PersonAnchorRow, anchored(EventRow))
        .where(EventRow.shop_id == shop_id, chosen, EventRow.at > since, EventRow.at <= as_of)
        .order_by(PersonAnchorRow.person_id, EventRow.at)
    )


def _columns(
    persons: list[str],
    orders: Any,
    events: Any,
    products: dict[str, dict[str, list[int]]],
    as_of: datetime,
) -> Histories:
    """Lays the query results out person by person."""
    h = Histories(person_ids=persons)
    by_person_orders: dict[str, list[Any]] = {}
    for row in orders:
        by_person_orders.setdefault(row[0], []).append(row)
    by_person_events: dict[str, list[Any]] = {}
    for row in events:
        by_person_events.setdefault(row[0], []).append(row)
    through = int(utc(as_of).timestamp() // DAY_SECONDS)
    for person in persons:
        days = by_person_orders.get(person, [])
        h.order_days.append(len(days))
        last = 0
        for _, day, count, value, placed_at in days:
            h.order_day.append(day)
            h.order_count.append(count)
            h.order_value.append(float(value))
            last = max(last, int(utc(placed_at).timestamp()))
        h.last_order_at.append(last)
        seen = by_person_events.get(person, [])
        h.events.append(len(seen))
        for _, at, kind in seen:
            h.event_at.append(int(utc(at).timestamp()))
            h.event_kind.append(kind)
        repeats = 0
        for product, bought in sorted((products.get(person) or {}).items()):
            bought = [d for d in bought if d <= through]
            if len(bought) > 1:
                repeats += 1
                h.product.append(product)
                h.product_days.append(len(bought))
                h.product_first_day.append(bought[0])
                h.product_last_day.append(bought[-1])
        h.repeat_products.append(repeats)
    return h
