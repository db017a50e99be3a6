"""Identity operations racing each other on real PostgreSQL, each interleaving forced by running
a second call at a chosen point of the first: every outcome must be one that running them one
after the other could give, and an erasure must leave nothing behind."""

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity import graph, store
from services.runtime import db
from services.runtime.server import Server
from services.runtime.telemetry import Telemetry
from tests.clock import Clock
from tests.conftest import ADMIN_TOKEN, service_module
from tests.integration.test_identity import NOON, Identity, O
from tests.polling import eventually
from tests.rpc import bearer, details
from tests.sql import sql


@contextlib.asynccontextmanager
async def running(settings: Any) -> AsyncIterator[Identity]:
    module = service_module("identity")
    await asyncio.to_thread(db.migrate, settings, Path(module.MIGRATIONS))
    server: Server = await module.build(settings, Telemetry(), clock=Clock(NOON))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Identity(
            identity_pb2_grpc.IdentityStub(channel),
            f"shop-{secrets.token_hex(4)}",
            Clock(NOON),
            itertools.count(1),
        )
    await server.stop(grace=1.0)


@pytest.fixture
async def pg(settings_for: Callable[..., Any]) -> AsyncIterator[tuple[Identity, Any]]:
    """The identity service on PostgreSQL, and its settings for reading its tables."""
    settings = settings_for("identity")
    async with running(settings) as client:
        yield client, settings


def once(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[], Awaitable[None]] | None = None,
    owner: Any = store.Tx,
) -> None:
    """Runs `before` / `after` around the next call of Tx.<name> only (or of <name> of another
    owner: the graph module's statements of the common cases, say)."""
    original = getattr(owner, name)
    armed = [True]

    async def hooked(*args: Any, **kw: Any) -> Any:
        fire, armed[0] = armed[0], False
        if fire and before:
            await before()
        result = await original(*args, **kw)
        if fire and after:
            await after()
        return result

    monkeypatch.setattr(owner, name, hooked)


async def lock_waiters(settings: Any) -> int:
    rows = await sql(settings, "SELECT count(*) FROM pg_locks WHERE NOT granted")
    return int(rows[0][0])


async def test_a_merge_racing_a_merge_ends_as_one_serial_order(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, _ = pg
    a, b, c = [(await identity.resolve(("email", f"{x}@r.example"))).person_id for x in "abc"]

    async def c_absorbs_b() -> None:
        await identity.call("Merge", person_a_id=c, person_b_id=b)

    once(monkeypatch, "lock_persons", before=c_absorbs_b)
    await identity.call("Merge", person_a_id=a, person_b_id=b)
    # As if c absorbed b first, then a absorbed b's group.
    assert [await identity.lookup("email", f"{x}@r.example") for x in "abc"] == [a, a, a]
    group = await identity.person(c)
    assert (group.person_id, sorted(group.member_person_ids)) == (a, sorted([b, c]))


async def test_unmerge_takes_along_what_was_merged_through_the_member(pg: Any) -> None:
    identity, _ = pg
    a = (await identity.resolve(("email", "a@u.example"))).person_id
    b = (await identity.resolve(("email", "b@u.example"))).person_id
    await identity.resolve(("email", "d@u.example"), ("phone", "+14155550100"))
    first = (await identity.call("Merge", person_a_id=a, person_b_id=b)).merge
    linked = await identity.resolve(("email", "b@u.example"), ("email", "d@u.example"))
    assert linked.outcome == O.RESOLVE_OUTCOME_MERGED
    await identity.call("Unmerge", merge_id=first.merge_id)
    # d's only evidence is with b's email: it leaves with b.
    assert await identity.lookup("email", "d@u.example") == b
    assert await identity.lookup("phone", "+14155550100") == b
    assert await identity.lookup("email", "a@u.example") == a


async def test_a_resolve_racing_forget_leaves_no_pii(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, settings = pg
    person = (await identity.resolve(("email", "gone@f.example"))).person_id
    forgetting: list[asyncio.Task[Any]] = []

    async def forget_waits_for_the_resolve() -> None:
        forgetting.append(asyncio.create_task(identity.call("Forget", person_id=person)))
        await eventually(lambda: lock_waiters(settings), lambda n: n > 0, "forget waiting")

    # The resolve holds the locks of the session it adds and of the person it joins.
    once(monkeypatch, "lock", after=forget_waits_for_the_resolve, owner=graph)
    linked = await identity.resolve(("email", "gone@f.example"), ("cookie", "ck-after"))
    assert linked.outcome == O.RESOLVE_OUTCOME_LINKED
    forgotten = await forgetting[0]
    assert (forgotten.identifiers_deleted, forgotten.evidence_deleted) == (2, 2)
    assert await pii_left(identity, settings) == []


async def test_evidence_of_a_person_forgotten_meanwhile_is_not_left_behind(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, settings = pg
    person = (await identity.resolve(("email", "gone@fe.example"), ("cookie", "ck-fe"))).person_id

    async def forget() -> None:
        await identity.call("Forget", person_id=person)

    # Read before the erasure, written after it: the write finds the identifiers gone, and the
    # record goes through the exact path, which finds the tombstone.
    once(monkeypatch, "write", before=forget, owner=graph)
    answer = await identity.resolve(("email", "gone@fe.example"))
    assert (answer.outcome, answer.person_id) == (O.RESOLVE_OUTCOME_ERASED, person)
    assert await pii_left(identity, settings) == []


async def pii_left(identity: Identity, settings: Any) -> list[Any]:
    """Rows of the shop that still hold an identifier's value."""
    return await sql(
        settings,
        "SELECT 'evidence' FROM evidence WHERE shop_id = $1 AND anchor_key IS NOT NULL "
        "UNION ALL SELECT 'carried' FROM evidence_identifier WHERE shop_id = $1 "
        "UNION ALL SELECT 'identifier' FROM identifier WHERE shop_id = $1",
        identity.shop,
    )


async def test_a_forget_racing_a_merge_forgets_the_merged_group(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, _ = pg
    b = (await identity.resolve(("email", "b@fm.example"))).person_id
    c = (await identity.resolve(("email", "c@fm.example"))).person_id

    async def c_absorbs_b() -> None:
        await identity.call("Merge", person_a_id=c, person_b_id=b)

    once(monkeypatch, "lock_persons", before=c_absorbs_b)
    done = await identity.call("Forget", person_id=b)
    assert (done.identifiers_deleted, done.evidence_deleted) == (2, 2)
    for email in ("b@fm.example", "c@fm.example"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await identity.lookup("email", email)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_resolve_racing_an_unmerge_sees_the_unmerge(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, _ = pg
    a = (await identity.resolve(("email", "a@ru.example"))).person_id
    b = (await identity.resolve(("email", "b@ru.example"), ("shopify_customer_id", "1"))).person_id
    merged = (await identity.call("Merge", person_a_id=a, person_b_id=b)).merge

    async def unmerge() -> None:
        await identity.call("Unmerge", merge_id=merged.merge_id)

    once(monkeypatch, "identifiers", after=unmerge)
    answer = await identity.resolve(
        ("email", "a@ru.example"), ("email", "b@ru.example"), ("shopify_customer_id", "9")
    )
    assert answer.outcome == O.RESOLVE_OUTCOME_CANDIDATE_RAISED
    assert await identity.lookup("email", "a@ru.example") != await identity.lookup(
        "email", "b@ru.example"
    )


async def test_a_value_an_erased_person_shared_does_not_take_another_persons_record(
    pg: Any,
) -> None:
    identity, _ = pg
    ann = await identity.resolve(("email", "ann@h.example"), ("cookie", "family-pc"))
    bob = await identity.resolve(("email", "bob@h.example"))
    await identity.call("Forget", person_id=ann.person_id)
    order = await identity.resolve(("email", "bob@h.example"), ("cookie", "family-pc"))
    assert (order.outcome, order.person_id) == (O.RESOLVE_OUTCOME_UNCHANGED, bob.person_id)
    assert await identity.keys(bob.person_id) == {("email", "bob@h.example")}


async def test_one_event_delivered_four_times_at_once_is_recorded_once(pg: Any) -> None:
    identity, settings = pg
    for n in range(10):
        answers = await asyncio.gather(
            *(identity.resolve(("email", "test@test.com"), event_id=f"dup-{n}") for _ in range(4))
        )
        assert [a.outcome for a in answers] == [O.RESOLVE_OUTCOME_ANONYMOUS] * 4
    rows = await sql(settings, "SELECT count(*) FROM evidence WHERE shop_id = $1", identity.shop)
    assert rows[0][0] == 10


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("nul", "identifiers[0].value"),
        ("token_superscript", "page_token"),
        ("token_too_long", "page_token"),
        ("observed_at", "observed_at"),
        ("window", "unmerge_window"),
    ],
)
async def test_odd_input_is_invalid_argument_not_internal(pg: Any, case: str, field: str) -> None:
    identity, _ = pg
    token = "²" if case == "token_superscript" else "9" * 30
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "nul": lambda: identity.resolve(("cookie", "a\x00b")),
        "token_superscript": lambda: identity.stub.ListMergeCandidates(
            identity_pb2.ListMergeCandidatesRequest(shop_id=identity.shop, page_token=token),
            metadata=bearer(ADMIN_TOKEN),
        ),
        "observed_at": lambda: identity.resolve(
            ("email", "x@o.example"), observed_at=Timestamp(seconds=2**40)
        ),
        "window": lambda: identity.call("PutShopPolicy", unmerge_window=Duration(seconds=2**62)),
    }
    calls["token_too_long"] = calls["token_superscript"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await calls[case]()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(raised.value)[0].field_violations] == [field]


async def test_forget_removes_the_forgotten_session_from_other_peoples_evidence(pg: Any) -> None:
    identity, settings = pg
    await identity.resolve(("cookie", "shared-ck"), ("email", "ann@s.example"))
    await identity.resolve(("cookie", "shared-ck"))  # anchored on the cookie, then ann's
    bob = await identity.resolve(("email", "bob@s.example"))
    await identity.resolve(("email", "bob@s.example"), ("cookie", "shared-ck"))  # re-pointed
    await identity.call("Forget", person_id=bob.person_id)
    left = await sql(
        settings,
        "SELECT event_id FROM evidence WHERE shop_id = $1 AND anchor_key = 'shared-ck'",
        identity.shop,
    )
    assert left == []


async def test_a_session_linked_while_its_person_is_merged_joins_the_merged_group(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, _ = pg
    ann = (await identity.resolve(("email", "ann@lm.example"))).person_id
    bob = (await identity.resolve(("email", "bob@lm.example"))).person_id

    async def bob_absorbs_ann() -> None:
        await identity.call("Merge", person_a_id=bob, person_b_id=ann)

    # Decided on ann standing alone, written after the merge: the write sees ann's group moved
    # and the record goes through the exact path, which links the session to the merged group.
    once(monkeypatch, "lock", before=bob_absorbs_ann, owner=graph)
    answer = await identity.resolve(("email", "ann@lm.example"), ("cookie", "ck-lm"))
    assert (answer.outcome, answer.person_id) == (O.RESOLVE_OUTCOME_LINKED, bob)
    assert await identity.lookup("cookie", "ck-lm") == bob
    assert await identity.keys(bob) == {
        ("email", "ann@lm.example"),
        ("email", "bob@lm.example"),
        ("cookie", "ck-lm"),
    }
