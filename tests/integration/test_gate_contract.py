"""The gate's semantics, as one contract run against both counter stores: real Redis and the
embedded in-process store. Time is a clock the test moves; the database is real PostgreSQL."""

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.asyncio as redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.gate.counters import ContactPolicy, Counters, CustomerKeys
from services.gate.gate import Decision, Gate, Request
from services.gate.message_log import MessageLogWriter
from services.gate.rules import CHANNELS
from services.gate.store import GateStore
from services.runtime import db
from services.runtime.errors import AlreadyExists
from tests.backing import Backing
from tests.clock import Clock

MIGRATIONS = Path(__file__).parents[2] / "services" / "gate" / "migrations"
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class GateUnderTest:
    gate: Gate
    clock: Clock
    store: GateStore
    writer: MessageLogWriter
    client: Any
    metrics: InMemoryMetricReader
    shop: str
    make_gate: Callable[..., Gate]

    async def consent(self, person: str, time_zone: str = "", **policy: Any) -> None:
        granted = frozenset(policy.pop("granted", CHANNELS))
        await self.gate.put_contact_policy(
            self.shop, person, ContactPolicy(granted, time_zone=time_zone, **policy)
        )

    async def check(self, person: str, channel: str, message: str, **kw: Any) -> Decision:
        return await self.gate.check(Request(self.shop, person, channel, message, **kw))

    async def lose_redis(self, person: str) -> None:
        """Redis loses the customer's keys, as after a restart without persistence."""
        await self.client.delete(*CustomerKeys.of(self.shop, person).all())


SLOW_MACHINE_SECONDS = 30.0


@pytest.fixture(params=["redis", "embedded"])
async def gut(
    request: pytest.FixtureRequest,
    backing: Backing,
    settings_for: Callable[..., Any],
    tmp_path: Path,
) -> AsyncIterator[GateUnderTest]:
    """The gate on PostgreSQL and Redis, or on its embedded defaults: SQLite and in-process
    counters, as `make run` runs it."""
    if request.param == "redis":
        settings = settings_for("gate")
    else:
        settings = settings_for("gate", database_url=f"sqlite+aiosqlite:///{tmp_path}/gate.db")
    await asyncio.to_thread(db.migrate, settings, MIGRATIONS)
    engine = db.create_engine(settings)
    store = GateStore(db.session_factory(engine))
    client = (
        redis.from_url(backing.redis_url)
        if request.param == "redis"
        else fakeredis.FakeAsyncRedis()
    )
    # Timeouts far above any healthy answer: these tests are about what the gate decides, and a
    # busy machine must not turn a decision into gate_unavailable (test_gate_service covers that).
    counters = Counters(client, timeout=SLOW_MACHINE_SECONDS)
    writer = MessageLogWriter(store, counters, interval=3600, batch_size=100_000)
    clock = Clock(NOON)
    metrics = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[metrics]).get_meter("test")

    def make_gate(gate_store: GateStore = store, **overrides: Any) -> Gate:
        """Another replica on the same stores (its database store and settings overridable)."""
        settings = {"shop_policy_ttl": 0, "database_timeout": SLOW_MACHINE_SECONDS, **overrides}
        return Gate(counters, gate_store, writer, clock, meter, **settings)

    yield GateUnderTest(
        make_gate(),
        clock,
        store,
        writer,
        client,
        metrics,
        f"shop-{secrets.token_hex(4)}",
        make_gate,
    )
    await writer.stop()
    await client.aclose()
    await engine.dispose()


def summary(decision: Decision) -> tuple[bool, str, datetime | None]:
    return decision.allowed, decision.reason, decision.next_eligible_at


async def test_no_contact_policy_means_no_consent_and_never_retry(gut: GateUnderTest) -> None:
    decision = await gut.check("p1", "sms", "m1")
    assert summary(decision) == (False, "no_consent:sms", None)
    assert decision.retryable is False


async def test_consent_is_per_channel(gut: GateUnderTest) -> None:
    await gut.consent("p1", granted={"email"})
    assert (await gut.check("p1", "email", "m1")).allowed is True
    assert summary(await gut.check("p1", "whatsapp", "m2")) == (
        False,
        "no_consent:whatsapp",
        None,
    )


async def test_global_unsubscribe_turns_every_channel_off(gut: GateUnderTest) -> None:
    await gut.consent("p1", global_unsubscribe=True)
    for i, channel in enumerate(CHANNELS):
        decision = await gut.check("p1", channel, f"m{i}")
        assert summary(decision) == (False, "global_unsubscribe", None)
        assert decision.retryable is False


async def test_the_global_cap_is_reached_at_three_and_resets_at_local_midnight(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1")
    for i, channel in enumerate(["email", "push", "whatsapp"]):
        assert (await gut.check("p1", channel, f"m{i}")).allowed is True
    blocked = await gut.check("p1", "email", "m3")
    midnight = datetime(2026, 6, 2, tzinfo=UTC)
    assert summary(blocked) == (False, "global_cap_reached:3/3", midnight)
    assert blocked.retryable is True
    assert blocked.counts.today_by_channel == {"email": 1, "push": 1, "whatsapp": 1}
    assert blocked.counts.today_total == 3


async def test_the_channel_cap_is_reached_with_exact_counts(gut: GateUnderTest) -> None:
    await gut.consent("p1")
    assert (await gut.check("p1", "whatsapp", "m1")).allowed is True
    assert (await gut.check("p1", "whatsapp", "m2")).allowed is True
    blocked = await gut.check("p1", "whatsapp", "m3")
    assert summary(blocked) == (
        False,
        "channel_cap_reached:whatsapp:2/2",
        datetime(2026, 6, 2, tzinfo=UTC),
    )
    assert (await gut.check("p1", "sms", "m4")).allowed is True
    assert summary(await gut.check("p1", "sms", "m5"))[1] == "global_cap_reached:3/3"


async def test_the_calendar_day_rolls_over_at_the_customers_midnight(gut: GateUnderTest) -> None:
    await gut.consent("p1", time_zone="America/New_York")
    gut.clock.set(datetime(2026, 6, 2, 3, 0, tzinfo=UTC))  # 23:00 on 1 June in New York
    for i in range(3):
        assert (await gut.check("p1", "email", f"m{i}")).allowed is True
    local_midnight = datetime(2026, 6, 2, 4, 0, tzinfo=UTC)
    assert (await gut.check("p1", "email", "m3")).next_eligible_at == local_midnight
    gut.clock.set(local_midnight - timedelta(milliseconds=1))
    assert summary(await gut.check("p1", "email", "m4"))[1] == "global_cap_reached:3/3"
    gut.clock.set(local_midnight)
    allowed = await gut.check("p1", "email", "m5")
    assert allowed.allowed is True
    assert allowed.counts.today_total == 0
    assert allowed.counts.last_window == 3


async def test_fatigue_blocks_at_seven_in_seven_days_until_the_oldest_leaves(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1")
    for day in range(7):
        gut.clock.set(NOON + timedelta(days=day))
        assert (await gut.check("p1", "email", f"m{day}")).allowed is True
    week_later = NOON + timedelta(days=7)
    gut.clock.set(week_later - timedelta(milliseconds=1))
    blocked = await gut.check("p1", "email", "late")
    assert summary(blocked) == (False, "fatigue:0.70/0.70", week_later)
    assert (blocked.counts.last_window, blocked.counts.fatigue) == (7, "0.70")
    gut.clock.set(week_later)
    allowed = await gut.check("p1", "email", "on-time")
    assert allowed.allowed is True
    assert (allowed.counts.last_window, allowed.counts.fatigue) == (6, "0.60")


async def test_a_shops_own_fatigue_threshold_and_caps(gut: GateUnderTest) -> None:
    await gut.gate.put_shop_policy(
        gut.shop, {"global_daily_cap": 10, "channel_caps": {"email": 10}, "fatigue_threshold": 50}
    )
    await gut.consent("p1")
    for i in range(5):
        assert (await gut.check("p1", "email", f"m{i}")).allowed is True
    blocked = await gut.check("p1", "email", "m5")
    assert summary(blocked) == (False, "fatigue:0.50/0.50", NOON + timedelta(days=7))


async def test_quiet_hours_in_the_customers_zone_and_email_is_exempt(gut: GateUnderTest) -> None:
    await gut.consent("p1", time_zone="Europe/Paris")
    gut.clock.set(datetime(2026, 6, 1, 20, 30, tzinfo=UTC))  # 22:30 in Paris
    nine_in_paris = datetime(2026, 6, 2, 7, 0, tzinfo=UTC)
    blocked = await gut.check("p1", "sms", "m1")
    assert summary(blocked) == (False, "quiet_hours", nine_in_paris)
    assert blocked.retryable is True
    assert (await gut.check("p1", "email", "m2")).allowed is True
    gut.clock.set(nine_in_paris)
    assert (await gut.check("p1", "sms", "m3")).allowed is True


async def test_quiet_hours_end_is_dst_safe(gut: GateUnderTest) -> None:
    await gut.consent("p1", time_zone="Europe/Paris")
    gut.clock.set(datetime(2026, 3, 28, 21, 30, tzinfo=UTC))  # 22:30 CET, the night clocks jump
    blocked = await gut.check("p1", "push", "m1")
    # 09:00 on 29 March is summer time (UTC+2): 07:00 UTC, 9.5 hours later, not 10.5.
    assert summary(blocked) == (False, "quiet_hours", datetime(2026, 3, 29, 7, 0, tzinfo=UTC))


async def test_the_daily_cap_resets_at_the_real_midnight_on_a_25_hour_day(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1", time_zone="Europe/Paris")
    gut.clock.set(datetime(2026, 10, 25, 12, 0, tzinfo=UTC))  # the day clocks go back
    for i in range(3):
        assert (await gut.check("p1", "email", f"m{i}")).allowed is True
    blocked = await gut.check("p1", "email", "m3")
    assert blocked.next_eligible_at == datetime(2026, 10, 25, 23, 0, tzinfo=UTC)


async def test_region_quiet_hours_apply_to_customers_in_that_region(gut: GateUnderTest) -> None:
    await gut.gate.put_shop_policy(
        gut.shop, {"region_quiet_hours": {"America/": [22 * 60, 8 * 60]}}
    )
    await gut.consent("ny", time_zone="America/New_York")
    await gut.consent("paris", time_zone="Europe/Paris")
    gut.clock.set(datetime(2026, 6, 2, 1, 30, tzinfo=UTC))  # 21:30 New York, 03:30 Paris
    assert (await gut.check("ny", "sms", "m1")).allowed is True
    assert summary(await gut.check("paris", "sms", "m2"))[1] == "quiet_hours"
    gut.clock.set(datetime(2026, 6, 2, 2, 0, tzinfo=UTC))  # 22:00 New York
    blocked = await gut.check("ny", "push", "m3")
    assert summary(blocked) == (False, "quiet_hours", datetime(2026, 6, 2, 12, 0, tzinfo=UTC))


async def test_a_replica_that_never_saw_the_customers_zone_still_uses_it(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1", time_zone="Asia/Tokyo")
    other_replica = gut.make_gate()
    gut.clock.set(datetime(2026, 6, 1, 13, 0, tzinfo=UTC))  # 22:00 in Tokyo, 13:00 UTC
    decision = await other_replica.check(Request(gut.shop, "p1", "sms", "m1"))
    assert summary(decision) == (False, "quiet_hours", datetime(2026, 6, 2, 0, 0, tzinfo=UTC))


async def test_the_same_message_id_counts_once_and_gets_the_same_answer(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1")
    first = await gut.check("p1", "sms", "m1")
    again = await gut.check("p1", "sms", "m1")
    assert (first.allowed, first.replayed) == (True, False)
    assert (again.allowed, again.replayed) == (True, True)
    assert again.counts.today_total == 1
    assert (await gut.check("p1", "email", "m2")).counts.today_total == 1


async def test_release_gives_the_reservation_back_once(gut: GateUnderTest) -> None:
    await gut.consent("p1")
    assert (await gut.check("p1", "sms", "m1")).allowed is True
    assert await gut.gate.release(gut.shop, "p1", "m1") is True
    assert await gut.gate.release(gut.shop, "p1", "m1") is False
    assert await gut.gate.release(gut.shop, "p1", "never-sent") is False
    again = await gut.check("p1", "sms", "m1")
    assert (again.allowed, again.replayed, again.counts.today_total) == (True, False, 0)


async def test_transactional_messages_skip_marketing_rules_and_do_not_count(
    gut: GateUnderTest,
) -> None:
    gut.clock.set(datetime(2026, 6, 1, 23, 0, tzinfo=UTC))  # quiet hours in UTC
    for i in range(5):
        decision = await gut.check("p1", "sms", f"t{i}", transactional=True)
        assert summary(decision) == (True, "", None)
        assert decision.counts.today_total == 0


async def test_a_hard_suppression_blocks_even_transactional_messages(gut: GateUnderTest) -> None:
    await gut.consent("p1", suppressed=frozenset({"sms"}))
    for message_class in (True, False):
        decision = await gut.check("p1", "sms", f"m{message_class}", transactional=message_class)
        assert summary(decision) == (False, "suppressed:sms", None)
    assert (await gut.check("p1", "email", "receipt", transactional=True)).allowed is True


async def test_a_dry_run_reserves_and_logs_nothing(gut: GateUnderTest) -> None:
    await gut.consent("p1")
    for _ in range(2):
        dry = await gut.check("p1", "sms", "m1", dry_run=True)
        assert (dry.allowed, dry.replayed, dry.counts.today_total) == (True, False, 0)
    assert (await gut.check("p1", "sms", "m1")).replayed is False
    await gut.writer.flush()
    assert [r.message_id for r in await gut.store.log(gut.shop, "p1", 10)] == ["m1"]


async def test_every_decision_and_release_reaches_the_durable_log(gut: GateUnderTest) -> None:
    await gut.consent("p1", granted={"email", "sms"})
    await gut.check("p1", "whatsapp", "m1")
    gut.clock.set(NOON + timedelta(seconds=1))
    await gut.check("p1", "sms", "m2")
    gut.clock.set(NOON + timedelta(seconds=2))
    await gut.check("p1", "sms", "m3")
    gut.clock.set(NOON + timedelta(seconds=3))
    await gut.gate.release(gut.shop, "p1", "m2")
    await gut.writer.flush()
    rows = await gut.store.log(gut.shop, "p1", 10)
    assert [(r.message_id, r.channel, r.allowed, r.reason, r.released) for r in rows] == [
        ("m3", "sms", False, "channel_cap_reached:sms:1/1", False),
        ("m2", "sms", True, "", True),
        ("m1", "whatsapp", False, "no_consent:whatsapp", False),
    ]
    log_key = CustomerKeys.of(gut.shop, "p1").log
    assert await gut.client.xlen(log_key) == 4
    assert 0 < await gut.client.pttl(log_key) <= 60_000


async def test_counters_lost_by_redis_are_rebuilt_before_the_next_answer(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1", granted={"email"})
    for i in range(3):
        assert (await gut.check("p1", "email", f"m{i}")).allowed is True
    await gut.lose_redis("p1")
    blocked = await gut.check("p1", "email", "m3")
    assert summary(blocked)[:2] == (False, "global_cap_reached:3/3")
    assert blocked.counts.today_by_channel == {"email": 3}
    assert summary(await gut.check("p1", "sms", "m4"))[1] == "no_consent:sms"


async def test_two_hundred_concurrent_checks_allow_exactly_the_cap(gut: GateUnderTest) -> None:
    await gut.consent("p1")
    decisions = await asyncio.gather(*(gut.check("p1", "email", f"m{i}") for i in range(200)))
    assert Counter((d.allowed, d.reason) for d in decisions) == {
        (True, ""): 3,
        (False, "global_cap_reached:3/3"): 197,
    }


async def test_concurrent_checks_on_every_channel_never_exceed_any_cap(
    gut: GateUnderTest,
) -> None:
    await gut.gate.put_shop_policy(gut.shop, {"global_daily_cap": 6})
    await gut.consent("p1")
    decisions = await asyncio.gather(
        *(gut.check("p1", CHANNELS[i % 4], f"m{i}") for i in range(200))
    )
    allowed = Counter(CHANNELS[i % 4] for i, d in enumerate(decisions) if d.allowed)
    assert sum(allowed.values()) == 6
    assert all(
        allowed[c] <= cap for c, cap in {"email": 5, "sms": 1, "whatsapp": 2, "push": 3}.items()
    )
    assert {d.reason.split(":")[0] for d in decisions if not d.allowed} <= {
        "global_cap_reached",
        "channel_cap_reached",
    }


async def test_check_batch_decides_each_item_as_check_would(gut: GateUnderTest) -> None:
    for person in ("a", "b"):
        await gut.consent(person, granted={"sms"})
    await gut.check("b", "sms", "earlier")
    batch = [Request(gut.shop, p, "sms", f"campaign-{p}") for p in ("a", "b", "c", "a")]
    decisions = await gut.gate.check_batch(batch)
    assert [(d.allowed, d.reason, d.replayed) for d in decisions] == [
        (True, "", False),
        (False, "channel_cap_reached:sms:1/1", False),
        (False, "no_consent:sms", False),
        (True, "", True),
    ]


async def test_decisions_are_counted_by_outcome_and_channel(gut: GateUnderTest) -> None:
    await gut.consent("p1", granted={"email"})
    await gut.check("p1", "email", "m1")
    await gut.check("p1", "sms", "m2")
    await gut.check("p1", "sms", "m3")
    data: Any = gut.metrics.get_metrics_data()
    points = {
        (p.attributes["outcome"], p.attributes["channel"]): p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "c360.gate.decisions"
        for p in metric.data.data_points
    }
    assert points == {("allowed", "email"): 1, ("no_consent", "sms"): 2}


async def test_a_policy_update_after_redis_lost_the_customer_keeps_the_counts(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1", granted={"email"})
    for i in range(3):
        assert (await gut.check("p1", "email", f"m{i}")).allowed is True
    await gut.lose_redis("p1")
    await gut.consent("p1", granted={"email", "sms"})
    blocked = await gut.check("p1", "sms", "m3")
    assert summary(blocked)[:2] == (False, "global_cap_reached:3/3")


async def test_releasing_then_reusing_a_message_id_counts_exactly_once_after_a_rebuild(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1", granted={"email"})
    assert (await gut.check("p1", "email", "m1")).allowed is True
    assert await gut.gate.release(gut.shop, "p1", "m1") is True
    for message in ("m1", "m2", "m3"):
        assert (await gut.check("p1", "email", message)).allowed is True
    await gut.lose_redis("p1")
    blocked = await gut.check("p1", "email", "m4")
    assert (blocked.reason, blocked.counts.today_total) == ("global_cap_reached:3/3", 3)


async def test_release_after_redis_lost_the_customer_still_releases(gut: GateUnderTest) -> None:
    await gut.consent("p1", granted={"email"})
    assert (await gut.check("p1", "email", "m1")).allowed is True
    await gut.writer.flush()
    await gut.lose_redis("p1")
    assert await gut.gate.release(gut.shop, "p1", "m1") is True
    assert (await gut.check("p1", "email", "m2")).counts.today_total == 0


async def test_an_older_policy_never_replaces_a_newer_one(gut: GateUnderTest) -> None:
    await gut.consent("p1", global_unsubscribe=True, version=2)
    await gut.consent("p1", version=1)
    assert (await gut.check("p1", "email", "m1")).reason == "global_unsubscribe"
    await gut.lose_redis("p1")
    assert (await gut.check("p1", "email", "m2")).reason == "global_unsubscribe"


async def test_a_message_id_reserved_on_one_channel_cannot_be_checked_on_another(
    gut: GateUnderTest,
) -> None:
    await gut.consent("p1")
    assert (await gut.check("p1", "email", "m1")).allowed is True
    with pytest.raises(AlreadyExists, match="'m1' is reserved on email"):
        await gut.check("p1", "sms", "m1")


async def test_a_batch_holding_a_message_reserved_on_another_channel_fails_and_logs_the_rest(
    gut: GateUnderTest,
) -> None:
    for person in ("a", "b", "c"):
        await gut.consent(person)
    assert (await gut.check("b", "email", "m-b")).allowed is True
    batch = [Request(gut.shop, p, "sms", f"m-{p}") for p in ("a", "b", "c")]
    with pytest.raises(AlreadyExists, match="'m-b' is reserved on email"):
        await gut.gate.check_batch(batch)
    # The others were decided (and reserved): their decisions are in the log, and asking again
    # replays them.
    for person in ("a", "c"):
        history = await gut.gate.history(gut.shop, person, 10)
        assert [(line.message_id, line.channel, line.allowed) for line in history.log] == [
            (f"m-{person}", "sms", True)
        ]
    replayed = await gut.gate.check_batch([batch[0], batch[2]])
    assert [(d.allowed, d.replayed) for d in replayed] == [(True, True), (True, True)]


async def test_a_batch_of_customers_the_gate_never_saw_is_decided_in_bulk(
    gut: GateUnderTest,
) -> None:
    for person in ("p0", "p1"):
        await gut.consent(person, granted={"sms"})
    await gut.client.delete(*CustomerKeys.of(gut.shop, "p1").all())
    people = [f"p{n}" for n in range(3000)]
    decisions = await gut.gate.check_batch(
        [Request(gut.shop, person, "sms", f"c-{person}") for person in people]
    )
    assert [d.reason for d in decisions[:3]] == ["", "", "no_consent:sms"]
    assert Counter(d.reason for d in decisions) == {"": 2, "no_consent:sms": 2998}


async def test_a_batch_works_after_redis_forgot_its_scripts(gut: GateUnderTest) -> None:
    await gut.consent("p1", granted={"sms"})
    await gut.client.script_flush()
    decisions = await gut.gate.check_batch(
        [Request(gut.shop, "p1", "sms", "m1"), Request(gut.shop, "p2", "sms", "m2")]
    )
    assert [d.reason for d in decisions] == ["", "no_consent:sms"]


@pytest.mark.parametrize("gut", ["redis"], indirect=True)
async def test_a_stalled_database_during_a_rebuild_is_gate_unavailable_and_loses_no_decision(
    gut: GateUnderTest, settings_for: Callable[..., Any]
) -> None:
    """A check for a customer Redis lost first writes this replica's buffered decisions to the
    database (so that the rebuilt counts include them). With the message log locked, that write
    gives up at the database timeout, answering gate_unavailable rather than hanging, and the
    decisions it was writing stay queued: they reach the log once the database answers again,
    with the gate_unavailable answer."""
    gate = gut.make_gate(database_timeout=0.2)
    await gut.consent("p1", granted={"email"})
    await gut.consent("p2", granted={"email"})
    assert (await gut.check("p1", "email", "m1")).allowed is True
    await gut.lose_redis("p2")
    locker = await db.plain_connection(settings_for("gate"))
    try:
        await locker.execute("BEGIN; LOCK TABLE message_log IN EXCLUSIVE MODE")
        stalled = await asyncio.wait_for(
            gate.check(Request(gut.shop, "p2", "email", "m2")), SLOW_MACHINE_SECONDS
        )
    finally:
        await locker.execute("ROLLBACK")
        await locker.close()
    assert (stalled.allowed, stalled.reason, stalled.retryable) == (
        False,
        "gate_unavailable",
        True,
    )
    assert await gut.writer.flush() == 2
    assert [(r.message_id, r.allowed) for r in await gut.store.log(gut.shop, "p1", 10)] == [
        ("m1", True)
    ]
    gut.clock.set(NOON + timedelta(seconds=1))
    assert (await gate.check(Request(gut.shop, "p2", "email", "m2"))).allowed is True
    await gut.writer.flush()
    assert [(r.message_id, r.reason) for r in await gut.store.log(gut.shop, "p2", 10)] == [
        ("m2", ""),
        ("m2", "gate_unavailable"),
    ]


async def test_a_contact_history_first_leaves_the_policy_to_be_pulled_by_the_next_check(
    gut: GateUnderTest,
) -> None:
    """The journey engine reads a profile (the gate's contact history) before its first check of
    a customer the gate holds no policy for: the history's rebuild does not ask the profile, and
    the check that follows still does, and decides on the consent it gets."""
    asked: list[list[str]] = []

    async def profile(shop_id: str, person_ids: list[str]) -> dict[str, ContactPolicy]:
        asked.append(person_ids)
        return {p: ContactPolicy(frozenset({"email"}), version=5) for p in person_ids}

    gate = gut.make_gate(policy_source=profile)
    history = await gate.history(gut.shop, "p1", 10)
    assert (history.counts.today_total, history.log, asked) == (0, [], [])
    decision = await gate.check(Request(gut.shop, "p1", "email", "m1"))
    assert (decision.allowed, decision.reason, asked) == (True, "", [["p1"]])
    assert (await gate.check(Request(gut.shop, "p1", "sms", "m2"))).reason == "no_consent:sms"
    assert asked == [["p1"]]
    assert (await gate.history(gut.shop, "p1", 10)).counts.today_total == 1


class HeldReads(GateStore):
    """The gate's store, whose shop policy reads can be held once they have read (a slow read
    that returns after a change was written)."""

    def __init__(self, sessions: Any) -> None:
        super().__init__(sessions)
        self.hold: asyncio.Event | None = None
        self.read = asyncio.Event()

    async def shop_policy(self, shop_id: str) -> dict[str, Any] | None:
        document = await super().shop_policy(shop_id)
        if self.hold is not None:
            self.read.set()
            await self.hold.wait()
        return document


async def test_a_policy_read_that_began_before_a_change_does_not_bring_the_old_one_back(
    gut: GateUnderTest,
) -> None:
    store = HeldReads(gut.store._sessions)
    gate = gut.make_gate(store)
    await gate.put_shop_policy(gut.shop, {"global_daily_cap": 3, "channel_caps": {"email": 3}})
    await gut.consent("p1", granted={"email"})
    assert (await gate.check(Request(gut.shop, "p1", "email", "m1"))).allowed is True
    store.hold = asyncio.Event()
    # Served from the cache, which sends a refresh to the database: it reads the cap of 3.
    assert (await gate.check(Request(gut.shop, "p1", "email", "m2"))).allowed is True
    await asyncio.wait_for(store.read.wait(), SLOW_MACHINE_SECONDS)
    await gate.put_shop_policy(gut.shop, {"global_daily_cap": 1, "channel_caps": {"email": 3}})
    hold, store.hold = store.hold, None
    hold.set()
    await asyncio.gather(*gate._refreshing.values())
    blocked = await gate.check(Request(gut.shop, "p1", "email", "m3"))
    assert (blocked.allowed, blocked.reason) == (False, "global_cap_reached:2/1")
