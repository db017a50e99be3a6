"""Persons' histories as enrichment reads them: purchase days, recent engagement and repeat
purchases up to an instant, a page of persons at a time; and the activity it follows."""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, cast, func, select, text
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


class epoch_second(FunctionElement[int]):  # a SQL function, named as one
    """The Unix second of a timestamp column (fractions dropped)."""

    type = BigInteger()
    inherit_cache = True


@compiles(epoch_second, "postgresql")
def _epoch_second_postgresql(element: epoch_second, compiler: Any, **kw: Any) -> str:
    return f"CAST(floor(extract(epoch FROM {compiler.process(element.clauses, **kw)})) AS BIGINT)"


@compiles(epoch_second, "sqlite")
def _epoch_second_sqlite(element: epoch_second, compiler: Any, **kw: Any) -> str:
    return f"CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER)"


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
            # Core results, without the ORM's row processing: these are many rows of plain values.
            connection = await session.connection()
            if connection.dialect.name == "postgresql":
                # The estimated cost of a page's aggregate starts JIT compilation, which took
                # longer than the query itself (seconds a page on a shop of 1M customers).
                await connection.execute(text("SET LOCAL jit = off"))
            paging = not person_ids
            query = select(SummaryRow.person_id, SummaryRow.repeat_products).where(
                SummaryRow.shop_id == shop_id
            )
            if paging:
                query = query.where(SummaryRow.person_id > after).limit(limit)
            else:
                query = query.where(SummaryRow.person_id.in_(person_ids))
            summaries = (await connection.execute(query.order_by(SummaryRow.person_id))).all()
            if not summaries:
                return Histories()
            persons = [person for person, _ in summaries]
            owner = PersonAnchorRow.person_id
            chosen: ColumnElement[bool] = (
                owner.between(persons[0], persons[-1]) if paging else owner.in_(persons)
            )
            orders = (await connection.execute(_orders(shop_id, as_of, chosen))).all()
            events = (
                await connection.execute(
                    _events(shop_id, as_of - timedelta(days=engagement_days), as_of, chosen)
                )
            ).all()
            return _columns(summaries, orders, events, as_of)

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
    last placing instant (Unix seconds)."""
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
            cast(func.sum(OrderRow.total - refunded), Float),
            epoch_second(func.max(OrderRow.placed_at)),
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
        select(PersonAnchorRow.person_id, epoch_second(EventRow.at), EventRow.kind)
        .join(PersonAnchorRow, anchored(EventRow))
        .where(EventRow.shop_id == shop_id, chosen, EventRow.at > since, EventRow.at <= as_of)
        .order_by(PersonAnchorRow.person_id, EventRow.at)
    )


def _columns(
    summaries: Sequence[Any],
    orders: Sequence[Any],
    events: Sequence[Any],
    as_of: datetime,
) -> Histories:
    """Lays the query results out person by person: the rows of orders and events come in
    person order (each query orders by person id, as the summaries do), so each column is the
    rows' column, less the rows of persons outside the page (merged away, or not known)."""
    persons = [person for person, _ in summaries]
    h = Histories(person_ids=persons)
    known = set(persons)
    orders = [row for row in orders if row[0] in known]
    events = [row for row in events if row[0] in known]
    owners: Sequence[str] = ()
    if orders:
        owners, h.order_day, h.order_count, h.order_value, last = map(
            list, zip(*orders, strict=True)
        )
        # A person's last row is their last purchase day, whose last order is their last.
        last_order_at = dict(zip(owners, last, strict=True))
        h.last_order_at = [last_order_at.get(person, 0) for person in persons]
    else:
        h.last_order_at = [0] * len(persons)
    h.order_days = _counts(persons, owners)
    watchers: Sequence[str] = ()
    if events:
        watchers, h.event_at, h.event_kind = map(list, zip(*events, strict=True))
    h.events = _counts(persons, watchers)
    through = int(utc(as_of).timestamp() // DAY_SECONDS)
    for _, products in summaries:
        repeats = 0
        for product, bought in sorted((products or {}).items()):
            bought = [d for d in bought if d <= through]
            if len(bought) > 1:
                repeats += 1
                h.product.append(product)
                h.product_days.append(len(bought))
                h.product_first_day.append(bought[0])
                h.product_last_day.append(bought[-1])
        h.repeat_products.append(repeats)
    return h


def _counts(persons: list[str], owners: Sequence[str]) -> list[int]:
    """How many of the rows each person owns."""
    counts = Counter(owners)
    return [counts.get(person, 0) for person in persons]
