"""Profiles: facts in (idempotent, anchored on the identifier they came with), the whole
picture out (the facts of every anchor identity groups under one person)."""

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from c360.identity.v1 import identity_pb2
from services.profile import custobar, loyalty
from services.profile.loyalty import Standing
from services.profile.peers import (
    ContactPolicy,
    GatePeer,
    Group,
    History,
    IdentityPeer,
    Resolved,
    Sighting,
)
from services.profile.store import (
    Anchor,
    ConsentRow,
    CustomerRow,
    EventRow,
    Facts,
    GatePushRow,
    OrderTotals,
    ProfileStore,
    RefundRow,
    SignalRow,
)
from services.runtime.errors import InvalidArgument, NotFound, PeerRejected
from services.runtime.validation import PersonRef
from services.runtime.worker import Worker

log = logging.getLogger(__name__)

CENT = Decimal("0.01")
ALL_CHANNELS = "all"
CUSTOBAR = "custobar"
UPLOAD_IN_FLIGHT = 16
# Persons whose contact policies one round of the push worker sends.
PUSH_BATCH = 500
IDENTITY = "identity"
# Identity changes after which consent applies to other people than before.
REGROUPING = frozenset({identity_pb2.CHANGE_KIND_MERGED, identity_pb2.CHANGE_KIND_UNMERGED})
# Identity changes that go on the change feed, by the feed's name for them.
FEED_KINDS = {
    identity_pb2.CHANGE_KIND_MERGED: "merged",
    identity_pb2.CHANGE_KIND_UNMERGED: "unmerged",
    identity_pb2.CHANGE_KIND_FORGOTTEN: "gdpr_erasure",
}
# Anchors of facts that identify nobody: the record itself.
ANONYMOUS = ("order", "event", "customer")


@dataclass(frozen=True)
class Order:
    """An order as ingested: identifiers resolve its person; the rest is kept as it came."""

    shop_id: str
    order_id: str
    identifiers: list[tuple[str, str]]
    placed_at: datetime
    updated_at: datetime
    total: Decimal
    currency: str
    source: str
    location: str
    line_items: list[dict[str, Any]]
    cancelled: bool = False
    country: str = ""


@dataclass(frozen=True)
class Customer:
    """A customer record of a source system (a Shopify customer), as ingested."""

    shop_id: str
    source: str
    source_id: str
    identifiers: list[tuple[str, str]]
    updated_at: datetime
    first_name: str
    last_name: str
    tags: list[str]
    country: str = ""


@dataclass(frozen=True)
class ConsentChange:
    """A consent given or withdrawn on one channel, or (channel `all`, not granted) a global
    unsubscribe."""

    shop_id: str
    person: PersonRef
    channel: str
    granted: bool
    consent_text: str
    source: str
    at: datetime


@dataclass(frozen=True)
class ConsentState:
    """The newest consent on a channel, with its exact text, time and source."""

    channel: str
    granted: bool
    consent_text: str
    source: str
    at: datetime


@dataclass(frozen=True)
class Purchases:
    """What a person bought, net of refunds, in their main currency."""

    order_count: int = 0
    lifetime_spend: Decimal = Decimal(0)
    refunded: Decimal = Decimal(0)
    currency: str = ""
    first_order_at: datetime | None = None
    last_order_at: datetime | None = None
    acquisition_channel: str = ""
    by_source: dict[str, int] = field(default_factory=dict)
    preferred_location: str = ""

    @property
    def average_order_value(self) -> Decimal:
        if not self.order_count:
            return Decimal(0)
        return (self.lifetime_spend / self.order_count).quantize(CENT)


@dataclass(frozen=True)
class Profile:
    """The whole picture of one person."""

    shop_id: str
    group: Group
    purchases: Purchases
    engagement: list[tuple[str, str, int, datetime]]
    consents: list[ConsentState]
    global_unsubscribe: bool
    history: History | None
    name: tuple[str, str] = ("", "")
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    standing: Standing = field(default_factory=Standing)
    signals: SignalRow | None = None


def hidden(shop_id: str, key: str) -> str:
    """The stand-in of a forgotten record's key: a hash, so that a later upload of the same
    customer is recognised without the key being kept."""
    return "forgotten-" + hashlib.sha256(f"{shop_id}\0{key}".encode()).hexdigest()[:40]


def consent_id(shop_id: str, anchor: Anchor, change: ConsentChange) -> str:
    """The idempotency key of a consent: the same consent delivered twice is stored once."""
    text = "\0".join(
        [shop_id, *anchor, change.channel, str(change.granted), change.consent_text,
         change.source, change.at.isoformat()]
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def purchases(facts: Facts) -> Purchases:
    """Order totals in the currency of most orders, refunds netted."""
    if not facts.orders:
        return Purchases()
    by_currency: Counter[str] = Counter()
    for row in facts.orders:
        by_currency[row.currency] += row.orders
    currency = by_currency.most_common(1)[0][0]
    rows: list[OrderTotals] = [r for r in facts.orders if r.currency == currency]
    by_source: Counter[str] = Counter()
    pos_locations: Counter[str] = Counter()
    for row in rows:
        by_source[row.source] += row.orders
        if row.source == "pos" and row.location:
            pos_locations[row.location] += row.orders
    refunded = facts.refunded.get(currency, Decimal(0))
    spend = sum((r.spend for r in rows), Decimal(0)) - refunded
    return Purchases(
        order_count=sum(r.orders for r in rows),
        lifetime_spend=spend.quantize(CENT),
        refunded=Decimal(refunded).quantize(CENT),
        currency=currency,
        first_order_at=min(r.first_at for r in rows),
        last_order_at=max(r.last_at for r in rows),
        # The source of the very first order, whatever its currency.
        acquisition_channel=min(facts.orders, key=lambda r: r.first_at).source,
        by_source=dict(by_source),
        preferred_location=pos_locations.most_common(1)[0][0] if pos_locations else "",
    )


def consent_states(rows: Sequence[ConsentRow]) -> tuple[list[ConsentState], bool]:
    """The newest consent per channel, and whether a global unsubscribe stands (no consent was
    granted after the newest one). Rows come oldest first."""
    latest: dict[str, ConsentState] = {}
    unsubscribed_at: datetime | None = None
    for row in rows:
        state = ConsentState(row.channel, row.granted, row.consent_text, row.source, row.at)
        if row.channel == ALL_CHANNELS:
            unsubscribed_at = row.at
            for channel, old in list(latest.items()):
                latest[channel] = ConsentState(channel, False, old.consent_text, row.source, row.at)
        else:
            latest[row.channel] = state
    stands = unsubscribed_at is not None and not any(
        s.granted and s.at > unsubscribed_at for s in latest.values()
    )
    return sorted(latest.values(), key=lambda s: s.channel), stands


def _consent_states_of(
    group: Group, consents: dict[Anchor, list[ConsentRow]]
) -> tuple[list[ConsentState], bool]:
    """A group's consents and global unsubscribe, from the consent records of its anchors."""
    rows = [row for anchor in group.anchors for row in consents.get(anchor, ())]
    return consent_states(sorted(rows, key=lambda row: (row.at, row.consent_id)))


def assemble(shop_id: str, group: Group, facts: Facts, history: History | None) -> Profile:
    """A person's profile from their facts."""
    consents, unsubscribed = consent_states(facts.consents)
    named = next((c for c in reversed(facts.customers) if c.first_name or c.last_name), None)
    return Profile(
        shop_id,
        group,
        purchases(facts),
        facts.engagement,
        consents,
        unsubscribed,
        history,
        name=(named.first_name, named.last_name) if named else ("", ""),
        tags=sorted({t for c in facts.customers for t in c.tags}),
        attributes={k: v for c in facts.customers for k, v in c.attributes.items()},
    )


class Profiles:
    """Ingestion and assembly of profiles, and the consent outbox to the gate."""

    def __init__(
        self,
        store: ProfileStore,
        identity: IdentityPeer,
        gate: GatePeer,
        clock: Callable[[], datetime],
        push_interval: float = 0.2,
        follow_interval: float = 0.5,
    ) -> None:
        self._store = store
        self._identity = identity
        self._gate = gate
        self._clock = clock
        self._pusher = Worker("gate-push", self.push_pending, push_interval)
        self._follower = Worker("identity-changes", self.follow_identity, follow_interval)

    # --- ingestion ------------------------------------------------------------------------------

    async def ingest_order(self, order: Order, skip_invalid: bool = False) -> tuple[str, bool]:
        """Stores the order (see `ingest_orders`); returns its person and whether anything
        changed. Identity's violations of its identifiers are raised."""
        found = (await self.ingest_orders(order.shop_id, [order], skip_invalid))[0]
        if isinstance(found, InvalidArgument):
            raise found
        return found

    async def ingest_orders(
        self, shop_id: str, orders: Sequence[Order], skip_invalid: bool = False
    ) -> list[tuple[str, bool] | InvalidArgument]:
        """Stores orders of one shop, each under its strongest identifier (a newer version
        supersedes, an equal or older one changes nothing), exactly as if each were ingested
        alone in this order; returns, for each, its person and whether anything changed, or
        identity's violations of its identifiers (that order changed nothing). Identity
        resolves them in one call a thousand; the facts are written by one transaction."""
        resolved = await self._resolve_all(
            shop_id,
            [
                Sighting(
                    order.identifiers,
                    source=f"order_{order.source}",
                    event_id=f"order:{order.order_id}:{order.updated_at.isoformat()}",
                    country=order.country,
                    skip_invalid=skip_invalid,
                    observed_at=order.updated_at,
                )
                for order in orders
            ],
        )
        now = self._clock()
        kept = [
            (order, found)
            for order, found in zip(orders, resolved, strict=True)
            if isinstance(found, Resolved)
        ]
        applied = await self._store.put_orders(
            shop_id,
            [(_order_values(order, found, now), found.person_id) for order, found in kept],
            now,
        )
        answers = iter(zip(kept, applied, strict=True))
        return [
            found if isinstance(found, InvalidArgument) else _answer(next(answers))
            for found in resolved
        ]

    async def ingest_customer(self, customer: Customer) -> tuple[str, bool]:
        """Stores a customer record (a newer version supersedes) under its strongest identifier;
        identifiers that fail normalisation are left out rather than losing the record."""
        resolved = await self._resolve(
            customer.shop_id,
            Sighting(
                customer.identifiers,
                source=f"{customer.source}_customer",
                event_id=f"customer:{customer.source}:{customer.source_id}:"
                f"{customer.updated_at.isoformat()}",
                country=customer.country,
                skip_invalid=True,
                observed_at=customer.updated_at,
            ),
        )
        if resolved.erased:
            return resolved.person_id, False  # an erased person: their details are not taken again
        anchor = resolved.anchor or ("customer", customer.source_id)
        applied = await self._store.put_customer(
            {
                "shop_id": customer.shop_id,
                "source": customer.source,
                "source_id": customer.source_id,
                "updated_at": customer.updated_at,
                "anchor_type": anchor[0],
                "anchor_key": anchor[1],
                "first_name": customer.first_name,
                "last_name": customer.last_name,
                "tags": customer.tags,
            },
            resolved.person_id,
            self._clock(),
        )
        return resolved.person_id, applied

    async def upsert_customers(
        self, shop_id: str, records: Sequence[Any]
    ) -> tuple[int, list[tuple[int, str, str]]]:
        """Applies a Custobar-format upload; returns how many records were accepted and (index,
        field, why) for each one that was not. Valid records are kept whatever the others do.
        Records sharing an identifying key are applied in their order, one after the other: the
        upload goes in rounds, each applying the next record of every such group together."""
        problems = {i: custobar.problems(record) for i, record in enumerate(records)}
        valid = [i for i, found in problems.items() if not found]
        queues = [deque(group) for group in _sharing(valid, records)]
        while queues:
            heads = {queue.popleft(): queue for queue in queues}
            for index in await self._upload_round(shop_id, records, list(heads), problems):
                heads[index].appendleft(index)  # its record was taken by another: next round
            queues = [queue for queue in queues if queue]
        errors = [(i, field, why) for i in sorted(problems) for field, why in problems[i]]
        return sum(not found for found in problems.values()), errors

    async def _upload_round(
        self,
        shop_id: str,
        records: Sequence[Any],
        indices: list[int],
        problems: dict[int, list[tuple[str, str]]],
    ) -> list[int]:
        """Applies upload records that share no key: finds the stored record each updates,
        resolves them all in one identity call, records their changed permissions and then the
        records, each in one transaction. Returns those put off because another record of the
        round updates the same stored record."""
        keys = {i: custobar.keys_of(records[i]) for i in indices}
        stored = await self._store.custobar_records(
            shop_id,
            CUSTOBAR,
            [k for i in indices for key in keys[i] for k in (key, hidden(shop_id, key))],
        )
        # Forgotten for good: nothing an upload says about them is kept.
        live = [i for i in indices if not any(hidden(shop_id, k) in stored for k in keys[i])]
        found: dict[int, CustomerRow | None] = {
            i: next((stored[k] for k in keys[i] if k in stored), None) for i in live
        }  # by its own key, else by the person any of its identifiers names
        found.update(
            await self._uploaded_records_of(
                shop_id,
                {i: custobar.identifiers(records[i]) for i, row in found.items() if row is None},
            )
        )
        now = self._clock()
        later: list[int] = []
        taken: set[str] = set()
        uploads: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
        for index in live:
            record_of = found[index]
            if record_of is not None and record_of.deleted:
                continue  # deleted for good
            key = keys[index][0] if record_of is None else record_of.source_id
            if key in taken:
                later.append(index)
                continue
            taken.add(key)
            before = record_of.attributes if record_of is not None else {}
            document = custobar.merged(before, records[index])
            if document.get("is_forgotten"):
                await self._forget_upload(shop_id, {**before, **records[index]}, record_of)
                continue
            uploads.append((index, before, document | {"_key": key}))
        await self._apply_uploads(shop_id, records, uploads, problems, now)
        return later

    async def _apply_uploads(
        self,
        shop_id: str,
        records: Sequence[Any],
        uploads: list[tuple[int, dict[str, Any], dict[str, Any]]],
        problems: dict[int, list[tuple[str, str]]],
        now: datetime,
    ) -> None:
        """Resolves upload records' persons in one call, then stores their changed permissions
        (before the records: if anything fails between the two, a retried upload still sees the
        permissions as changed and records them) and the records."""
        sightings = []
        for _, _, document in uploads:
            identifiers = custobar.identifiers(document)
            digest = hashlib.sha256(repr(sorted(identifiers)).encode()).hexdigest()[:32]
            sightings.append(
                Sighting(
                    identifiers,
                    source=CUSTOBAR,
                    event_id=f"{CUSTOBAR}:{document['_key']}:{digest}",
                    country=str(document.get("country", "")),
                )
            )
        resolved = await self._resolve_all(shop_id, sightings)
        consents: list[tuple[dict[str, Any], str]] = []
        customers: list[tuple[dict[str, Any], str]] = []
        for (index, before, document), person in zip(uploads, resolved, strict=True):
            if isinstance(person, InvalidArgument):
                problems[index] = _violations(person, records[index])
                continue
            if person.erased:
                continue  # an erased person: their details are not taken again
            record = records[index]
            for name, channel in custobar.PERMISSIONS.items():
                if name in record and document.get(name) != before.get(name):
                    change = ConsentChange(
                        shop_id, PersonRef(person_id=person.person_id), channel,
                        bool(document[name]), f"Custobar upload: {channel} permission", CUSTOBAR,
                        now,
                    )  # fmt: skip
                    # A person id identity answered is its group's root: the consent's person.
                    consents.append((_consent_values(change, ("person", person.person_id)),
                                     person.person_id))  # fmt: skip
            key = document.pop("_key")
            anchor = person.anchor or ("customer", key)
            values = {
                "shop_id": shop_id,
                "source": CUSTOBAR,
                "source_id": key,
                "updated_at": now,
                "anchor_type": anchor[0],
                "anchor_key": anchor[1],
                "first_name": str(document.get("first_name", "")),
                "last_name": str(document.get("last_name", "")),
                "tags": document.get("tags", []),
                "attributes": document,
                "deleted": bool(document.get("is_deleted")),
                "forgotten": False,
            }
            customers.append((values, person.person_id))
        if consents:
            await self._store.add_consents(shop_id, consents, now)
            self._pusher.wake()
        await self._store.replace_customers(shop_id, customers, now)

    async def _uploaded_records_of(
        self, shop_id: str, identifiers: dict[int, list[tuple[str, str]]]
    ) -> dict[int, CustomerRow | None]:
        """For each record (by index), the newest uploaded record of the person its first
        identifier that names someone belongs to: one LookupBatch and one GetPersons for them
        all, then a read a record found (UPLOAD_IN_FLIGHT at once)."""
        asked = [(i, identifier) for i, found in identifiers.items() for identifier in found]
        persons = await self._identity.lookup_many(shop_id, [found for _, found in asked])
        person_of: dict[int, str] = {}
        for (index, _), person_id in zip(asked, persons, strict=True):
            if person_id:
                person_of.setdefault(index, person_id)
        wanted = list(dict.fromkeys(person_of.values()))
        groups = dict(zip(wanted, await self._identity.groups(shop_id, wanted), strict=True))
        limit = asyncio.Semaphore(UPLOAD_IN_FLIGHT)

        async def newest(index: int) -> CustomerRow | None:
            group = groups.get(person_of.get(index, ""))
            if group is None:
                return None
            async with limit:
                return await self._store.newest_customer(shop_id, CUSTOBAR, group.anchors)

        return dict(zip(identifiers, await asyncio.gather(*map(newest, identifiers)), strict=True))

    async def _forget_upload(
        self, shop_id: str, known: dict[str, Any], existing: CustomerRow | None
    ) -> None:
        """is_forgotten: the person the record names (by any identifier it or its stored
        version carries) is forgotten, and each of its keys is kept only as a hash, so that no
        later upload brings them back."""
        person_id = ""
        if existing is not None:
            person_id = await self._person_of(shop_id, (existing.anchor_type, existing.anchor_key))
        for type_, value in custobar.identifiers(known):
            if person_id:
                break
            with contextlib.suppress(PeerRejected):
                person_id = await self._identity.lookup(shop_id, type_, value)
        if person_id:
            await self.forget(shop_id, person_id)
        markers = [hidden(shop_id, key) for key in custobar.keys_of(known)]
        await self._store.forget_customer_keys(
            shop_id, CUSTOBAR, [] if existing is None else [existing.source_id], markers,
            self._clock(),
        )  # fmt: skip

    async def forget(self, shop_id: str, person_id: str) -> None:
        """Anonymises a person for good: their facts stay, anonymous, under their tombstone, with
        every customer record's details wiped, and identity forgets every identifier of theirs."""
        group = await self._identity.group(shop_id, person_id)
        tombstone = ("person", group.person_id)
        await self._store.reanchor(shop_id, group.anchors, tombstone, self._clock())
        await self._store.scrub_customers(shop_id, tombstone, lambda key: hidden(shop_id, key))
        await self._identity.forget(shop_id, group.person_id)

    async def ingest_refund(
        self,
        shop_id: str,
        refund_id: str,
        order_id: str,
        amount: Decimal,
        refunded_at: datetime,
        is_return: bool,
    ) -> tuple[str, bool]:
        """Stores a refund against its order (which may not have arrived yet)."""
        anchor = await self._store.order_anchor(shop_id, order_id)
        person_id = await self._person_of(shop_id, anchor) if anchor else ""
        applied = await self._store.add_fact(
            RefundRow,
            {
                "shop_id": shop_id,
                "refund_id": refund_id,
                "order_id": order_id,
                "amount": amount,
                "refunded_at": refunded_at,
                "is_return": is_return,
                "received_at": self._clock(),
            },
            person_id,
            self._clock(),
        )
        return person_id, applied

    async def ingest_event(
        self,
        shop_id: str,
        event_id: str,
        identifiers: list[tuple[str, str]],
        kind: str,
        channel: str,
        at: datetime,
    ) -> tuple[str, bool]:
        """Stores a visit or an engagement under its strongest identifier."""
        resolved = await self._resolve(
            shop_id,
            Sighting(
                identifiers, f"event_{kind}", f"event:{event_id}", asserted=True, observed_at=at
            ),
        )
        anchor = resolved.anchor or ("event", event_id)
        applied = await self._store.add_fact(
            EventRow,
            {
                "shop_id": shop_id,
                "event_id": event_id,
                "anchor_type": anchor[0],
                "anchor_key": anchor[1],
                "kind": kind,
                "channel": channel,
                "at": at,
            },
            resolved.person_id,
            self._clock(),
        )
        return resolved.person_id, applied

    async def set_consent(self, change: ConsentChange) -> tuple[str, bool]:
        """Stores a consent change and queues the person's contact policy for the gate; for a
        person erased under GDPR, nothing (its text could name them; the gate blocks them for
        good anyway)."""
        # Recorded against what the change names, the person id or the identifier: it follows
        # that through merges and unmerges.
        if change.person.identifier is not None:
            try:
                person_id, anchor = await self._identity.find(
                    change.shop_id, *change.person.identifier
                )
            except PeerRejected as rejected:
                raise rejected.under(change.person.field) from None
        else:
            person_id = change.person.person_id
            anchor = ("person", person_id)
        group = await self._identity.group(change.shop_id, person_id)
        if await self._store.erased_among(change.shop_id, [group.person_id]):
            return group.person_id, False
        [applied] = await self._store.add_consents(
            change.shop_id, [(_consent_values(change, anchor), group.person_id)], self._clock()
        )
        self._pusher.wake()
        return group.person_id, applied

    async def _resolve(self, shop_id: str, sighting: Sighting) -> Resolved:
        """Who a record belongs to (see `_resolve_all`); identity's violations are raised."""
        found = (await self._resolve_all(shop_id, [sighting]))[0]
        if isinstance(found, InvalidArgument):
            raise found
        return found

    async def _resolve_all(
        self, shop_id: str, sightings: Sequence[Sighting]
    ) -> list[Resolved | InvalidArgument]:
        """Who each record belongs to, resolved in order (see IdentityPeer.resolve_all); a
        person the profile erased is erased, even before identity has forgotten them."""
        found = await self._identity.resolve_all(shop_id, sightings)
        erased = await self._store.erased_among(
            shop_id,
            [
                r.person_id
                for r in found
                if isinstance(r, Resolved) and r.person_id and not r.erased
            ],
        )
        return [
            Resolved(r.person_id, ("person", r.person_id), erased=True)
            if isinstance(r, Resolved) and r.person_id in erased
            else r
            for r in found
        ]

    async def _person(self, shop_id: str, person: PersonRef) -> Group:
        """The group of a person named by id or by any identifier (read-only: never creates)."""
        person_id = person.person_id
        if person.identifier is not None:
            try:
                person_id = await self._identity.lookup(shop_id, *person.identifier)
            except PeerRejected as rejected:
                raise rejected.under(person.field) from None
        return await self._identity.group(shop_id, person_id)

    async def _person_of(self, shop_id: str, anchor: Anchor) -> str:
        """The person an anchor belongs to now ("" for an anonymous order or event)."""
        if anchor[0] in ANONYMOUS:
            return ""
        if anchor[0] == "person":
            return (await self._identity.group(shop_id, anchor[1])).person_id
        return await self._identity.lookup(shop_id, *anchor)

    # --- the whole picture ----------------------------------------------------------------------

    async def get(self, shop_id: str, person: PersonRef, include_log: bool) -> Profile:
        """Everything known about the person (the group identity keeps them in); NOT_FOUND for
        a person erased under GDPR (checked in the same statement as the reads, not before
        them). The profile's own tables are read by one statement while the gate is asked for
        the contact history."""
        group = await self._person(shop_id, person)
        picture, history = await asyncio.gather(
            self._store.picture(shop_id, group.person_id, group.anchors),
            self._history(shop_id, group.person_id, include_log),
        )
        if picture.erased:
            raise NotFound("person", group.person_id)
        profile = assemble(shop_id, group, picture.facts, history)
        return replace(
            profile,
            standing=loyalty.standing(picture.programme, picture.ledger, self._clock()),
            signals=picture.signals,
        )

    async def _history(self, shop_id: str, person_id: str, include_log: bool) -> History | None:
        """The gate's contact history; absent (not invented) while the gate cannot answer."""
        try:
            history: History = await self._gate.history(shop_id, person_id, include_log)
        except Exception as exc:
            log.warning("contact history unavailable", extra={"error": type(exc).__name__})
            return None
        return history

    # --- consent to the gate --------------------------------------------------------------------

    async def contact_policy(
        self, shop_id: str, person_id: str
    ) -> tuple[list[ConsentState], bool] | None:
        """A person's consents and global unsubscribe as the gate needs them; None for a person
        identity does not know."""
        try:
            group = await self._identity.group(shop_id, person_id)
        except PeerRejected as rejected:
            if rejected.code.name == "NOT_FOUND":
                return None
            raise
        return _consent_states_of(group, await self._store.consents(shop_id, group.anchors))

    async def push_pending(self) -> int:
        """Gives the gate the contact policy of every person whose consent changed (or whose
        grouping did), a shop's due persons at a time (one GetPersons, one PutContactPolicies);
        returns how many were pushed. A failed push is retried with backoff."""
        rows = await self._store.pending_pushes(self._clock(), limit=PUSH_BATCH)
        shops: dict[str, list[GatePushRow]] = {}
        for row in rows:
            shops.setdefault(row.shop_id, []).append(row)
        done: list[GatePushRow] = []
        for shop_id, due in shops.items():
            try:
                done.extend(await self._push(shop_id, due))
            except Exception as exc:
                await self._push_failed(due, type(exc).__name__)
        await self._store.pushed(done)  # one statement for them all
        return len(done)

    async def _push(self, shop_id: str, rows: Sequence[GatePushRow]) -> list[GatePushRow]:
        """Sends the gate the policies of one shop's persons, each as its group's facts say
        (a merged person's id too: it gets its group's policy); returns the rows it sent. The
        rows of persons identity does not know are put off."""
        groups = await self._identity.groups(shop_id, [row.person_id for row in rows])
        paired = list(zip(rows, groups, strict=True))
        known = [(row, group) for row, group in paired if group is not None]
        await self._push_failed([row for row, group in paired if group is None], "NotFound")
        consents = await self._store.consents(shop_id, [a for _, g in known for a in g.anchors])
        policies = []
        for row, group in known:
            states, unsubscribed = _consent_states_of(group, consents)
            policies.append(
                ContactPolicy(
                    row.person_id,
                    {s.channel: s.granted for s in states},
                    unsubscribed,
                    version=int(row.requested_at.timestamp() * 1_000_000),
                )
            )
        await self._gate.put_contact_policies(shop_id, policies)
        return [row for row, _ in known]

    async def _push_failed(self, rows: Sequence[GatePushRow], error: str) -> None:
        """Puts pushes off, each with its own backoff (0.5 s doubling to 60 s)."""
        if rows:
            log.warning(
                "contact policy push failed; retrying",
                extra={"error": error, "persons": len(rows)},
            )
        for row in rows:
            delay = min(60.0, 0.5 * 2 ** min(row.attempts, 7))
            await self._store.push_failed(row, self._clock() + timedelta(seconds=delay))

    async def follow_identity(self) -> int:
        """Reads identity's changes since the last time: a merge or an unmerge changes whose
        consent applies to whom and what each profile holds, so both persons' policies go to
        the gate again, their summaries are refreshed and the change goes on the change feed.
        Returns how many changes it read."""
        changes = await self._identity.changes(await self._store.cursor(IDENTITY), 500)
        if not changes:
            return 0
        now = self._clock()
        pushes = [
            (change.shop_id, person_id)
            for change in changes
            if change.kind in REGROUPING
            for person_id in (change.person_id, change.other_person_id)
            if person_id
        ]
        feed = [
            {
                "shop_id": change.shop_id,
                "person_id": change.person_id,
                "kind": FEED_KINDS[change.kind],
                "data": {"other_person_id": change.other_person_id}
                if change.other_person_id
                else {},
                "at": change.at.ToDatetime(tzinfo=UTC),
            }
            for change in changes
            if change.kind in FEED_KINDS
        ]
        await self._store.regrouped(pushes, feed, (IDENTITY, changes[-1].sequence), now)
        if pushes:
            self._pusher.wake()
        return len(changes)

    def start(self) -> None:
        """Pushes contact policies in the background, as soon as a consent changes or identity
        regroups people."""
        self._pusher.start()
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()
        await self._pusher.stop()


def _consent_values(change: ConsentChange, anchor: Anchor) -> dict[str, Any]:
    """A consent's row, anchored on what the change named."""
    return {
        "shop_id": change.shop_id,
        "consent_id": consent_id(change.shop_id, anchor, change),
        "anchor_type": anchor[0],
        "anchor_key": anchor[1],
        "channel": change.channel,
        "granted": change.granted,
        "consent_text": change.consent_text,
        "source": change.source,
        "at": change.at,
    }


def _order_values(order: Order, resolved: Resolved, now: datetime) -> dict[str, Any]:
    """An order's row, anchored where identity resolved it (on itself when on nobody)."""
    anchor = resolved.anchor or ("order", order.order_id)
    return {
        "shop_id": order.shop_id,
        "order_id": order.order_id,
        "updated_at": order.updated_at,
        "placed_at": order.placed_at,
        "anchor_type": anchor[0],
        "anchor_key": anchor[1],
        "total": order.total,
        "currency": order.currency,
        "source": order.source,
        "location": order.location,
        "cancelled": order.cancelled,
        "line_items": order.line_items,
        "received_at": now,
    }


def _answer(stored: tuple[tuple[Order, Resolved], bool]) -> tuple[str, bool]:
    (_, resolved), applied = stored
    return resolved.person_id, applied


def _sharing(indices: list[int], records: Sequence[Any]) -> list[list[int]]:
    """The records grouped so that two sharing an identifying key are in one group, in order."""
    owner: dict[str, int] = {}
    group_of: dict[int, int] = {}
    for index in indices:
        keys = custobar.keys_of(records[index])
        joined = {group_of[owner[k]] for k in keys if k in owner}
        group = min(joined, default=index)
        for other in joined:  # this record bridges groups: they become one
            for member, g in list(group_of.items()):
                if g == other:
                    group_of[member] = group
        group_of[index] = group
        owner.update({k: index for k in keys})
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(group_of[index], []).append(index)
    return list(groups.values())


def _violations(
    refused: PeerRejected | InvalidArgument, record: dict[str, Any]
) -> list[tuple[str, str]]:
    """Identity's field violations of an upload record, named by the record's own fields."""
    violations = (
        refused.violations if isinstance(refused, InvalidArgument) else refused.field_violations()
    )
    names = [
        name
        for name in ("external_id", "email", "phone_number")
        if record.get(name) not in (None, "")
    ]
    found = []
    for violation in violations:
        index = violation[0].partition("[")[2].partition("]")[0]
        field_name = names[int(index)] if index.isdigit() and int(index) < len(names) else ""
        found.append((field_name, violation[1]))
    return found or [("", refused.message)]
