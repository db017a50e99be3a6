"""Identity RPCs: requests validated and turned into identity-graph calls, answers into protos."""

from datetime import timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration

from c360.common.v1 import common_pb2
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.graph import IdentityGraph, Observation, PersonView, Policy, Resolution
from services.identity.identifiers import InvalidIdentifier
from services.identity.store import IdentifierRow, MergeRow
from services.runtime.auth import current_principal
from services.runtime.db import utc
from services.runtime.validation import (
    Violations,
    bounded,
    cursor,
    person,
    required_time,
    shop,
    text,
    time_field,
    timestamp,
)

OUTCOMES = {
    "created": identity_pb2.RESOLVE_OUTCOME_CREATED,
    "linked": identity_pb2.RESOLVE_OUTCOME_LINKED,
    "merged": identity_pb2.RESOLVE_OUTCOME_MERGED,
    "candidate_raised": identity_pb2.RESOLVE_OUTCOME_CANDIDATE_RAISED,
    "unchanged": identity_pb2.RESOLVE_OUTCOME_UNCHANGED,
    "anonymous": identity_pb2.RESOLVE_OUTCOME_ANONYMOUS,
    "erased": identity_pb2.RESOLVE_OUTCOME_ERASED,
}
CHANGE_KINDS = {
    "merged": identity_pb2.CHANGE_KIND_MERGED,
    "unmerged": identity_pb2.CHANGE_KIND_UNMERGED,
    "session_repointed": identity_pb2.CHANGE_KIND_SESSION_REPOINTED,
    "forgotten": identity_pb2.CHANGE_KIND_FORGOTTEN,
}
STRENGTHS = {"authoritative": identity_pb2.STRENGTH_AUTHORITATIVE}
MAX_EVENT_ID = 256
# Records a ResolveBatch may carry.
MAX_BATCH = 1000
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# Anything longer is out of range; the graph checks the exact bounds.
MAX_WINDOW_SECONDS = 10**9


def _by() -> str:
    return current_principal.get().name


def _merge(row: MergeRow) -> identity_pb2.MergeRecord:
    return identity_pb2.MergeRecord(
        merge_id=row.merge_id,
        surviving_person_id=row.survivor_id,
        merged_person_id=row.merged_id,
        merged_by=row.merged_by,
        reason=row.reason,
        merged_at=timestamp(utc(row.merged_at)),
        unmerged_at=timestamp(None if row.unmerged_at is None else utc(row.unmerged_at)),
        unmerge_deadline=timestamp(utc(row.unmerge_deadline)),
    )


def _person(shop_id: str, view: PersonView) -> identity_pb2.Person:
    return identity_pb2.Person(
        shop_id=shop_id,
        person_id=view.person_id,
        identifiers=[_identifier(i) for i in view.identifiers],
        merges=[_merge(m) for m in view.merges],
        created_at=timestamp(view.created_at),
        erased=view.erased,
        member_person_ids=view.members,
    )


def _identifier(row: IdentifierRow) -> identity_pb2.StoredIdentifier:
    return identity_pb2.StoredIdentifier(
        type=row.type,
        raw_value=row.raw_value,
        normalized_value=row.value,
        match_key=row.match_key,
        first_seen_at=timestamp(utc(row.first_seen_at)),
    )


def _policy(policy: Policy) -> identity_pb2.ShopPolicy:
    window = Duration()
    window.FromTimedelta(policy.unmerge_window)
    return identity_pb2.ShopPolicy(
        shop_id=policy.shop_id,
        unmerge_window=window,
        default_country=policy.country,
        own_domains=policy.own_domains,
        blocked_values=[common_pb2.Identifier(type=t, value=k) for t, k in policy.blocked],
    )


def _observation(request: Any, shop_id: str, prefix: str, violations: Violations) -> Observation:
    """A ResolveRequest as an observation; its violations named `prefix` + field."""
    event_id = request.event_id
    if not event_id or len(event_id) > MAX_EVENT_ID or not event_id.isprintable():
        violations.add(prefix + "event_id", f"must be 1-{MAX_EVENT_ID} printable characters")
    source = text(request.source, prefix + "source", violations)
    if request.strength not in (
        identity_pb2.STRENGTH_AUTHORITATIVE,
        identity_pb2.STRENGTH_ASSERTED,
    ):
        violations.add(prefix + "strength", "must be STRENGTH_AUTHORITATIVE or STRENGTH_ASSERTED")
    if request.country and not (len(request.country) == 2 and request.country.isalpha()):
        violations.add(prefix + "country", "must be an ISO 3166-1 alpha-2 code, e.g. GB")
    observed_at = time_field(
        request, "observed_at", violations, required=False, path=prefix + "observed_at"
    )
    return Observation(
        shop_id=shop_id,
        identifiers=[(i.type, i.value) for i in request.identifiers],
        source=source,
        asserted=request.strength == identity_pb2.STRENGTH_ASSERTED,
        event_id=event_id,
        country=request.country.upper(),
        observed_at=observed_at,
        skip_invalid=request.skip_invalid,
    )


def _resolution(resolution: Resolution) -> identity_pb2.ResolveResponse:
    anchor = None
    if resolution.anchor is not None:
        anchor = common_pb2.Identifier(type=resolution.anchor[0], value=resolution.anchor[1])
    return identity_pb2.ResolveResponse(
        person_id=resolution.person_id,
        outcome=OUTCOMES[resolution.outcome],
        candidate_id=resolution.candidate_id,
        anchor=anchor,
        skipped=resolution.skipped,
    )


class IdentityServicer(identity_pb2_grpc.IdentityServicer):
    """The Identity service over the identity graph."""

    def __init__(self, graph: IdentityGraph) -> None:
        self._graph = graph

    async def Resolve(self, request: Any, context: Any) -> identity_pb2.ResolveResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        observation = _observation(request, shop_id, "", violations)
        violations.raise_any()
        return _resolution(await self._graph.resolve(observation))

    async def ResolveBatch(self, request: Any, context: Any) -> identity_pb2.ResolveBatchResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if not 1 <= len(request.records) <= MAX_BATCH:
            violations.add("records", f"must hold 1-{MAX_BATCH} records")
        observations = []
        for i, record in enumerate(request.records[:MAX_BATCH]):
            prefix = f"records[{i}]."
            if record.shop_id and record.shop_id != request.shop_id:
                violations.add(prefix + "shop_id", "must be empty or the request's shop_id")
            observations.append(_observation(record, shop_id, prefix, violations))
        violations.raise_any()
        resolutions = await self._graph.resolve_batch(observations)
        return identity_pb2.ResolveBatchResponse(results=[_resolution(r) for r in resolutions])

    async def Lookup(self, request: Any, context: Any) -> identity_pb2.LookupResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if not request.HasField("identifier"):
            violations.add("identifier", "required")
        violations.raise_any()
        person_id, match_key = await self._graph.lookup(
            shop_id, request.identifier.type, request.identifier.value
        )
        return identity_pb2.LookupResponse(
            person_id=person_id,
            identifier=common_pb2.Identifier(type=request.identifier.type, value=match_key),
        )

    async def LookupBatch(self, request: Any, context: Any) -> identity_pb2.LookupBatchResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if not 1 <= len(request.identifiers) <= MAX_BATCH:
            violations.add("identifiers", f"must hold 1-{MAX_BATCH} identifiers")
        violations.raise_any()
        found = await self._graph.lookup_many(
            shop_id, [(i.type, i.value) for i in request.identifiers]
        )
        results = []
        for identifier, result in zip(request.identifiers, found, strict=True):
            if isinstance(result, InvalidIdentifier):
                results.append(identity_pb2.LookupResult(invalid=str(result)))
            elif result is None:
                results.append(identity_pb2.LookupResult())
            else:
                results.append(
                    identity_pb2.LookupResult(
                        person_id=result[0],
                        identifier=common_pb2.Identifier(type=identifier.type, value=result[1]),
                    )
                )
        return identity_pb2.LookupBatchResponse(results=results)

    async def GetPerson(self, request: Any, context: Any) -> identity_pb2.Person:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        person_id = person(request.person_id, "person_id", violations)
        violations.raise_any()
        return _person(shop_id, await self._graph.person(shop_id, person_id))

    async def GetPersons(self, request: Any, context: Any) -> identity_pb2.GetPersonsResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if not 1 <= len(request.person_ids) <= MAX_BATCH:
            violations.add("person_ids", f"must hold 1-{MAX_BATCH} person ids")
        person_ids = [
            person(p, f"person_ids[{i}]", violations)
            for i, p in enumerate(request.person_ids[:MAX_BATCH])
        ]
        violations.raise_any()
        views = await self._graph.persons(shop_id, person_ids)
        return identity_pb2.GetPersonsResponse(
            persons=[identity_pb2.Person() if v is None else _person(shop_id, v) for v in views]
        )

    async def ListMergeCandidates(
        self, request: Any, context: Any
    ) -> identity_pb2.ListMergeCandidatesResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        size = bounded(request.page_size, "page_size", DEFAULT_PAGE, MAX_PAGE, violations)
        after = cursor(request.page_token, "page_token", violations)
        violations.raise_any()
        found = await self._graph.candidates(shop_id, after, size + 1)
        candidates = [
            identity_pb2.MergeCandidate(
                candidate_id=row.candidate_id,
                person_a_id=row.person_a_id,
                person_b_id=row.person_b_id,
                reason=row.reason,
                raised_at=timestamp(utc(row.raised_at)),
                evidence=[
                    identity_pb2.Evidence(
                        source=e.source,
                        event_id=e.event_id,
                        strength=STRENGTHS.get(e.strength, identity_pb2.STRENGTH_ASSERTED),
                        identifiers=[
                            common_pb2.Identifier(type=i.type, value=i.raw_value) for i in carried
                        ],
                        observed_at=timestamp(utc(e.observed_at)),
                    )
                    for e, carried in evidence
                ],
            )
            for row, evidence in found[:size]
        ]
        token = str(found[size - 1][0].seq) if len(found) > size else ""
        return identity_pb2.ListMergeCandidatesResponse(
            candidates=candidates, next_page_token=token
        )

    async def Merge(self, request: Any, context: Any) -> identity_pb2.MergeResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if request.candidate_id:
            text(request.candidate_id, "candidate_id", violations)
        else:
            person(request.person_a_id, "person_a_id", violations)
            person(request.person_b_id, "person_b_id", violations)
        reason = text(request.reason, "reason", violations, required=False)
        violations.raise_any()
        row = await self._graph.merge(
            shop_id,
            request.candidate_id,
            (request.person_a_id, request.person_b_id),
            reason,
            _by(),
        )
        return identity_pb2.MergeResponse(merge=_merge(row))

    async def DismissCandidate(
        self, request: Any, context: Any
    ) -> identity_pb2.DismissCandidateResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        candidate_id = text(request.candidate_id, "candidate_id", violations)
        reason = text(request.reason, "reason", violations, required=False)
        violations.raise_any()
        await self._graph.dismiss(shop_id, candidate_id, reason, _by())
        return identity_pb2.DismissCandidateResponse()

    async def Unmerge(self, request: Any, context: Any) -> identity_pb2.UnmergeResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        merge_id = text(request.merge_id, "merge_id", violations)
        reason = text(request.reason, "reason", violations, required=False)
        violations.raise_any()
        row = await self._graph.unmerge(shop_id, merge_id, reason, _by())
        return identity_pb2.UnmergeResponse(merge=_merge(row))

    async def Forget(self, request: Any, context: Any) -> identity_pb2.ForgetResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        person_id = person(request.person_id, "person_id", violations)
        violations.raise_any()
        removed = await self._graph.forget(shop_id, person_id, request.dry_run)
        return identity_pb2.ForgetResponse(
            identifiers_deleted=removed["identifier"],
            evidence_deleted=removed["evidence"],
            removed=removed,
        )

    async def PutShopPolicy(self, request: Any, context: Any) -> identity_pb2.ShopPolicy:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        window: timedelta | None = None
        if request.HasField("unmerge_window"):
            if abs(request.unmerge_window.seconds) > MAX_WINDOW_SECONDS:
                violations.add("unmerge_window", "must be between 24 hours and 90 days")
            else:
                window = request.unmerge_window.ToTimedelta()
        violations.raise_any()
        policy = await self._graph.put_policy(
            shop_id,
            window,
            request.default_country,
            list(request.own_domains),
            [(i.type, i.value) for i in request.blocked_values],
        )
        return _policy(policy)

    async def GetShopPolicy(self, request: Any, context: Any) -> identity_pb2.ShopPolicy:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        return _policy(await self._graph.policy(shop_id))

    async def Inventory(self, request: Any, context: Any) -> identity_pb2.InventoryResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        seen_before = required_time(request, "seen_before", violations)
        violations.raise_any()
        counts = await self._graph.inventory(shop_id, seen_before)
        return identity_pb2.InventoryResponse(
            persons=counts.persons, with_email=counts.with_email, with_phone=counts.with_phone,
            oldest_record_at=timestamp(counts.oldest_record_at),
            past_retention=counts.past_retention,
        )  # fmt: skip

    async def ListChanges(self, request: Any, context: Any) -> identity_pb2.ListChangesResponse:
        violations = Violations()
        # Empty: every shop (the interceptor lets only a token bound to all shops ask that).
        shop_id = shop(request.shop_id, violations) if request.shop_id else None
        limit = bounded(request.limit, "limit", DEFAULT_PAGE, MAX_PAGE, violations)
        if request.after_sequence < 0:
            violations.add("after_sequence", "must be 0 or a sequence already seen")
        violations.raise_any()
        rows = await self._graph.changes(shop_id, request.after_sequence, limit)
        return identity_pb2.ListChangesResponse(
            changes=[
                identity_pb2.Change(
                    sequence=row.seq,
                    kind=CHANGE_KINDS[row.kind],
                    person_id=row.person_id,
                    other_person_id=row.other_person_id or "",
                    merge_id=row.merge_id or "",
                    at=timestamp(utc(row.at)),
                    shop_id=row.shop_id,
                )
                for row in rows
            ]
        )
