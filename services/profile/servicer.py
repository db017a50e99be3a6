"""Profile RPCs: requests validated and turned into profile calls, answers into protos."""

import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

from c360.common.v1 import common_pb2
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.audiences import CHANGE_KINDS, Audiences, Signals
from services.profile.gdpr import PersonData
from services.profile.history_store import HistoryStore
from services.profile.loyalty import Programme, Standing, Tier
from services.profile.profiles import (
    ALL_CHANNELS,
    ConsentChange,
    Order,
    Profile,
    Profiles,
)
from services.profile.report_store import ReportStore, ShopFigures
from services.profile.segments import STAGES
from services.profile.store import SegmentRow, SignalRow
from services.profile.webhooks import MAX_UPLOAD, Webhooks
from services.runtime.auth import ALL_SHOPS, current_principal
from services.runtime.db import utc
from services.runtime.errors import InvalidArgument, NotFound, PermissionDenied
from services.runtime.validation import (
    CHANNEL_ENUMS,
    SHOP_ID,
    Violations,
    bounded,
    channel_name,
    cursor,
    person,
    person_ref,
    plain,
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
DEFAULT_HISTORY_PAGE = 5000
MAX_HISTORY_PAGE = 20_000
MAX_TEXT = 4000
# The version of a contact policy the gate pulls: below every push's (docs/profile.md).
PULLED_VERSION = 1
MAX_AMOUNT = Decimal("1e15")
MAX_NAME = 128
MAX_RATE = Decimal(1000)
MAX_EXPIRY_DAYS = 3650
SEGMENT_ID = re.compile(r"[0-9a-f]{32}")
DATASETS = {
    profile_pb2.EXPORT_DATASET_CRM360: "crm360",
    profile_pb2.EXPORT_DATASET_LOYALTY: "loyalty",
}


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


def _json(value: Any) -> Any:
    """A google.protobuf Struct, ListValue or value as JSON values, numbers as floats (NaN and
    the infinities too, which MessageToDict refuses before validation can report them)."""
    if isinstance(value, struct_pb2.Struct):
        return {key: _json(item) for key, item in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [_json(item) for item in value]
    return value


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


def _order(shop_id: str, request: Any, violations: Violations) -> Order:
    """An order from an IngestOrderRequest, its problems added to `violations` (fields named as
    in the request)."""
    order_id = _id(request.order_id, "order_id", violations, limit=64)
    placed_at = required_time(request, "placed_at", violations)
    updated_at = time_field(request, "updated_at", violations, required=False)
    total = _amount(request.total, "total", violations)
    if not CURRENCY.fullmatch(request.currency):
        violations.add("currency", "must be an ISO 4217 code such as EUR")
    source = SOURCES.get(request.source, "")
    if not source:
        violations.add(
            "source", "must be ORDER_SOURCE_ONLINE, ORDER_SOURCE_POS or ORDER_SOURCE_MARKETPLACE"
        )
    if len(request.location) > MAX_ID:
        violations.add("location", f"at most {MAX_ID} characters")
    for i, item in enumerate(request.line_items):
        _amount(item.price or "0", f"line_items[{i}].price", violations)
        if item.quantity < 0:
            violations.add(f"line_items[{i}].quantity", "must not be negative")
    return Order(
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
            MessageToDict(item, preserving_proto_field_name=True) for item in request.line_items
        ],
        cancelled=request.cancelled,
    )


def _segment_id(value: str, field: str, violations: Violations) -> None:
    if not SEGMENT_ID.fullmatch(value):
        violations.add(field, "must be a segment id as CreateSegment returned it")


def _segment(row: SegmentRow) -> profile_pb2.Segment:
    return profile_pb2.Segment(
        segment_id=row.segment_id, shop_id=row.shop_id, name=row.name, filter=row.filter,
        member_count=row.member_count, created_at=timestamp(utc(row.created_at)),
    )  # fmt: skip


def _loyalty(standing: Standing) -> profile_pb2.Loyalty:
    expiry = standing.points_expiration_date
    return profile_pb2.Loyalty(
        member=standing.member,
        tier=standing.tier,
        points_balance=standing.points_balance,
        points_to_next_tier=standing.points_to_next_tier,
        next_tier=standing.next_tier,
        benefits=standing.benefits,
        points_expiring=standing.points_expiring,
        points_expiration_date=timestamp(
            datetime(expiry.year, expiry.month, expiry.day, tzinfo=UTC) if expiry else None
        ),
        member_since=timestamp(standing.member_since),
        lifetime_points=standing.lifetime_points,
    )


def _predictions(row: SignalRow, now: datetime) -> profile_pb2.Predictions:
    """Enrichment's predictions as stored; a predicted next order day that has since passed
    shows as overdue, never as a date in the past."""
    predictions = profile_pb2.Predictions()
    ParseDict(row.predictions, predictions)
    if predictions.HasField("predicted_next_order_at") and (
        predictions.predicted_next_order_at.ToDatetime(UTC).date() < now.date()
    ):
        predictions.ClearField("predicted_next_order_at")
        predictions.next_order_overdue = True
    return predictions


def _programme(request: Any, violations: Violations) -> Programme:
    names: set[str] = set()
    tiers, previous = [], -1
    for i, tier in enumerate(request.tiers):
        _id(tier.name, f"tiers[{i}].name", violations, limit=64)
        if tier.name in names:
            violations.add(f"tiers[{i}].name", "tier names must be unique")
        names.add(tier.name)
        if tier.threshold <= previous:
            violations.add(f"tiers[{i}].threshold", "thresholds must increase from 0 or more")
        previous = tier.threshold
        for j, benefit in enumerate(tier.benefits):
            _id(benefit, f"tiers[{i}].benefits[{j}]", violations)
        tiers.append(Tier(tier.name, tier.threshold, list(tier.benefits)))
    if not tiers:
        violations.add("tiers", "at least one tier")
    rate = _amount(request.points_per_currency_unit, "points_per_currency_unit", violations)
    if rate > MAX_RATE:
        violations.add("points_per_currency_unit", f"at most {MAX_RATE}")
    if not 0 <= request.expiry_days <= MAX_EXPIRY_DAYS:
        violations.add("expiry_days", f"0 (never) to {MAX_EXPIRY_DAYS}")
    return Programme(tiers, rate, request.expiry_days)


def _programme_message(shop_id: str, programme: Programme) -> profile_pb2.LoyaltyProgramme:
    return profile_pb2.LoyaltyProgramme(
        shop_id=shop_id,
        tiers=[
            profile_pb2.LoyaltyTier(name=t.name, threshold=t.threshold, benefits=t.benefits)
            for t in programme.tiers
        ],
        points_per_currency_unit=str(programme.points_per_unit.normalize()),
        expiry_days=programme.expiry_days,
    )


def _signals(item: Any, field: str, violations: Violations) -> Signals:
    person(item.person_id, f"{field}.person_id", violations)
    p = item.predictions
    if p.lifecycle_stage and p.lifecycle_stage not in STAGES:
        violations.add(f"{field}.predictions.lifecycle_stage", f"one of {', '.join(STAGES)}")
    rfm = None
    if p.HasField("rfm"):
        rfm = (p.rfm.r, p.rfm.f, p.rfm.m)
        if not all(1 <= score <= 5 for score in rfm):
            violations.add(f"{field}.predictions.rfm", "each score is 1 to 5")
    for name in ("churn_risk", "p_order_30d", "p_order_90d"):
        if p.HasField(name) and not 0 <= getattr(p, name) <= 1:
            violations.add(f"{field}.predictions.{name}", "a probability, 0 to 1")
    # Stored as JSON, which holds only times of the years 1-9999.
    time_field(
        p, "predicted_next_order_at", violations, required=False,
        path=f"{field}.predictions.predicted_next_order_at",
    )  # fmt: skip
    engagement = item.engagement_score if item.HasField("engagement_score") else None
    if engagement is not None and not 0 <= engagement <= 1:
        violations.add(f"{field}.engagement_score", "0 to 1")
    return Signals(
        item.person_id,
        p.lifecycle_stage,
        rfm,
        p.churn_risk if p.HasField("churn_risk") else None,
        engagement,
        # Not converted once a violation is found: the request is rejected, and JSON cannot
        # hold every value a violation is about.
        {} if violations.found else stored_predictions(p),
    )


def stored_predictions(message: Any) -> dict[str, Any]:
    """A Predictions message as the JSON it is stored as: what MessageToDict makes of it with
    the fields' own names, for the kinds of field Predictions has (numbers, strings, booleans,
    repeated or not; Timestamps; messages of those), many times faster (a daily run stores a
    million)."""
    stored: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is None:
            stored[field.name] = list(value) if field.is_repeated else value
        elif field.message_type.full_name == "google.protobuf.Timestamp":
            stored[field.name] = value.ToJsonString()
        else:
            stored[field.name] = stored_predictions(value)
    return stored


def _shop_report(figures: ShopFigures) -> profile_pb2.ShopReport:
    return profile_pb2.ShopReport(
        shop_id=figures.shop_id,
        customers=figures.customers,
        lifecycle=figures.lifecycle,
        rfm=[
            profile_pb2.RfmCell(r=r, f=f, customers=n) for (r, f), n in sorted(figures.rfm.items())
        ],
        rfm_unscored=figures.rfm_unscored,
        coverage=profile_pb2.Coverage(
            with_email=figures.with_email,
            with_order=figures.with_order,
            opted_in=figures.opted_in,
            reachable=figures.reachable,
            unsubscribed=figures.unsubscribed,
            loyalty_members=figures.loyalty_members,
        ),
        refreshing=figures.refreshing,
    )


def _readable(shops: list[str]) -> list[str] | None:
    """The shops a report may cover: those asked for, each one the caller's token is bound to,
    else the token's own (None: every shop, for a token bound to all)."""
    principal = current_principal.get()
    for shop_id in shops:
        if not principal.may_access(shop_id):
            raise PermissionDenied(
                "OTHER_SHOP", "the token is not bound to this shop", shop_id=shop_id
            )
    if shops:
        return sorted(set(shops))
    if ALL_SHOPS in principal.shops:
        return None
    return sorted(principal.shops)


class ProfileServicer(profile_pb2_grpc.ProfileServicer):
    """The Profile service over the profiles."""

    def __init__(
        self,
        profiles: Profiles,
        audiences: Audiences,
        webhooks: Webhooks,
        histories: HistoryStore,
        person_data: PersonData,
        reports: ReportStore,
        clock: Callable[[], datetime],
    ) -> None:
        self._profiles = profiles
        self._audiences = audiences
        self._webhooks = webhooks
        self._histories = histories
        self._person_data = person_data
        self._reports = reports
        self._clock = clock

    async def Get(self, request: Any, context: Any) -> profile_pb2.CustomerProfile:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = person_ref(request, "person", violations)
        violations.raise_any()
        found = await self._profiles.get(shop_id, ref, request.include_message_log)
        answer = _profile(found, request.include_message_log)
        answer.loyalty.CopyFrom(_loyalty(found.standing))
        signals = found.signals
        if signals is not None:
            answer.predictions.CopyFrom(_predictions(signals, self._clock()))
            if signals.engagement is not None:
                answer.engagement.score = signals.engagement
        return answer

    # --- audiences ------------------------------------------------------------------------------

    async def CreateSegment(self, request: Any, context: Any) -> profile_pb2.Segment:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        _id(request.name, "name", violations, limit=MAX_NAME)
        if not request.filter.strip():
            violations.add("filter", "a filter is required")
        violations.raise_any()
        row = await self._audiences.create_segment(shop_id, request.name, request.filter)
        return _segment(row)

    async def ListSegments(self, request: Any, context: Any) -> profile_pb2.ListSegmentsResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        rows = await self._audiences.list_segments(shop_id)
        return profile_pb2.ListSegmentsResponse(segments=[_segment(row) for row in rows])

    async def StreamSegmentMembers(
        self, request: Any, context: Any
    ) -> AsyncIterator[profile_pb2.SegmentMember]:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        _segment_id(request.segment_id, "segment_id", violations)
        channel = ""
        if request.allowed_now_on:
            channel = channel_name(request.allowed_now_on, "allowed_now_on", violations)
        violations.raise_any()
        async for batch in self._audiences.members(shop_id, request.segment_id, channel):
            for person_id in batch:
                yield profile_pb2.SegmentMember(person_id=person_id)

    async def WatchChanges(self, request: Any, context: Any) -> AsyncIterator[profile_pb2.Change]:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        after = cursor(request.from_cursor, "from_cursor", violations)
        for i, kind in enumerate(request.kinds):
            if kind not in CHANGE_KINDS:
                violations.add(f"kinds[{i}]", f"must be one of {', '.join(sorted(CHANGE_KINDS))}")
        violations.raise_any()
        async for row in self._audiences.watch(shop_id, after, list(request.kinds)):
            change = profile_pb2.Change(
                cursor=str(row.seq), shop_id=row.shop_id, person_id=row.person_id,
                kind=row.kind, at=timestamp(utc(row.at)),
            )  # fmt: skip
            change.data.update(row.data)
            yield change

    async def Export(self, request: Any, context: Any) -> AsyncIterator[profile_pb2.ExportChunk]:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        dataset = DATASETS.get(request.dataset, "")
        if not dataset:
            violations.add("dataset", "must be EXPORT_DATASET_CRM360 or EXPORT_DATASET_LOYALTY")
        if request.format not in (profile_pb2.EXPORT_FORMAT_JSONL, profile_pb2.EXPORT_FORMAT_CSV):
            violations.add("format", "must be EXPORT_FORMAT_JSONL or EXPORT_FORMAT_CSV")
        if request.segment_id:
            _segment_id(request.segment_id, "segment_id", violations)
        violations.raise_any()
        as_csv = request.format == profile_pb2.EXPORT_FORMAT_CSV
        async for data in self._audiences.export(shop_id, dataset, as_csv, request.segment_id):
            yield profile_pb2.ExportChunk(data=data)

    async def Erase(self, request: Any, context: Any) -> profile_pb2.EraseResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        person_id = person(request.person_id, "person_id", violations)
        if len(request.order_ids) > MAX_PAGE:
            violations.add("order_ids", f"at most {MAX_PAGE}")
        for i, order_id in enumerate(request.order_ids):
            _id(order_id, f"order_ids[{i}]", violations)
        violations.raise_any()
        removed = await self._person_data.erase(
            shop_id, person_id, list(request.order_ids), request.dry_run
        )
        return profile_pb2.EraseResponse(removed=removed)

    async def ExportPerson(self, request: Any, context: Any) -> profile_pb2.ExportPersonResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        person_id = person(request.person_id, "person_id", violations)
        violations.raise_any()
        answer = profile_pb2.ExportPersonResponse()
        answer.data.update(plain(await self._person_data.export(shop_id, person_id)))
        return answer

    async def GetShopReports(
        self, request: Any, context: Any
    ) -> profile_pb2.GetShopReportsResponse:
        violations = Violations()
        if len(request.shops) > MAX_PAGE:
            violations.add("shops", f"at most {MAX_PAGE}")
        for i, shop_id in enumerate(request.shops):
            if not SHOP_ID.fullmatch(shop_id):
                violations.add(f"shops[{i}]", "must be 1-128 letters, digits, '.', '_' or '-'")
        violations.raise_any()
        figures = await self._reports.figures(_readable(list(request.shops)))
        return profile_pb2.GetShopReportsResponse(reports=[_shop_report(f) for f in figures])

    async def LookupTraits(self, request: Any, context: Any) -> profile_pb2.Traits:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        _id(request.identifier.type, "identifier.type", violations)
        _id(request.identifier.value, "identifier.value", violations)
        violations.raise_any()
        found = await self._audiences.traits(
            shop_id, request.identifier.type, request.identifier.value
        )
        if found is None:
            return profile_pb2.Traits(found=False)
        first_name, stage, standing = found
        return profile_pb2.Traits(
            found=True, first_name=first_name, lifecycle_stage=stage,
            loyalty_tier=standing.tier, points_balance=standing.points_balance,
        )  # fmt: skip

    async def PutLoyaltyProgramme(self, request: Any, context: Any) -> profile_pb2.LoyaltyProgramme:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        programme = _programme(request, violations)
        violations.raise_any()
        await self._audiences.put_programme(shop_id, programme)
        return _programme_message(shop_id, programme)

    async def GetLoyaltyProgramme(self, request: Any, context: Any) -> profile_pb2.LoyaltyProgramme:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        programme = await self._audiences.programme(shop_id)
        if programme is None:
            raise NotFound("loyalty_programme", shop_id)
        return _programme_message(shop_id, programme)

    async def PutSignals(self, request: Any, context: Any) -> profile_pb2.PutSignalsResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if len(request.signals) > MAX_PAGE:
            violations.add("signals", f"at most {MAX_PAGE} a call")
        signals = [
            _signals(item, f"signals[{i}]", violations) for i, item in enumerate(request.signals)
        ]
        fitted_at = time_field(request, "model_fitted_at", violations, required=False)
        violations.raise_any()
        changes = await self._audiences.put_signals(shop_id, signals, fitted_at)
        return profile_pb2.PutSignalsResponse(changes=changes)

    async def ListHistories(self, request: Any, context: Any) -> profile_pb2.HistoryPage:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        as_of = time_field(request, "as_of", violations, required=False) or self._clock()
        if len(request.person_ids) > MAX_PAGE:
            violations.add("person_ids", f"at most {MAX_PAGE}")
        for i, person_id in enumerate(request.person_ids):
            person(person_id, f"person_ids[{i}]", violations)
        if request.after_person_id:
            person(request.after_person_id, "after_person_id", violations)
        limit = bounded(request.limit, "limit", DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE, violations)
        days = bounded(request.engagement_days, "engagement_days", 90, 365, violations)
        violations.raise_any()
        page = await self._histories.page(
            shop_id, as_of, list(request.person_ids), request.after_person_id, limit, days
        )
        more = not request.person_ids and len(page.person_ids) == limit
        return profile_pb2.HistoryPage(
            person_ids=page.person_ids,
            order_days=page.order_days,
            order_day=page.order_day,
            order_count=page.order_count,
            order_value=page.order_value,
            last_order_at=page.last_order_at,
            events=page.events,
            event_at=page.event_at,
            event_kind=[KIND_ENUMS[kind] for kind in page.event_kind],
            repeat_products=page.repeat_products,
            product=page.product,
            product_days=page.product_days,
            product_first_day=page.product_first_day,
            product_last_day=page.product_last_day,
            next_after_person_id=page.person_ids[-1] if more else "",
        )

    async def ListActivity(self, request: Any, context: Any) -> profile_pb2.ListActivityResponse:
        violations = Violations()
        if request.shop_id:
            shop(request.shop_id, violations)
        if request.after_sequence < 0:
            violations.add("after_sequence", "must not be negative")
        limit = bounded(request.limit, "limit", 1000, 10_000, violations)
        violations.raise_any()
        rows = await self._histories.activity(request.shop_id, request.after_sequence, limit)
        return profile_pb2.ListActivityResponse(
            activity=[
                profile_pb2.Activity(sequence=r.seq, shop_id=r.shop_id, person_id=r.person_id)
                for r in rows
            ]
        )

    async def IngestOrder(self, request: Any, context: Any) -> profile_pb2.IngestResponse:
        violations = Violations()
        order = _order(shop(request.shop_id, violations), request, violations)
        violations.raise_any()
        person_id, applied = await self._profiles.ingest_order(order)
        return profile_pb2.IngestResponse(person_id=person_id, applied=applied)

    async def IngestOrders(self, request: Any, context: Any) -> profile_pb2.IngestOrdersResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if not 1 <= len(request.orders) <= MAX_PAGE:
            violations.add("orders", f"1 to {MAX_PAGE} orders a call")
        for i, item in enumerate(request.orders):
            if item.shop_id not in ("", shop_id):
                violations.add(f"orders[{i}].shop_id", "empty or the request's shop_id")
        violations.raise_any()
        problems: dict[int, list[tuple[str, str]]] = {}
        orders: list[Order] = []
        for i, item in enumerate(request.orders):
            found = Violations()
            order = _order(shop_id, item, found)
            if found.found:
                problems[i] = found.found
            else:
                orders.append(order)
        stored = iter(await self._profiles.ingest_orders(shop_id, orders))
        results = []
        for i in range(len(request.orders)):
            answer = None if i in problems else next(stored)
            if isinstance(answer, InvalidArgument):
                problems[i] = answer.violations
            elif answer is not None:
                results.append(profile_pb2.IngestResponse(person_id=answer[0], applied=answer[1]))
                continue
            results.append(profile_pb2.IngestResponse())
        return profile_pb2.IngestOrdersResponse(
            results=results,
            errors=[
                profile_pb2.RecordError(index=i, field=field, description=why)
                for i in sorted(problems)
                for field, why in problems[i]
            ],
        )

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
        ref = person_ref(request, "person", violations)
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
        ref = person_ref(request, "person", violations)
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
        size = bounded(request.page_size, "page_size", DEFAULT_PAGE, MAX_PAGE, violations)
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
        records = [_json(record) for record in request.customers]
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
                    version=PULLED_VERSION,
                )
            )  # fmt: skip
        return profile_pb2.GetContactPoliciesResponse(policies=policies)
