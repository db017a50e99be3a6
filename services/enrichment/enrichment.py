"""Enrichment's work: the daily run of a shop (read, fit, score, publish; resumable), the
recompute of one person, and the follower that keeps lifecycle stages current as facts arrive
and as time passes."""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from services.enrichment import signals
from services.enrichment.peers import IdentityPeer, ProfilePeer, histories
from services.enrichment.signals import Model, ShopConfig
from services.enrichment.store import EnrichmentStore
from services.runtime.errors import NotFound, PeerRejected
from services.runtime.validation import PersonRef
from services.runtime.worker import Worker

log = logging.getLogger(__name__)

READ_PAGE = 20_000
PUBLISH_IN_FLIGHT = 4
FOLLOW_BATCH = 1000
BACK_TEST_AFTER = timedelta(days=1)
"""A run whose as_of is further back than this is a back-test: fitted, reported, not published."""
ACTIVITY_CURSOR = "profile_activity"
DAILY_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class Progress:
    """Where a run is: its phase, and how far through it."""

    phase: str
    done: int
    total: int
    resumed: bool = False


class Enrichment:
    """Computes and publishes shops' signals."""

    def __init__(
        self,
        store: EnrichmentStore,
        profile: ProfilePeer,
        identity: IdentityPeer,
        clock: Callable[[], datetime],
        follow_interval: float,
        publish_batch: int,
    ) -> None:
        self._store = store
        self._profile = profile
        self._identity = identity
        self._clock = clock
        self._publish_batch = publish_batch
        self._follower = Worker("lifecycle", self.follow, follow_interval)
        self._running: dict[str, asyncio.Lock] = {}
        self._daily: Worker | None = None

    # --- configuration and models ---------------------------------------------------------------

    async def config(self, shop_id: str) -> ShopConfig:
        stored = await self._store.config(shop_id)
        return signals.config_of(stored or {})

    async def put_config(self, shop_id: str, config: ShopConfig) -> None:
        await self._store.put_config(shop_id, asdict(config))

    async def model(self, shop_id: str) -> Model | None:
        """The shop's live model: what scores its persons (None before its first run)."""
        stored = (await self._store.models(shop_id)).get(False)
        return signals.load(stored) if stored else None

    async def report(self, shop_id: str) -> Model:
        """The shop's latest fit, live or back-test."""
        fits = [signals.load(m) for m in (await self._store.models(shop_id)).values()]
        if not fits:
            raise NotFound("model", shop_id)
        return max(fits, key=lambda m: m.fitted_at)

    # --- the daily run --------------------------------------------------------------------------

    async def run_shop(
        self, shop_id: str, as_of: datetime | None
    ) -> AsyncGenerator[Progress, None]:
        """Reads every person's history up to as_of, fits the shop, and (unless a back-test)
        publishes everyone's signals. A live run that was interrupted after its fit resumes
        after the last batch it published, when asked again for the same as_of or for none (the
        daily job). One run per shop at a time per process."""
        lock = self._running.setdefault(shop_id, asyncio.Lock())
        async with lock:
            now = self._clock()
            run = await self._store.run(shop_id)
            unfinished = run.as_of if run and run.finished_at is None else None
            if as_of is None:
                live = unfinished is not None and unfinished >= now - BACK_TEST_AFTER
                as_of = unfinished if unfinished and live else now
            back_test = as_of < now - BACK_TEST_AFTER
            model = None if back_test or unfinished != as_of else await self.model(shop_id)
            resume = model is not None and model.as_of == as_of
            after = run.published_through if resume and run else ""
            pages = []
            async for page in self._pages(shop_id, as_of, after, await self.config(shop_id)):
                pages.append(page)
                yield Progress("read", sum(len(p.person_ids) for p in pages), 0, resume)
            h = histories(pages)
            await self._store.know([shop_id])
            if model is None or not resume:
                model = await asyncio.to_thread(
                    signals.fit, h, as_of, await self.config(shop_id), now
                )
                await self._store.put_model(shop_id, back_test, signals.dump(model))
                if not back_test:
                    await self._store.start_run(shop_id, as_of)
            yield Progress("fit", 1, 1, resume)
            if not back_test:
                scores = await asyncio.to_thread(signals.scores, h, model, as_of)
                async for done in self._publish(shop_id, scores, model.version):
                    yield Progress("publish", done, scores.size, resume)
                await self._store.finish_run(shop_id, self._clock())
            yield Progress("done", h.size, h.size, resume)

    async def _pages(
        self, shop_id: str, as_of: datetime, after: str, config: ShopConfig
    ) -> AsyncIterator[Any]:
        """The shop's histories a page at a time, the next page read while this one is used."""
        days = signals.engagement_days(config)
        pending = asyncio.ensure_future(self._profile.page(shop_id, as_of, after, READ_PAGE, days))
        while True:
            page = await pending
            if page.next_after_person_id:
                pending = asyncio.ensure_future(
                    self._profile.page(shop_id, as_of, page.next_after_person_id, READ_PAGE, days)
                )
            yield page
            if not page.next_after_person_id:
                return

    async def _publish(
        self, shop_id: str, scores: signals.Scores, version: datetime | None
    ) -> AsyncIterator[int]:
        """Hands signals to the profile in batches, PUBLISH_IN_FLIGHT at a time, recording
        progress after each group so that a resumed run never skips an unpublished batch. The
        next group is made (in a thread) while one is in flight and sent while that one is
        recorded, so that the profile is not kept waiting on this side."""
        size, step = self._publish_batch, self._publish_batch * PUBLISH_IN_FLIGHT
        starts = iter(range(0, scores.size, step))

        def make(start: int | None) -> list[signals.Scored]:
            return [] if start is None else scores.persons(start, min(start + step, scores.size))

        def send(group: list[signals.Scored]) -> asyncio.Future[list[int]]:
            return asyncio.gather(
                *(
                    self._profile.put_signals(shop_id, group[i : i + size], version)
                    for i in range(0, len(group), size)
                )
            )

        group = make(next(starts, None))
        sending = send(group)
        done = 0
        try:
            while group:
                following = await asyncio.to_thread(make, next(starts, None))
                await sending
                recording = self._store.published(
                    shop_id, group[-1].person_id, [(s.person_id, s.stage_changes_at) for s in group]
                )
                sending = send(following)
                await recording
                done += len(group)
                yield done
                group = following
        finally:
            sending.cancel()

    # --- one person -----------------------------------------------------------------------------

    async def recompute(self, shop_id: str, ref: PersonRef) -> tuple[signals.Scored, int]:
        """One person's signals now under the shop's current model, published; with the change
        feed entries they made."""
        if ref.identifier:
            try:
                person_id = await self._identity.lookup(shop_id, *ref.identifier)
            except PeerRejected as rejected:
                raise rejected.under(ref.field) from None
        else:
            person_id = ref.person_id
        scored, changes = await self._recompute(shop_id, [person_id])
        if not scored:
            raise NotFound("person", person_id)
        return scored[0], changes

    async def _recompute(
        self, shop_id: str, person_ids: Sequence[str]
    ) -> tuple[list[signals.Scored], int]:
        """Scores and publishes persons now; persons the profile no longer has lose their
        stage deadline."""
        now = self._clock()
        model = await self.model(shop_id) or signals.bare(await self.config(shop_id), now)
        page = await self._profile.of(
            shop_id, now, person_ids, signals.engagement_days(model.config)
        )
        scored = signals.score(histories([page]), model, now)
        changes = await self._profile.put_signals(shop_id, scored, model.version) if scored else 0
        deadlines = dict.fromkeys(person_ids, None) | {
            s.person_id: s.stage_changes_at for s in scored
        }
        await self._store.deadlines(shop_id, list(deadlines.items()))
        return scored, changes

    # --- keeping stages current -----------------------------------------------------------------

    async def follow(self) -> int:
        """Recomputes persons whose facts changed (the profile's activity) and persons whose
        stage deadline passed; returns how many it recomputed."""
        now = self._clock()
        after = await self._store.cursor(ACTIVITY_CURSOR)
        activity = await self._profile.activity(after, FOLLOW_BATCH)
        due = await self._store.due(now, FOLLOW_BATCH)
        persons: dict[str, set[str]] = {}
        for item in activity:
            persons.setdefault(item.shop_id, set()).add(item.person_id)
        for shop_id, person_id in due:
            persons.setdefault(shop_id, set()).add(person_id)
        await self._store.know(sorted(persons))
        for shop_id, ids in persons.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), FOLLOW_BATCH):
                await self._recompute(shop_id, ordered[start : start + FOLLOW_BATCH])
        if activity:
            await self._store.advance(ACTIVITY_CURSOR, activity[-1].sequence)
        return sum(len(ids) for ids in persons.values())

    # --- the daily schedule ---------------------------------------------------------------------

    async def run_due_shops(self, hour_utc: int) -> int:
        """Runs every known shop not yet run since today's run hour (once that hour has come);
        returns how many it ran. A shop that fails is logged and left for the next call."""
        now = self._clock()
        since = now.replace(hour=hour_utc, minute=0, second=0, microsecond=0)
        if now < since:
            return 0
        ran = 0
        for shop_id in await self._store.shops_to_run(since):
            try:
                async for _ in self.run_shop(shop_id, None):
                    pass
            except Exception as exc:
                log.warning(
                    "daily run failed", extra={"shop_id": shop_id, "error": type(exc).__name__}
                )
                continue
            log.info("daily run done", extra={"shop_id": shop_id})
            ran += 1
        return ran

    def start(self, daily_hour_utc: int | None) -> None:
        """Starts following activity and deadlines, and the daily runs if an hour is set."""
        self._follower.start()
        if daily_hour_utc is not None:
            self._daily = Worker(
                "daily", lambda: self._daily_step(daily_hour_utc), DAILY_CHECK_SECONDS
            )
            self._daily.start()

    async def _daily_step(self, hour_utc: int) -> int:
        await self.run_due_shops(hour_utc)
        return 0

    async def stop(self) -> None:
        if self._daily is not None:
            await self._daily.stop()
        await self._follower.stop()
