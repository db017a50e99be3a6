"""A summary refresh settles the request it read, never one made while it ran."""

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from services.profile.__main__ import MIGRATIONS
from services.profile.audience_store import AudienceStore, Refreshed
from services.profile.store import _mark_all_due
from services.runtime import db


async def test_a_request_made_again_at_the_same_instant_outlives_the_refresh_that_read_the_first(
    settings_for: Callable[..., Any], run_id: str
) -> None:
    # A schema of its own: other tests' services leave requests in the run's profile schema.
    settings = settings_for("profile", db_schema_prefix=f"{run_id}_summary_requests_")
    await asyncio.to_thread(db.migrate, settings, MIGRATIONS)
    engine = db.create_engine(settings)
    sessions = db.session_factory(engine)
    store = AudienceStore(sessions)
    instant = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # a frozen clock: both requests alike

    async def request() -> None:
        async with sessions.begin() as session:
            await _mark_all_due(session, "shop-a", ["p1"], instant)

    def refreshed(due: Any) -> Refreshed:
        return Refreshed(due=due, root="p1", gone=[], anchors=[], summary=None, tags=[])

    await request()
    [read] = await store.due_summaries(10)
    await request()  # a new fact while the refresh builds from the old ones
    await store.save_summaries([refreshed(read)])
    [left] = await store.due_summaries(10)
    assert (left.person_id, left.requested_at, left.requests) == ("p1", instant, 2)
    await store.save_summaries([refreshed(left)])
    assert await store.due_summaries(10) == []
    await engine.dispose()
