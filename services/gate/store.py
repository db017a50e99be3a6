"""The gate's durable data in its database: shop policies, contact policies, the message log."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.gate.counters import ContactPolicy


class Base(DeclarativeBase):
    """Tables of the gate service."""


class ShopPolicyRow(Base):
    """A shop's caps, fatigue threshold and quiet hours, as set through PutShopPolicy."""

    __tablename__ = "shop_policy"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ContactPolicyRow(Base):
    """The durable copy of a customer's contact policy; Redis is rebuilt from it."""

    __tablename__ = "contact_policy"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    granted: Mapped[list[str]] = mapped_column(JSON)
    global_unsubscribe: Mapped[bool] = mapped_column(Boolean)
    time_zone: Mapped[str] = mapped_column(String(64))
    suppressed: Mapped[list[str]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MessageLogRow(Base):
    """One decision of the gate, allowed or blocked, with its reason."""

    __tablename__ = "message_log"
    __table_args__ = (
        UniqueConstraint("shop_id", "person_id", "entry_id", name="message_log_entry"),
        Index("message_log_person", "shop_id", "person_id", "decided_at"),
    )
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    shop_id: Mapped[str] = mapped_column(String(128))
    person_id: Mapped[str] = mapped_column(String(128))
    # The id of the decision in the customer's pending log stream: makes writes idempotent.
    entry_id: Mapped[str] = mapped_column(String(40))
    message_id: Mapped[str] = mapped_column(String(256))
    channel: Mapped[str] = mapped_column(String(16))
    transactional: Mapped[bool] = mapped_column(Boolean)
    allowed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(64))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class Decided:
    """A decision on its way to the durable log."""

    shop_id: str
    person_id: str
    entry_id: str
    message_id: str
    channel: str
    transactional: bool
    allowed: bool
    reason: str
    decided_at: datetime


@dataclass(frozen=True)
class Released:
    """A released reservation on its way to the durable log."""

    shop_id: str
    person_id: str
    entry_id: str
    message_id: str
    released_at: datetime


def utc(instant: datetime) -> datetime:
    """The instant as an aware UTC datetime (SQLite hands back naive ones)."""
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


class GateStore:
    """Queries of the gate's tables."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def shop_policy(self, shop_id: str) -> dict[str, Any] | None:
        """The stored policy document of a shop, or None when it set none."""
        async with self._sessions() as session:
            row = await session.get(ShopPolicyRow, shop_id)
            return None if row is None else row.policy

    async def put_shop_policy(self, shop_id: str, policy: dict[str, Any], now: datetime) -> None:
        """Replaces a shop's policy document."""
        async with self._sessions.begin() as session:
            await session.merge(ShopPolicyRow(shop_id=shop_id, policy=policy, updated_at=now))

    async def contact_policy(self, shop_id: str, person_id: str) -> ContactPolicy | None:
        """The durable contact policy of a customer, or None when none was ever pushed."""
        async with self._sessions() as session:
            row = await session.get(ContactPolicyRow, (shop_id, person_id))
            if row is None:
                return None
            return ContactPolicy(
                frozenset(row.granted),
                row.global_unsubscribe,
                row.time_zone,
                frozenset(row.suppressed),
            )

    async def put_contact_policy(
        self, shop_id: str, person_id: str, policy: ContactPolicy, now: datetime
    ) -> None:
        """Replaces a customer's durable contact policy."""
        async with self._sessions.begin() as session:
            await session.merge(
                ContactPolicyRow(
                    shop_id=shop_id,
                    person_id=person_id,
                    granted=sorted(policy.granted),
                    global_unsubscribe=policy.global_unsubscribe,
                    time_zone=policy.time_zone,
                    suppressed=sorted(policy.suppressed),
                    updated_at=now,
                )
            )

    async def append(self, decided: Sequence[Decided], released: Sequence[Released]) -> None:
        """Writes decisions (idempotently, by entry id) and releases in one transaction."""
        async with self._sessions.begin() as session:
            if decided:
                dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
                await session.execute(
                    dialect.insert(MessageLogRow).on_conflict_do_nothing(
                        index_elements=["shop_id", "person_id", "entry_id"]
                    ),
                    [d.__dict__ for d in decided],
                )
            for r in released:
                await session.execute(
                    update(MessageLogRow)
                    .where(
                        MessageLogRow.shop_id == r.shop_id,
                        MessageLogRow.person_id == r.person_id,
                        MessageLogRow.message_id == r.message_id,
                        MessageLogRow.allowed.is_(True),
                        MessageLogRow.released_at.is_(None),
                    )
                    .values(released_at=r.released_at)
                )

    async def reservations_since(
        self, shop_id: str, person_id: str, since: datetime
    ) -> list[tuple[str, str, datetime]]:
        """Counted messages (allowed, marketing, not released) decided since `since`:
        (message_id, channel, decided_at), what Redis needs to be rebuilt."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(MessageLogRow.message_id, MessageLogRow.channel, MessageLogRow.decided_at)
                .where(
                    MessageLogRow.shop_id == shop_id,
                    MessageLogRow.person_id == person_id,
                    MessageLogRow.decided_at >= since,
                    MessageLogRow.allowed.is_(True),
                    MessageLogRow.transactional.is_(False),
                    MessageLogRow.released_at.is_(None),
                )
                .order_by(MessageLogRow.decided_at)
            )
            return [(m, c, utc(at)) for m, c, at in rows]

    async def last_contact(self, shop_id: str, person_id: str) -> dict[str, datetime]:
        """The last allowed, not released message per channel."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(MessageLogRow.channel, func.max(MessageLogRow.decided_at))
                .where(
                    MessageLogRow.shop_id == shop_id,
                    MessageLogRow.person_id == person_id,
                    MessageLogRow.allowed.is_(True),
                    MessageLogRow.released_at.is_(None),
                )
                .group_by(MessageLogRow.channel)
            )
            return {channel: utc(at) for channel, at in rows}

    async def log(self, shop_id: str, person_id: str, limit: int) -> list[MessageLogRow]:
        """The newest decisions about a customer."""
        async with self._sessions() as session:
            rows = await session.scalars(
                select(MessageLogRow)
                .where(MessageLogRow.shop_id == shop_id, MessageLogRow.person_id == person_id)
                .order_by(MessageLogRow.decided_at.desc(), MessageLogRow.id.desc())
                .limit(limit)
            )
            return list(rows)
