"""Identity.ResolveBatch over a real channel, on PostgreSQL and on SQLite: a batch answers and
stores exactly what resolving its records one by one would, and rejects bad input whole."""

import asyncio
import contextlib
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import text_format

from c360.common.v1 import common_pb2
from c360.identity.v1 import identity_pb2
from services.identity import graph
from services.runtime import db
from tests.conftest import ADMIN_TOKEN, READER_TOKEN
from tests.integration.test_identity import (  # noqa: F401  # the fixture
    ASSERTED,
    AUTHORITATIVE,
    Identity,
    components,
    identity,
    running,
)
from tests.polling import eventually
from tests.rpc import bearer, details
from tests.sql import sql

Record = tuple[list[tuple[str, str]], dict[str, Any]]


def workload(rng: random.Random, size: int) -> list[Record]:
    """Records a shop might see: known persons, new sessions and new shoppers, identifiers that
    meet again within a few records (merges), conflicts of every common kind, junk and invalid
    values, national phone numbers and repeated event ids."""
    people = 40
    fresh = itertools.count()
    news: list[str] = []
    records: list[Record] = []

    def ids(p: int) -> list[tuple[str, str]]:
        return [
            ("shopify_customer_id", f"70000{p:04d}"),
            ("email", f"c{p}@x.example"),
            ("phone", f"+1415555{p:04d}"),
            ("cookie", f"ck-{p}"),
        ]

    for n in range(size):
        p, q = rng.sample(range(people), k=2)
        draw = rng.random()
        options: dict[str, Any] = {"event_id": f"ev-{n}"}
        if draw < 0.30:  # a known person (or, early on, one about to be met again)
            found = rng.sample(ids(p), k=rng.randint(1, 3))
        elif draw < 0.40:  # a new session of a known person
            found = [rng.choice(ids(p)[:3]), ("cookie", f"ck-new-{next(fresh)}")]
        elif draw < 0.52:  # a new shopper
            news.append(f"new{next(fresh)}@y.example")
            found = [("email", news[-1]), ("cookie", f"ck-new-{next(fresh)}")]
        elif draw < 0.57 and news:  # a new shopper met again (often in the same batch)
            found = [("email", rng.choice(news)), ("phone", f"+1415666{next(fresh):04d}")]
        elif draw < 0.63:  # two Shopify ids
            found = [ids(p)[1], ("shopify_customer_id", f"70000{q:04d}")]
        elif draw < 0.67:  # a session bridging two people
            found = [ids(p)[1], ("cookie", f"ck-{q}")]
        elif draw < 0.71:  # a phone-only link
            found = [("email", f"other{p}@z.example"), ids(q)[2]]
        elif draw < 0.75:  # asserted: typed into a form
            found = [ids(p)[1], ids(q)[2]]
            options["strength"] = ASSERTED
            options["source"] = "web_form"
        elif draw < 0.81:  # junk beside (or instead of) a real identifier
            junk = [("email", "test@test.com"), ("phone", "0000000"), ("external_id", "null"),
                    ("email", "orders@x.example")]  # fmt: skip
            found = rng.sample(junk, k=2) + rng.sample(ids(p), k=rng.randint(0, 1))
        elif draw < 0.85:  # an invalid phone, left out
            found = [ids(p)[1], ("phone", "555-555-SHIP")]
            options["skip_invalid"] = True
        elif draw < 0.89:  # a national number read with the record's country
            found = [ids(p)[0], ("phone", f"07911 12{p:04d}")]
            options["country"] = "GB"
        elif draw < 0.95 and n:  # an event delivered again, with what it carried or not
            options["event_id"] = f"ev-{rng.randrange(n)}"
            found = rng.sample(ids(p), k=1)
        else:  # a record that names two persons' strongest ids: a merge or a candidate
            found = [ids(p)[2], ids(q)[3], ("crm_id", f"crm-{p}")]
        records.append((found, options))
    return records


def request(shop: str, record: Record) -> Any:
    found, options = record
    return identity_pb2.ResolveRequest(
        shop_id=shop,
        identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in found],
        source=options.get("source", "shopify"),
        strength=options.get("strength", AUTHORITATIVE),
        event_id=options["event_id"],
        country=options.get("country", ""),
        skip_invalid=options.get("skip_invalid", False),
    )


def counted_ids(tag: str) -> Callable[[str], str]:
    """Ids drawn from a counter, so that two runs that create the same things name them alike
    (apart from `tag`)."""
    counter = itertools.count()
    return lambda prefix: f"{prefix}_{tag}{next(counter):06d}"


async def snapshot(client: Identity, records: list[Record], answers: list[Any]) -> list[str]:
    """Everything a caller can read back about the records, as text: the answers, who holds
    each identifier, every person reached in full, the Duplicates list and the changes."""
    auth = bearer(ADMIN_TOKEN)
    seen: list[str] = [text_format.MessageToString(a) for a in answers]
    persons = {a.person_id for a in answers if a.person_id}
    for type_, value in sorted({i for found, _ in records for i in found}):
        try:
            found = await client.stub.Lookup(
                identity_pb2.LookupRequest(
                    shop_id=client.shop, identifier=common_pb2.Identifier(type=type_, value=value)
                ),
                metadata=auth,
            )
        except grpc.aio.AioRpcError as error:
            seen.append(f"{type_} {value}: {error.code().name}")
        else:
            seen.append(f"{type_} {value}: {text_format.MessageToString(found)}")
            persons.add(found.person_id)
    for person_id in sorted(persons):
        seen.append(text_format.MessageToString(await client.person(person_id)))
    seen.append(
        text_format.MessageToString(
            await client.stub.ListMergeCandidates(
                identity_pb2.ListMergeCandidatesRequest(shop_id=client.shop, page_size=1000),
                metadata=auth,
            )
        )
    )
    changes = await client.stub.ListChanges(
        identity_pb2.ListChangesRequest(shop_id=client.shop, limit=1000), metadata=auth
    )
    for change in changes.changes:
        change.sequence = 0  # numbered across every shop
        seen.append(text_format.MessageToString(change))
    return seen


def batches(rng: random.Random, records: list[Record]) -> Iterator[list[Record]]:
    """The records in batches of 1 to 120."""
    start = 0
    while start < len(records):
        size = rng.choice([1, 2, 7, 30, 120])
        yield records[start : start + size]
        start += size


async def test_a_batch_answers_and_stores_what_resolving_one_by_one_would(
    identity: Identity,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(20261124)  # noqa: S311  # a reproducible workload, not a secret
    records = workload(rng, 400)
    one_by_one = Identity(identity.stub, f"{identity.shop}-seq", identity.clock, itertools.count())
    batched = Identity(identity.stub, f"{identity.shop}-bat", identity.clock, itertools.count())
    exact = Identity(identity.stub, f"{identity.shop}-exa", identity.clock, itertools.count())
    run = identity.shop.removeprefix("shop-")  # merge and candidate ids are unique in every shop

    async def one_by_one_run(client: Identity) -> list[Any]:
        return [
            await client.stub.Resolve(request(client.shop, r), metadata=bearer(ADMIN_TOKEN))
            for r in records
        ]

    # The exact path alone (no record decided in memory), as resolving worked before batches.
    with monkeypatch.context() as exact_only:
        exact_only.setattr(graph, "new_id", counted_ids(f"exarun{run}"))
        exact_only.setattr(
            graph.IdentityGraph, "_plan", lambda _, s, r, start: graph._Plan(slow=start)
        )
        exact_answers = await one_by_one_run(exact)
    monkeypatch.setattr(graph, "new_id", counted_ids(f"seqrun{run}"))
    sequential = await one_by_one_run(one_by_one)
    monkeypatch.setattr(graph, "new_id", counted_ids(f"batrun{run}"))
    answers = []
    for batch in batches(rng, records):
        answer = await batched.stub.ResolveBatch(
            identity_pb2.ResolveBatchRequest(
                shop_id=batched.shop, records=[request("", r) for r in batch]
            ),
            metadata=bearer(ADMIN_TOKEN),
        )
        answers.extend(answer.results)

    outcomes = {identity_pb2.ResolveOutcome.Name(a.outcome) for a in sequential}
    assert outcomes == {f"RESOLVE_OUTCOME_{o}" for o in (
        "CREATED", "LINKED", "MERGED", "CANDIDATE_RAISED", "UNCHANGED", "ANONYMOUS",
    )}  # fmt: skip
    expected = await snapshot(one_by_one, records, sequential)
    assert await snapshot(batched, records, answers) == [
        line.replace(f"seqrun{run}", f"batrun{run}").replace(one_by_one.shop, batched.shop)
        for line in expected
    ]
    assert await snapshot(exact, records, exact_answers) == [
        line.replace(f"seqrun{run}", f"exarun{run}").replace(one_by_one.shop, exact.shop)
        for line in expected
    ]


async def test_a_batch_with_bad_records_is_refused_whole(identity: Identity) -> None:  # noqa: F811
    good = request("", ([("email", "kept@x.example")], {"event_id": "b-1"}))
    other_shop = request("shop-b", ([("email", "a@x.example")], {"event_id": "b-2"}))
    no_event = request("", ([("email", "b@x.example")], {"event_id": ""}))
    no_event.strength = identity_pb2.STRENGTH_UNSPECIFIED
    bad_value = request("", ([("email", "c@x.example"), ("phone", "12")], {"event_id": "b-4"}))

    async def refused(
        records: list[Any], token: str = ADMIN_TOKEN, shop: str = identity.shop
    ) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await identity.stub.ResolveBatch(
                identity_pb2.ResolveBatchRequest(shop_id=shop, records=records),
                metadata=bearer(token),
            )
        return raised.value

    def fields(error: grpc.aio.AioRpcError) -> list[str]:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        return [v.field for v in details(error)[0].field_violations]

    assert fields(await refused([good, other_shop, no_event, bad_value])) == [
        "records[1].shop_id",
        "records[2].event_id",
        "records[2].strength",
    ]
    assert fields(await refused([good, bad_value])) == ["records[1].identifiers[1].value"]
    assert fields(await refused([])) == ["records"]
    assert fields(await refused([good] * 1001)) == ["records"]
    # A reader of shop-a may read it, not resolve into it.
    denied = await refused([good], READER_TOKEN, "shop-a")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.lookup("email", "kept@x.example")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    answer = await identity.stub.ResolveBatch(
        identity_pb2.ResolveBatchRequest(shop_id=identity.shop, records=[good, good]),
        metadata=bearer(ADMIN_TOKEN),
    )
    assert [a.outcome for a in answer.results] == [
        identity_pb2.RESOLVE_OUTCOME_CREATED,
        identity_pb2.RESOLVE_OUTCOME_UNCHANGED,
    ]
    assert answer.results[0].person_id == answer.results[1].person_id
    assert await identity.lookup("email", "kept@x.example") == answer.results[0].person_id


async def test_batches_racing_on_shared_identifiers_group_as_one_by_one(
    identity: Identity,  # noqa: F811
) -> None:
    rng = random.Random(5)  # noqa: S311  # a reproducible workload, not a secret
    people = 40

    def ids(p: int) -> list[tuple[str, str]]:
        return [("shopify_customer_id", f"s{p}"), ("email", f"c{p}@x.example"),
                ("phone", f"+1415555{p:04d}")]  # fmt: skip

    records: list[Record] = [
        (rng.sample(ids(rng.randrange(people)), k=rng.randint(1, 2)), {"event_id": f"race-{n}"})
        for n in range(600)
    ]

    async def grouping(shop: str, calls: list[Any]) -> set[frozenset[tuple[str, str]]]:
        await asyncio.gather(*calls)
        client = Identity(identity.stub, shop, identity.clock, itertools.count())
        groups = set()
        for p in range(people):
            for type_, value in ids(p):
                with contextlib.suppress(grpc.aio.AioRpcError):  # never seen
                    groups.add(frozenset(await client.keys(await client.lookup(type_, value))))
        assert await client.candidates() == []
        return groups

    def batch_call(shop: str, start: int) -> Any:
        return identity.stub.ResolveBatch(
            identity_pb2.ResolveBatchRequest(
                shop_id=shop, records=[request("", r) for r in records[start : start + 50]]
            ),
            metadata=bearer(ADMIN_TOKEN),
        )

    one_shop, batch_shop = f"{identity.shop}-one", f"{identity.shop}-bat"
    one_by_one = grouping(
        one_shop,
        [
            identity.stub.Resolve(request(one_shop, r), metadata=bearer(ADMIN_TOKEN))
            for r in records
        ],
    )
    # Twelve batches of 50 at once, and the same records one by one at once in another shop:
    # nothing here conflicts, so both end in the records' connected components.
    batched = grouping(batch_shop, [batch_call(batch_shop, s) for s in range(0, 600, 50)])
    want = components([found for found, _ in records])
    assert await one_by_one == want
    assert await batched == want


async def test_a_full_batch_with_conflicts_among_its_records(identity: Identity) -> None:  # noqa: F811
    records: list[Record] = []
    for n in range(1000):
        if n % 10 == 9:  # a second Shopify id for a shopper of this batch: a candidate
            found = [("email", f"e{n - 9}@full.example"), ("shopify_customer_id", f"x{n}")]
        else:
            found = [("email", f"e{n}@full.example"), ("shopify_customer_id", f"s{n}")]
        records.append((found, {"event_id": f"full-{n}"}))
    answer = await identity.stub.ResolveBatch(
        identity_pb2.ResolveBatchRequest(
            shop_id=identity.shop, records=[request("", r) for r in records]
        ),
        metadata=bearer(ADMIN_TOKEN),
    )
    outcomes = [identity_pb2.ResolveOutcome.Name(a.outcome) for a in answer.results]
    assert outcomes == [
        "RESOLVE_OUTCOME_CANDIDATE_RAISED" if n % 10 == 9 else "RESOLVE_OUTCOME_CREATED"
        for n in range(1000)
    ]
    listed = await identity.stub.ListMergeCandidates(
        identity_pb2.ListMergeCandidatesRequest(shop_id=identity.shop, page_size=1000),
        metadata=bearer(ADMIN_TOKEN),
    )
    assert sorted(c.reason for c in listed.candidates) == ["two_shopify_customer_ids"] * 100


async def test_lookup_batch_answers_each_identifier_as_lookup_does(
    identity: Identity,  # noqa: F811
) -> None:
    for record in workload(random.Random(7), 150):  # noqa: S311  # reproducible, not a secret
        await identity.stub.Resolve(request(identity.shop, record), metadata=bearer(ADMIN_TOKEN))
    asked = [
        ("email", "C3@X.example"),  # found, through its normalised form
        ("email", "c3@x.example"),  # the same person again
        ("shopify_customer_id", "700000007"),
        ("phone", "+14155550012"),
        ("cookie", "ck-nobody"),  # nobody holds it
        ("email", "test@test.com"),  # junk: never a person's
        ("phone", "12"),  # invalid
        ("loyalty_card", "123"),  # an unknown type
        ("email", "not an email"),
    ]
    answer = await identity.stub.LookupBatch(
        identity_pb2.LookupBatchRequest(
            shop_id=identity.shop,
            identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in asked],
        ),
        metadata=bearer(ADMIN_TOKEN),
    )
    assert len(answer.results) == len(asked)

    async def lookup(type_: str, value: str) -> tuple[grpc.StatusCode, Any, list[str]]:
        """Lookup's answer: its code, the response, the descriptions of its violations."""
        try:
            single = await identity.stub.Lookup(
                identity_pb2.LookupRequest(
                    shop_id=identity.shop, identifier=common_pb2.Identifier(type=type_, value=value)
                ),
                metadata=bearer(ADMIN_TOKEN),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                return error.code(), None, []
            return error.code(), None, [v.description for v in details(error)[0].field_violations]
        return grpc.StatusCode.OK, single, []

    found = 0
    for (type_, value), result in zip(asked, answer.results, strict=True):
        code, single, why = await lookup(type_, value)
        if code == grpc.StatusCode.OK:
            found += 1
            assert (result.person_id, result.identifier) == (single.person_id, single.identifier)
            assert result.invalid == ""
        elif code == grpc.StatusCode.NOT_FOUND:
            assert (result.person_id, result.invalid) == ("", ""), (type_, value)
            assert not result.HasField("identifier")
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert (result.person_id, [result.invalid]) == ("", why)
            assert not result.HasField("identifier")
    assert found == 4
    assert answer.results[0].person_id == answer.results[1].person_id
    assert [bool(r.invalid) for r in answer.results] == [False] * 6 + [True] * 3


async def test_get_persons_answers_each_person_as_get_person_does(
    identity: Identity,  # noqa: F811
) -> None:
    sarah = (await identity.resolve(("email", "sarah@x.example"), ("cookie", "ck-a"))).person_id
    other = (await identity.resolve(("email", "sarah.b@x.example"), ("cookie", "ck-b"))).person_id
    alone = (await identity.resolve(("email", "alone@x.example"))).person_id
    # Two Shopify ids make a candidate; merging it makes `other` a member of sarah's group.
    await identity.resolve(("email", "sarah@x.example"), ("shopify_customer_id", "1"))
    await identity.resolve(("email", "sarah.b@x.example"), ("shopify_customer_id", "2"))
    await identity.resolve(("shopify_customer_id", "1"), ("cookie", "ck-b"))
    [candidate] = await identity.candidates()
    await identity.call("Merge", candidate_id=candidate.candidate_id, reason="same shopper")
    asked = [sarah, other, alone, "p_nobody", sarah]
    answer = await identity.stub.GetPersons(
        identity_pb2.GetPersonsRequest(shop_id=identity.shop, person_ids=asked),
        metadata=bearer(ADMIN_TOKEN),
    )
    assert len(answer.persons) == len(asked)
    for person_id, person in zip(asked, answer.persons, strict=True):
        if person_id == "p_nobody":
            assert person == identity_pb2.Person()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await identity.person(person_id)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            continue
        assert person == await identity.person(person_id)
    assert answer.persons[0].person_id == answer.persons[1].person_id
    assert len(answer.persons[0].member_person_ids) == 1
    assert len(answer.persons[0].identifiers) == 6


async def test_batch_reads_refuse_bad_requests_whole(identity: Identity) -> None:  # noqa: F811
    async def refused(method: str, request: Any) -> list[str]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(identity.stub, method)(request, metadata=bearer(ADMIN_TOKEN))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return [v.field for v in details(raised.value)[0].field_violations]

    email = common_pb2.Identifier(type="email", value="a@x.example")
    lookup = identity_pb2.LookupBatchRequest
    assert await refused("LookupBatch", lookup(shop_id=identity.shop)) == ["identifiers"]
    assert await refused(
        "LookupBatch", lookup(shop_id=identity.shop, identifiers=[email] * 1001)
    ) == ["identifiers"]
    assert await refused("LookupBatch", lookup(identifiers=[email])) == ["shop_id"]
    persons = identity_pb2.GetPersonsRequest
    assert await refused("GetPersons", persons(shop_id=identity.shop)) == ["person_ids"]
    assert await refused(
        "GetPersons", persons(shop_id=identity.shop, person_ids=["p1"] * 1001)
    ) == ["person_ids"]
    assert await refused(
        "GetPersons", persons(shop_id=identity.shop, person_ids=["p1", "", "p\x01"])
    ) == ["person_ids[1]", "person_ids[2]"]


class HeldBatches:
    """Spies on the graph's batches of concurrent resolves: the event ids of each batch written,
    the first one held until `release` is set, and a batch holding the event id `poison`
    failing as a record that breaks its batch would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.written: list[list[str]] = []
        self.normalized = 0
        self.release = asyncio.Event()
        original = graph.IdentityGraph._resolve_records
        normalize = graph.IdentityGraph._normalize

        async def resolve_records(inner: Any, shop_id: str, records: Any, window: Any) -> Any:
            self.written.append([r.observation.event_id for r in records])
            if len(self.written) == 1:
                await self.release.wait()
            if "poison" in self.written[-1]:
                raise RuntimeError("a record that breaks its batch")
            return await original(inner, shop_id, records, window)

        def counted(inner: Any, *args: Any) -> Any:
            self.normalized += 1
            return normalize(inner, *args)

        monkeypatch.setattr(graph.IdentityGraph, "_resolve_records", resolve_records)
        monkeypatch.setattr(graph.IdentityGraph, "_normalize", counted)

    async def arrived(self, count: int) -> None:
        """Returns once `count` resolves reached the graph (each is queued once normalised)."""

        async def probe() -> int:
            return self.normalized

        await eventually(probe, lambda n: n == count, f"{count} resolves in the graph")


async def test_concurrent_resolves_are_written_together_each_answered_its_own(
    identity: Identity,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBatches(monkeypatch)
    sarah = asyncio.create_task(identity.resolve(("email", "sarah@x.example"), event_id="s-1"))
    await held.arrived(1)
    again = asyncio.create_task(identity.resolve(("email", "sarah@x.example"), event_id="s-1"))
    linked = asyncio.create_task(
        identity.resolve(("email", "sarah@x.example"), ("phone", "+14155550100"), event_id="s-2")
    )
    new = [
        asyncio.create_task(identity.resolve(("email", f"new{n}@x.example"), event_id=f"n-{n}"))
        for n in range(10)
    ]
    await held.arrived(13)
    # An invalid record is refused at once, whatever batch is being written.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.resolve(("phone", "12"), event_id="bad")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(raised.value)[0].field_violations] == ["identifiers[0].value"]
    assert held.written == [["s-1"]]

    held.release.set()
    first, replay, link, *created = await asyncio.gather(sarah, again, linked, *new)

    # In the order they reached the server, which the callers do not fix.
    assert [sorted(batch) for batch in held.written] == [
        ["s-1"],
        sorted(["s-1", "s-2", *(f"n-{n}" for n in range(10))]),
    ]
    assert first.outcome == identity_pb2.RESOLVE_OUTCOME_CREATED
    assert replay.outcome == identity_pb2.RESOLVE_OUTCOME_UNCHANGED
    assert link.outcome == identity_pb2.RESOLVE_OUTCOME_LINKED
    assert replay.person_id == link.person_id == first.person_id
    assert [c.outcome for c in created] == [identity_pb2.RESOLVE_OUTCOME_CREATED] * 10
    assert len({c.person_id for c in created} | {first.person_id}) == 11
    assert await identity.keys(first.person_id) == {
        ("email", "sarah@x.example"),
        ("phone", "+14155550100"),
    }


async def test_a_record_that_breaks_its_batch_fails_only_its_own_resolve(
    identity: Identity,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBatches(monkeypatch)
    first = asyncio.create_task(identity.resolve(("email", "first@x.example"), event_id="f"))
    await held.arrived(1)
    calls = [
        asyncio.create_task(identity.resolve(("email", f"{e}@x.example"), event_id=e))
        for e in ("a", "poison", "b")
    ]
    await held.arrived(4)
    held.release.set()
    answers = await asyncio.gather(first, *calls, return_exceptions=True)

    batch, *alone = held.written[1:]
    assert (held.written[0], sorted(batch)) == (["f"], ["a", "b", "poison"])
    assert alone == [[e] for e in batch]
    poisoned = answers[2]
    assert isinstance(poisoned, grpc.aio.AioRpcError)
    assert poisoned.code() == grpc.StatusCode.INTERNAL
    assert [a.outcome for a in (answers[0], answers[1], answers[3])] == [  # type: ignore[union-attr]
        identity_pb2.RESOLVE_OUTCOME_CREATED
    ] * 3
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.lookup("email", "poison@x.example")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_lookup_first_run_on_a_new_shops_empty_tables_reads_by_key_once_they_grew(
    settings_for: Callable[..., Any], run_id: str
) -> None:
    """The identity service plans a statement for the tables as they are when it runs: its
    connections first look identifiers up while a new shop's tables (its own schema) are empty
    and never analysed, as before autovacuum's first round; once the shop holds 20,000 persons,
    the same lookup of 10 identifiers reads exactly those 10 rows. A generic plan kept from the
    first call read the shop's identifiers through `identifier_person` by `shop_id` alone, all
    20,000 for each key asked (200,000 rows here; 4-8 s a call in an import)."""
    # No health pings during the test: a connection opened for one would plan the lookup afresh.
    settings = settings_for(
        "identity", db_schema_prefix=f"{run_id}_plans_", health_interval_seconds=60.0
    )
    asked = [f"c{n}@x.example" for n in range(0, 20_000, 2_000)]

    async def rows_read() -> int:
        """The identifier rows PostgreSQL has read, through any index or by scanning (the
        service's backends report their counts when they go idle)."""
        [[read]] = await sql(
            settings,
            "SELECT idx_tup_fetch + seq_tup_read FROM pg_stat_user_tables"
            " WHERE schemaname = $1 AND relname = 'identifier'",
            settings.schema_name,
        )
        return int(read)

    async with running(settings) as service:

        async def lookup() -> Any:
            return await service.stub.LookupBatch(
                identity_pb2.LookupBatchRequest(
                    shop_id=service.shop,
                    identifiers=[common_pb2.Identifier(type="email", value=v) for v in asked],
                ),
                metadata=bearer(ADMIN_TOKEN),
            )

        # At once, so that every connection of the service's pool runs it on the empty tables.
        await asyncio.gather(*(lookup() for _ in range(20)))
        connection = await db.plain_connection(settings)
        try:
            await connection.execute(
                "INSERT INTO person (shop_id, person_id, parent_id, root_id, created_at)"
                " SELECT $1, 'p' || n, NULL, 'p' || n, now() FROM generate_series(0, 19999) n",
                service.shop,
            )
            await connection.execute(
                "INSERT INTO identifier (shop_id, type, match_key, value, raw_value, person_id,"
                " first_seen_at, normalizer_version, conflicts)"
                " SELECT $1, 'email', 'c' || n || '@x.example', 'c' || n || '@x.example',"
                " 'c' || n || '@x.example', 'p' || n, now(), 1, 0"
                " FROM generate_series(0, 19999) n",
                service.shop,
            )
        finally:
            await connection.close()
        answer = await lookup()
        assert [r.person_id for r in answer.results] == [f"p{n}" for n in range(0, 20_000, 2_000)]
        # The first lookups read no row (there was none): whatever is read, this one read.
        read = await eventually(rows_read, lambda n: n > 0, "the lookup's reads", 30.0)
    assert read == len(asked)
