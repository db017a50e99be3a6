"""SQLAlchemy 2 async engines (PostgreSQL via asyncpg, SQLite via aiosqlite) and migrations."""

import asyncio
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
from alembic import command, context
from alembic.config import Config
from sqlalchemy import JSON, Connection, event, exc, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from services.runtime.settings import RuntimeSettings


class Rehearsal(Exception):
    """Raised inside a transaction to roll it back and hand its result out: a dry run that
    counts exactly what the real run would touch, because it is the real run, undone."""

    def __init__(self, result: Any) -> None:
        super().__init__("dry run")
        self.result = result


# What asyncpg raises when the connection, not the statement, failed: the server went away, was
# shut down or restarted, or the connection broke mid-operation.
LOST_CONNECTION: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


class DatabaseUnavailable(ConnectionError):
    """The database connection was lost during a statement: a retry on a new one may succeed."""


def _lost_connection(context: ExceptionContext) -> None:
    """Turns a statement that failed because its connection was lost into DatabaseUnavailable
    (a dependency failure: UNAVAILABLE, retried) and drops the connection from the pool."""
    cause: BaseException | None = context.original_exception
    while cause is not None:
        if isinstance(cause, LOST_CONNECTION):
            context.is_disconnect = True
            raise DatabaseUnavailable(str(cause)) from context.sqlalchemy_exception
        cause = cause.__cause__


def _closed_connection(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """A pooled connection the server has closed (a restart, a failover, a terminated backend)
    is replaced before it is handed out. asyncpg notices the close when it happens, so this check
    costs no round trip; SQLAlchemy's pre-ping cost three (BEGIN, a statement, ROLLBACK) at every
    checkout, and a ping that failed was raised as DatabaseUnavailable by `_lost_connection`
    instead of being replaced."""
    if dbapi_connection.driver_connection.is_closed():
        raise exc.DisconnectionError("the server closed the connection")


def create_engine(settings: RuntimeSettings) -> AsyncEngine:
    """The service's engine. On PostgreSQL every connection works in the service's own schema,
    so services sharing one database never see each other's tables, and plans every statement
    for its actual parameters and the tables as they are now. A generic plan is kept for the
    connection's life and is made with what PostgreSQL knew at its first call: a prepared `IN
    (...)` of many ids filtered the ids over a whole shop instead of looking each one up, and
    lookups first planned on a new shop's near-empty tables went on scanning every row of the
    shop by its `shop_id` once they had grown (seconds a call instead of ms; docs/identity.md).
    A connection the server closed is replaced at checkout (`_closed_connection`), one lost
    during a statement is DatabaseUnavailable (`_lost_connection`)."""
    url = make_url(settings.sqlalchemy_url)
    if url.get_backend_name() == "postgresql":
        engine = create_async_engine(
            url,
            pool_size=10,
            max_overflow=10,
            connect_args={
                "server_settings": {
                    "search_path": settings.schema_name,
                    "plan_cache_mode": "force_custom_plan",
                },
                "timeout": settings.dependency_timeout_seconds * 5,
            },
        )
        event.listen(engine.sync_engine, "handle_error", _lost_connection)
        event.listen(engine.sync_engine.pool, "checkout", _closed_connection)
        return engine
    if url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    return create_async_engine(url, pool_pre_ping=True)


async def plain_connection(settings: RuntimeSettings) -> asyncpg.Connection:
    """A bare asyncpg connection to the service's PostgreSQL schema, for what SQLAlchemy is not
    made for (COPY of a benchmark's seed, reading tables in tests)."""
    url = make_url(settings.sqlalchemy_url).set(drivername="postgresql")
    return await asyncpg.connect(
        url.render_as_string(hide_password=False),
        server_settings={"search_path": settings.schema_name},
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Raises unless the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def utc(instant: datetime) -> datetime:
    """The instant as an aware UTC datetime (SQLite hands back naive ones)."""
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def dialect_of(session: AsyncSession) -> ModuleType:
    """The SQLAlchemy dialect module of a session's database, for its INSERT … ON CONFLICT."""
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


async def append_to_outbox(
    session: AsyncSession, model: Any, rows: Sequence[dict[str, Any]]
) -> None:
    """Appends rows to an outbox whose sequence its readers follow, as the transaction's last
    write. On PostgreSQL the transaction first takes the outbox's advisory lock and holds it to
    commit, so sequence numbers are handed out in commit order: a reader that has seen sequence
    n never later finds a row below n commit (SQLite has one writer at a time anyway). Every row
    has the keys of the first."""
    if not rows:
        return
    await hold_lock(session, "outbox", model.__tablename__)
    table = model.__table__
    if session.get_bind().dialect.name != "postgresql":
        await session.execute(insert(table), list(rows))
        return
    # COPY: a daily run appends millions of rows, which a multi-row INSERT took four times as
    # long to write (26 against 7 us a row).
    columns = list(rows[0])
    as_json = [isinstance(table.c[column].type, JSON) for column in columns]
    records = [
        [json.dumps(row[c]) if j else row[c] for c, j in zip(columns, as_json, strict=True)]
        for row in rows
    ]
    raw = await (await session.connection()).get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    await driver.copy_records_to_table(table.name, columns=columns, records=records)


async def hold_lock(session: AsyncSession, *key: str) -> None:
    """Takes the advisory lock of a key and holds it until the transaction ends (PostgreSQL;
    SQLite has one writer at a time anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.sha256("\0".join(key).encode()).digest()
        lock = int.from_bytes(digest[:8], "big", signed=True)
        await session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": lock})


def version_table(settings: RuntimeSettings) -> str:
    """Each service's Alembic version table, in its own schema."""
    return f"alembic_version_{settings.service}"


def migrate(settings: RuntimeSettings, migrations: Path, revision: str = "head") -> None:
    """Brings the service's tables to `revision` (run as a step of its own, not at every boot)."""
    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.attributes["settings"] = settings
    command.upgrade(config, revision)


def run_migrations() -> None:
    """The body of every service's migrations/env.py: online migrations on the async engine."""
    settings: RuntimeSettings = context.config.attributes["settings"]

    def upgrade(connection: Connection) -> None:
        context.configure(connection=connection, version_table=version_table(settings))
        with context.begin_transaction():
            context.run_migrations()

    async def run() -> None:
        engine = create_engine(settings)
        try:
            if engine.dialect.name == "postgresql":
                async with engine.begin() as connection:
                    await connection.execute(
                        text(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema_name}"')
                    )
            async with engine.begin() as connection:
                await connection.run_sync(upgrade)
        finally:
            await engine.dispose()

    asyncio.run(run())
