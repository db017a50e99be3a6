"""The identity service over a real channel on real PostgreSQL: the Sarah scenario, every
conflict kind, merge and exact unmerge, read-only lookups, forgetting, and 1,000 racing resolves."""

import asyncio
import contextlib
import itertools
import random
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from c360.common.v1 import common_pb2
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.runtime import db
from services.runtime.server import Server
from services.runtime.telemetry import Telemetry
from tests.clock import Clock
from tests.conftest import ADMIN_TOKEN, service_module
from tests.rpc import bearer, details

AUTHORITATIVE = identity_pb2.STRENGTH_AUTHORITATIVE
ASSERTED = identity_pb2.STRENGTH_ASSERTED
O = identity_pb2  # noqa: E741  # outcomes read as O.RESOLVE_OUTCOME_...
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class Identity:
    """A client of one shop on a running identity service, and the clock it runs on."""

    stub: Any
    shop: str
    clock: Clock
    events: "itertools.count[int]"

    async def resolve(
        self,
        *identifiers: tuple[str, str],
        strength: identity_pb2.Strength.ValueType = AUTHORITATIVE,
        **kw: Any,
    ) -> Any:
        kw.setdefault("event_id", f"e{next(self.events)}")
        kw.setdefault("source", "shopify")
        return await self.stub.Resolve(
            identity_pb2.ResolveRequest(
                shop_id=self.shop,
                identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in identifiers],
                strength=strength,
                **kw,
            ),
            metadata=bearer(ADMIN_TOKEN),
        )

    async def person(self, person_id: str) -> Any:
        return await self.stub.GetPerson(
            identity_pb2.GetPersonRequest(shop_id=self.shop, person_id=person_id),
            metadata=bearer(ADMIN_TOKEN),
        )

    async def keys(self, person_id: str) -> set[tuple[str, str]]:
        """The (type, normalised value) pairs of a person."""
        return {(i.type, i.normalized_value) for i in (await self.person(person_id)).identifiers}

    async def lookup(self, type_: str, value: str) -> str:
        answer = await self.stub.Lookup(
            identity_pb2.LookupRequest(
                shop_id=self.shop, identifier=common_pb2.Identifier(type=type_, value=value)
            ),
            metadata=bearer(ADMIN_TOKEN),
        )
        return str(answer.person_id)

    async def candidates(self) -> list[Any]:
        answer = await self.stub.ListMergeCandidates(
            identity_pb2.ListMergeCandidatesRequest(shop_id=self.shop),
            metadata=bearer(ADMIN_TOKEN),
        )
        return list(answer.candidates)

    async def call(self, method: str, **fields: Any) -> Any:
        stub_method = getattr(self.stub, method)
        request_class = {
            "Merge": identity_pb2.MergeRequest,
            "Unmerge": identity_pb2.UnmergeRequest,
            "DismissCandidate": identity_pb2.DismissCandidateRequest,
            "Forget": identity_pb2.ForgetRequest,
            "PutShopPolicy": identity_pb2.ShopPolicy,
            "ListChanges": identity_pb2.ListChangesRequest,
        }[method]
        return await stub_method(
            request_class(shop_id=self.shop, **fields), metadata=bearer(ADMIN_TOKEN)
        )


@contextlib.asynccontextmanager
async def running(settings: Any) -> AsyncIterator[Identity]:
    """The identity service with these settings, on a clock the test moves."""
    module = service_module("identity")
    await asyncio.to_thread(db.migrate, settings, Path(module.MIGRATIONS))
    clock = Clock(NOON)
    server: Server = await module.build(settings, Telemetry(), clock=clock)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Identity(
            identity_pb2_grpc.IdentityStub(channel),
            f"shop-{secrets.token_hex(4)}",
            clock,
            itertools.count(1),
        )
    await server.stop(grace=1.0)


@pytest.fixture(params=["postgresql", "sqlite"])
async def identity(
    request: pytest.FixtureRequest, settings_for: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[Identity]:
    """The identity service on PostgreSQL, and on its embedded SQLite default."""
    overrides = {}
    if request.param == "sqlite":
        overrides["database_url"] = f"sqlite+aiosqlite:///{tmp_path}/identity.db"
    async with running(settings_for("identity", **overrides)) as client:
        yield client


@pytest.fixture
async def identity_pg(settings_for: Callable[..., Any]) -> AsyncIterator[Identity]:
    """The identity service on PostgreSQL only, where resolves run on many connections."""
    async with running(settings_for("identity")) as client:
        yield client


async def test_sarah_two_emails_one_phone_two_sessions_is_one_person(identity: Identity) -> None:
    phone_visit = await identity.resolve(("cookie", "ck-A"), source="web")
    assert phone_visit.outcome == O.RESOLVE_OUTCOME_CREATED
    popup = await identity.resolve(
        ("cookie", "ck-A"), ("email", " Sarah@Work.Example "), source="popup", strength=ASSERTED
    )
    assert (popup.outcome, popup.person_id) == (O.RESOLVE_OUTCOME_LINKED, phone_visit.person_id)
    laptop_visit = await identity.resolve(("cookie", "ck-B"), source="web")
    assert laptop_visit.outcome == O.RESOLVE_OUTCOME_CREATED
    assert laptop_visit.person_id != phone_visit.person_id
    # She opens the welcome email on her laptop: the anonymous laptop session joins her.
    click = await identity.resolve(
        ("email", "sarah@work.example"), ("cookie", "ck-B"), source="email_click",
        strength=ASSERTED,
    )  # fmt: skip
    assert (click.outcome, click.person_id) == (O.RESOLVE_OUTCOME_MERGED, phone_visit.person_id)
    checkout = await identity.resolve(
        ("cookie", "ck-B"),
        ("email", "Sarah.Smith+shop@GMail.com"),
        ("shopify_customer_id", "7012345678901"),
        ("phone", "07911 123456"),
        country="GB",
        source="shopify_checkout",
    )
    assert (checkout.outcome, checkout.person_id) == (
        O.RESOLVE_OUTCOME_LINKED,
        phone_visit.person_id,
    )
    assert (checkout.anchor.type, checkout.anchor.value) == (
        "shopify_customer_id",
        "7012345678901",
    )
    whatsapp = await identity.resolve(("phone", "+44 7911 123456"), source="whatsapp")
    assert (whatsapp.outcome, whatsapp.person_id) == (
        O.RESOLVE_OUTCOME_UNCHANGED,
        phone_visit.person_id,
    )
    assert await identity.keys(phone_visit.person_id) == {
        ("cookie", "ck-A"),
        ("cookie", "ck-B"),
        ("email", "sarah@work.example"),
        ("email", "sarah.smith+shop@gmail.com"),
        ("phone", "+447911123456"),
        ("shopify_customer_id", "7012345678901"),
    }
    assert await identity.lookup("email", "sarahsmith@googlemail.com") == phone_visit.person_id
    sarah = await identity.person(laptop_visit.person_id)
    assert sarah.person_id == phone_visit.person_id
    assert list(sarah.member_person_ids) == [laptop_visit.person_id]
    assert await identity.candidates() == []


async def test_resolve_is_idempotent_per_event(identity: Identity) -> None:
    first = await identity.resolve(("email", "a@shop-x.example"), event_id="order-1")
    again = await identity.resolve(("email", "b@shop-x.example"), event_id="order-1")
    assert first.outcome == O.RESOLVE_OUTCOME_CREATED
    assert (again.outcome, again.person_id) == (O.RESOLVE_OUTCOME_UNCHANGED, first.person_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.lookup("email", "b@shop-x.example")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_two_shopify_ids_raise_a_candidate_not_a_merge(identity: Identity) -> None:
    first = await identity.resolve(("shopify_customer_id", "1"), ("email", "pat@home.example"))
    second = await identity.resolve(("shopify_customer_id", "2"), ("email", "pat@home.example"))
    assert second.outcome == O.RESOLVE_OUTCOME_CANDIDATE_RAISED
    assert second.person_id not in ("", first.person_id)
    assert await identity.keys(second.person_id) == {("shopify_customer_id", "2")}
    [candidate] = await identity.candidates()
    assert (candidate.reason, candidate.candidate_id) == (
        "two_shopify_customer_ids",
        second.candidate_id,
    )
    assert {candidate.person_a_id, candidate.person_b_id} == {first.person_id, second.person_id}
    [evidence] = candidate.evidence
    assert [(i.type, i.value) for i in evidence.identifiers] == [
        ("shopify_customer_id", "2"),
        ("email", "pat@home.example"),
    ]


async def test_two_ids_of_a_single_valued_source_raise_a_candidate(identity: Identity) -> None:
    await identity.resolve(("crm_id", "001A000001AbCdE"), ("email", "lee@home.example"))
    other = await identity.resolve(("crm_id", "001A000001ZzZzZ"), ("email", "lee@home.example"))
    assert other.outcome == O.RESOLVE_OUTCOME_CANDIDATE_RAISED
    assert [c.reason for c in await identity.candidates()] == ["two_crm_ids"]


async def test_a_cookie_bridging_two_known_people_is_repointed_not_merged(
    identity: Identity,
) -> None:
    ann = await identity.resolve(("email", "ann@home.example"), ("cookie", "family-pc"))
    bob = await identity.resolve(("email", "bob@home.example"))
    bridge = await identity.resolve(("email", "bob@home.example"), ("cookie", "family-pc"))
    assert (bridge.outcome, bridge.person_id) == (O.RESOLVE_OUTCOME_CANDIDATE_RAISED, bob.person_id)
    assert await identity.keys(ann.person_id) == {("email", "ann@home.example")}
    assert await identity.keys(bob.person_id) == {
        ("email", "bob@home.example"),
        ("cookie", "family-pc"),
    }
    assert [c.reason for c in await identity.candidates()] == ["cookie_bridge"]
    changes = (await identity.call("ListChanges")).changes
    assert [(c.kind, c.person_id, c.other_person_id) for c in changes] == [
        (identity_pb2.CHANGE_KIND_SESSION_REPOINTED, bob.person_id, ann.person_id)
    ]


async def test_a_household_landline_never_merges_two_people(identity: Identity) -> None:
    mum = await identity.resolve(("email", "mum@home.example"), ("phone", "+33 1 42 68 53 00"))
    dad = await identity.resolve(("email", "dad@home.example"), ("phone", "01 42 68 53 00"),
                                 country="FR")  # fmt: skip
    assert dad.outcome == O.RESOLVE_OUTCOME_CANDIDATE_RAISED
    assert dad.person_id != mum.person_id
    assert await identity.keys(dad.person_id) == {("email", "dad@home.example")}
    assert [c.reason for c in await identity.candidates()] == ["phone_only_link"]
    # A phone alone with a known person's email is simply that person's.
    again = await identity.resolve(("email", "mum@home.example"), ("phone", "+33142685300"))
    assert (again.outcome, again.person_id) == (O.RESOLVE_OUTCOME_UNCHANGED, mum.person_id)


async def test_asserted_evidence_never_merges_two_known_people(identity: Identity) -> None:
    one = await identity.resolve(("email", "kim@one.example"))
    two = await identity.resolve(("phone", "+14155550123"), ("email", "kim@two.example"))
    typed = await identity.resolve(
        ("email", "kim@one.example"), ("email", "kim@two.example"), strength=ASSERTED
    )
    assert (typed.outcome, typed.person_id) == (O.RESOLVE_OUTCOME_CANDIDATE_RAISED, one.person_id)
    assert await identity.keys(two.person_id) == {
        ("phone", "+14155550123"),
        ("email", "kim@two.example"),
    }
    assert [c.reason for c in await identity.candidates()] == ["asserted_link"]


async def test_a_per_type_cap_keeps_the_extra_identifier_apart(identity: Identity) -> None:
    emails = [("email", f"n{i}@many.example") for i in range(10)]
    person = await identity.resolve(("shopify_customer_id", "99"), *emails)
    extra = await identity.resolve(("shopify_customer_id", "99"), ("email", "n10@many.example"))
    assert extra.outcome == O.RESOLVE_OUTCOME_CANDIDATE_RAISED
    assert extra.person_id == person.person_id
    assert [c.reason for c in await identity.candidates()] == ["type_cap_exceeded:email"]
    assert ("email", "n10@many.example") not in await identity.keys(person.person_id)


@pytest.mark.parametrize(
    ("blocked", "policy"),
    [
        (("email", "orders@myshop.example"), {"own_domains": ["myshop.example"]}),
        (("email", "test@test.com"), {}),
        (("email", "Info@Somewhere.example"), {}),
        (("pos_customer_id", "WALKIN-1"), {}),
        (("phone", "0000000"), {}),
    ],
)
async def test_junk_role_and_placeholder_values_never_link_two_people(
    identity: Identity, blocked: tuple[str, str], policy: dict[str, Any]
) -> None:
    await identity.call(
        "PutShopPolicy",
        blocked_values=[common_pb2.Identifier(type="pos_customer_id", value="WALKIN-1")],
        **policy,
    )
    first = await identity.resolve(("email", "one@people.example"), blocked)
    second = await identity.resolve(("email", "two@people.example"), blocked)
    assert first.outcome == second.outcome == O.RESOLVE_OUTCOME_CREATED
    assert first.person_id != second.person_id
    assert await identity.keys(first.person_id) == {("email", "one@people.example")}
    only_junk = await identity.resolve(blocked)
    assert (only_junk.outcome, only_junk.person_id) == (O.RESOLVE_OUTCOME_ANONYMOUS, "")
    assert await identity.candidates() == []


async def test_a_value_in_too_many_conflicts_becomes_promiscuous(identity: Identity) -> None:
    tablet = ("cookie", "shop-floor-tablet")
    emails = [("email", f"p{n}@people.example") for n in range(5)]
    people = [(await identity.resolve(email)).person_id for email in emails]
    first = await identity.resolve(emails[0], tablet)
    assert first.outcome == O.RESOLVE_OUTCOME_LINKED
    bridges = [await identity.resolve(email, tablet) for email in emails[1:4]]
    assert [b.outcome for b in bridges] == [O.RESOLVE_OUTCOME_CANDIDATE_RAISED] * 3
    assert await identity.lookup(*tablet) == people[3]
    late = await identity.resolve(emails[4], tablet)
    assert (late.outcome, late.person_id) == (O.RESOLVE_OUTCOME_CANDIDATE_RAISED, people[4])
    assert await identity.lookup(*tablet) == people[3]
    assert await identity.keys(people[4]) == {emails[4]}
    assert [c.reason for c in await identity.candidates()] == [
        "cookie_bridge",
        "cookie_bridge",
        "cookie_bridge",
        "blocked_value",
    ]


async def test_merge_then_unmerge_restores_both_exactly(identity: Identity) -> None:
    a = await identity.resolve(("email", "jo@a.example"), ("cookie", "ck-a"))
    b = await identity.resolve(("phone", "+4915112345678"), ("email", "jo@b.example"))
    before_a, before_b = await identity.person(a.person_id), await identity.person(b.person_id)
    identity.clock.set(NOON + timedelta(hours=1))
    merged = (
        await identity.call(
            "Merge",
            person_a_id=a.person_id,
            person_b_id=b.person_id,
            reason="same customer, confirmed by phone",
        )
    ).merge
    assert (merged.surviving_person_id, merged.merged_person_id, merged.merged_by) == (
        a.person_id,
        b.person_id,
        "ops",
    )
    # Facts arriving while merged keep the identifier they came with.
    joined = await identity.resolve(("email", "jo@b.example"), ("cookie", "ck-new-b"))
    assert joined.person_id == a.person_id
    assert await identity.lookup("phone", "+4915112345678") == a.person_id
    identity.clock.set(NOON + timedelta(days=6))
    undone = (await identity.call("Unmerge", merge_id=merged.merge_id, reason="twins")).merge
    assert undone.unmerged_at.ToDatetime(tzinfo=UTC) == NOON + timedelta(days=6)
    after_a, after_b = await identity.person(a.person_id), await identity.person(b.person_id)
    for before, after in ((before_a, after_a), (before_b, after_b)):
        assert (after.person_id, after.created_at, after.erased) == (
            before.person_id,
            before.created_at,
            before.erased,
        )
        assert list(after.member_person_ids) == []
    assert list(after_a.identifiers) == list(before_a.identifiers)
    assert await identity.keys(b.person_id) == {
        ("phone", "+4915112345678"),
        ("email", "jo@b.example"),
        ("cookie", "ck-new-b"),
    }
    assert [(m.merge_id, m.HasField("unmerged_at")) for m in after_b.merges] == [
        (merged.merge_id, True)
    ]
    # The unmerge is a "not the same person" decision: the same evidence now raises a candidate.
    again = await identity.resolve(("email", "jo@a.example"), ("email", "jo@b.example"))
    assert again.outcome == O.RESOLVE_OUTCOME_CANDIDATE_RAISED
    assert [c.reason for c in await identity.candidates()] == ["not_same_person"]
    kinds = [c.kind for c in (await identity.call("ListChanges")).changes]
    assert kinds == [identity_pb2.CHANGE_KIND_MERGED, identity_pb2.CHANGE_KIND_UNMERGED]


async def test_unmerge_after_the_window_is_refused(identity: Identity) -> None:
    window = Duration()
    window.FromTimedelta(timedelta(hours=24))
    await identity.call("PutShopPolicy", unmerge_window=window)
    a = await identity.resolve(("email", "x@a.example"))
    b = await identity.resolve(("email", "x@b.example"))
    merged = (await identity.call("Merge", person_a_id=a.person_id, person_b_id=b.person_id)).merge
    assert merged.unmerge_deadline.ToDatetime(tzinfo=UTC) == NOON + timedelta(hours=24)
    identity.clock.set(NOON + timedelta(hours=24, seconds=1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.call("Unmerge", merge_id=merged.merge_id)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [violation] = details(raised.value)[0].violations
    assert violation.type == "UNMERGE_WINDOW_PASSED"
    assert await identity.lookup("email", "x@b.example") == a.person_id


async def test_accepting_and_dismissing_candidates(identity: Identity) -> None:
    one = await identity.resolve(("shopify_customer_id", "10"), ("email", "dup@x.example"))
    two = await identity.resolve(("shopify_customer_id", "11"), ("email", "dup@x.example"))
    accepted = await identity.call("Merge", candidate_id=two.candidate_id, reason="same buyer")
    assert {accepted.merge.surviving_person_id, accepted.merge.merged_person_id} == {
        one.person_id,
        two.person_id,
    }
    assert await identity.candidates() == []
    three = await identity.resolve(("shopify_customer_id", "12"), ("email", "dup@x.example"))
    await identity.call("DismissCandidate", candidate_id=three.candidate_id, reason="different")
    assert await identity.candidates() == []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.call("DismissCandidate", candidate_id=three.candidate_id)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_lookup_is_read_only(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.lookup("email", "nobody@x.example")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError):
        await identity.lookup("email", "nobody@x.example")
    created = await identity.resolve(("email", "nobody@x.example"))
    assert created.outcome == O.RESOLVE_OUTCOME_CREATED


async def test_forget_leaves_a_tombstone_that_no_redelivery_resurrects(
    identity: Identity,
) -> None:
    person = await identity.resolve(("email", "gone@x.example"), ("phone", "+14155550199"),
                                    event_id="order-9")  # fmt: skip
    await identity.resolve(("email", "gone@x.example"), ("cookie", "ck-gone"))
    rehearsed = await identity.call("Forget", person_id=person.person_id, dry_run=True)
    assert (await identity.person(person.person_id)).erased is False
    forgotten = await identity.call("Forget", person_id=person.person_id)
    assert (forgotten.identifiers_deleted, forgotten.evidence_deleted) == (3, 2)
    assert dict(forgotten.removed) == dict(rehearsed.removed) == {
        "identifier": 3, "evidence": 2, "evidence_identifier": 4, "merge_candidate": 0,
        "person": 1,
    }  # fmt: skip
    again = await identity.call("Forget", person_id=person.person_id)
    assert sum(again.removed.values()) == 0
    tombstone = await identity.person(person.person_id)
    assert (tombstone.erased, list(tombstone.identifiers)) == (True, [])
    redelivered = await identity.resolve(
        ("email", "gone@x.example"), ("cookie", "ck-fresh"), event_id="order-9"
    )
    assert (redelivered.outcome, redelivered.person_id) == (
        O.RESOLVE_OUTCOME_ERASED,
        person.person_id,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.lookup("cookie", "ck-fresh")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_input_names_every_field(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.resolve(
            ("email", "not-an-address"),
            ("phone", "12"),
            ("fax", "1"),
            strength=identity_pb2.STRENGTH_UNSPECIFIED,
            event_id="",
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in details(raised.value)[0].field_violations]
    assert fields == ["event_id", "strength"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.resolve(("email", "not-an-address"), ("phone", "12"), ("fax", "1"))
    fields = [v.field for v in details(raised.value)[0].field_violations]
    assert fields == ["identifiers[0].value", "identifiers[1].value", "identifiers[2].type"]


async def test_concurrent_resolves_group_as_sequential_ones(identity_pg: Identity) -> None:
    identity = identity_pg
    rng = random.Random(7)  # noqa: S311  # a reproducible workload, not a secret
    people = 60
    records = []
    for n in range(1000):
        p = rng.randrange(people)
        ids = [("shopify_customer_id", f"s{p}"), ("email", f"c{p}@x.example"),
               ("phone", f"+1415555{p:04d}")]  # fmt: skip
        records.append((f"race-{n}", rng.sample(ids, k=rng.randint(1, 2))))

    async def run_all(shop: str, concurrent: bool) -> set[frozenset[tuple[str, str]]]:
        racer = Identity(identity.stub, shop, identity.clock, itertools.count())

        async def one(event: str, ids: list[tuple[str, str]]) -> Any:
            return await racer.resolve(*ids, event_id=event)

        if concurrent:
            await asyncio.gather(*(one(e, ids) for e, ids in records))
        else:
            for e, ids in records:
                await one(e, ids)
        groups = set()
        for p in range(people):
            for type_, value in (("shopify_customer_id", f"s{p}"), ("email", f"c{p}@x.example"),
                                 ("phone", f"+1415555{p:04d}")):  # fmt: skip
                try:
                    person_id = await racer.lookup(type_, value)
                except grpc.aio.AioRpcError:
                    continue
                groups.add(frozenset(await racer.keys(person_id)))
        assert await racer.candidates() == []
        return groups

    sequential = await run_all(f"seq-{secrets.token_hex(3)}", concurrent=False)
    concurrent = await run_all(f"conc-{secrets.token_hex(3)}", concurrent=True)
    # Nothing here conflicts, so the grouping is the records' connected components.
    assert sequential == components([ids for _, ids in records])
    assert concurrent == sequential


def components(records: list[list[tuple[str, str]]]) -> set[frozenset[tuple[str, str]]]:
    """The identifiers grouped as records seen together link them, with no conflict rules."""
    component: dict[tuple[str, str], tuple[str, str]] = {}

    def find(key: tuple[str, str]) -> tuple[str, str]:
        while component.setdefault(key, key) != key:
            key = component[key]
        return key

    for ids in records:
        for key in ids[1:]:
            component[find(key)] = find(ids[0])
    groups: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for key in list(component):
        groups.setdefault(find(key), set()).add(key)
    return {frozenset(group) for group in groups.values()}
