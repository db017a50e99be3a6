"""The Enrichment service over gRPC: requests to runs, reports and configuration, and back."""

from collections.abc import AsyncIterator
from typing import Any

from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from services.enrichment.enrichment import Enrichment
from services.enrichment.signals import Model, ShopConfig
from services.runtime.validation import (
    Violations,
    bounded,
    person_ref,
    shop,
    time_field,
    timestamp,
)

# The largest value of each window; engaged_days is bounded by the events the profile serves.
LIMITS = {
    "at_risk_days": 3650, "churned_days": 3650, "engaged_days": 365, "engaged_min_events": 1000,
    "horizon_days": 3650,
}  # fmt: skip


def _config(request: Any, violations: Violations) -> ShopConfig:
    defaults = ShopConfig()
    values = {
        name: bounded(getattr(request, name), name, getattr(defaults, name), limit, violations)
        for name, limit in LIMITS.items()
    }
    bands = tuple(request.recency_bands) or defaults.recency_bands
    if len(bands) != 4 or any(b <= 0 for b in bands) or list(bands) != sorted(set(bands)):
        violations.add("recency_bands", "four ascending positive day limits (or none)")
        bands = defaults.recency_bands
    if values["churned_days"] <= values["at_risk_days"]:
        violations.add("churned_days", "must be more than at_risk_days")
    return ShopConfig(recency_bands=(bands[0], bands[1], bands[2], bands[3]), **values)


def _config_message(shop_id: str, config: ShopConfig) -> enrichment_pb2.ShopConfig:
    return enrichment_pb2.ShopConfig(
        shop_id=shop_id,
        at_risk_days=config.at_risk_days,
        churned_days=config.churned_days,
        engaged_days=config.engaged_days,
        engaged_min_events=config.engaged_min_events,
        horizon_days=config.horizon_days,
        recency_bands=config.recency_bands,
    )


def _report(shop_id: str, model: Model) -> enrichment_pb2.ModelReport:
    answer = enrichment_pb2.ModelReport(
        shop_id=shop_id,
        fitted_at=timestamp(model.fitted_at),
        as_of=timestamp(model.as_of),
        customers=model.customers,
        repeat_customers=model.repeat_customers,
        ltv_model=model.ltv_model,
        fit_seconds=model.fit_seconds,
    )
    if model.bgnbd:
        b = model.bgnbd
        answer.bgnbd.CopyFrom(
            enrichment_pb2.BgNbd(
                r=b.r, alpha=b.alpha, a=b.a, b=b.b, log_likelihood=b.log_likelihood
            )
        )
    if model.gamma_gamma:
        g = model.gamma_gamma
        answer.gamma_gamma.CopyFrom(enrichment_pb2.GammaGamma(p=g.p, q=g.q, gamma=g.gamma))
    if model.report:
        r = model.report
        answer.calibration.CopyFrom(
            enrichment_pb2.Calibration(
                method=r.method,
                horizon_days=r.horizon_days,
                brier_score=r.brier_score,
                baseline_brier_score=r.baseline_brier_score,
                expected_calibration_error=r.expected_calibration_error,
                reliability=[
                    enrichment_pb2.ReliabilityBin(
                        mean_predicted=b.mean_predicted,
                        observed_rate=b.observed_rate,
                        count=b.count,
                    )
                    for b in r.reliability
                ],
                samples=r.samples,
            )
        )
    return answer


class EnrichmentServicer(enrichment_pb2_grpc.EnrichmentServicer):
    """The Enrichment service over the enrichment work."""

    def __init__(self, enrichment: Enrichment) -> None:
        self._enrichment = enrichment

    async def RunShop(
        self, request: Any, context: Any
    ) -> AsyncIterator[enrichment_pb2.RunProgress]:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        as_of = time_field(request, "as_of", violations, required=False)
        violations.raise_any()
        async for progress in self._enrichment.run_shop(shop_id, as_of):
            yield enrichment_pb2.RunProgress(
                phase=progress.phase,
                done=progress.done,
                total=progress.total,
                resumed=progress.resumed,
            )

    async def Recompute(self, request: Any, context: Any) -> enrichment_pb2.RecomputeResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = person_ref(request, "person", violations)
        violations.raise_any()
        scored, changes = await self._enrichment.recompute(shop_id, ref)
        answer = enrichment_pb2.RecomputeResponse(
            person_id=scored.person_id, lifecycle_stage=scored.lifecycle_stage, changes=changes
        )
        if scored.churn_risk is not None:
            answer.churn_risk = scored.churn_risk
        return answer

    async def GetModelReport(self, request: Any, context: Any) -> enrichment_pb2.ModelReport:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        return _report(shop_id, await self._enrichment.report(shop_id))

    async def PutShopConfig(self, request: Any, context: Any) -> enrichment_pb2.ShopConfig:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        config = _config(request, violations)
        violations.raise_any()
        await self._enrichment.put_config(shop_id, config)
        return _config_message(shop_id, config)

    async def GetShopConfig(self, request: Any, context: Any) -> enrichment_pb2.ShopConfig:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        return _config_message(shop_id, await self._enrichment.config(shop_id))
