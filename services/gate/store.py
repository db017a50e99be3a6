"""The gate's durable data in its database: shop policies, contact policies, the message log."""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
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
    delete,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.gate.counters import ERASED, ERASED_VERSION, ContactPolicy
from services.runtime.db import dialect_of, utc


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
    version: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReleaseRow(Base):
    """A reservation given back, by the log entry id of the decision that made it."""

    __tablename__ = "message_release"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    entry_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    released_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


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


@dataclass(slots=True)
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


@dataclass(slots=True)
class Released:
    """A released reservation on its way to the durable log; `entry_id` is the reservation's."""

    shop_id: str
    person_id: str
    entry_id: str
    released_at: datetime


@dataclass(frozen=True)
class LogLine:
    """One decision as the contact history shows it."""

    message_id: str
    channel: str
    transactional: bool
    allowed: bool
    reason: str
    decided_at: datetime
    released: bool


def row(entry: "Decided | Released") -> dict[str, Any]:
    """A log entry as the row of its table: its fields by name."""
    return {field.name: getattr(entry, field.name) for field in fields(entry)}


# Decisions as one statement of arrays on PostgreSQL: a row costs the writer a few µs of CPU
# beside the gate's hot path, where executemany cost ~25 (a CheckBatch of 50,000: 0.15 s, was
# 1.2 s). Idempotent by the log entry id.
LOG_FROM_ARRAYS = text(
    """
    INSERT INTO message_log (shop_id, person_id, entry_id, message_id, channel, transactional,
                             allowed, reason, decided_at)
    SELECT * FROM unnest(CAST(:shop_id AS text[]), CAST(:person_id AS text[]),
                         CAST(:entry_id AS text[]), CAST(:message_id AS text[]),
                         CAST(:channel AS text[]), CAST(:transactional AS boolean[]),
                         CAST(:allowed AS boolean[]), CAST(:reason AS text[]),
                         CAST(:decided_at AS timestamptz[]))
    ON CONFLICT (shop_id, person_id, entry_id) DO NOTHING
    """
)


# Contact policies of one shop as one statement of arrays on PostgreSQL, each replacing only an
# older version; the JSON columns arrive as text, as SQLAlchemy's JSON type writes them.
POLICIES_FROM_ARRAYS = text(
    """
    INSERT INTO contact_policy (shop_id, person_id, granted, global_unsubscribe, time_zone,
                                suppressed, version, updated_at)
    SELECT CAST(:shop_id AS text), person_id, CAST(granted AS json), global_unsubscribe,
           time_zone, CAST(suppressed AS json), version, CAST(:updated_at AS timestamptz)
    FROM unnest(CAST(:person_id AS text[]), CAST(:granted AS text[]),
                CAST(:global_unsubscribe AS boolean[]), CAST(:time_zone AS text[]),
                CAST(:suppressed AS text[]), CAST(:version AS bigint[]))
         AS policy (person_id, granted, global_unsubscribe, time_zone, suppressed, version)
    ON CONFLICT (shop_id, person_id) DO UPDATE
    SET granted = excluded.granted, global_unsubscribe = excluded.global_unsubscribe,
        time_zone = excluded.time_zone, suppressed = excluded.suppressed,
        version = excluded.version, updated_at = excluded.updated_at
    WHERE contact_policy.version < excluded.version
    """
)
# What a put replaces of a stored contact policy: all but the key.
POLICY_UPDATED = (
    "granted",
    "global_unsubscribe",
    "time_zone",
    "suppressed",
    "version",
    "updated_at",
)


def _released() -> Any:
    """The releases of the message log row in the enclosing query."""
    return select(ReleaseRow.entry_id).where(
        ReleaseRow.shop_id == MessageLogRow.shop_id,
        ReleaseRow.person_id == MessageLogRow.person_id,
        ReleaseRow.entry_id == MessageLogRow.entry_id,
    )


def _policy_values(
    shop_id: str, person_id: str, policy: ContactPolicy, now: datetime
) -> dict[str, Any]:
    """A contact policy as the row of its table."""
    return {
        "shop_id": shop_id,
        "person_id": person_id,
        "granted": sorted(policy.granted),
        "global_unsubscribe": policy.global_unsubscribe,
        "time_zone": policy.time_zone,
        "suppressed": sorted(policy.suppressed),
        "version": policy.version,
        "updated_at": now,
    }


async def _contact_policies(
    session: AsyncSession, shop_id: str, person_ids: Sequence[str]
) -> dict[str, ContactPolicy]:
    """The durable contact policies of customers (those that have one)."""
    rows = await session.scalars(
        select(ContactPolicyRow).where(
            ContactPolicyRow.shop_id == shop_id, ContactPolicyRow.person_id.in_(person_ids)
        )
    )
    return {
        row.person_id: ContactPolicy(
            frozenset(row.granted),
            row.global_unsubscribe,
            row.time_zone,
            frozenset(row.suppressed),
            row.version,
        )
        for row in rows
    }


async def _reservations_since(
    session: AsyncSession, shop_id: str, person_ids: Sequence[str], since: datetime
) -> dict[str, list[tuple[str, str, datetime, str]]]:
    """Counted messages (allowed, marketing, not released) decided since `since`, per
    customer: (message_id, channel, decided_at, entry_id), what Redis needs to be rebuilt."""
    rows = await session.execute(
        select(
            MessageLogRow.person_id,
            MessageLogRow.message_id,
            MessageLogRow.channel,
            MessageLogRow.decided_at,
            MessageLogRow.entry_id,
        )
        .where(
            MessageLogRow.shop_id == shop_id,
            MessageLogRow.person_id.in_(person_ids),
            MessageLogRow.decided_at >= since,
            MessageLogRow.allowed.is_(True),
            MessageLogRow.transactional.is_(False),
            ~_released().exists(),
        )
        .order_by(MessageLogRow.decided_at)
    )
    found: dict[str, list[tuple[str, str, datetime, str]]] = {}
    for person_id, message_id, channel, at, entry_id in rows:
        found.setdefault(person_id, []).append((message_id, channel, utc(at), entry_id))
    return found


async def _last_contact(session: AsyncSession, shop_id: str, person_id: str) -> dict[str, datetime]:
    """The last allowed, not released message per channel."""
    rows = await session.execute(
        select(MessageLogRow.channel, func.max(MessageLogRow.decided_at))
        .where(
            MessageLogRow.shop_id == shop_id,
            MessageLogRow.person_id == person_id,
            MessageLogRow.allowed.is_(True),
            ~_released().exists(),
        )
        .group_by(MessageLogRow.channel)
    )
    return {channel: utc(at) for channel, at in rows}


async def _log(session: AsyncSession, shop_id: str, person_id: str, limit: int) -> list[LogLine]:
    """The newest decisions about a customer."""
    rows = await session.execute(
        select(MessageLogRow, ReleaseRow.entry_id)
        .outerjoin(
            ReleaseRow,
            (ReleaseRow.shop_id == MessageLogRow.shop_id)
            & (ReleaseRow.person_id == MessageLogRow.person_id)
            & (ReleaseRow.entry_id == MessageLogRow.entry_id),
        )
        .where(MessageLogRow.shop_id == shop_id, MessageLogRow.person_id == person_id)
        .order_by(MessageLogRow.decided_at.desc(), MessageLogRow.id.desc())
        .limit(limit)
    )
    return [
        LogLine(
            row.message_id,
            row.channel,
            row.transactional,
            row.allowed,
            row.reason,
            utc(row.decided_at),
            released is not None,
        )
        for row, released in rows
    ]


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

    async def put_contact_policies(
        self, shop_id: str, policies: Mapping[str, ContactPolicy], now: datetime
    ) -> None:
        """Stores customers' contact policies (one per customer), each unless a newer one is
        stored, in one statement."""
        if not policies:
            return
        async with self._sessions.begin() as session:
            connection = await session.connection()
            dialect = dialect_of(session)
            if dialect is postgresql:
                await connection.execute(
                    POLICIES_FROM_ARRAYS,
                    {
                        "shop_id": shop_id,
                        "updated_at": now,
                        "person_id": list(policies),
                        "granted": [json.dumps(sorted(p.granted)) for p in policies.values()],
                        "global_unsubscribe": [p.global_unsubscribe for p in policies.values()],
                        "time_zone": [p.time_zone for p in policies.values()],
                        "suppressed": [json.dumps(sorted(p.suppressed)) for p in policies.values()],
                        "version": [p.version for p in policies.values()],
                    },
                )
            else:
                insert = dialect.insert(ContactPolicyRow.__table__).values(
                    [_policy_values(shop_id, p, policy, now) for p, policy in policies.items()]
                )
                await connection.execute(
                    insert.on_conflict_do_update(
                        index_elements=["shop_id", "person_id"],
                        set_={name: insert.excluded[name] for name in POLICY_UPDATED},
                        where=ContactPolicyRow.__table__.c.version < insert.excluded.version,
                    )
                )

    async def erase(
        self, shop_id: str, person_id: str, now: datetime, dry_run: bool
    ) -> dict[str, int]:
        """Deletes a customer's message log, releases and contact policy and stores the erased
        tombstone policy (ERASED) in its place, in one transaction; returns the rows removed by
        table, not counting a tombstone an earlier erasure left. With `dry_run` the same
        transaction is rolled back: the same counts, nothing changed."""
        async with self._sessions() as session:
            async with session.begin() as transaction:
                removed = {}
                for name, model in (
                    ("message_log", MessageLogRow),
                    ("message_release", ReleaseRow),
                ):
                    result = await session.execute(
                        delete(model).where(model.shop_id == shop_id, model.person_id == person_id)
                    )
                    removed[name] = int(getattr(result, "rowcount", 0))
                versions = await session.scalars(
                    delete(ContactPolicyRow)
                    .where(
                        ContactPolicyRow.shop_id == shop_id,
                        ContactPolicyRow.person_id == person_id,
                    )
                    .returning(ContactPolicyRow.version)
                )
                removed["contact_policy"] = sum(1 for v in versions if v != ERASED_VERSION)
                # An upsert: a push may have inserted the row again since the delete.
                values = _policy_values(shop_id, person_id, ERASED, now)
                insert = dialect_of(session).insert(ContactPolicyRow).values(values)
                await session.execute(
                    insert.on_conflict_do_update(
                        index_elements=["shop_id", "person_id"],
                        set_={k: v for k, v in values.items() if k not in ("shop_id", "person_id")},
                    )
                )
                if dry_run:
                    await transaction.rollback()
            return removed

    async def append(self, decided: Sequence[Decided], released: Sequence[Released]) -> None:
        """Writes decisions and releases idempotently (by log entry id), in one transaction.
        Core statements on the connection: this runs beside the gate's hot path."""
        async with self._sessions.begin() as session:
            connection = await session.connection()
            dialect = dialect_of(session)
            if decided and dialect is postgresql:
                names = [field.name for field in fields(Decided)]
                await connection.execute(
                    LOG_FROM_ARRAYS,
                    {name: [getattr(d, name) for d in decided] for name in names},
                )
            elif decided:
                await connection.execute(
                    dialect.insert(MessageLogRow.__table__).on_conflict_do_nothing(
                        index_elements=["shop_id", "person_id", "entry_id"]
                    ),
                    [row(d) for d in decided],
                )
            if released:
                await connection.execute(
                    dialect.insert(ReleaseRow.__table__).on_conflict_do_nothing(),
                    [row(r) for r in released],
                )

    async def customers_by_count(self, shop_id: str, since: datetime) -> dict[int, int]:
        """How many of a shop's customers have n counted messages (allowed, marketing, not
        released) decided after `since`, by n (customers with none are left out)."""
        per_customer = (
            select(MessageLogRow.person_id, func.count().label("n"))
            .where(
                MessageLogRow.shop_id == shop_id,
                MessageLogRow.decided_at > since,
                MessageLogRow.allowed.is_(True),
                MessageLogRow.transactional.is_(False),
                ~_released().exists(),
            )
            .group_by(MessageLogRow.person_id)
            .subquery()
        )
        async with self._sessions() as session:
            rows = await session.execute(
                select(per_customer.c.n, func.count()).group_by(per_customer.c.n)
            )
            return {int(n): int(customers) for n, customers in rows}

    async def rebuild_reads(
        self, shop_id: str, person_ids: Sequence[str], since: datetime
    ) -> tuple[dict[str, ContactPolicy], dict[str, list[tuple[str, str, datetime, str]]]]:
        """What Redis needs to rebuild customers, on one connection: their durable contact
        policies (those that have one) and their counted messages since `since`."""
        async with self._sessions() as session:
            policies = await _contact_policies(session, shop_id, person_ids)
            return policies, await _reservations_since(session, shop_id, person_ids, since)

    async def history(
        self, shop_id: str, person_id: str, log_limit: int
    ) -> tuple[dict[str, datetime], list[LogLine]]:
        """A customer's last contact per channel and (log_limit > 0) the newest decisions about
        them, on one connection."""
        async with self._sessions() as session:
            last = await _last_contact(session, shop_id, person_id)
            log = await _log(session, shop_id, person_id, log_limit) if log_limit else []
            return last, log

    async def log(self, shop_id: str, person_id: str, limit: int) -> list[LogLine]:
        """The newest decisions about a customer."""
        async with self._sessions() as session:
            return await _log(session, shop_id, person_id, limit)
