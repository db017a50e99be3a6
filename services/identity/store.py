"""The identity service's tables and the queries the identity graph runs inside one transaction.

A person is a grouping: every identifier has a home person (the one its evidence tied it to), and
every person either stands alone (its own root) or was merged into another (`parent_id`), so an
identifier belongs to the root of its home. Merges and unmerges change `parent_id` (and the
cached `root_id` of the persons under it); they never move identifiers or rewrite facts.
"""

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.identity.identifiers import NORMALIZER_VERSION, Normalized
from services.runtime.db import append_to_outbox, dialect_of, utc

BIGINT = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    """Tables of the identity service."""


class ShopPolicyRow(Base):
    """A shop's identity policy (PutShopPolicy)."""

    __tablename__ = "shop_policy"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    unmerge_window_seconds: Mapped[int] = mapped_column(Integer)
    default_country: Mapped[str] = mapped_column(String(2))
    own_domains: Mapped[list[str]] = mapped_column(JSON)
    # [type, match key] of each blocked value.
    blocked_values: Mapped[list[list[str]]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PersonRow(Base):
    """A person: a grouping of identifiers, merged into `parent_id` while a merge stands."""

    __tablename__ = "person"
    __table_args__ = (
        Index("person_root", "shop_id", "root_id"),
        Index("person_parent", "shop_id", "parent_id"),
    )
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(String(64))
    root_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdentifierRow(Base):
    """An identifier: raw, normalised, match key, and its home person."""

    __tablename__ = "identifier"
    __table_args__ = (
        UniqueConstraint("shop_id", "type", "match_key", name="identifier_key"),
        Index("identifier_person", "shop_id", "person_id"),
    )
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    match_key: Mapped[str] = mapped_column(String(320))
    value: Mapped[str] = mapped_column(String(320))
    raw_value: Mapped[str] = mapped_column(String(320))
    person_id: Mapped[str] = mapped_column(String(64))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    normalizer_version: Mapped[int] = mapped_column(Integer)
    # Conflicts this value was the link of; past a threshold it is promiscuous and links nobody.
    conflicts: Mapped[int] = mapped_column(Integer, default=0)


class EvidenceRow(Base):
    """One observation "these identifiers were seen together", append-only."""

    __tablename__ = "evidence"
    __table_args__ = (
        UniqueConstraint("shop_id", "event_id", name="evidence_event"),
        Index("evidence_person", "shop_id", "person_id"),
    )
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(64))
    strength: Mapped[str] = mapped_column(String(16))
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # What the record resolved to: the home person of its anchor, and what was done.
    person_id: Mapped[str | None] = mapped_column(String(64))
    anchor_type: Mapped[str | None] = mapped_column(String(32))
    anchor_key: Mapped[str | None] = mapped_column(String(320))
    outcome: Mapped[str] = mapped_column(String(16))
    candidate_id: Mapped[str | None] = mapped_column(String(64))


class EvidenceIdentifierRow(Base):
    """An identifier as one piece of evidence carried it (junk and blocked values included)."""

    __tablename__ = "evidence_identifier"
    __table_args__ = (Index("evidence_identifier_key", "shop_id", "type", "match_key"),)
    evidence_id: Mapped[int] = mapped_column(BIGINT, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    raw_value: Mapped[str] = mapped_column(String(320))
    match_key: Mapped[str] = mapped_column(String(320))


# Tables most resolves append to, as Core tables: inserts without the ORM's bookkeeping.
IDENTIFIER = cast(Table, IdentifierRow.__table__)
EVIDENCE = cast(Table, EvidenceRow.__table__)
EVIDENCE_IDENTIFIER = cast(Table, EvidenceIdentifierRow.__table__)


class MergeRow(Base):
    """A merge and, once undone, its unmerge: the audit of both (who, when, why, evidence)."""

    __tablename__ = "merge"
    merge_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(128), index=True)
    survivor_id: Mapped[str] = mapped_column(String(64))
    merged_id: Mapped[str] = mapped_column(String(64))
    merged_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(256))
    event_id: Mapped[str | None] = mapped_column(String(256))
    candidate_id: Mapped[str | None] = mapped_column(String(64))
    merged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    unmerge_deadline: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    unmerged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    unmerged_by: Mapped[str | None] = mapped_column(String(128))
    unmerge_reason: Mapped[str | None] = mapped_column(String(256))


class CandidateRow(Base):
    """A merge candidate (the Duplicates list): two persons kept apart, with why."""

    __tablename__ = "merge_candidate"
    __table_args__ = (Index("merge_candidate_open", "shop_id", "state", "seq"),)
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    candidate_id: Mapped[str] = mapped_column(String(64), unique=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    person_a_id: Mapped[str] = mapped_column(String(64))
    person_b_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    # The events that raised it (the first ones, at most MAX_CANDIDATE_EVIDENCE).
    event_ids: Mapped[list[str]] = mapped_column(JSON)
    raised_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decision_reason: Mapped[str | None] = mapped_column(String(256))


class DecisionRow(Base):
    """A "not the same person" decision (a dismissed candidate, an unmerge)."""

    __tablename__ = "not_same_person"
    __table_args__ = (
        Index("not_same_person_a", "shop_id", "person_a_id"),
        Index("not_same_person_b", "shop_id", "person_b_id"),
    )
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    person_a_id: Mapped[str] = mapped_column(String(64))
    person_b_id: Mapped[str] = mapped_column(String(64))
    decided_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(256))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ChangeRow(Base):
    """The outbox other services follow: merges, unmerges, re-pointed sessions, forgotten."""

    __tablename__ = "change"
    __table_args__ = (Index("change_shop", "shop_id", "seq"),)
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    person_id: Mapped[str] = mapped_column(String(64))
    other_person_id: Mapped[str | None] = mapped_column(String(64))
    merge_id: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ErasedIdentifierRow(Base):
    """The tombstone of a forgotten identifier: a hash, never the value, and its person."""

    __tablename__ = "erased_identifier"
    shop_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(64))
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def erased_hash(shop_id: str, type_: str, match_key: str) -> str:
    """The tombstone hash of an identifier (SHA-256 over shop, type and match key)."""
    return hashlib.sha256(f"{shop_id}\0{type_}\0{match_key}".encode()).hexdigest()


def lock_key(shop_id: str, type_: str, match_key: str) -> int:
    """The 64-bit advisory lock of an identifier: whoever links it holds it first."""
    digest = hashlib.blake2b(f"{shop_id}\0{type_}\0{match_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class Inventory:
    """A shop's persons in counts: what a data-minimisation review starts from."""

    persons: int
    with_email: int
    with_phone: int
    oldest_record_at: datetime | None
    """When the oldest of their evidence was observed."""
    past_retention: int
    """Persons whose newest evidence is older than the cutoff."""


@dataclass(frozen=True)
class Stored:
    """What linking needs of a stored identifier: its home person, the root that person belongs
    to now, and how many conflicts it was the link of."""

    home_id: str
    root_id: str
    conflicts: int


# The identifier rows of (type, match key) pairs given as two arrays, one index lookup a pair.
# The subquery is LATERAL with OFFSET 0 so that the planner cannot turn it into a join: for
# many pairs it otherwise hashes every identifier of the shop, a cost that grows with the shop
# (2,000 pairs among 200,000 identifiers: 81 ms hashed, 18 ms looked up).
_KEYED = """
    unnest(CAST(:{types} AS text[]), CAST(:{keys} AS text[])) AS k(type, match_key)
    CROSS JOIN LATERAL (
        SELECT * FROM identifier x
        WHERE x.shop_id = :shop AND x.type = k.type AND x.match_key = k.match_key OFFSET 0
    ) AS i"""

# _stored on PostgreSQL: the keys as two arrays, so that the statement is the same (prepared
# once) however many keys a call reads, where an IN list of pairs is compiled and planned anew for
# every length (a thousand pairs took seconds).
_STORED = text(
    f"""
    SELECT i.type, i.match_key, i.person_id, p.root_id, i.conflicts
    FROM {_KEYED.format(types="types", keys="keys")}
    JOIN person p ON p.shop_id = i.shop_id AND p.person_id = i.person_id
    """  # noqa: S608  # composed of constants only
)


async def _stored(
    session: AsyncSession | AsyncConnection,
    shop_id: str,
    keys: Sequence[tuple[str, str]],
    postgres: bool,
) -> dict[tuple[str, str], Stored]:
    """The stored identifiers among these (type, match key) pairs, with their roots."""
    if not keys:
        return {}
    if postgres:
        rows = await session.execute(
            _STORED,
            {"shop": shop_id, "types": [t for t, _ in keys], "keys": [k for _, k in keys]},
        )
    else:
        rows = await session.execute(
            select(
                IdentifierRow.type,
                IdentifierRow.match_key,
                IdentifierRow.person_id,
                PersonRow.root_id,
                IdentifierRow.conflicts,
            )
            .join(
                PersonRow,
                (PersonRow.shop_id == IdentifierRow.shop_id)
                & (PersonRow.person_id == IdentifierRow.person_id),
            )
            .where(
                IdentifierRow.shop_id == shop_id,
                tuple_(IdentifierRow.type, IdentifierRow.match_key).in_(keys),
            )
        )
    return {
        (type_, key): Stored(home, root, conflicts) for type_, key, home, root, conflicts in rows
    }


@dataclass(frozen=True)
class Prior:
    """The evidence an event id already left: what a replay of the event answers."""

    person_id: str | None
    root_id: str | None
    anchor: tuple[str, str] | None
    outcome: str
    candidate_id: str | None


@dataclass
class Snapshot:
    """What resolving a batch reads first, in one statement: the stored identifiers among its
    keys (with their roots), the evidence its event ids left, and the tombstones among its keys
    (by hash)."""

    stored: dict[tuple[str, str], Stored]
    priors: dict[str, Prior]
    erased: dict[str, str]
    held: dict[str, dict[str, set[str]]]
    """Every identifier (type -> match keys) of the groups those identifiers belong to."""


@dataclass
class Writes:
    """The rows a batch's common cases add, written by one statement, and what that statement
    checks first: each key in `expected` still stored with that home and root (not
    promiscuous), each group in `held` still holding exactly those identifiers, and each key in
    `new` neither stored nor forgotten."""

    expected: dict[tuple[str, str], Stored] = field(default_factory=dict)
    held: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    new: list[tuple[str, str]] = field(default_factory=list)
    persons: list[tuple[str, datetime]] = field(default_factory=list)
    identifiers: list[tuple[Normalized, str, datetime]] = field(default_factory=list)
    evidence: list[tuple[dict[str, Any], Sequence[Normalized]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.evidence)


# Every part looks its rows up the same way, LATERAL with OFFSET 0 (as do the rows `_EXPECTED`
# locks): in tables PostgreSQL has not analysed yet (a new shop's first import, before autovacuum
# gets to it) the planner otherwise compared every person of the shop with every root found
# (15,000 persons and 200 roots: 719 ms, against 1 ms looked up), and filtered every evidence
# row of the shop against the event ids asked and hashed every person of the shop to find their
# roots (23,000 and 15,000 rows for 100 ids: 15 ms, against 1 ms looked up).
_SNAPSHOT = text(
    f"""
    WITH found AS (
        SELECT i.type, i.match_key, i.person_id, p.root_id, i.conflicts
        FROM {_KEYED.format(types="types", keys="keys")}
        JOIN person p ON p.shop_id = i.shop_id AND p.person_id = i.person_id
    )
    SELECT 'i' AS kind, type AS a, match_key AS b, person_id AS c, root_id AS d,
           conflicts AS n, CAST(NULL AS text) AS f, CAST(NULL AS text) AS g
    FROM found
    UNION ALL
    SELECT 'h', i.type, i.match_key, NULL, m.root_id, NULL, NULL, NULL
    FROM (SELECT DISTINCT root_id FROM found) AS r
    CROSS JOIN LATERAL (
        SELECT * FROM person x WHERE x.shop_id = :shop AND x.root_id = r.root_id OFFSET 0
    ) AS m
    JOIN identifier i ON i.shop_id = :shop AND i.person_id = m.person_id
    UNION ALL
    SELECT 'e', e.event_id, e.anchor_type, e.person_id, p.root_id, NULL, e.anchor_key,
           e.outcome || ' ' || coalesce(e.candidate_id, '')
    FROM unnest(CAST(:events AS text[])) AS w(event_id)
    CROSS JOIN LATERAL (
        SELECT * FROM evidence x WHERE x.shop_id = :shop AND x.event_id = w.event_id OFFSET 0
    ) AS e
    LEFT JOIN LATERAL (
        SELECT root_id FROM person x
        WHERE x.shop_id = e.shop_id AND x.person_id = e.person_id OFFSET 0
    ) AS p ON true
    UNION ALL
    SELECT 't', t.key_hash, NULL, t.person_id, NULL, NULL, NULL, NULL
    FROM unnest(CAST(:hashes AS text[])) AS w(key_hash)
    CROSS JOIN LATERAL (
        SELECT * FROM erased_identifier x
        WHERE x.shop_id = :shop AND x.key_hash = w.key_hash OFFSET 0
    ) AS t
    """  # noqa: S608  # composed of constants only
)

# The common cases' rows in one statement. It first locks the identifier rows it relies on (so a
# Forget, which locks them FOR UPDATE before reading the evidence it deletes, waits for it or
# is seen to have removed them) and checks that nothing it decided on moved since it was read;
# only then (`ok`) does it insert anything. PostgreSQL plans every statement anew (the runtime's
# force_custom_plan), which costs more than running this one: each batch leaves out the parts
# it has no rows for (`_write_statement`).
_EXPECTED = """
    expected AS (
        SELECT * FROM unnest(CAST(:v_types AS text[]), CAST(:v_keys AS text[]),
                             CAST(:v_homes AS text[]), CAST(:v_roots AS text[]))
            AS v(type, match_key, home, root)
    ), held AS (
        SELECT i.type, i.match_key
        FROM expected v
        CROSS JOIN LATERAL (
            SELECT * FROM identifier x
            WHERE x.shop_id = :shop AND x.type = v.type AND x.match_key = v.match_key
                AND x.person_id = v.home AND x.conflicts < :promiscuous
            OFFSET 0 FOR KEY SHARE
        ) AS i
        JOIN person p ON p.shop_id = i.shop_id AND p.person_id = i.person_id
            AND p.root_id = v.root
    ),"""
_GROUPS = """
    wanted AS (
        SELECT * FROM unnest(CAST(:h_roots AS text[]), CAST(:h_types AS text[]),
                             CAST(:h_keys AS text[])) AS w(root_id, type, match_key)
    ), group_held AS (
        SELECT m.root_id, i.type, i.match_key
        FROM person m
        JOIN identifier i ON i.shop_id = m.shop_id AND i.person_id = m.person_id
        WHERE m.shop_id = :shop AND m.root_id = ANY(CAST(:r_ids AS text[]))
    ),"""
_OK_EXPECTED = "(SELECT count(*) FROM held) = cardinality(CAST(:v_types AS text[]))"
_OK_GROUPS = """
    NOT EXISTS (SELECT * FROM group_held EXCEPT SELECT * FROM wanted)
    AND NOT EXISTS (SELECT * FROM wanted EXCEPT SELECT * FROM group_held)"""
_OK_NEW = f"""
    NOT EXISTS (
        SELECT 1
        FROM {_KEYED.format(types="n_types", keys="n_keys")}
    )
    AND NOT EXISTS (
        SELECT 1 FROM erased_identifier t
        WHERE t.shop_id = :shop AND t.key_hash = ANY(CAST(:n_hashes AS text[]))
    )"""  # noqa: S608  # composed of constants only
_PERSONS = """
    persons AS (
        INSERT INTO person (shop_id, person_id, parent_id, root_id, created_at, erased_at)
        SELECT :shop, x.id, NULL, x.id, x.at, NULL
        FROM unnest(CAST(:p_ids AS text[]), CAST(:p_at AS timestamptz[])) AS x(id, at)
        WHERE (SELECT ok FROM ok)
    ),"""
_IDENTIFIERS = """
    identifiers AS (
        INSERT INTO identifier (shop_id, type, match_key, value, raw_value, person_id,
                                first_seen_at, normalizer_version, conflicts)
        SELECT :shop, x.type, x.key, x.value, x.raw, x.person, x.at, :version, 0
        FROM unnest(CAST(:i_types AS text[]), CAST(:i_keys AS text[]),
                    CAST(:i_values AS text[]), CAST(:i_raws AS text[]),
                    CAST(:i_persons AS text[]), CAST(:i_at AS timestamptz[]))
            AS x(type, key, value, raw, person, at)
        WHERE (SELECT ok FROM ok)
    ),"""
_EVIDENCE = """
    added AS (
        INSERT INTO evidence (shop_id, event_id, source, strength, observed_at, recorded_at,
                              person_id, anchor_type, anchor_key, outcome, candidate_id)
        SELECT :shop, x.event, x.source, x.strength, x.observed, x.recorded, x.person,
               x.anchor_type, x.anchor_key, x.outcome, NULL
        FROM unnest(CAST(:e_events AS text[]), CAST(:e_sources AS text[]),
                    CAST(:e_strengths AS text[]), CAST(:e_observed AS timestamptz[]),
                    CAST(:e_recorded AS timestamptz[]), CAST(:e_persons AS text[]),
                    CAST(:e_anchor_types AS text[]), CAST(:e_anchor_keys AS text[]),
                    CAST(:e_outcomes AS text[]))
            WITH ORDINALITY
            AS x(event, source, strength, observed, recorded, person, anchor_type, anchor_key,
                 outcome, position)
        WHERE (SELECT ok FROM ok)
        ORDER BY x.position
        RETURNING id, event_id
    ), carried AS (
        INSERT INTO evidence_identifier (evidence_id, position, shop_id, type, raw_value,
                                         match_key)
        SELECT e.id, x.position, :shop, x.type, x.raw, x.key
        FROM unnest(CAST(:c_events AS text[]), CAST(:c_positions AS int[]),
                    CAST(:c_types AS text[]), CAST(:c_raws AS text[]),
                    CAST(:c_keys AS text[])) AS x(event, position, type, raw, key)
        JOIN added e ON e.event_id = x.event
    )
    SELECT ok FROM ok"""


@functools.cache
def _write_statement(expected: bool, groups: bool, new: bool, persons: bool) -> Any:
    """The write statement with only the parts a batch has rows for."""
    checks = [
        c for c, used in ((_OK_EXPECTED, expected), (_OK_GROUPS, groups), (_OK_NEW, new)) if used
    ]
    parts = [_EXPECTED if expected else "", _GROUPS if groups else ""]
    parts.append(f" ok AS (SELECT {' AND '.join(checks) or 'true'} AS ok),")
    parts += [_PERSONS if persons else "", _IDENTIFIERS if new else "", _EVIDENCE]
    return text("WITH" + "".join(parts))


async def read_snapshot(
    executor: Any, shop_id: str, keys: Iterable[tuple[str, str]], event_ids: Iterable[str]
) -> Snapshot:
    """Reads what resolving a batch starts from (PostgreSQL), by one statement."""
    keys = sorted(set(keys))
    hashes = {erased_hash(shop_id, t, k): (t, k) for t, k in keys}
    rows = await executor.execute(
        _SNAPSHOT,
        {
            "shop": shop_id,
            "types": [t for t, _ in keys],
            "keys": [k for _, k in keys],
            "events": sorted(set(event_ids)),
            "hashes": list(hashes),
        },
    )
    snapshot = Snapshot({}, {}, {}, {})
    for kind, a, b, c, d, n, f, g in rows:
        if kind == "i":
            snapshot.stored[(a, b)] = Stored(c, d, n)
        elif kind == "h":
            snapshot.held.setdefault(d, {}).setdefault(a, set()).add(b)
        elif kind == "e":
            outcome, candidate = g.split(" ", 1)
            anchor = None if b is None or f is None else (b, f)
            snapshot.priors[a] = Prior(c, d, anchor, outcome, candidate or None)
        else:
            snapshot.erased[a] = c
    return snapshot


async def lock(
    executor: Any, shop_id: str, keys: Sequence[tuple[str, str]], roots: Iterable[str]
) -> None:
    """Takes the advisory locks of identifiers about to be added, then the row locks of the
    persons whose groups they join, each in one order for every transaction, by one statement
    (PostgreSQL): what the exact path takes before it adds identifiers."""
    await executor.execute(
        text(
            "SELECT (SELECT count(*) FROM (SELECT pg_advisory_xact_lock(k) FROM "
            "(SELECT unnest(CAST(:keys AS bigint[])) AS k ORDER BY 1) AS sorted) AS a), "
            "(SELECT count(*) FROM (SELECT 1 FROM person WHERE shop_id = :shop "
            "AND person_id = ANY(CAST(:roots AS text[])) ORDER BY person_id FOR UPDATE) AS b)"
        ),
        {
            "shop": shop_id,
            "keys": sorted({lock_key(shop_id, t, k) for t, k in keys}),
            "roots": sorted(set(roots)),
        },
    )


async def write(executor: Any, shop_id: str, writes: Writes, promiscuous: int) -> bool:
    """Writes the common cases' rows by one statement (PostgreSQL); False, with nothing
    written, when something they were decided on moved since it was read."""
    expected = sorted(writes.expected.items())
    held = [
        (r, t, k) for r, types in writes.held.items() for t, keys in types.items() for k in keys
    ]
    identifiers = writes.identifiers
    carried = [
        (evidence["event_id"], position, n)
        for evidence, normalized in writes.evidence
        for position, n in enumerate(normalized)
    ]
    params: dict[str, Any] = {"shop": shop_id}
    if expected:
        params |= {
            "promiscuous": promiscuous,
            "v_types": [t for (t, _), _ in expected],
            "v_keys": [k for (_, k), _ in expected],
            "v_homes": [s.home_id for _, s in expected],
            "v_roots": [s.root_id for _, s in expected],
        }
    if held:
        params |= {
            "r_ids": list(writes.held),
            "h_roots": [r for r, _, _ in held],
            "h_types": [t for _, t, _ in held],
            "h_keys": [k for _, _, k in held],
        }
    if writes.persons:
        params |= {
            "p_ids": [p for p, _ in writes.persons],
            "p_at": [at for _, at in writes.persons],
        }
    if writes.new:
        params |= {
            "n_types": [t for t, _ in writes.new],
            "n_keys": [k for _, k in writes.new],
            "n_hashes": [erased_hash(shop_id, t, k) for t, k in writes.new],
            "version": NORMALIZER_VERSION,
            "i_types": [n.type for n, _, _ in identifiers],
            "i_keys": [n.match_key for n, _, _ in identifiers],
            "i_values": [n.value for n, _, _ in identifiers],
            "i_raws": [n.raw for n, _, _ in identifiers],
            "i_persons": [p for _, p, _ in identifiers],
            "i_at": [at for _, _, at in identifiers],
        }
    params |= {
        "e_events": [e["event_id"] for e, _ in writes.evidence],
        "e_sources": [e["source"] for e, _ in writes.evidence],
        "e_strengths": [e["strength"] for e, _ in writes.evidence],
        "e_observed": [e["observed_at"] for e, _ in writes.evidence],
        "e_recorded": [e["recorded_at"] for e, _ in writes.evidence],
        "e_persons": [e["person_id"] for e, _ in writes.evidence],
        "e_anchor_types": [e["anchor_type"] for e, _ in writes.evidence],
        "e_anchor_keys": [e["anchor_key"] for e, _ in writes.evidence],
        "e_outcomes": [e["outcome"] for e, _ in writes.evidence],
        "c_events": [event for event, _, _ in carried],
        "c_positions": [position for _, position, _ in carried],
        "c_types": [n.type for _, _, n in carried],
        "c_raws": [n.raw for _, _, n in carried],
        "c_keys": [n.match_key for _, _, n in carried],
    }
    statement = _write_statement(bool(expected), bool(held), bool(writes.new), bool(writes.persons))
    ok = await executor.scalar(statement, params)
    return bool(ok)


class Tx:
    """The queries of one identity transaction."""

    def __init__(self, session: AsyncSession, shop_id: str) -> None:
        self.session = session
        self.shop_id = shop_id
        self.postgres = session.get_bind().dialect.name == "postgresql"
        self.changes: list[dict[str, Any]] = []

    async def lock_identifiers(self, keys: Iterable[tuple[str, str]]) -> None:
        """Takes the advisory locks of the identifiers, in one order for every transaction
        (PostgreSQL; SQLite runs one writer at a time anyway)."""
        if not self.postgres:
            return
        locks = sorted({lock_key(self.shop_id, t, k) for t, k in keys})
        await self.session.execute(
            text(
                "SELECT pg_advisory_xact_lock(k) FROM "
                "(SELECT unnest(CAST(:keys AS bigint[])) AS k ORDER BY 1) AS sorted"
            ),
            {"keys": locks},
        )

    async def evidence(self, event_id: str) -> EvidenceRow | None:
        return (
            await self.session.scalars(
                select(EvidenceRow).where(
                    EvidenceRow.shop_id == self.shop_id, EvidenceRow.event_id == event_id
                )
            )
        ).one_or_none()

    async def erased(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """Which of these identifiers were forgotten, with their tombstone person."""
        hashes = {erased_hash(self.shop_id, t, k): (t, k) for t, k in keys}
        rows = await self.session.execute(
            select(ErasedIdentifierRow.key_hash, ErasedIdentifierRow.person_id).where(
                ErasedIdentifierRow.shop_id == self.shop_id,
                ErasedIdentifierRow.key_hash.in_(list(hashes)),
            )
        )
        return {hashes[key_hash]: person_id for key_hash, person_id in rows}

    async def identifiers(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
        """The stored identifiers among these (type, match key) pairs, with their roots."""
        return await _stored(self.session, self.shop_id, keys, self.postgres)

    async def lock_persons(self, person_ids: Iterable[str]) -> dict[str, PersonRow]:
        """Locks persons (sorted, so two transactions take them in the same order)."""
        ids = sorted(set(person_ids))
        if not ids:
            return {}
        rows = await self.session.scalars(
            select(PersonRow)
            .where(PersonRow.shop_id == self.shop_id, PersonRow.person_id.in_(ids))
            .order_by(PersonRow.person_id)
            .with_for_update()
            .execution_options(populate_existing=True)  # the rows as they are once locked
        )
        return {row.person_id: row for row in rows}

    async def person(self, person_id: str) -> PersonRow | None:
        """A person as it is now (never an earlier read of this transaction)."""
        return await self.session.get(PersonRow, (self.shop_id, person_id), populate_existing=True)

    async def held(self, root_ids: Sequence[str]) -> dict[str, dict[str, set[str]]]:
        """Every identifier (type -> match keys) of the persons grouped under each root."""
        held: dict[str, dict[str, set[str]]] = {root: {} for root in root_ids}
        if not root_ids:
            return held
        rows = await self.session.execute(
            select(PersonRow.root_id, IdentifierRow.type, IdentifierRow.match_key)
            .join(
                IdentifierRow,
                (IdentifierRow.shop_id == PersonRow.shop_id)
                & (IdentifierRow.person_id == PersonRow.person_id),
            )
            .where(PersonRow.shop_id == self.shop_id, PersonRow.root_id.in_(root_ids))
        )
        for root, type_, key in rows:
            held[root].setdefault(type_, set()).add(key)
        return held

    async def members(self, root_id: str) -> list[PersonRow]:
        """The persons grouped under a root, the root first."""
        rows = await self.session.scalars(
            select(PersonRow).where(PersonRow.shop_id == self.shop_id, PersonRow.root_id == root_id)
        )
        return sorted(rows, key=lambda p: (p.person_id != root_id, p.created_at, p.person_id))

    async def not_same_person(self, root_a: str, root_b: str) -> bool:
        """Whether a decision says someone under one root is not someone under the other."""
        a, b = PersonRow.__table__.alias("a"), PersonRow.__table__.alias("b")
        found = await self.session.scalar(
            select(func.count())
            .select_from(DecisionRow)
            .join(
                a, (a.c.shop_id == DecisionRow.shop_id) & (a.c.person_id == DecisionRow.person_a_id)
            )
            .join(
                b, (b.c.shop_id == DecisionRow.shop_id) & (b.c.person_id == DecisionRow.person_b_id)
            )
            .where(
                DecisionRow.shop_id == self.shop_id,
                or_(
                    (a.c.root_id == root_a) & (b.c.root_id == root_b),
                    (a.c.root_id == root_b) & (b.c.root_id == root_a),
                ),
            )
        )
        return bool(found)

    def add_person(self, person_id: str, now: datetime) -> None:
        self.session.add(
            PersonRow(
                shop_id=self.shop_id,
                person_id=person_id,
                parent_id=None,
                root_id=person_id,
                created_at=now,
                erased_at=None,
            )
        )

    async def add_identifiers(
        self, identifiers: Sequence[Normalized], home_id: str, now: datetime
    ) -> None:
        if not identifiers:
            return
        await self.session.execute(
            insert(IDENTIFIER),
            [
                {
                    "shop_id": self.shop_id,
                    "type": n.type,
                    "match_key": n.match_key,
                    "value": n.value,
                    "raw_value": n.raw,
                    "person_id": home_id,
                    "first_seen_at": now,
                    "normalizer_version": NORMALIZER_VERSION,
                    "conflicts": 0,
                }
                for n in identifiers
            ],
        )

    async def rehome(self, key: tuple[str, str], home_id: str) -> None:
        """Moves one identifier to another home person (a re-pointed session)."""
        await self.session.execute(
            update(IdentifierRow)
            .where(
                IdentifierRow.shop_id == self.shop_id,
                IdentifierRow.type == key[0],
                IdentifierRow.match_key == key[1],
            )
            .values(person_id=home_id)
        )

    async def count_conflicts(self, keys: Sequence[tuple[str, str]]) -> None:
        if keys:
            await self.session.execute(
                update(IdentifierRow)
                .where(
                    IdentifierRow.shop_id == self.shop_id,
                    tuple_(IdentifierRow.type, IdentifierRow.match_key).in_(keys),
                )
                .values(conflicts=IdentifierRow.conflicts + 1)
            )

    async def add_evidence(
        self, evidence: dict[str, Any], identifiers: Sequence[Normalized]
    ) -> None:
        """Appends one piece of evidence with every identifier it carried (Core statements:
        this runs on every resolve)."""
        evidence_id = await self.session.scalar(
            insert(EVIDENCE).values(shop_id=self.shop_id, **evidence).returning(EVIDENCE.c.id)
        )
        if identifiers:
            await self.session.execute(
                insert(EVIDENCE_IDENTIFIER),
                [
                    {
                        "evidence_id": evidence_id,
                        "position": position,
                        "shop_id": self.shop_id,
                        "type": n.type,
                        "raw_value": n.raw,
                        "match_key": n.match_key,
                    }
                    for position, n in enumerate(identifiers)
                ],
            )

    async def set_parent(self, person_id: str, parent_id: str | None) -> None:
        """Merges a root under another (or, with None, stands it alone again), and re-roots every
        person under it."""
        await self.session.execute(
            update(PersonRow)
            .where(PersonRow.shop_id == self.shop_id, PersonRow.person_id == person_id)
            .values(parent_id=parent_id)
        )
        root = person_id
        if parent_id is not None:
            parent = await self.person(parent_id)
            assert parent is not None
            root = parent.root_id
        frontier = [person_id]
        while frontier:
            await self.session.execute(
                update(PersonRow)
                .where(PersonRow.shop_id == self.shop_id, PersonRow.person_id.in_(frontier))
                .values(root_id=root)
            )
            frontier = list(
                await self.session.scalars(
                    select(PersonRow.person_id).where(
                        PersonRow.shop_id == self.shop_id, PersonRow.parent_id.in_(frontier)
                    )
                )
            )
        for loaded in list(self.session.identity_map.values()):
            if isinstance(loaded, PersonRow):
                self.session.expire(loaded)  # roots changed underneath

    async def open_candidate(self, root_a: str, root_b: str) -> CandidateRow | None:
        """The open candidate between two groups, if one was raised already."""
        a, b = PersonRow.__table__.alias("a"), PersonRow.__table__.alias("b")
        return (
            await self.session.scalars(
                select(CandidateRow)
                .join(
                    a,
                    (a.c.shop_id == CandidateRow.shop_id)
                    & (a.c.person_id == CandidateRow.person_a_id),
                )
                .join(
                    b,
                    (b.c.shop_id == CandidateRow.shop_id)
                    & (b.c.person_id == CandidateRow.person_b_id),
                )
                .where(
                    CandidateRow.shop_id == self.shop_id,
                    CandidateRow.state == "open",
                    or_(
                        (a.c.root_id == root_a) & (b.c.root_id == root_b),
                        (a.c.root_id == root_b) & (b.c.root_id == root_a),
                    ),
                )
                .limit(1)
            )
        ).one_or_none()

    async def candidate(self, candidate_id: str) -> CandidateRow | None:
        return (
            await self.session.scalars(
                select(CandidateRow).where(
                    CandidateRow.shop_id == self.shop_id,
                    CandidateRow.candidate_id == candidate_id,
                )
            )
        ).one_or_none()

    async def close_candidates(
        self, root_a: str, root_b: str, state: str, by: str, reason: str, now: datetime
    ) -> None:
        """Closes every open candidate between two groups."""
        while (found := await self.open_candidate(root_a, root_b)) is not None:
            found.state, found.decided_at, found.decided_by = state, now, by
            found.decision_reason = reason
            await self.session.flush()

    def add_change(
        self,
        kind: str,
        person_id: str,
        other_person_id: str | None,
        merge_id: str | None,
        now: datetime,
    ) -> None:
        """Queues a change for the outbox; written when the transaction ends."""
        self.changes.append(
            {
                "shop_id": self.shop_id,
                "kind": kind,
                "person_id": person_id,
                "other_person_id": other_person_id,
                "merge_id": merge_id,
                "at": now,
            }
        )

    async def merge(self, merge_id: str) -> MergeRow | None:
        row = await self.session.get(MergeRow, merge_id, with_for_update=self.postgres)
        return row if row is not None and row.shop_id == self.shop_id else None

    async def merges_of(self, person_ids: Sequence[str]) -> list[MergeRow]:
        """Every merge that involved one of these persons, oldest first."""
        rows = await self.session.scalars(
            select(MergeRow)
            .where(
                MergeRow.shop_id == self.shop_id,
                or_(MergeRow.survivor_id.in_(person_ids), MergeRow.merged_id.in_(person_ids)),
            )
            .order_by(MergeRow.merged_at, MergeRow.merge_id)
        )
        return list(rows)

    async def identifiers_of(self, person_ids: Sequence[str]) -> list[IdentifierRow]:
        rows = await self.session.scalars(
            select(IdentifierRow)
            .where(IdentifierRow.shop_id == self.shop_id, IdentifierRow.person_id.in_(person_ids))
            .order_by(IdentifierRow.type, IdentifierRow.match_key)
        )
        return list(rows)

    async def forget(self, persons: Sequence[PersonRow], now: datetime) -> dict[str, int]:
        """Deletes the persons' identifiers and evidence, keeps tombstones; returns the rows
        touched by table."""
        ids = [p.person_id for p in persons]
        if self.postgres:
            # A resolve that recorded evidence on these identifiers without taking their advisory
            # locks holds them FOR KEY SHARE until it commits: wait for it, so that its evidence
            # is among what is read and deleted below.
            await self.session.execute(
                select(IdentifierRow.id)
                .where(IdentifierRow.shop_id == self.shop_id, IdentifierRow.person_id.in_(ids))
                .with_for_update()
            )
        identifiers = await self.identifiers_of(ids)
        keys = [(i.type, i.match_key) for i in identifiers]
        if keys:
            await self.session.execute(
                dialect_of(self.session)
                .insert(ErasedIdentifierRow.__table__)
                .on_conflict_do_nothing(),
                [
                    {
                        "shop_id": self.shop_id,
                        "key_hash": erased_hash(self.shop_id, t, k),
                        "person_id": persons[0].person_id,
                        "erased_at": now,
                    }
                    for t, k in keys
                ],
            )
        evidence_ids = list(
            await self.session.scalars(
                select(EvidenceRow.id).where(
                    EvidenceRow.shop_id == self.shop_id, EvidenceRow.person_id.in_(ids)
                )
            )
        )
        links = 0
        for start in range(0, len(keys), 500):
            links += await self._count(
                delete(EvidenceIdentifierRow).where(
                    EvidenceIdentifierRow.shop_id == self.shop_id,
                    tuple_(EvidenceIdentifierRow.type, EvidenceIdentifierRow.match_key).in_(
                        keys[start : start + 500]
                    ),
                )
            )
        for start in range(0, len(keys), 500):
            await self.session.execute(
                update(EvidenceRow)
                .where(
                    EvidenceRow.shop_id == self.shop_id,
                    tuple_(EvidenceRow.anchor_type, EvidenceRow.anchor_key).in_(
                        keys[start : start + 500]
                    ),
                )
                .values(anchor_type=None, anchor_key=None)
            )
        links += await self._count(
            delete(EvidenceIdentifierRow).where(EvidenceIdentifierRow.evidence_id.in_(evidence_ids))
        )
        evidence = await self._count(delete(EvidenceRow).where(EvidenceRow.id.in_(evidence_ids)))
        deleted = await self._count(
            delete(IdentifierRow).where(
                IdentifierRow.shop_id == self.shop_id, IdentifierRow.person_id.in_(ids)
            )
        )
        candidates = await self._count(
            update(CandidateRow)
            .where(
                CandidateRow.shop_id == self.shop_id,
                CandidateRow.state == "open",
                or_(CandidateRow.person_a_id.in_(ids), CandidateRow.person_b_id.in_(ids)),
            )
            .values(state="erased", decided_at=now, decided_by="gdpr", decision_reason="erased")
        )
        marked = await self._count(
            update(PersonRow)
            .where(
                PersonRow.shop_id == self.shop_id,
                PersonRow.person_id.in_(ids),
                PersonRow.erased_at.is_(None),
            )
            .values(erased_at=now)
        )
        return {
            "identifier": deleted, "evidence": evidence, "evidence_identifier": links,
            "merge_candidate": candidates, "person": marked,
        }  # fmt: skip

    async def _count(self, statement: Any) -> int:
        """Runs a statement; the rows it touched."""
        return int(getattr(await self.session.execute(statement), "rowcount", 0))


# GetPerson's and GetPersons' read is one statement: the asked persons' groups (every member),
# their identifiers and the merges that touched them, as a UNION ALL of selects whose rows are
# tagged with their kind and their group's root (`r`) and carry their values in the slots below
# (NULL where a kind has none). One snapshot, one round trip, no transaction, however many
# persons are asked. Rows come ordered by root and kind, then (t, a, b): identifiers by type and
# match key, merges by time and id, as the database collates them.
_SLOTS: list[tuple[str, Any]] = [
    ("a", String()), ("b", String()), ("c", String()), ("d", String()), ("e", String()),
    ("f", String()), ("g", String()), ("h", String()), ("i", String()), ("j", String()),
    ("t", DateTime(timezone=True)), ("u", DateTime(timezone=True)),
    ("v", DateTime(timezone=True)), ("r", String()),
]  # fmt: skip


def _tagged(kind: str, **values: Any) -> Any:
    columns = [literal_column(f"'{kind}'", String()).label("kind")]
    columns += [
        (values.pop(name) if name in values else null().cast(type_)).label(name)
        for name, type_ in _SLOTS
    ]
    assert not values, f"no slot for {sorted(values)}"
    return select(*columns)


def _groups_statement(postgres: bool) -> Any:
    """The statement of `IdentityStore.groups`: the persons asked are one array parameter on
    PostgreSQL (one prepared statement however many), an expanding IN list on SQLite."""
    shop_id: Any = bindparam("shop_id")
    p, i, m = PersonRow.__table__, IdentifierRow.__table__, MergeRow.__table__
    asked = (
        p.c.person_id == any_(bindparam("person_ids", type_=ARRAY(String())))
        if postgres
        else p.c.person_id.in_(bindparam("person_ids", expanding=True))
    )
    roots = select(p.c.root_id).where(p.c.shop_id == shop_id, asked)
    members = (
        select(p.c.person_id, p.c.root_id, p.c.created_at, p.c.erased_at)
        .where(p.c.shop_id == shop_id, p.c.root_id.in_(roots))
        .cte("members")
    )
    return union_all(
        _tagged(
            "member",
            a=members.c.person_id,
            b=members.c.root_id,
            u=members.c.created_at,
            v=members.c.erased_at,
            r=members.c.root_id,
        ),
        _tagged(
            "identifier",
            a=i.c.type,
            b=i.c.match_key,
            c=i.c.raw_value,
            d=i.c.value,
            u=i.c.first_seen_at,
            r=members.c.root_id,
        ).select_from(
            i.join(members, (i.c.shop_id == shop_id) & (i.c.person_id == members.c.person_id))
        ),
        _tagged(
            "merge",
            t=m.c.merged_at,
            a=m.c.merge_id,
            c=m.c.survivor_id,
            d=m.c.merged_id,
            e=m.c.merged_by,
            f=m.c.reason,
            g=m.c.event_id,
            h=m.c.candidate_id,
            i=m.c.unmerged_by,
            j=m.c.unmerge_reason,
            u=m.c.unmerge_deadline,
            v=m.c.unmerged_at,
            r=members.c.root_id,
        )
        # A merge between two members of one group is one row of that group.
        .distinct()
        .select_from(
            m.join(
                members,
                (m.c.shop_id == shop_id)
                & or_(m.c.survivor_id == members.c.person_id, m.c.merged_id == members.c.person_id),
            )
        ),
    ).order_by(*(literal_column(name) for name in ("r", "kind", "t", "a", "b")))


_GROUP_READS = {postgres: _groups_statement(postgres) for postgres in (False, True)}


def _group_of(
    shop_id: str, rows: Sequence[Any]
) -> tuple[list[PersonRow], list[IdentifierRow], list[MergeRow]]:
    """A group as the rows of its root in `_GROUP_READS` hold it."""
    members: list[PersonRow] = []
    identifiers: list[IdentifierRow] = []
    merges: list[MergeRow] = []
    for kind, a, b, c, d, e, f, g, h, i, j, t, u, v, _ in rows:
        if kind == "member":
            members.append(
                PersonRow(shop_id=shop_id, person_id=a, root_id=b, created_at=u, erased_at=v)
            )
        elif kind == "identifier":
            identifiers.append(
                IdentifierRow(
                    shop_id=shop_id, type=a, match_key=b, raw_value=c, value=d,
                    person_id=None, first_seen_at=u,
                )
            )  # fmt: skip
        else:
            merges.append(
                MergeRow(
                    merge_id=a, shop_id=shop_id, survivor_id=c, merged_id=d, merged_by=e,
                    reason=f, event_id=g, candidate_id=h, merged_at=t, unmerge_deadline=u,
                    unmerged_at=v, unmerged_by=i, unmerge_reason=j,
                )
            )  # fmt: skip
    root_id = members[0].root_id
    members.sort(key=lambda p: (p.person_id != root_id, p.created_at, p.person_id))
    return members, identifiers, merges


class IdentityStore:
    """Transactions on the identity tables, and the reads that need none."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        # SQLite has no row or advisory locks: its transactions take turns in this process.
        self._turns = asyncio.Lock()
        self._engine: AsyncEngine = sessions.kw["bind"]
        self.postgres = self._engine.dialect.name == "postgresql"
        self._serial = not self.postgres

    @contextlib.asynccontextmanager
    async def statements(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on a connection, committed when the block ends (no ORM session: a few
        statements written by hand)."""
        async with self._engine.begin() as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose every statement is a transaction of its own: no BEGIN and no
        COMMIT round trips around a statement that reads or writes all it needs at once."""
        async with self._engine.connect() as connection:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.asynccontextmanager
    async def transaction(self, shop_id: str) -> AsyncIterator[Tx]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        async with contextlib.AsyncExitStack() as stack:
            if self._serial:
                await stack.enter_async_context(self._turns)
            session = await stack.enter_async_context(self._sessions.begin())
            tx = Tx(session, shop_id)
            yield tx
            await append_to_outbox(session, ChangeRow, tx.changes)

    async def groups(
        self, shop_id: str, person_ids: Sequence[str]
    ) -> list[tuple[list[PersonRow], list[IdentifierRow], list[MergeRow]] | None]:
        """For each person: the persons grouped with them (the root first), their identifiers
        (by type and match key) and every merge that involved one of them (oldest first), read
        by one statement for all of them; None for a person nobody knows."""
        parameters = {"shop_id": shop_id, "person_ids": list(person_ids)}
        async with self._reader() as reader:
            rows = (await reader.execute(_GROUP_READS[self.postgres], parameters)).all()
        of_root: dict[str, list[Any]] = {}
        for row in rows:
            of_root.setdefault(row.r, []).append(row)
        root_of = {row.a: row.r for row in rows if row.kind == "member"}
        return [
            _group_of(shop_id, of_root[root_of[person_id]]) if person_id in root_of else None
            for person_id in person_ids
        ]

    async def identifiers(
        self, shop_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Stored]:
        """The stored identifiers among these (type, match key) pairs with their roots, read
        by one statement outside any transaction."""
        async with self._reader() as reader:
            return await _stored(reader, shop_id, keys, self.postgres)

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[AsyncSession | AsyncConnection]:
        """Where a read of one statement runs: on PostgreSQL an autocommit connection (a session
        would send BEGIN and ROLLBACK around it), on SQLite a session."""
        if not self.postgres:
            async with self._sessions() as session:
                yield session
            return
        async with self.autocommit() as connection:
            yield connection

    async def shop_policy(self, shop_id: str) -> ShopPolicyRow | None:
        async with self._sessions() as session:
            return await session.get(ShopPolicyRow, shop_id)

    async def put_shop_policy(self, row: ShopPolicyRow) -> None:
        async with self._sessions.begin() as session:
            await session.merge(row)

    async def candidates(
        self, shop_id: str, after_seq: int, limit: int
    ) -> list[tuple[CandidateRow, list[tuple[EvidenceRow, list[EvidenceIdentifierRow]]]]]:
        """Open candidates after a position, with the evidence that raised them."""
        async with self._sessions() as session:
            rows = list(
                await session.scalars(
                    select(CandidateRow)
                    .where(
                        CandidateRow.shop_id == shop_id,
                        CandidateRow.state == "open",
                        CandidateRow.seq > after_seq,
                    )
                    .order_by(CandidateRow.seq)
                    .limit(limit)
                )
            )
            event_ids = {e for row in rows for e in row.event_ids}
            evidence = {
                e.event_id: e
                for e in await session.scalars(
                    select(EvidenceRow).where(
                        EvidenceRow.shop_id == shop_id, EvidenceRow.event_id.in_(event_ids)
                    )
                )
            }
            carried: dict[int, list[EvidenceIdentifierRow]] = {}
            for item in await session.scalars(
                select(EvidenceIdentifierRow)
                .where(EvidenceIdentifierRow.evidence_id.in_([e.id for e in evidence.values()]))
                .order_by(EvidenceIdentifierRow.evidence_id, EvidenceIdentifierRow.position)
            ):
                carried.setdefault(item.evidence_id, []).append(item)
            return [
                (
                    row,
                    [
                        (evidence[e], carried.get(evidence[e].id, []))
                        for e in row.event_ids
                        if e in evidence
                    ],
                )
                for row in rows
            ]

    async def inventory(self, shop_id: str, seen_before: datetime) -> Inventory:
        """The shop's persons in counts (a merged group once, erased ones not at all)."""
        live = (PersonRow.shop_id == shop_id, PersonRow.erased_at.is_(None))

        def with_type(type_: str) -> Any:
            return (
                select(func.count(func.distinct(PersonRow.root_id)))
                .join(
                    IdentifierRow,
                    (IdentifierRow.shop_id == PersonRow.shop_id)
                    & (IdentifierRow.person_id == PersonRow.person_id),
                )
                .where(*live, IdentifierRow.type == type_)
                .scalar_subquery()
            )

        seen = (
            select(
                func.min(EvidenceRow.observed_at).label("first"),
                func.max(EvidenceRow.observed_at).label("last"),
            )
            .join(
                PersonRow,
                (PersonRow.shop_id == EvidenceRow.shop_id)
                & (PersonRow.person_id == EvidenceRow.person_id),
            )
            .where(*live)
            .group_by(PersonRow.root_id)
            .subquery()
        )
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(
                        select(func.count())
                        .where(*live, PersonRow.person_id == PersonRow.root_id)
                        .scalar_subquery(),
                        with_type("email"),
                        with_type("phone"),
                        func.min(seen.c.first),
                        func.count().filter(seen.c.last < seen_before),
                    ).select_from(seen)
                )
            ).one()
        return Inventory(row[0], row[1], row[2], None if row[3] is None else utc(row[3]), row[4])

    async def changes(self, shop_id: str | None, after: int, limit: int) -> list[ChangeRow]:
        """Changes after a position, of one shop or (None) of all."""
        query = select(ChangeRow).where(ChangeRow.seq > after)
        if shop_id is not None:
            query = query.where(ChangeRow.shop_id == shop_id)
        async with self._sessions() as session:
            return list(await session.scalars(query.order_by(ChangeRow.seq).limit(limit)))
