"""Persistence of the enrichment service: shops' windows, fitted models, runs, persons' stage
deadlines and the activity cursor."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    String,
    Table,
    bindparam,
    delete,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.runtime.db import dialect_of


class Base(DeclarativeBase):
    """The enrichment service's tables."""


class ShopConfigRow(Base):
    """A shop's windows (see signals.ShopConfig); absent = the defaults."""

    __tablename__ = "shop_config"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)


class ModelRow(Base):
    """A shop's latest fit (see signals.dump): the live one, which scores persons, and the
    latest back-test's, kept apart so that a back-test never scores anyone."""

    __tablename__ = "shop_model"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    back_test: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    model: Mapped[dict[str, Any]] = mapped_column(JSON)


class RunRow(Base):
    """A shop's latest live run: where publishing got to, so an interrupted run resumes there."""

    __tablename__ = "shop_run"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    as_of: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_through: Mapped[str] = mapped_column(String(64))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StageRow(Base):
    """When time alone will next move a person's lifecycle stage."""

    __tablename__ = "stage_deadline"
    __table_args__ = (Index("stage_deadline_due", "changes_at"),)
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    changes_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KnownShopRow(Base):
    """A shop whose persons the profile has reported: the daily run covers it."""

    __tablename__ = "known_shop"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)


class CursorRow(Base):
    """How far a follower has read a peer's outbox."""

    __tablename__ = "follow_cursor"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)


class EnrichmentStore:
    """Reads and writes of the enrichment tables."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def config(self, shop_id: str) -> dict[str, Any] | None:
        async with self._sessions() as session:
            row = await session.get(ShopConfigRow, shop_id)
            return row.config if row else None

    async def put_config(self, shop_id: str, config: dict[str, Any]) -> None:
        async with self._sessions.begin() as session:
            await session.merge(ShopConfigRow(shop_id=shop_id, config=config))

    async def models(self, shop_id: str) -> dict[bool, dict[str, Any]]:
        """The shop's fits by whether they are a back-test's."""
        async with self._sessions() as session:
            rows = await session.scalars(select(ModelRow).where(ModelRow.shop_id == shop_id))
            return {row.back_test: row.model for row in rows}

    async def put_model(self, shop_id: str, back_test: bool, model: dict[str, Any]) -> None:
        async with self._sessions.begin() as session:
            await session.merge(ModelRow(shop_id=shop_id, back_test=back_test, model=model))

    async def run(self, shop_id: str) -> RunRow | None:
        async with self._sessions() as session:
            return await session.get(RunRow, shop_id)

    async def start_run(self, shop_id: str, as_of: datetime) -> None:
        async with self._sessions.begin() as session:
            await session.merge(
                RunRow(shop_id=shop_id, as_of=as_of, published_through="", finished_at=None)
            )

    async def published(
        self, shop_id: str, through: str, deadlines: Sequence[tuple[str, datetime | None]]
    ) -> None:
        """Records a published batch: the run's position and the persons' stage deadlines."""
        async with self._sessions.begin() as session:
            run = await session.get(RunRow, shop_id)
            if run is not None:
                run.published_through = through
            await self._deadlines(session, shop_id, deadlines)

    async def finish_run(self, shop_id: str, now: datetime) -> None:
        async with self._sessions.begin() as session:
            run = await session.get(RunRow, shop_id)
            if run is not None:
                run.finished_at = now

    async def deadlines(
        self, shop_id: str, deadlines: Sequence[tuple[str, datetime | None]]
    ) -> None:
        async with self._sessions.begin() as session:
            await self._deadlines(session, shop_id, deadlines)

    @staticmethod
    async def _deadlines(
        session: AsyncSession, shop_id: str, deadlines: Sequence[tuple[str, datetime | None]]
    ) -> None:
        """Sets or clears persons' deadlines; an upsert in person order, so a run and the
        follower writing the same persons at once neither collide nor deadlock."""
        cleared = sorted(p for p, at in deadlines if at is None)
        if cleared:
            # A delete a person (one statement, many parameter sets): given a long IN list,
            # PostgreSQL reads the shop's every deadline when its statistics predate the shop's
            # growth (as in a shop's first run).
            table = cast(Table, StageRow.__table__)
            await session.execute(
                delete(table).where(
                    table.c.shop_id == bindparam("shop"), table.c.person_id == bindparam("person")
                ),
                [{"shop": shop_id, "person": p} for p in cleared],
            )
        rows = [
            {"shop_id": shop_id, "person_id": p, "changes_at": at}
            for p, at in sorted((p, at) for p, at in deadlines if at is not None)
        ]
        if rows:
            insert = dialect_of(session).insert(StageRow.__table__)
            await session.execute(
                insert.on_conflict_do_update(
                    index_elements=["shop_id", "person_id"],
                    set_={"changes_at": insert.excluded.changes_at},
                ),
                rows,
            )

    async def due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """Persons whose stage deadline has passed, soonest first."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(StageRow.shop_id, StageRow.person_id)
                .where(StageRow.changes_at <= now)
                .order_by(StageRow.changes_at)
                .limit(limit)
            )
            return [(shop_id, person_id) for shop_id, person_id in rows]

    async def know(self, shop_ids: Sequence[str]) -> None:
        if not shop_ids:
            return
        async with self._sessions.begin() as session:
            insert = dialect_of(session).insert(KnownShopRow)
            await session.execute(
                insert.on_conflict_do_nothing(), [{"shop_id": s} for s in shop_ids]
            )

    async def shops_to_run(self, since: datetime) -> list[str]:
        """Known shops without a run finished since `since`."""
        async with self._sessions() as session:
            finished = select(RunRow.shop_id).where(RunRow.finished_at >= since)
            return list(
                await session.scalars(
                    select(KnownShopRow.shop_id)
                    .where(KnownShopRow.shop_id.not_in(finished))
                    .order_by(KnownShopRow.shop_id)
                )
            )

    async def cursor(self, name: str) -> int:
        async with self._sessions() as session:
            row = await session.get(CursorRow, name)
            return row.position if row else 0

    async def advance(self, name: str, position: int) -> None:
        async with self._sessions.begin() as session:
            await session.merge(CursorRow(name=name, position=position))
