"""Profile RPCs: requests validated and turned into profile calls, answers into protos."""

import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf.json_format import MessageToDict

from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.profiles import (
    ALL_CHANNELS,
    ConsentChange,
    Order,
    PersonRef,
    Profile,
    Profiles,
)
from services.profile.webhooks import MAX_UPLOAD, Webhooks
from services.runtime.db import utc
from services.runtime.validation import (
    CHANNEL_ENUMS,
    Violations,
    channel_name,
    cursor,
    person,
    required_time,
    shop,
    time_field,
    timestamp,
)

SOURCES = {
    profile_pb2.ORDER_SOURCE_ONLINE: "online",
    profile_pb2.ORDER_SOURCE_POS: "pos",
    profile_pb2.ORDER_SOURCE_MARKETPLACE: "marketplace",
}
KINDS = {
    profile_pb2.EVENT_KIND_VISIT: "visit",
    profile_pb2.EVENT_KIND_OPEN: "open",
    profile_pb2.EVENT_KIND_CLICK: "click",
    profile_pb2.EVENT_KIND_REPLY: "reply",
    profile_pb2.EVENT_KIND_DISMISS: "dismiss",
}
KIND_ENUMS = {name: value for value, name in KINDS.items()}
CURRENCY = re.compile(r"[A-Z]{3}")
MAX_ID = 256
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_TEXT = 4000
MAX_AMOUNT = Decimal("1e15")


def _id(value: str, field: str, violations: Violations, limit: int = MAX_ID) -> str:
    if not value or len(value) > limit or not value.isprintable():
        violations.add(field, f"must be 1-{limit} printable characters")
    return value


def _amount(value: str, field: str, violations: Violations) -> Decimal:
    """A non-negative decimal string such as "129.90"."""
    try:
        amount = Decimal(value)
    except InvalidOperation:
        amount = Decimal(-1)
    if not amount.is_finite() or amount < 0 or amount >= MAX_AMOUNT or "e" in value.lower():
        violations.add(field, 'must be a non-negative decimal string such as "129.90"')
        return Decimal(0)
    return amount


def _identifiers(request: Any) -> list[tuple[str, str]]:
    return [(i.type, i.value) for i in request.identifiers]


def _person_ref(request: Any, violations: Violations) -> PersonRef:
    which = request.person.WhichOneof("ref")
    if which == "person_id":
        return PersonRef(person_id=person(request.person.person_id, "person.person_id", violations))
    if which == "identifier":
        identifier = request.person.identifier
        _id(identifier.type, "person.identifier.type", violations)
        _id(identifier.value, "person.identifier.value", violations)
        return PersonRef(identifier=(identifier.type, identifier.value))
    violations.add("person", "a person_id or an identifier is required")
    return PersonRef()


def _money(amount: Decimal) -> str:
    return f"{amount:.2f}"


def _profile(found: Profile, include_log: bool) -> profile_pb2.CustomerProfile:
    group, bought = found.group, found.purchases
    by_type: dict[str, list[str]] = {}
    for type_, value, _ in group.identifiers:
        by_type.setdefault(type_, []).append(value)
    answer = profile_pb2.CustomerProfile(
        shop_id=found.shop_id,
        person_id=group.person_id,
        identifiers=[common_pb2.Identifier(type=t, value=v) for t, v, _ in group.identifiers],
        emails=by_type.get("email", []),
        phones=by_type.get("phone", []),
        shopify_customer_id=(by_type.get("shopify_customer_id") or [""])[0],
        marketplace_ids=[
            common_pb2.Identifier(type=t, value=v)
            for t, v, _ in group.identifiers
            if t in ("amazon_buyer_id", "ebay_user_id", "tiktok_buyer_id")
        ],
        sessions=len(by_type.get("cookie", [])),
        purchases=profile_pb2.Purchases(
            order_count=bought.order_count,
            lifetime_spend=_money(bought.lifetime_spend),
            average_order_value=_money(bought.average_order_value),
            currency=bought.currency,
            first_order_at=timestamp(bought.first_order_at),
            last_order_at=timestamp(bought.last_order_at),
            acquisition_channel=bought.acquisition_channel,
            online_orders=bought.by_source.get("online", 0),
            pos_orders=bought.by_source.get("pos", 0),
            marketplace_orders=bought.by_source.get("marketplace", 0),
            preferred_location=bought.preferred_location,
            refunded=_money(bought.refunded),
        ),
        engagement=profile_pb2.Engagement(
            counts=[
                profile_pb2.EngagementCount(
                    channel=CHANNEL_ENUMS.get(channel, common_pb2.CHANNEL_UNSPECIFIED),
                    kind=KIND_ENUMS[kind],
                    count=count,
                )
                for channel, kind, count, _ in found.engagement
            ],
            visits=sum(n for _, kind, n, _ in found.engagement if kind == "visit"),
            last_engaged_at=timestamp(max((at for *_, at in found.engagement), default=None)),
        ),
        consents=[
            profile_pb2.Consent(
                channel=CHANNEL_ENUMS[c.channel],
                granted=c.granted,
                consent_text=c.consent_text,
                source=c.source,
                at=timestamp(c.at),
            )
            for c in found.consents
        ],
        global_unsubscribe=found.global_unsubscribe,
        tags=found.tags,
    )
    if found.attributes:
        answer.attributes.update(found.attributes)
    if any(found.name):
        answer.name.CopyFrom(profile_pb2.Name(first_name=found.name[0], last_name=found.name[1]))
    if found.history is not None:
        history = found.history
        answer.contact_history.CopyFrom(
            profile_pb2.ContactHistory(
                today_by_channel=history.today,
                last_7_days=history.week_total,
                fatigue=history.fatigue,
                last_contact=[
                    profile_pb2.LastContactAt(channel=CHANNEL_ENUMS[c], at=timestamp(at))
                    for c, at in sorted(history.last_contact.items())
                ],
                message_log=[
                    profile_pb2.MessageLogLine(
                        message_id=line.message_id,
                        channel=line.channel,
                        allowed=line.allowed,
                        reason=line.reason,
                        decided_at=line.decided_at,
                    )
                    for line in (history.log if include_log else [])
                ],
            )
        )
    return answer


class ProfileServicer(profile_pb2_grpc.ProfileServicer):
    """The Profile service over the profiles."""

    def __init__(self, profiles: Profiles, webhooks: Webhooks) -> None:
        self._profiles = profiles
        self._webhooks = webhooks

    async def Get(self, request: Any, context: Any) -> profile_pb2.CustomerProfile:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = _person_ref(request, violations)
        violations.raise_any()
        found = await self._profiles.get(shop_id, ref, request.include_message_log)
        return _profile(found, request.include_message_log)

    async def IngestOrder(self, request: Any, context: Any) -> profile_pb2.IngestResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        order_id = _id(request.order_id, "order_id", violations, limit=64)
        placed_at = required_time(request, "placed_at", violations)
        updated_at = time_field(request, "updated_at", violations, required=False)
        total = _amount(request.total, "total", violations)
        if not CURRENCY.fullmatch(request.currency):
            violations.add("currency", "must be an ISO 4217 code such as EUR")
        source = SOURCES.get(request.source, "")
        if not source:
            violations.add(
                "source",
                "must be ORDER_SOURCE_ONLINE, ORDER_SOURCE_POS or ORDER_SOURCE_MARKETPLACE",
            )
        if len(request.location) > MAX_ID:
            violations.add("location", f"at most {MAX_ID} characters")
        for i, item in enumerate(request.line_items):
            _amount(item.price or "0", f"line_items[{i}].price", violations)
            if item.quantity < 0:
                violations.add(f"line_items[{i}].quantity", "must not be negative")
        violations.raise_any()
        person_id, applied = await self._profiles.ingest_order(
            Order(
                shop_id=shop_id,
                order_id=order_id,
                identifiers=_identifiers(request),
                placed_at=placed_at,
                updated_at=updated_at or placed_at,
                total=total,
                currency=request.currency,
                source=source,
                location=request.location,
                line_items=[
                    MessageToDict(item, preserving_proto_field_name=True)
                    for item in request.line_items
                ],
                cancelled=request.cancelled,
            )
        )
        return profile_pb2.IngestResponse(person_id=person_id, applied=applied)

    async def IngestRefund(self, request: Any, context: Any) -> profile_pb2.IngestResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        refund_id = _id(request.refund_id, "refund_id", violations, limit=64)
        order_id = _id(request.order_id, "order_id", violations, limit=64)
        amount = _amount(request.amount, "amount", violations)
        refunded_at = required_time(request, "refunded_at", violations)
        violations.raise_any()
        person_id, applied = await self._profiles.ingest_refund(
            shop_id, refund_id, order_id, amount, refunded_at, request.is_return
        )
        return profile_pb2.IngestResponse(person_id=person_id, applied=applied)

    async def IngestEvent(self, request: Any, context: Any) -> profile_pb2.IngestResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        event_id = _id(request.event_id, "event_id", violations)
        kind = KINDS.get(request.kind, "")
        if not kind:
            violations.add(
                "kind", "must be one of EVENT_KIND_VISIT, _OPEN, _CLICK, _REPLY, _DISMISS"
            )
        channel = ""
        if kind != "visit":
            channel = channel_name(request.channel, "channel", violations)
        at = required_time(request, "at", violations)
        violations.raise_any()
        person_id, applied = await self._profiles.ingest_event(
            shop_id, event_id, _identifiers(request), kind, channel, at
        )
        return profile_pb2.IngestResponse(person_id=person_id, applied=applied)

    async def SetConsent(self, request: Any, context: Any) -> profile_pb2.IngestResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = _person_ref(request, violations)
        channel = channel_name(request.channel, "channel", violations)
        if len(request.consent_text) > MAX_TEXT:
            violations.add("consent_text", f"at most {MAX_TEXT} characters")
        source = _id(request.source, "source", violations, limit=64)
        at = required_time(request, "at", violations)
        violations.raise_any()
        person_id, applied = await self._profiles.set_consent(
            ConsentChange(shop_id, ref, channel, request.granted, request.consent_text, source, at)
        )
        return profile_pb2.IngestResponse(person_id=person_id, applied=applied)

    async def Unsubscribe(self, request: Any, context: Any) -> profile_pb2.IngestResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = _person_ref(request, violations)
        source = _id(request.source, "source", violations, limit=64)
        at = required_time(request, "at", violations)
        violations.raise_any()
        person_id, applied = await self._profiles.set_consent(
            ConsentChange(shop_id, ref, ALL_CHANNELS, False, "", source, at)
        )
        return profile_pb2.IngestResponse(person_id=person_id, applied=applied)

    async def ListDeadLetters(
        self, request: Any, context: Any
    ) -> profile_pb2.ListDeadLettersResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        size = request.page_size or DEFAULT_PAGE
        if not 0 <= request.page_size <= MAX_PAGE:
            violations.add("page_size", f"must be 0-{MAX_PAGE} (0 = {DEFAULT_PAGE})")
        after = cursor(request.page_token, "page_token", violations)
        violations.raise_any()
        rows = await self._webhooks.dead_letters(shop_id, after, size + 1)
        return profile_pb2.ListDeadLettersResponse(
            dead_letters=[
                profile_pb2.DeadLetter(
                    id=str(row.id),
                    kind=f"webhook:{row.topic}",
                    error=row.error or "",
                    attempts=row.attempts,
                    first_failed_at=timestamp(row.first_failed_at and utc(row.first_failed_at)),
                )
                for row in rows[:size]
            ],
            next_page_token=str(rows[size - 1].id) if len(rows) > size else "",
        )

    async def ReplayDeadLetters(
        self, request: Any, context: Any
    ) -> profile_pb2.ReplayDeadLettersResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ids = [cursor(value, f"ids[{i}]", violations) for i, value in enumerate(request.ids)]
        violations.raise_any()
        replayed, failed = await self._webhooks.replay(shop_id, ids)
        return profile_pb2.ReplayDeadLettersResponse(replayed=replayed, failed_again=failed)

    async def UpsertCustomers(
        self, request: Any, context: Any
    ) -> profile_pb2.UpsertCustomersResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if len(request.customers) > MAX_UPLOAD:
            violations.add("customers", f"at most {MAX_UPLOAD} records a call")
        violations.raise_any()
        records = [MessageToDict(record) for record in request.customers]
        accepted, errors = await self._profiles.upsert_customers(shop_id, records)
        return profile_pb2.UpsertCustomersResponse(
            accepted=accepted,
            errors=[
                profile_pb2.RecordError(index=i, field=field, description=why)
                for i, field, why in errors
            ],
        )

    async def GetContactPolicies(
        self, request: Any, context: Any
    ) -> profile_pb2.GetContactPoliciesResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if len(request.person_ids) > MAX_PAGE:
            violations.add("person_ids", f"at most {MAX_PAGE}")
        ids = [person(p, f"person_ids[{i}]", violations) for i, p in enumerate(request.person_ids)]
        violations.raise_any()
        version = int(time.time() * 1_000_000)  # read now: a push of any later change wins
        policies = []
        for person_id in ids:
            found = await self._profiles.contact_policy(shop_id, person_id)
            if found is None:
                continue
            states, unsubscribed = found
            policies.append(
                profile_pb2.ContactPolicy(
                    person_id=person_id,
                    consents=[
                        profile_pb2.Consent(
                            channel=CHANNEL_ENUMS[c.channel], granted=c.granted,
                            consent_text=c.consent_text, source=c.source, at=timestamp(c.at),
                        )
                        for c in states
                    ],
                    global_unsubscribe=unsubscribed,
                    version=version,
                )
            )  # fmt: skip
        return profile_pb2.GetContactPoliciesResponse(policies=policies)
