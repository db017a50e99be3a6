"""The enrichment service's calls to its peers: the profile service (histories in, signals out,
the activity it follows) and identity (who an identifier belongs to)."""

from collections.abc import Sequence
from datetime import datetime

import numpy as np

from c360.common.v1 import common_pb2
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.enrichment.signals import Histories, Scored
from services.runtime.channels import peer_answer
from services.runtime.validation import timestamp

PAGE_TIMEOUT_SECONDS = 120.0
"""A page of 20,000 persons' histories on a loaded database takes seconds, not minutes."""


def histories(pages: Sequence[profile_pb2.HistoryPage]) -> Histories:
    """Pages laid end to end as one columnar Histories."""

    def column(name: str, dtype: type = np.int64) -> np.ndarray:
        return np.concatenate([np.array(getattr(page, name), dtype=dtype) for page in pages])

    return Histories(
        person_ids=[p for page in pages for p in page.person_ids],
        order_days=column("order_days"),
        order_day=column("order_day"),
        order_count=column("order_count"),
        order_value=column("order_value", float),
        last_order_at=column("last_order_at"),
        events=column("events"),
        event_at=column("event_at"),
        event_kind=[KINDS[k] for page in pages for k in page.event_kind],
        repeat_products=column("repeat_products"),
        product=[p for page in pages for p in page.product],
        product_days=column("product_days"),
        product_first_day=column("product_first_day"),
        product_last_day=column("product_last_day"),
    )


KINDS = {
    value: name.removeprefix("EVENT_KIND_").lower() for name, value in profile_pb2.EventKind.items()
}
"""Event kinds as the profile names them ("visit" for EVENT_KIND_VISIT)."""


class ProfilePeer:
    """The profile service, over a channel carrying the service token."""

    def __init__(self, stub: "profile_pb2_grpc.ProfileAsyncStub") -> None:
        self._stub = stub

    async def page(
        self, shop_id: str, as_of: datetime, after: str, limit: int, engagement_days: int
    ) -> profile_pb2.HistoryPage:
        """The next page of the shop's persons after `after`, with the events of the last
        `engagement_days`."""
        request = profile_pb2.ListHistoriesRequest(
            shop_id=shop_id, as_of=timestamp(as_of), after_person_id=after, limit=limit,
            engagement_days=engagement_days,
        )  # fmt: skip
        return await self._stub.ListHistories(request, timeout=PAGE_TIMEOUT_SECONDS)

    async def of(
        self, shop_id: str, as_of: datetime, person_ids: Sequence[str], engagement_days: int
    ) -> profile_pb2.HistoryPage:
        """These persons' histories (at most 1000)."""
        request = profile_pb2.ListHistoriesRequest(
            shop_id=shop_id, as_of=timestamp(as_of), person_ids=person_ids,
            engagement_days=engagement_days,
        )  # fmt: skip
        return await self._stub.ListHistories(request, timeout=PAGE_TIMEOUT_SECONDS)

    async def put_signals(
        self, shop_id: str, scored: Sequence[Scored], model_fitted_at: datetime | None
    ) -> int:
        """Hands persons' signals to the profile, with when the model that scored them was
        fitted; returns the change feed entries made."""
        request = profile_pb2.PutSignalsRequest(
            shop_id=shop_id, model_fitted_at=timestamp(model_fitted_at)
        )
        for s in scored:
            item = request.signals.add(person_id=s.person_id, engagement_score=s.engagement)
            _predictions(s, item.predictions)
        answer = await self._stub.PutSignals(request, timeout=PAGE_TIMEOUT_SECONDS)
        return answer.changes

    async def activity(self, after: int, limit: int) -> list[profile_pb2.Activity]:
        """Persons whose facts changed after the cursor, across every shop."""
        answer = await self._stub.ListActivity(
            profile_pb2.ListActivityRequest(after_sequence=after, limit=limit)
        )
        return list(answer.activity)


def _predictions(s: Scored, into: profile_pb2.Predictions) -> None:
    """Sets the Predictions message of profile.proto to a person's signals."""
    into.lifecycle_stage = s.lifecycle_stage
    if s.rfm:
        into.rfm.r, into.rfm.f, into.rfm.m = s.rfm
    if s.churn_risk is not None:
        into.churn_risk = s.churn_risk
    if s.p_order_30d is not None:
        into.p_order_30d = s.p_order_30d
    if s.p_order_90d is not None:
        into.p_order_90d = s.p_order_90d
    into.historical_ltv = s.historical_ltv
    into.predicted_ltv_90d = s.predicted_ltv_90d
    if s.next_order_at:
        into.predicted_next_order_at.FromDatetime(s.next_order_at)
    into.next_order_overdue = s.next_order_overdue
    into.products_due.extend(s.products_due)


class IdentityPeer:
    """Identity, over a channel carrying the service token."""

    def __init__(self, stub: "identity_pb2_grpc.IdentityAsyncStub") -> None:
        self._stub = stub

    async def lookup(self, shop_id: str, type_: str, value: str) -> str:
        """The person holding an identifier (NOT_FOUND passes on to the caller)."""
        found = await peer_answer(
            self._stub.Lookup(
                identity_pb2.LookupRequest(
                    shop_id=shop_id, identifier=common_pb2.Identifier(type=type_, value=value)
                )
            )
        )
        return str(found.person_id)
