"""The identity graph: resolving records to persons, merges and unmerges, lookups, forgetting.

Every change runs in one transaction that first locks what it reads: the identifiers of the
record (advisory locks, always in the same order), then the persons they belong to (row locks,
sorted). Two resolves racing on overlapping identifiers therefore run one after the other on
what they share, and end in the grouping that running them one by one would give. A deadlock
between wider transactions is retried.
"""

import asyncio
import contextvars
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from services.identity.identifiers import (
    InvalidIdentifier,
    Normalized,
    ShopRules,
    normalize,
)
from services.identity.linking import Party, conflict
from services.identity.store import (
    CandidateRow,
    ChangeRow,
    DecisionRow,
    EvidenceIdentifierRow,
    EvidenceRow,
    IdentifierRow,
    IdentityStore,
    Inventory,
    MergeRow,
    Prior,
    ShopPolicyRow,
    Snapshot,
    Stored,
    Tx,
    Writes,
    erased_hash,
    lock,
    read_snapshot,
    write,
)
from services.runtime.db import DatabaseUnavailable, Rehearsal, utc
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

DEFAULT_UNMERGE_WINDOW = timedelta(days=7)
MIN_UNMERGE_WINDOW = timedelta(hours=24)
MAX_UNMERGE_WINDOW = timedelta(days=90)
# A value that was the link of this many conflicts (a household landline, a shared tablet's
# session) is promiscuous: it links nobody any more.
PROMISCUOUS_AFTER = 3
# A candidate keeps the ids of the first events that raised it, for its evidence.
MAX_CANDIDATE_EVIDENCE = 20
MAX_IDENTIFIERS = 50
RETRIES = 10
# Records a batch writes per transaction, in order. A transaction of the exact path holds an
# advisory lock per identifier and event id of its records, and PostgreSQL's lock table is
# shared and small (64 locks a connection by default): a 1,000-record batch would hold ~4,000.
CHUNK = 100
# The advisory lock of an event id, beside those of identifiers (no identifier type has this name).
EVENT_LOCK = "\0event"
T = TypeVar("T")
# Deadlock detected, serialization failure, and a unique key taken meanwhile: an identifier or
# an event id that a resolve without advisory locks (the common cases) recorded first.
RETRYABLE_SQLSTATES = ("40P01", "40001", "23505")


@dataclass(frozen=True)
class Observation:
    """Identifiers seen together on one record, and where and when they were seen."""

    shop_id: str
    identifiers: Sequence[tuple[str, str]]
    source: str
    asserted: bool
    event_id: str
    country: str = ""
    observed_at: datetime | None = None
    skip_invalid: bool = False


@dataclass(frozen=True)
class Resolution:
    """What a record resolved to: the person holding its anchor, and what was done."""

    person_id: str
    outcome: str
    anchor: tuple[str, str] | None
    candidate_id: str = ""
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class PersonView:
    """A person as GetPerson shows it: the root of its group, with every member's identifiers
    and the merges that touched it."""

    person_id: str
    created_at: datetime
    erased: bool
    identifiers: list[IdentifierRow]
    merges: list[MergeRow]
    members: list[str]


@dataclass(frozen=True)
class Policy:
    """A shop's identity policy with its defaults."""

    shop_id: str
    unmerge_window: timedelta = DEFAULT_UNMERGE_WINDOW
    country: str = ""
    own_domains: tuple[str, ...] = ()
    blocked: tuple[tuple[str, str], ...] = ()

    @property
    def rules(self) -> ShopRules:
        return ShopRules(self.country, frozenset(self.own_domains), frozenset(self.blocked))


@dataclass
class _Run:
    """The state of one resolve while it decides."""

    tx: Tx
    observation: Observation
    now: datetime
    window: timedelta
    stored: dict[tuple[str, str], str] = field(default_factory=dict)  # key -> home person
    outcomes: set[str] = field(default_factory=set)
    candidate_id: str = ""


@dataclass(frozen=True)
class _Record:
    """One record of a batch: the observation and its identifiers normalised, strongest first."""

    observation: Observation
    normalized: list[Normalized]


@dataclass
class _Queue:
    """One shop's resolves waiting for the batch being written to end, and the task writing
    the shop's batches (the queue is dropped when the task ends)."""

    waiting: list[tuple[_Record, asyncio.Future[Resolution]]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


@dataclass
class _Plan:
    """What `_plan` decided: the answers of the records it could decide, the rows they add, and
    the first record it left to the exact path (None when it decided every one)."""

    results: dict[int, Resolution] = field(default_factory=dict)
    writes: Writes = field(default_factory=Writes)
    slow: int | None = None


def _keys(records: Sequence[_Record]) -> list[tuple[str, str]]:
    return [n.key for r in records for n in r.normalized if not n.blocked]


def _events(records: Sequence[_Record]) -> list[str]:
    return [r.observation.event_id for r in records]


def _evidence(
    observation: Observation,
    now: datetime,
    home: str | None,
    anchor: Normalized | None,
    outcome: str,
    candidate_id: str,
) -> dict[str, Any]:
    """The evidence row of a record: what it carried, and what it resolved to."""
    return {
        "event_id": observation.event_id,
        "source": observation.source,
        "strength": "asserted" if observation.asserted else "authoritative",
        "observed_at": observation.observed_at or now,
        "recorded_at": now,
        "person_id": home,
        "anchor_type": None if anchor is None else anchor.type,
        "anchor_key": None if anchor is None else anchor.match_key,
        "outcome": outcome,
        "candidate_id": candidate_id or None,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code in RETRYABLE_SQLSTATES


class IdentityGraph:
    """Identity resolution for every shop, on the identity store."""

    def __init__(
        self, store: IdentityStore, clock: Callable[[], datetime], policy_ttl: float = 5.0
    ) -> None:
        self._store = store
        self._clock = clock
        self._policy_ttl = policy_ttl
        self._policies: dict[str, tuple[float, Policy]] = {}
        self._queues: dict[str, _Queue] = {}

    async def _retrying(self, shop_id: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        for attempt in range(RETRIES):
            try:
                async with self._store.transaction(shop_id) as tx:
                    return await work(tx)
            except DBAPIError as exc:
                if not _retryable(exc) or attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(0.001 * (attempt + 1))
        raise AssertionError("unreachable")

    # --- policy ---------------------------------------------------------------------------------

    async def policy(self, shop_id: str) -> Policy:
        """The shop's policy, defaults for a shop that set none; cached for the policy TTL."""
        cached = self._policies.get(shop_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        policy = await self._read_policy(shop_id)
        self._policies[shop_id] = (time.monotonic() + self._policy_ttl, policy)
        return policy

    async def _read_policy(self, shop_id: str) -> Policy:
        row = await self._store.shop_policy(shop_id)
        if row is None:
            return Policy(shop_id)
        return Policy(
            shop_id,
            timedelta(seconds=row.unmerge_window_seconds),
            row.default_country,
            tuple(row.own_domains),
            tuple((t, k) for t, k in row.blocked_values),
        )

    async def put_policy(
        self,
        shop_id: str,
        window: timedelta | None,
        country: str,
        own_domains: Sequence[str],
        blocked: Sequence[tuple[str, str]],
    ) -> Policy:
        """Validates and stores a shop's policy; INVALID_ARGUMENT names each bad field."""
        violations: list[tuple[str, str]] = []
        window = DEFAULT_UNMERGE_WINDOW if window is None else window
        if not MIN_UNMERGE_WINDOW <= window <= MAX_UNMERGE_WINDOW:
            violations.append(("unmerge_window", "must be between 24 hours and 90 days"))
        if country and not (len(country) == 2 and country.isalpha()):
            violations.append(("default_country", "must be an ISO 3166-1 alpha-2 code"))
        domains = tuple(sorted({d.strip().lower() for d in own_domains}))
        for i, domain in enumerate(domains):
            if not domain or "@" in domain or "." not in domain:
                violations.append((f"own_domains[{i}]", "must be a domain such as shop.example"))
        keys = []
        for i, (type_, value) in enumerate(blocked):
            try:
                found = normalize(type_, value, ShopRules(country.upper()))
            except InvalidIdentifier as exc:
                violations.append((f"blocked_values[{i}]", str(exc)))
            else:
                keys.append(list(found.key))
        if violations:
            raise InvalidArgument(violations)
        await self._store.put_shop_policy(
            ShopPolicyRow(
                shop_id=shop_id,
                unmerge_window_seconds=int(window.total_seconds()),
                default_country=country.upper(),
                own_domains=list(domains),
                blocked_values=keys,
                updated_at=self._clock(),
            )
        )
        self._policies.pop(shop_id, None)
        return await self.policy(shop_id)

    # --- resolve --------------------------------------------------------------------------------

    def _normalize(
        self, observation: Observation, rules: ShopRules
    ) -> tuple[list[Normalized], list[str]]:
        """The identifiers normalised, strongest first, and (with skip_invalid) those left out."""
        violations: list[tuple[str, str]] = []
        skipped: list[str] = []
        if not observation.identifiers:
            violations.append(("identifiers", "at least one identifier is required"))
        if len(observation.identifiers) > MAX_IDENTIFIERS:
            violations.append(("identifiers", f"at most {MAX_IDENTIFIERS} identifiers"))
        found: dict[tuple[str, str], Normalized] = {}
        for i, (type_, value) in enumerate(observation.identifiers):
            try:
                n = normalize(type_, value, rules, observation.country)
            except InvalidIdentifier as exc:
                if observation.skip_invalid:
                    skipped.append(f"identifiers[{i}]: {exc}")
                else:
                    violations.append((f"identifiers[{i}].{exc.field}", str(exc)))
            else:
                found.setdefault(n.key, n)
        if violations:
            raise InvalidArgument(violations)
        # Strongest first; the sort is stable, so equal ranks keep the record's order.
        return sorted(found.values(), key=lambda n: n.rank), skipped

    async def resolve(self, observation: Observation) -> Resolution:
        """Records the observation and returns the person it belongs to (see linking.py for
        when identifiers join and when they raise a merge candidate instead); INVALID_ARGUMENT
        for an invalid identifier, and nothing stored.

        A shop's concurrent resolves are written together: those that arrive while one of the
        shop's batches is being written wait for it and then go as the next batch, resolved in
        turn as `resolve_batch` resolves its records. A resolve arriving alone goes at once."""
        policy = await self.policy(observation.shop_id)
        normalized, skipped = self._normalize(observation, policy.rules)
        answer: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(observation.shop_id)
        if queue is None:
            queue = self._queues[observation.shop_id] = _Queue()
            # A context of its own: the batch is no one caller's (span, deadline, principal).
            queue.task = asyncio.create_task(
                self._drain(observation.shop_id, queue), context=contextvars.Context()
            )
        queue.waiting.append((_Record(observation, normalized), answer))
        # A caller that goes away (its answer cancelled) leaves its record to be stored anyway.
        return dataclasses.replace(await answer, skipped=tuple(skipped))

    async def _drain(self, shop_id: str, queue: _Queue) -> None:
        """Writes the shop's waiting resolves, CHUNK at a time, until none wait. Cancelled (the
        process stopping), it cancels the resolves still waiting."""
        try:
            while queue.waiting:
                batch, queue.waiting = queue.waiting[:CHUNK], queue.waiting[CHUNK:]
                await self._answer(shop_id, batch)
        finally:
            for _, answer in queue.waiting:
                answer.cancel()
            del self._queues[shop_id]

    async def _answer(
        self, shop_id: str, batch: list[tuple[_Record, asyncio.Future[Resolution]]]
    ) -> None:
        """Resolves a batch and answers each of its resolves. When the batch fails for a reason
        other than the database being down, each record is resolved again on its own, so that
        one record's failure is its caller's alone."""
        try:
            window = (await self.policy(shop_id)).unmerge_window
            results = await self._resolve_records(shop_id, [r for r, _ in batch], window)
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, DatabaseUnavailable):
                for one in batch:
                    await self._answer(shop_id, [one])
                return
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        except BaseException:
            for _, answer in batch:
                answer.cancel()
            raise
        for (_, answer), result in zip(batch, results, strict=True):
            if not answer.done():
                answer.set_result(result)

    async def resolve_batch(self, observations: Sequence[Observation]) -> list[Resolution]:
        """Resolves the observations (all of one shop), with the results and the stored state of
        resolving each in turn, in transactions of up to CHUNK records in order (a retry after a
        failure midway answers the records already stored as replays). Every observation is
        normalised first: any invalid one raises INVALID_ARGUMENT for all of them (violations
        named `records[<i>].<field>`) and nothing is stored."""
        shop_id = observations[0].shop_id
        policy = await self.policy(shop_id)
        prepared: list[tuple[list[Normalized], list[str]]] = []
        violations: list[tuple[str, str]] = []
        for i, observation in enumerate(observations):
            try:
                prepared.append(self._normalize(observation, policy.rules))
            except InvalidArgument as exc:
                violations += [(f"records[{i}].{name}", why) for name, why in exc.violations]
        if violations:
            raise InvalidArgument(violations)

        records = [
            _Record(observation, normalized)
            for observation, (normalized, _) in zip(observations, prepared, strict=True)
        ]
        resolutions = []
        for start in range(0, len(records), CHUNK):
            chunk = records[start : start + CHUNK]
            resolutions += await self._resolve_records(shop_id, chunk, policy.unmerge_window)
        return [
            dataclasses.replace(resolution, skipped=tuple(skipped))
            for resolution, (_, skipped) in zip(resolutions, prepared, strict=True)
        ]

    async def _resolve_records(
        self, shop_id: str, records: list[_Record], window: timedelta
    ) -> list[Resolution]:
        """On PostgreSQL: one statement reads what every record needs; the common cases are
        decided in memory and, when that is all there is, written by one more statement: with
        no transaction around either when nothing adds identifiers (every record a replay,
        anonymous, or already one person's), else in a transaction that first takes the locks
        the exact path would. Anything else runs in one transaction (`_segments`). On SQLite
        the records run one by one through the exact path, in one transaction."""
        if not self._store.postgres:

            async def one_by_one(tx: Tx) -> list[Resolution]:
                return [await self._exact(tx, r, window) for r in records]

            return await self._retrying(shop_id, one_by_one)
        plan: _Plan | None
        async with self._store.autocommit() as connection:
            snapshot = await read_snapshot(connection, shop_id, _keys(records), _events(records))
            plan = self._plan(snapshot, records, 0)
            if plan.slow is None and not plan.writes.identifiers:
                try:
                    if not plan.writes or await write(
                        connection, shop_id, plan.writes, PROMISCUOUS_AFTER
                    ):
                        return [plan.results[i] for i in range(len(records))]
                except DBAPIError as exc:  # the same event recorded meanwhile, say
                    if not _retryable(exc):
                        raise
                plan = None  # something moved meanwhile: decide again in the transaction
        if plan is not None and plan.slow is None:  # new identifiers: a short transaction
            try:
                async with self._store.statements() as connection:
                    await lock(connection, shop_id, plan.writes.new, plan.writes.held)
                    if await write(connection, shop_id, plan.writes, PROMISCUOUS_AFTER):
                        return [plan.results[i] for i in range(len(records))]
            except DBAPIError as exc:
                if not _retryable(exc):
                    raise
            plan = None
        first = [plan]

        async def segments(tx: Tx) -> list[Resolution]:
            planned, first[0] = first[0], None
            return await self._segments(tx, records, window, planned)

        return await self._retrying(shop_id, segments)

    async def _segments(
        self, tx: Tx, records: list[_Record], window: timedelta, plan: "_Plan | None"
    ) -> list[Resolution]:
        """The records in one transaction, under the advisory locks of all their identifiers and
        event ids: the common cases up to the first record that needs the exact path written at
        once, that record through the exact path, then the same again from a fresh read for the
        records after it. `plan` is the first records' plan, when one was made already."""
        results: list[Resolution | None] = [None] * len(records)
        # Every advisory lock of the batch at once, sorted: two batches never wait on each other
        # in a circle for them (their records' exact paths would take them in record order).
        await tx.lock_identifiers(
            [*_keys(records), *((EVENT_LOCK, r.observation.event_id) for r in records)]
        )
        start = 0
        while start < len(records):
            if plan is None:
                rest = records[start:]
                snapshot = await read_snapshot(tx.session, tx.shop_id, _keys(rest), _events(rest))
                plan = self._plan(snapshot, records, start)
            end = len(records) if plan.slow is None else plan.slow
            if plan.writes:
                if plan.writes.new:
                    await lock(tx.session, tx.shop_id, plan.writes.new, plan.writes.held)
                if await write(tx.session, tx.shop_id, plan.writes, PROMISCUOUS_AFTER):
                    for i in range(start, end):
                        results[i] = plan.results[i]
                else:  # something moved since the read: these too through the exact path
                    for i in range(start, end):
                        results[i] = await self._exact(tx, records[i], window)
            else:
                for i in range(start, end):
                    results[i] = plan.results[i]
            if plan.slow is not None:
                results[plan.slow] = await self._exact(tx, records[plan.slow], window)
            start, plan = end + 1, None
        return [r for r in results if r is not None]

    async def _exact(self, tx: Tx, record: _Record, window: timedelta) -> Resolution:
        """One record through the exact path (its advisory locks already held)."""
        return await self._resolve(tx, record.observation, record.normalized, window)

    def _plan(self, snapshot: Snapshot, records: list[_Record], start: int) -> "_Plan":
        """Decides the records from `start` on in memory, as the exact path would, up to the
        first that is not a common case: a replay, an anonymous record, a record whose every
        identifier is already one person's (evidence only), one whose every identifier is new
        and unforgotten (a new person), or one that adds new identifiers to the one person
        holding the others with no conflict (linked)."""
        plan = _Plan()
        stored = dict(snapshot.stored)
        held = {
            root: {t: set(k) for t, k in types.items()} for root, types in snapshot.held.items()
        }
        created: set[tuple[str, str]] = set()  # identifiers this plan adds
        priors = dict(snapshot.priors)
        shop_id = records[start].observation.shop_id
        for i in range(start, len(records)):
            observation, normalized = records[i].observation, records[i].normalized
            prior = priors.get(observation.event_id)
            if prior is not None:
                outcome = "anonymous" if prior.outcome == "anonymous" else "unchanged"
                plan.results[i] = Resolution(
                    prior.root_id or "", outcome, prior.anchor, prior.candidate_id or ""
                )
                continue
            linkable = [n for n in normalized if not n.blocked]
            found = {n.key: stored[n.key] for n in linkable if n.key in stored}
            new = [n for n in linkable if n.key not in found]
            roots = {s.root_id for s in found.values()}
            now = self._clock()
            if any(s.conflicts >= PROMISCUOUS_AFTER for s in found.values()) or any(
                erased_hash(shop_id, *n.key) in snapshot.erased for n in new
            ):
                plan.slow = i
                break
            if not linkable:
                person_id, home, root, outcome = "", None, None, "anonymous"
            elif not new and len(roots) == 1:
                home, root, outcome = found[linkable[0].key].home_id, roots.pop(), "unchanged"
                person_id = root
            elif not found:
                person_id = home = root = new_id("p")
                outcome = "created"
                plan.writes.persons.append((person_id, now))
                held[root] = {}
            elif len(roots) == 1 and (joining := self._linked(observation, linkable, found, held)):
                # The anchor's home either way: the new identifiers join the home of the
                # strongest identifier already held, which is the anchor unless it is new.
                root = person_id = roots.pop()
                home, outcome = joining, "linked"
                if root in snapshot.held:
                    plan.writes.held[root] = snapshot.held[root]
            else:
                plan.slow = i
                break
            plan.writes.expected.update({k: s for k, s in found.items() if k not in created})
            if root is not None and home is not None:
                for n in new:
                    plan.writes.identifiers.append((n, home, now))
                    plan.writes.new.append(n.key)
                    stored[n.key] = Stored(home, root, 0)
                    held[root].setdefault(n.type, set()).add(n.match_key)
                    created.add(n.key)
            anchor = linkable[0] if linkable else None
            plan.writes.evidence.append(
                (_evidence(observation, now, home, anchor, outcome, ""), normalized)
            )
            priors[observation.event_id] = Prior(
                home, root, None if anchor is None else anchor.key, outcome, None
            )
            plan.results[i] = Resolution(person_id, outcome, None if anchor is None else anchor.key)
        return plan

    def _linked(
        self,
        observation: Observation,
        linkable: list[Normalized],
        found: dict[tuple[str, str], Stored],
        held: dict[str, dict[str, set[str]]],
    ) -> str:
        """Where new identifiers join the one person holding a record's other identifiers: the
        home of its strongest identifier there, as the exact path would attach them; "" when
        they conflict (linking.py)."""
        root = next(iter(found.values())).root_id
        known, new = Party(root, held[root]), Party(None, {})
        order: list[Party] = []
        for n in linkable:
            party = known if n.key in found else new
            if not any(p is party for p in order):
                order.append(party)
            party.links.append(n)
            if party is new:
                new.held.setdefault(n.type, set()).add(n.match_key)
        if conflict(order[0], order[1], observation.asserted, False) is not None:
            return ""
        return found[known.links[0].key].home_id

    async def _resolve(
        self, tx: Tx, observation: Observation, normalized: list[Normalized], window: timedelta
    ) -> Resolution:
        linkable = [n for n in normalized if not n.blocked]
        keys = [n.key for n in linkable]
        prior = await tx.evidence(observation.event_id)
        if prior is not None:
            return await self._replay(tx, prior)
        now = self._clock()
        run = _Run(tx, observation, now, window)
        if not linkable:
            await self._record(run, normalized, None, None, "anonymous")
            return Resolution("", "anonymous", None)
        found = await tx.identifiers(keys)
        missing = [k for k in keys if k not in found]
        # A forgotten identifier is no longer stored: only the missing ones may be tombstones.
        erased = await tx.erased(missing) if missing else {}
        if linkable[0].key in erased:  # the record is the erased person's: nothing is kept
            return Resolution(erased[linkable[0].key], "erased", None)
        if erased:  # a value an erased person shared (a family computer): left out, unrecorded
            normalized = [n for n in normalized if n.key not in erased]
            linkable = [n for n in linkable if n.key not in erased]
            keys = [n.key for n in linkable]
            missing = [k for k in missing if k not in erased]
        roots = {s.root_id for s in found.values() if s.conflicts < PROMISCUOUS_AFTER}
        held: dict[str, dict[str, set[str]]] = {}
        # The common case, every identifier already one person's, changes no grouping: it
        # needs neither the persons' locks nor their identifiers.
        if (
            missing
            or len(roots) > 1
            or any(s.conflicts >= PROMISCUOUS_AFTER for s in found.values())
        ):
            while True:
                await tx.lock_persons(roots)
                # Merged or unmerged meanwhile? Read again under the locks until nothing moved.
                found = await tx.identifiers(keys)
                now_roots = {s.root_id for s in found.values() if s.conflicts < PROMISCUOUS_AFTER}
                if now_roots == roots:
                    break
                roots = now_roots
            held = await tx.held(sorted(roots))
        run.stored = {k: s.home_id for k, s in found.items()}
        parties: dict[str | None, Party] = {}
        promiscuous: list[Normalized] = []
        for n in linkable:
            stored = found.get(n.key)
            if stored is not None and stored.conflicts >= PROMISCUOUS_AFTER:
                promiscuous.append(n)
                continue
            person_id = None if stored is None else stored.root_id
            if person_id not in parties:
                parties[person_id] = Party(person_id, held.get(person_id, {}) if person_id else {})
            party = parties[person_id]
            party.links.append(n)
            if person_id is None:
                party.held.setdefault(n.type, set()).add(n.match_key)
        if not parties:  # only promiscuous values: they identify nobody
            await self._record(run, normalized, None, None, "anonymous")
            return Resolution("", "anonymous", None)
        ordered = list(parties.values())
        anchor = ordered[0].links[0]
        await self._join(run, ordered)
        unchanged_root = found[anchor.key].root_id if anchor.key in found else None
        if run.outcomes or unchanged_root is None:
            anchor_root = await self._root(tx, run.stored[anchor.key])
        else:
            anchor_root = unchanged_root
        for n in promiscuous:
            root = found[n.key].root_id
            if anchor_root is not None and root != anchor_root:
                await self._candidate(run, anchor_root, root, "blocked_value")
        home = run.stored.get(anchor.key)
        person_id = anchor_root or ""
        outcome = next(
            (o for o in ("candidate_raised", "merged", "created", "linked") if o in run.outcomes),
            "unchanged",
        )
        await self._record(run, normalized, home, anchor, outcome)
        return Resolution(person_id, outcome, anchor.key, run.candidate_id)

    async def _join(self, run: _Run, parties: list[Party]) -> None:
        """Joins the parties into the first (the holder of the record's strongest identifier)
        wherever nothing conflicts."""
        group = parties[0]
        for other in parties[1:]:
            not_same = (
                group.person_id is not None
                and other.person_id is not None
                and await run.tx.not_same_person(group.person_id, other.person_id)
            )
            reason = conflict(group, other, run.observation.asserted, not_same)
            if reason is not None:
                await self._keep_apart(run, group, other, reason)
            elif other.person_id is None:
                await self._attach(run, other, self._home(run, group))
                group.absorb(other)
            elif group.person_id is None:
                await self._attach(run, group, self._home(run, other))
                other.absorb(group)
                other.links[:0] = group.links
                group = other
            else:
                survivor, merged = group, other
                if not group.known and other.known:
                    survivor, merged = other, group
                # Under the very person the record ties it to, so that undoing an earlier merge
                # of that person carries this group along.
                parent = self._home(run, survivor)
                await self._merge(run, parent, merged.person_id, other.links)
                survivor.absorb(merged)
                survivor.links.extend(merged.links)
                group = survivor
        for party in parties:
            if party.person_id is None and not any(n.key in run.stored for n in party.links):
                await self._create(run, party)

    def _home(self, run: _Run, party: Party) -> str:
        """The person a party's new companions are tied to: the home of its strongest link."""
        return run.stored[party.links[0].key]

    async def _attach(self, run: _Run, new: Party, home: str) -> None:
        await run.tx.add_identifiers(new.links, home, run.now)
        run.stored.update({n.key: home for n in new.links})
        run.outcomes.add("linked")

    async def _create(self, run: _Run, new: Party) -> str:
        person_id = new_id("p")
        run.tx.add_person(person_id, run.now)
        await run.tx.session.flush()
        await run.tx.add_identifiers(new.links, person_id, run.now)
        run.stored.update({n.key: person_id for n in new.links})
        new.person_id = person_id
        run.outcomes.add("created")
        return person_id

    async def _keep_apart(self, run: _Run, group: Party, other: Party, reason: str) -> None:
        """A conflict: both stay apart (the new identifiers as a person of their own) and a
        candidate is raised; a session bridging two known people moves to the newest one."""
        # The values that linked two existing persons count towards their promiscuity.
        linking = [n.key for n in other.links if n.key in run.stored]
        if group.person_id is None:
            await self._create(run, group)
        if other.person_id is None:
            await self._create(run, other)
        assert group.person_id is not None
        assert other.person_id is not None
        await run.tx.count_conflicts(linking)
        await self._candidate(run, group.person_id, other.person_id, reason)
        if reason == "cookie_bridge":
            home = self._home(run, group)
            for n in other.links:
                await run.tx.rehome(n.key, home)
                run.stored[n.key] = home
            run.tx.add_change("session_repointed", group.person_id, other.person_id, None, run.now)
            run.outcomes.add("linked")

    async def _candidate(self, run: _Run, a: str, b: str, reason: str) -> None:
        event_id = run.observation.event_id
        existing = await run.tx.open_candidate(a, b)
        if existing is None:
            existing = CandidateRow(
                candidate_id=new_id("c"),
                shop_id=run.tx.shop_id,
                person_a_id=a,
                person_b_id=b,
                reason=reason,
                event_ids=[event_id],
                raised_at=run.now,
                state="open",
            )
            run.tx.session.add(existing)
        elif (
            event_id not in existing.event_ids and len(existing.event_ids) < MAX_CANDIDATE_EVIDENCE
        ):
            existing.event_ids = [*existing.event_ids, event_id]
        await run.tx.session.flush()
        run.candidate_id = run.candidate_id or existing.candidate_id
        run.outcomes.add("candidate_raised")

    async def _merge(
        self, run: _Run, survivor: str | None, merged: str | None, links: Sequence[Normalized]
    ) -> None:
        assert survivor is not None
        assert merged is not None
        await self._do_merge(
            run.tx,
            survivor,
            merged,
            by=f"resolve:{run.observation.source}",
            reason="linked by " + ",".join(sorted({n.type for n in links})),
            now=run.now,
            window=run.window,
            event_id=run.observation.event_id,
            candidate_id=None,
        )
        run.outcomes.add("merged")

    async def _do_merge(
        self,
        tx: Tx,
        survivor: str,
        merged: str,
        *,
        by: str,
        reason: str,
        now: datetime,
        window: timedelta,
        event_id: str | None,
        candidate_id: str | None,
    ) -> MergeRow:
        """Hangs the root `merged` under the person `survivor` (either may be locked already)."""
        survivor_root = await self._root(tx, survivor)
        assert survivor_root is not None
        await tx.close_candidates(survivor_root, merged, "merged", by, reason, now)
        row = MergeRow(
            merge_id=new_id("m"),
            shop_id=tx.shop_id,
            survivor_id=survivor,
            merged_id=merged,
            merged_by=by,
            reason=reason,
            event_id=event_id,
            candidate_id=candidate_id,
            merged_at=now,
            unmerge_deadline=now + window,
            unmerged_at=None,
        )
        tx.session.add(row)
        await tx.session.flush()
        await tx.set_parent(merged, survivor)
        tx.add_change("merged", survivor, merged, row.merge_id, now)
        return row

    async def _root(self, tx: Tx, person_id: str | None) -> str | None:
        if person_id is None:
            return None
        person = await tx.person(person_id)
        return None if person is None else person.root_id

    async def _record(
        self,
        run: _Run,
        normalized: list[Normalized],
        home: str | None,
        anchor: Normalized | None,
        outcome: str,
    ) -> None:
        await run.tx.add_evidence(
            _evidence(run.observation, run.now, home, anchor, outcome, run.candidate_id),
            normalized,
        )

    async def _replay(self, tx: Tx, prior: EvidenceRow) -> Resolution:
        anchor = None
        if prior.anchor_type is not None and prior.anchor_key is not None:
            anchor = (prior.anchor_type, prior.anchor_key)
        root = await self._root(tx, prior.person_id)
        outcome = "anonymous" if prior.outcome == "anonymous" else "unchanged"
        return Resolution(root or "", outcome, anchor, prior.candidate_id or "")

    # --- reads ----------------------------------------------------------------------------------

    async def lookup(self, shop_id: str, type_: str, value: str) -> tuple[str, str]:
        """The person holding an identifier, and the identifier's match key; NOT_FOUND when
        nobody holds it. Creates nothing."""
        [found] = await self.lookup_many(shop_id, [(type_, value)])
        if isinstance(found, InvalidIdentifier):
            raise InvalidArgument([(f"identifier.{found.field}", str(found))])
        if found is None:
            raise NotFound("identifier", type_)
        return found

    async def lookup_many(
        self, shop_id: str, identifiers: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str] | InvalidIdentifier | None]:
        """For each (type, value): the person holding it and its match key, None when nobody
        does, or why it is not valid; one read for them all. Creates nothing."""
        policy = await self.policy(shop_id)
        normalized: list[Normalized | InvalidIdentifier] = []
        for type_, value in identifiers:
            try:
                normalized.append(normalize(type_, value, policy.rules))
            except InvalidIdentifier as exc:
                normalized.append(exc)
        stored = await self._store.identifiers(
            shop_id, list({n.key for n in normalized if isinstance(n, Normalized)})
        )
        results: list[tuple[str, str] | InvalidIdentifier | None] = []
        for n in normalized:
            if isinstance(n, InvalidIdentifier):
                results.append(n)
                continue
            found = stored.get(n.key)
            results.append(None if found is None or n.blocked else (found.root_id, n.match_key))
        return results

    async def person(self, shop_id: str, person_id: str) -> PersonView:
        """The group a person belongs to, seen from its root."""
        [view] = await self.persons(shop_id, [person_id])
        if view is None:
            raise NotFound("person", person_id)
        return view

    async def persons(self, shop_id: str, person_ids: Sequence[str]) -> list[PersonView | None]:
        """The group each person belongs to, seen from its root; None for a person nobody
        knows."""
        views: list[PersonView | None] = []
        for found in await self._store.groups(shop_id, person_ids):
            if found is None:
                views.append(None)
                continue
            members, identifiers, merges = found
            views.append(
                PersonView(
                    person_id=members[0].person_id,
                    created_at=utc(members[0].created_at),
                    erased=members[0].erased_at is not None,
                    identifiers=identifiers,
                    merges=merges,
                    members=[m.person_id for m in members[1:]],
                )
            )
        return views

    async def candidates(
        self, shop_id: str, after: int, limit: int
    ) -> list[tuple[CandidateRow, list[tuple[EvidenceRow, list[EvidenceIdentifierRow]]]]]:
        return await self._store.candidates(shop_id, after, limit)

    async def changes(self, shop_id: str | None, after: int, limit: int) -> list[ChangeRow]:
        return await self._store.changes(shop_id, after, limit)

    async def inventory(self, shop_id: str, seen_before: datetime) -> Inventory:
        return await self._store.inventory(shop_id, seen_before)

    # --- decisions ------------------------------------------------------------------------------

    async def _open_candidate(self, tx: Tx, candidate_id: str) -> CandidateRow:
        candidate = await tx.candidate(candidate_id)
        if candidate is None:
            raise NotFound("merge_candidate", candidate_id)
        if candidate.state != "open":
            raise FailedPrecondition(
                "CANDIDATE_CLOSED", candidate_id, f"the candidate is already {candidate.state}"
            )
        return candidate

    async def merge(
        self,
        shop_id: str,
        candidate_id: str,
        person_ids: tuple[str, str],
        reason: str,
        by: str,
    ) -> MergeRow:
        """Merges two persons by hand (or accepts a candidate): the first absorbs the second."""
        window = (await self.policy(shop_id)).unmerge_window

        async def work(tx: Tx) -> MergeRow:
            a, b = person_ids
            if candidate_id:
                candidate = await self._open_candidate(tx, candidate_id)
                a, b = candidate.person_a_id, candidate.person_b_id
            roots = await self._lock_groups(tx, {"person_a_id": a, "person_b_id": b})
            if roots[0] == roots[1]:
                raise FailedPrecondition("ALREADY_MERGED", b, "the two are already one person")
            return await self._do_merge(
                tx,
                a,
                roots[1],
                by=by,
                reason=reason or "merged by hand",
                now=self._clock(),
                window=window,
                event_id=None,
                candidate_id=candidate_id or None,
            )

        return await self._retrying(shop_id, work)

    async def _lock_groups(self, tx: Tx, persons: dict[str, str]) -> list[str]:
        """Locks the roots of the named persons (by field name), re-reading until no merge or
        unmerge moved them meanwhile; returns the roots in order."""
        while True:
            roots = []
            for field_name, person_id in persons.items():
                person = await tx.person(person_id)
                if person is None:
                    raise NotFound("person", person_id)
                if person.erased_at is not None:
                    raise FailedPrecondition("PERSON_ERASED", person_id, f"{field_name} is erased")
                roots.append(person.root_id)
            locked = await tx.lock_persons(roots)
            if all(locked[r].root_id == r for r in roots):
                current = [await self._root(tx, p) for p in persons.values()]
                if current == roots:
                    return roots

    async def dismiss(self, shop_id: str, candidate_id: str, reason: str, by: str) -> None:
        """Closes a candidate and records that the two are not the same person."""

        async def work(tx: Tx) -> None:
            candidate = await self._open_candidate(tx, candidate_id)
            now = self._clock()
            candidate.state, candidate.decided_at, candidate.decided_by = "dismissed", now, by
            candidate.decision_reason = reason
            tx.session.add(
                DecisionRow(
                    shop_id=shop_id,
                    person_a_id=candidate.person_a_id,
                    person_b_id=candidate.person_b_id,
                    decided_by=by,
                    reason=reason or "dismissed",
                    decided_at=now,
                )
            )

        await self._retrying(shop_id, work)

    async def unmerge(self, shop_id: str, merge_id: str, reason: str, by: str) -> MergeRow:
        """Undoes a merge within its window: the merged person stands alone again with every
        identifier its evidence ties to it, and the two are recorded as not the same person."""

        async def work(tx: Tx) -> MergeRow:
            merge = await tx.merge(merge_id)
            if merge is None:
                raise NotFound("merge", merge_id)
            if merge.unmerged_at is not None:
                raise FailedPrecondition("ALREADY_UNMERGED", merge_id, "already unmerged")
            now = self._clock()
            if now > utc(merge.unmerge_deadline):
                raise FailedPrecondition(
                    "UNMERGE_WINDOW_PASSED",
                    merge_id,
                    f"the unmerge window ended at {utc(merge.unmerge_deadline).isoformat()}",
                )
            while True:  # lock the group and the merged person, as they are once locked
                survivor_root = await self._root(tx, merge.survivor_id)
                assert survivor_root is not None
                locked = await tx.lock_persons([survivor_root, merge.merged_id])
                if locked[survivor_root].root_id == survivor_root:
                    break
            await tx.set_parent(merge.merged_id, None)
            merge.unmerged_at, merge.unmerged_by = now, by
            merge.unmerge_reason = reason or "unmerged"
            tx.session.add(
                DecisionRow(
                    shop_id=shop_id,
                    person_a_id=merge.survivor_id,
                    person_b_id=merge.merged_id,
                    decided_by=by,
                    reason=merge.unmerge_reason,
                    decided_at=now,
                )
            )
            tx.add_change("unmerged", merge.survivor_id, merge.merged_id, merge_id, now)
            await tx.session.flush()
            return merge

        return await self._retrying(shop_id, work)

    async def forget(self, shop_id: str, person_id: str, dry_run: bool) -> dict[str, int]:
        """Deletes the identifiers and evidence of a person's whole group, keeping a tombstone;
        returns the rows touched by table (with dry_run, counted and rolled back)."""

        async def work(tx: Tx) -> dict[str, int]:
            person = await tx.person(person_id)
            if person is None:
                raise NotFound("person", person_id)
            # The group's identifiers locked as a resolve locks them, then the root; read again
            # until nothing was added, merged or unmerged meanwhile.
            root, keys, locked_root = person.root_id, set[tuple[str, str]](), ""
            while True:
                members = await tx.members(root)
                ids = [m.person_id for m in members]
                held = {(i.type, i.match_key) for i in await tx.identifiers_of(ids)}
                if held == keys and locked_root == root:
                    break
                await tx.lock_identifiers(held)
                await tx.lock_persons([root])
                keys, locked_root = held, root
                root = await self._root(tx, person_id) or root
            counts = await tx.forget(members, self._clock())
            if dry_run:
                raise Rehearsal(counts)
            if counts["person"]:  # forgetting again changes nothing: no second change
                tx.add_change("forgotten", root, None, None, self._clock())
            return counts

        try:
            return await self._retrying(shop_id, work)
        except Rehearsal as rehearsal:
            return dict(rehearsal.result)
