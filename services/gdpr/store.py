"""Persistence of the gdpr service: durable erasure jobs and their steps, Shopify requests
handed over (idempotency), and the audit trail. Nothing here holds personal data: persons are
named by their ids only."""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.runtime.db import dialect_of


class Base(DeclarativeBase):
    """The gdpr service's tables."""


class JobRow(Base):
    """An erasure of one person, or the redaction of a whole shop (person_id empty)."""

    __tablename__ = "erasure_job"
    __table_args__ = (Index("erasure_job_due", "state", "not_before"),)
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    person_id: Mapped[str] = mapped_column(String(64))
    # Shopify's orders_to_redact: order ids, not personal data.
    order_ids: Mapped[list[str]] = mapped_column(JSON)
    # pending, running, done
    state: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StepRow(Base):
    """One service's part of a job, run in `position` order."""

    __tablename__ = "erasure_step"
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    service: Mapped[str] = mapped_column(String(32))
    done: Mapped[bool] = mapped_column(Boolean)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(String(1000))
    removed: Mapped[dict[str, int]] = mapped_column(JSON)


class RequestRow(Base):
    """A Shopify GDPR webhook handed over, once per webhook id."""

    __tablename__ = "shopify_request"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    topic: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(32))
    person_id: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One GDPR action: who, when, what and how many rows; never the personal data itself."""

    __tablename__ = "audit_entry"
    __table_args__ = (Index("audit_entry_shop", "shop_id", "id"),)
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    shop_id: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    person_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(256))
    counts: Mapped[dict[str, int]] = mapped_column(JSON)


@dataclass(frozen=True)
class Audit:
    """An audit entry to record."""

    shop_id: str
    action: str
    actor: str
    person_id: str = ""
    job_id: str = ""
    reason: str = ""
    counts: dict[str, int] | None = None


class GdprStore:
    """Jobs, requests and the audit trail."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create_job(
        self,
        shop_id: str,
        person_id: str,
        order_ids: Sequence[str],
        services: Sequence[str],
        now: datetime,
        not_before: datetime,
        audit: Audit,
    ) -> str:
        """A pending job with one step per service, and its audit entry, in one transaction."""
        job_id = secrets.token_hex(16)
        async with self._sessions.begin() as session:
            session.add(
                JobRow(
                    job_id=job_id, shop_id=shop_id, person_id=person_id,
                    order_ids=list(order_ids), state="pending", requested_at=now,
                    not_before=not_before, completed_at=None,
                )
            )  # fmt: skip
            session.add_all(
                StepRow(
                    job_id=job_id,
                    position=i,
                    service=s,
                    done=False,
                    attempts=0,
                    last_error="",
                    removed={},
                )
                for i, s in enumerate(services)
            )
            _audit(session, audit, job_id, now)
        return job_id

    async def job(self, job_id: str) -> tuple[JobRow, list[StepRow]] | None:
        async with self._sessions() as session:
            job = await session.get(JobRow, job_id)
            if job is None:
                return None
            steps = await session.scalars(
                select(StepRow).where(StepRow.job_id == job_id).order_by(StepRow.position)
            )
            return job, list(steps)

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Unfinished jobs whose time has come, oldest first."""
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(JobRow.job_id)
                    .where(JobRow.state != "done", JobRow.not_before <= now)
                    .order_by(JobRow.requested_at)
                    .limit(limit)
                )
            )

    async def step_done(self, job_id: str, position: int, removed: dict[str, int]) -> None:
        async with self._sessions.begin() as session:
            step = await session.get(StepRow, (job_id, position))
            if step is not None:
                step.done, step.removed, step.last_error = True, removed, ""
                step.attempts += 1
            job = await session.get(JobRow, job_id)
            if job is not None and job.state == "pending":
                job.state = "running"

    async def step_failed(self, job_id: str, position: int, error: str) -> None:
        async with self._sessions.begin() as session:
            step = await session.get(StepRow, (job_id, position))
            if step is not None:
                step.attempts += 1
                step.last_error = error[:1000]

    async def finish(self, job_id: str, now: datetime, audit: Audit) -> None:
        """Marks the job done and records it, once."""
        async with self._sessions.begin() as session:
            job = await session.get(JobRow, job_id, with_for_update=True)
            if job is None or job.state == "done":
                return
            job.state, job.completed_at = "done", now
            _audit(session, audit, job_id, now)

    async def request(self, shop_id: str, webhook_id: str) -> RequestRow | None:
        async with self._sessions() as session:
            return await session.get(RequestRow, (shop_id, webhook_id))

    async def put_request(self, row: RequestRow) -> RequestRow:
        """Records a handed-over request unless it was already; returns the recorded one."""
        async with self._sessions.begin() as session:
            values = {c.name: getattr(row, c.name) for c in RequestRow.__table__.columns}
            await session.execute(
                dialect_of(session).insert(RequestRow).values(values).on_conflict_do_nothing()
            )
        recorded = await self.request(row.shop_id, row.webhook_id)
        assert recorded is not None
        return recorded

    async def audit(self, entry: Audit, now: datetime) -> None:
        async with self._sessions.begin() as session:
            _audit(session, entry, entry.job_id, now)

    async def audit_page(self, shop_id: str, before: int, limit: int) -> list[AuditRow]:
        """The shop's entries, newest first, with ids below `before` (0: from the newest)."""
        async with self._sessions() as session:
            query = select(AuditRow).where(AuditRow.shop_id == shop_id)
            if before:
                query = query.where(AuditRow.id < before)
            return list(await session.scalars(query.order_by(AuditRow.id.desc()).limit(limit)))

    async def erasures_done(self, shop_id: str) -> int:
        async with self._sessions() as session:
            counted = await session.scalar(
                select(func.count()).where(
                    JobRow.shop_id == shop_id, JobRow.state == "done", JobRow.person_id != ""
                )
            )
            return int(counted or 0)


def _audit(session: AsyncSession, entry: Audit, job_id: str, now: datetime) -> None:
    session.add(
        AuditRow(
            shop_id=entry.shop_id, action=entry.action, actor=entry.actor, at=now,
            person_id=entry.person_id, job_id=job_id, reason=entry.reason[:256],
            counts=entry.counts or {},
        )
    )  # fmt: skip


def counts_of(removed: Any) -> dict[str, int]:
    """A protobuf map of counts as a plain dict."""
    return {str(k): int(v) for k, v in removed.items()}
