"""The profile service's calls to its peers: identity (who a record belongs to) and the gate
(contact policies, contact history)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.runtime.channels import peer_answer
from services.runtime.errors import InvalidArgument, PeerRejected
from services.runtime.validation import CHANNEL_ENUMS, CHANNEL_NAMES, timestamp


@dataclass(frozen=True)
class Resolved:
    """Who a record belongs to: the person, and the anchor its facts keep (None: nobody)."""

    person_id: str
    anchor: tuple[str, str] | None
    erased: bool = False


@dataclass(frozen=True)
class Sighting:
    """Identifiers seen together on one record, for identity to say who they belong to:
    `source` and `event_id` (the idempotency key) name the record, `observed_at` its own time
    (None: now); an asserted sighting can add identifiers but never merge two known people;
    with `skip_invalid`, identifiers that fail normalisation are left out instead of rejecting
    the record; national phone numbers are read in `country` (empty: the shop's)."""

    identifiers: list[tuple[str, str]]
    source: str
    event_id: str
    asserted: bool = False
    country: str = ""
    skip_invalid: bool = False
    observed_at: datetime | None = None


# At most this many records in one ResolveBatch.
RESOLVE_BATCH = 1000
# How long a call of a batch RPC (ResolveBatch, LookupBatch, GetPersons, PutContactPolicies) may
# take: a thousand items take far longer than the default deadline of a peer call; the caller's
# deadline still applies.
BATCH_SECONDS = 60.0
# At most this many identifiers or persons in one LookupBatch or GetPersons.
READ_BATCH = 1000
# At most this many policies in one PutContactPolicies.
POLICY_BATCH = 1000


@dataclass(frozen=True)
class Group:
    """A person as identity groups it: the root, its members, and every identifier
    (type, normalised value, match key)."""

    person_id: str
    members: list[str]
    identifiers: list[tuple[str, str, str]] = field(default_factory=list)
    erased: bool = False

    @property
    def anchors(self) -> list[tuple[str, str]]:
        """Every anchor a fact of this person can carry."""
        persons = [("person", p) for p in [self.person_id, *self.members]]
        return persons + [(t, key) for t, _, key in self.identifiers]


@dataclass(frozen=True)
class ContactPolicy:
    """What the gate is told of a person: consent per channel, the global unsubscribe, and
    the version that orders updates (µs since the epoch of the change)."""

    person_id: str
    granted: dict[str, bool]
    global_unsubscribe: bool
    version: int


@dataclass(frozen=True)
class History:
    """The gate's view of a person: counts, fatigue, last contact, the log."""

    today: dict[str, int]
    week_total: int
    fatigue: str
    last_contact: dict[str, datetime]
    log: list[gate_pb2.MessageLogEntry]


class IdentityPeer:
    """Identity, over a channel carrying the service token."""

    def __init__(self, stub: "identity_pb2_grpc.IdentityAsyncStub") -> None:
        self._stub = stub

    async def resolve_all(
        self, shop_id: str, sightings: Sequence[Sighting]
    ) -> list[Resolved | InvalidArgument]:
        """Who each record's identifiers belong to, resolved in order (a later record sees what
        an earlier one linked) with ResolveBatch, RESOLVE_BATCH records a call; a record identity
        finds invalid is answered with its violations (named as in the record) and changes
        nothing, the others are resolved as if it were not there."""
        results: list[Resolved | InvalidArgument] = [Resolved("", None) for _ in sightings]
        pending = [i for i, sighting in enumerate(sightings) if sighting.identifiers]
        while pending:
            chunk = pending[:RESOLVE_BATCH]
            try:
                answer = await peer_answer(
                    self._stub.ResolveBatch(
                        identity_pb2.ResolveBatchRequest(
                            shop_id=shop_id,
                            records=[_resolve_request(shop_id, sightings[i]) for i in chunk],
                        ),
                        timeout=BATCH_SECONDS,
                    )
                )
            except PeerRejected as rejected:
                invalid = _by_record(rejected, len(chunk))
                if not invalid:
                    raise
                for k, violations in invalid.items():
                    results[chunk[k]] = InvalidArgument(violations)
                pending = [i for k, i in enumerate(chunk) if k not in invalid] + pending[
                    len(chunk) :
                ]
                continue
            for i, resolved in zip(chunk, answer.results, strict=True):
                results[i] = _resolved(resolved)
            pending = pending[len(chunk) :]
        return results

    async def lookup(self, shop_id: str, type_: str, value: str) -> str:
        """The person holding an identifier."""
        return (await self.find(shop_id, type_, value))[0]

    async def find(self, shop_id: str, type_: str, value: str) -> tuple[str, tuple[str, str]]:
        """The person holding an identifier, and the identifier as facts anchor on it."""
        answer = await peer_answer(
            self._stub.Lookup(
                identity_pb2.LookupRequest(
                    shop_id=shop_id, identifier=common_pb2.Identifier(type=type_, value=value)
                )
            )
        )
        return str(answer.person_id), (answer.identifier.type, answer.identifier.value)

    async def changes(self, after: int, limit: int) -> list[identity_pb2.Change]:
        """Identity's changes of every shop after a sequence."""
        answer = await peer_answer(
            self._stub.ListChanges(
                identity_pb2.ListChangesRequest(shop_id="", after_sequence=after, limit=limit)
            )
        )
        return list(answer.changes)

    async def forget(self, shop_id: str, person_id: str) -> None:
        await peer_answer(
            self._stub.Forget(identity_pb2.ForgetRequest(shop_id=shop_id, person_id=person_id))
        )

    async def lookup_many(self, shop_id: str, identifiers: Sequence[tuple[str, str]]) -> list[str]:
        """The person holding each identifier ("" when nobody does or it is not valid), with
        LookupBatch, READ_BATCH identifiers a call."""
        found: list[str] = []
        for start in range(0, len(identifiers), READ_BATCH):
            answer = await peer_answer(
                self._stub.LookupBatch(
                    identity_pb2.LookupBatchRequest(
                        shop_id=shop_id,
                        identifiers=[
                            common_pb2.Identifier(type=t, value=v)
                            for t, v in identifiers[start : start + READ_BATCH]
                        ],
                    ),
                    timeout=BATCH_SECONDS,
                )
            )
            found.extend(result.person_id for result in answer.results)
        return found

    async def group(self, shop_id: str, person_id: str) -> Group:
        return _group(
            await peer_answer(
                self._stub.GetPerson(
                    identity_pb2.GetPersonRequest(shop_id=shop_id, person_id=person_id)
                )
            )
        )

    async def groups(self, shop_id: str, person_ids: Sequence[str]) -> list[Group | None]:
        """The group of each person (None for a person identity does not know), with
        GetPersons, READ_BATCH persons a call."""
        found: list[Group | None] = []
        for start in range(0, len(person_ids), READ_BATCH):
            answer = await peer_answer(
                self._stub.GetPersons(
                    identity_pb2.GetPersonsRequest(
                        shop_id=shop_id, person_ids=person_ids[start : start + READ_BATCH]
                    ),
                    timeout=BATCH_SECONDS,
                )
            )
            found.extend(_group(p) if p.person_id else None for p in answer.persons)
        return found


def _group(person: identity_pb2.Person) -> Group:
    return Group(
        person.person_id,
        list(person.member_person_ids),
        [(i.type, i.normalized_value, i.match_key) for i in person.identifiers],
        person.erased,
    )


def _resolve_request(shop_id: str, sighting: Sighting) -> identity_pb2.ResolveRequest:
    return identity_pb2.ResolveRequest(
        shop_id=shop_id,
        identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in sighting.identifiers],
        source=sighting.source,
        strength=identity_pb2.STRENGTH_ASSERTED
        if sighting.asserted
        else identity_pb2.STRENGTH_AUTHORITATIVE,
        event_id=sighting.event_id,
        country=sighting.country,
        skip_invalid=sighting.skip_invalid,
        observed_at=timestamp(sighting.observed_at),
    )


def _resolved(answer: identity_pb2.ResolveResponse) -> Resolved:
    if answer.outcome == identity_pb2.RESOLVE_OUTCOME_ERASED:
        return Resolved(answer.person_id, ("person", answer.person_id), erased=True)
    if answer.outcome == identity_pb2.RESOLVE_OUTCOME_ANONYMOUS:
        return Resolved("", None)
    return Resolved(answer.person_id, (answer.anchor.type, answer.anchor.value))


def _by_record(rejected: PeerRejected, records: int) -> dict[int, list[tuple[str, str]]]:
    """ResolveBatch's violations (`records[<i>].<field>`) by record, each field as the record's
    own; empty when the refusal names no record (then it is the whole call's)."""
    found: dict[int, list[tuple[str, str]]] = {}
    if rejected.code.name != "INVALID_ARGUMENT":
        return found
    for field_name, why in rejected.field_violations():
        head, _, rest = field_name.partition(".")
        index = head.removeprefix("records[").removesuffix("]")
        if not head.startswith("records[") or not index.isdigit() or int(index) >= records:
            return {}
        found.setdefault(int(index), []).append((rest, why))
    return found


class GatePeer:
    """The gate, over a channel carrying the service token."""

    def __init__(self, stub: "gate_pb2_grpc.GateAsyncStub") -> None:
        self._stub = stub

    async def put_contact_policies(self, shop_id: str, policies: Sequence[ContactPolicy]) -> None:
        """Sends persons' contact policies, POLICY_BATCH a call (PutContactPolicies)."""
        for start in range(0, len(policies), POLICY_BATCH):
            await peer_answer(
                self._stub.PutContactPolicies(
                    gate_pb2.PutContactPoliciesRequest(
                        shop_id=shop_id,
                        policies=[
                            gate_pb2.PutContactPolicyRequest(
                                person_id=p.person_id,
                                consents=[
                                    gate_pb2.ChannelConsent(channel=CHANNEL_ENUMS[name], granted=ok)
                                    for name, ok in sorted(p.granted.items())
                                ],
                                global_unsubscribe=p.global_unsubscribe,
                                version=p.version,
                            )
                            for p in policies[start : start + POLICY_BATCH]
                        ],
                    ),
                    timeout=BATCH_SECONDS,
                )
            )

    async def allowed(self, shop_id: str, person_ids: Sequence[str], channel: str) -> list[bool]:
        """Whether the gate would let a marketing message through to each person now (dry-run
        checks, counting nothing)."""
        answer = await peer_answer(
            self._stub.CheckBatch(
                gate_pb2.CheckBatchRequest(
                    shop_id=shop_id,
                    channel=CHANNEL_ENUMS[channel],
                    dry_run=True,
                    items=[
                        gate_pb2.BatchItem(person_id=p, message_id=f"segment-probe:{p}")
                        for p in person_ids
                    ],
                )
            )
        )
        return [result.allowed for result in answer.results]

    async def history(self, shop_id: str, person_id: str, include_log: bool) -> History:
        answer = await peer_answer(
            self._stub.GetContactHistory(
                gate_pb2.GetContactHistoryRequest(
                    shop_id=shop_id, person_id=person_id, include_log=include_log, log_limit=100
                )
            )
        )
        return History(
            dict(answer.counts.today_by_channel),
            answer.counts.last_7_days,
            answer.counts.fatigue,
            {
                CHANNEL_NAMES[c.channel]: c.at.ToDatetime()
                for c in answer.last_contact
                if c.channel in CHANNEL_NAMES
            },
            list(answer.log),
        )


class GdprPeer:
    """The gdpr service, over a channel carrying the service token."""

    def __init__(self, stub: "gdpr_pb2_grpc.GdprAsyncStub") -> None:
        self._stub = stub

    async def hand_over(self, shop_id: str, topic: str, webhook_id: str, body: bytes) -> None:
        """Hands a verified Shopify GDPR webhook over (idempotent per webhook id)."""
        await peer_answer(
            self._stub.HandleShopifyRequest(
                gdpr_pb2.ShopifyRequest(
                    shop_id=shop_id, topic=topic, webhook_id=webhook_id, body=body
                )
            )
        )
