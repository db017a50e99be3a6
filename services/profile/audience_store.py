"""The queries behind audiences: persons' summaries, the change feed, segments, enrichment's
signals and the loyalty ledger."""

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    Select,
    String,
    bindparam,
    delete,
    func,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from services.profile.loyalty import Earning, Programme
from services.profile.store import (
    ActivityRow,
    Anchor,
    ChangeRow,
    EarningRow,
    ErasedPersonRow,
    OrderRow,
    PersonAnchorRow,
    ProgrammeRow,
    RefundRow,
    SegmentRow,
    SignalRow,
    SummaryDueRow,
    SummaryRow,
    TagRow,
    bulk_insert,
    earning,
    programme_of,
)
from services.runtime.db import append_to_outbox, dialect_of, hold_lock

STREAM_BATCH = 1000


def _ledger(shop_id: str) -> Select:
    """Each earning order of a shop with what was refunded of it."""
    refunds = (
        select(RefundRow.order_id, func.sum(RefundRow.amount).label("refunded"))
        .where(RefundRow.shop_id == shop_id)
        .group_by(RefundRow.order_id)
        .subquery()
    )
    return (
        select(
            OrderRow.total,
            func.coalesce(refunds.c.refunded, 0),
            EarningRow.rate,
            EarningRow.earned_at,
            EarningRow.expires_at,
        )
        .select_from(OrderRow)
        .join(
            EarningRow,
            (EarningRow.shop_id == OrderRow.shop_id) & (EarningRow.order_id == OrderRow.order_id),
        )
        .outerjoin(refunds, refunds.c.order_id == OrderRow.order_id)
        .where(OrderRow.shop_id == shop_id, OrderRow.cancelled.is_(False))
    )


def _locked_signals(
    session: AsyncSession, shop_id: str, person_ids: Sequence[str]
) -> Select[SignalRow]:
    """The persons' stored signals, locked in person order so that writers never deadlock. On
    PostgreSQL each person is looked up on their own (a lateral join over the ids): given a long
    IN list, PostgreSQL reads the shop's every row when its statistics predate the shop's growth
    (as in a shop's first run, which that made quadratic)."""
    if session.get_bind().dialect.name != "postgresql":
        return (
            select(SignalRow)
            .where(SignalRow.shop_id == shop_id, SignalRow.person_id.in_(person_ids))
            .order_by(SignalRow.person_id)
            .with_for_update()
        )
    wanted = (
        func.unnest(bindparam("person_ids", sorted(person_ids), type_=ARRAY(String)))
        .table_valued("person_id")
        .render_derived(name="wanted")
    )
    locked = (
        select(SignalRow)
        .where(SignalRow.shop_id == shop_id, SignalRow.person_id == wanted.c.person_id)
        .with_for_update()
        .lateral()
    )
    return select(aliased(SignalRow, locked)).select_from(wanted).join(locked, true())


@dataclass(frozen=True)
class Refreshed:
    """A person's summary as rebuilt for a request (`due`): the root of their group, the
    persons merged into it, the group's anchors, the summary's columns (None: the person is
    gone or erased, their summary removed) and tags."""

    due: SummaryDueRow
    root: str
    gone: Sequence[str]
    anchors: Sequence[Anchor]
    summary: dict[str, Any] | None
    tags: Sequence[str]


async def _save_summaries(
    session: AsyncSession, shop_id: str, items: list[Refreshed]
) -> list[dict[str, Any]]:
    """One shop's part of `save_summaries`; returns the persons whose summary changed."""
    erased = set(
        await session.scalars(
            select(ErasedPersonRow.person_id).where(
                ErasedPersonRow.shop_id == shop_id,
                ErasedPersonRow.person_id.in_(sorted({r.root for r in items})),
            )
        )
    )
    kept: dict[str, Refreshed] = {}  # by root: two requests of one group build the same
    removed: set[str] = set()
    for item in items:
        removed.update(item.gone)
        if item.summary is None or item.root in erased:  # erased while it was being built
            removed.add(item.root)
        else:
            kept[item.root] = item
    for root in removed & set(kept):
        del kept[root]  # removed by one request, kept by another: a race; removal wins
    stale = sorted(removed | set(kept))
    for model in (SummaryRow, TagRow, PersonAnchorRow):
        await session.execute(
            delete(model).where(model.shop_id == shop_id, model.person_id.in_(stale))
        )
    if not kept:
        return []
    await session.execute(
        bulk_insert(
            session,
            SummaryRow,
            [
                {"shop_id": shop_id, "person_id": root, **(r.summary or {})}
                for root, r in kept.items()
            ],
        )
    )
    tags = [
        {"shop_id": shop_id, "person_id": root, "tag": tag}
        for root, r in kept.items()
        for tag in sorted(set(r.tags))
    ]
    if tags:
        await session.execute(bulk_insert(session, TagRow, tags))
    anchors = {
        (t, k): {"shop_id": shop_id, "anchor_type": t, "anchor_key": k, "person_id": root}
        for root, r in kept.items()
        for t, k in r.anchors
    }
    if anchors:
        insert = bulk_insert(session, PersonAnchorRow, list(anchors.values()))
        await session.execute(
            insert.on_conflict_do_update(
                index_elements=["shop_id", "anchor_type", "anchor_key"],
                set_={"person_id": insert.excluded.person_id},
            )
        )
    return [{"shop_id": shop_id, "person_id": root} for root in kept]


class AudienceStore:
    """Reads and writes of the audience tables."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # --- summaries ------------------------------------------------------------------------------

    async def due_summaries(self, limit: int) -> list[SummaryDueRow]:
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(SummaryDueRow).order_by(SummaryDueRow.requested_at).limit(limit)
                )
            )

    async def save_summaries(self, refreshed: Sequence["Refreshed"]) -> None:
        """Replaces each refreshed group's summary, tags and anchors (or, with no summary,
        removes them) and removes those of persons merged into it; each request is done unless
        it was made again meanwhile. One transaction, a few statements a shop."""
        by_shop: dict[str, list[Refreshed]] = {}
        for item in refreshed:
            by_shop.setdefault(item.due.shop_id, []).append(item)
        async with self._sessions.begin() as session:
            # Taken by an erasure too: the erased check below sees an erasure that ran meanwhile.
            for shop_id, person_id in sorted({(r.due.shop_id, r.root) for r in refreshed}):
                await hold_lock(session, "person", shop_id, person_id)
            activity: list[dict[str, Any]] = []
            for shop_id, items in sorted(by_shop.items()):
                activity += await _save_summaries(session, shop_id, items)
            due: Any = SummaryDueRow.__table__
            await (await session.connection()).execute(
                delete(due).where(
                    due.c.shop_id == bindparam("s"),
                    due.c.person_id == bindparam("p"),
                    due.c.requests == bindparam("r"),
                ),
                [
                    {"s": r.due.shop_id, "p": r.due.person_id, "r": r.due.requests}
                    for r in refreshed
                ],
            )
            await append_to_outbox(session, ActivityRow, activity)

    async def summary(self, shop_id: str, person_id: str) -> SummaryRow | None:
        async with self._sessions() as session:
            return await session.get(SummaryRow, (shop_id, person_id))

    # --- the change feed ------------------------------------------------------------------------

    async def changes(
        self, shop_id: str, after: int, kinds: Sequence[str], limit: int
    ) -> list[ChangeRow]:
        query = select(ChangeRow).where(ChangeRow.shop_id == shop_id, ChangeRow.seq > after)
        if kinds:
            query = query.where(ChangeRow.kind.in_(kinds))
        async with self._sessions() as session:
            return list(await session.scalars(query.order_by(ChangeRow.seq).limit(limit)))

    # --- signals --------------------------------------------------------------------------------

    async def signals(self, shop_id: str, person_id: str) -> SignalRow | None:
        async with self._sessions() as session:
            return await session.get(SignalRow, (shop_id, person_id))

    async def put_signals(
        self,
        shop_id: str,
        person_ids: Sequence[str],
        write: Callable[[dict[str, SignalRow]], tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    ) -> int:
        """Stores enrichment's signals and the changes they make, in one transaction: `write`
        gets the persons' current signals, read under a row lock (in person order, so writers
        never deadlock), and returns the rows to store and the change feed entries; returns how
        many entries it appended. A row never replaces one of a newer model, even when two
        writers insert a person's first signals at once."""
        if not person_ids:
            return 0
        async with self._sessions.begin() as session:
            current = await session.scalars(_locked_signals(session, shop_id, person_ids))
            rows, changes = write({row.person_id: row for row in current})
            if rows:
                # A Core upsert of the table: the ORM's bulk path took twice as long a row.
                table = SignalRow.__table__
                insert = dialect_of(session).insert(table)
                columns = [c for c in rows[0] if c != "person_id"]
                await session.execute(
                    insert.on_conflict_do_update(
                        index_elements=["shop_id", "person_id"],
                        set_={c: insert.excluded[c] for c in columns},
                        where=or_(
                            table.c.model_fitted_at.is_(None),
                            table.c.model_fitted_at <= insert.excluded.model_fitted_at,
                        ),
                    ),
                    [{"shop_id": shop_id, **row} for row in rows],
                )
            await append_to_outbox(session, ChangeRow, changes)
            return len(changes)

    # --- segments -------------------------------------------------------------------------------

    async def add_segment(self, row: SegmentRow) -> bool:
        """Stores a segment unless the shop has one of that name; returns whether it did."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                dialect_of(session)
                .insert(SegmentRow)
                .values({c.name: getattr(row, c.name) for c in SegmentRow.__table__.columns})
                .on_conflict_do_nothing()
            )
            return bool(getattr(result, "rowcount", 0))

    async def segments(self, shop_id: str) -> list[SegmentRow]:
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(SegmentRow)
                    .where(SegmentRow.shop_id == shop_id)
                    .order_by(SegmentRow.created_at, SegmentRow.name)
                )
            )

    async def segment(self, shop_id: str, segment_id: str) -> SegmentRow | None:
        async with self._sessions() as session:
            row = await session.get(SegmentRow, segment_id)
            return row if row is not None and row.shop_id == shop_id else None

    async def counted(self, segment_id: str, count: int) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(SegmentRow)
                .where(SegmentRow.segment_id == segment_id)
                .values(member_count=count)
            )

    async def count(self, query: Select) -> int:
        async with self._sessions() as session:
            counted = await session.scalar(select(func.count()).select_from(query.subquery()))
            return int(counted or 0)

    async def stream(self, query: Select) -> AsyncIterator[list[Any]]:
        """The rows of a query in batches, read with a server-side cursor in one snapshot."""
        async with self._sessions() as session:
            result = await session.stream(
                query.execution_options(yield_per=STREAM_BATCH, stream_results=True)
            )
            async for partition in result.partitions(STREAM_BATCH):
                yield list(partition)

    # --- loyalty --------------------------------------------------------------------------------

    async def put_programme(self, shop_id: str, programme: Programme, now: datetime) -> None:
        async with self._sessions.begin() as session:
            await session.merge(
                ProgrammeRow(
                    shop_id=shop_id,
                    tiers=[
                        {"name": t.name, "threshold": t.threshold, "benefits": t.benefits}
                        for t in programme.tiers
                    ],
                    points_per_unit=programme.points_per_unit,
                    expiry_days=programme.expiry_days,
                    updated_at=now,
                )
            )

    async def programme(self, shop_id: str) -> Programme | None:
        async with self._sessions() as session:
            row = await session.get(ProgrammeRow, shop_id)
        if row is None:
            return None
        return programme_of(row.tiers, row.points_per_unit, row.expiry_days)

    async def ledger(self, shop_id: str, anchors: Sequence[Anchor]) -> list[Earning]:
        """The ledger entries of one person's orders."""
        query = _ledger(shop_id).where(
            tuple_(OrderRow.anchor_type, OrderRow.anchor_key).in_(anchors)
        )
        async with self._sessions() as session:
            return [earning(row) for row in await session.execute(query)]

    def ledgers(self, shop_id: str, persons: Select | None) -> Select:
        """The ledger entries of every person of a shop (or of the persons a query selects),
        each with its person id, in person id order."""
        A = PersonAnchorRow
        query = (
            _ledger(shop_id)
            .add_columns(A.person_id)
            .join(
                A,
                (A.shop_id == OrderRow.shop_id)
                & (A.anchor_type == OrderRow.anchor_type)
                & (A.anchor_key == OrderRow.anchor_key),
            )
            .order_by(A.person_id)
        )
        if persons is not None:
            query = query.where(A.person_id.in_(persons.order_by(None)))
        return query
