"""The Gdpr gRPC service over the erasure jobs and data-subject requests."""

from datetime import timedelta
from typing import Any

from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from services.gdpr.gdpr import Gdpr
from services.gdpr.store import JobRow, StepRow
from services.runtime.auth import current_principal
from services.runtime.errors import NotFound
from services.runtime.validation import (
    Violations,
    bounded,
    cursor,
    person_ref,
    plain,
    shop,
    text,
    timestamp,
)

STATES = {
    "pending": gdpr_pb2.ERASURE_STATE_PENDING,
    "running": gdpr_pb2.ERASURE_STATE_RUNNING,
    "done": gdpr_pb2.ERASURE_STATE_DONE,
}
TOPICS = frozenset({"customers/redact", "customers/data_request", "shop/redact"})
MAX_BODY = 1 << 20
MAX_RETENTION_DAYS = 36500


def _actor(requested_by: str) -> str:
    """Who acts: who the request names, else the caller's token."""
    return requested_by or current_principal.get().name


def _erasure(job: JobRow, steps: list[StepRow]) -> gdpr_pb2.Erasure:
    return gdpr_pb2.Erasure(
        job_id=job.job_id, shop_id=job.shop_id, person_id=job.person_id,
        state=STATES[job.state],
        steps=[
            gdpr_pb2.ErasureStep(
                service=s.service, done=s.done, attempts=s.attempts, last_error=s.last_error,
                removed=s.removed,
            )
            for s in steps
        ],
        requested_at=timestamp(job.requested_at), completed_at=timestamp(job.completed_at),
        not_before=timestamp(job.not_before),
    )  # fmt: skip


class GdprServicer(gdpr_pb2_grpc.GdprServicer):
    """The Gdpr service."""

    def __init__(self, gdpr: Gdpr, retention_days: int) -> None:
        self._gdpr = gdpr
        self._retention_days = retention_days

    async def Erase(self, request: Any, context: Any) -> gdpr_pb2.EraseResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = person_ref(request, "person", violations)
        reason = text(request.reason, "reason", violations, required=False)
        actor = text(request.requested_by, "requested_by", violations, required=False)
        violations.raise_any()
        job_id, person_id = await self._gdpr.erase(shop_id, ref, [], reason, _actor(actor))
        return gdpr_pb2.EraseResponse(job_id=job_id, person_id=person_id)

    async def GetErasure(self, request: Any, context: Any) -> gdpr_pb2.Erasure:
        violations = Violations()
        if not request.job_id or len(request.job_id) > 32 or not request.job_id.isalnum():
            violations.add("job_id", "a job id as Erase or RedactShop returned it")
        violations.raise_any()
        job, steps = await self._gdpr.job(request.job_id)
        if not current_principal.get().may_access(job.shop_id):
            raise NotFound("erasure", request.job_id)  # another shop's job: as if absent
        return _erasure(job, steps)

    async def PreviewErase(self, request: Any, context: Any) -> gdpr_pb2.PreviewEraseResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = person_ref(request, "person", violations)
        violations.raise_any()
        rows = await self._gdpr.preview(shop_id, ref, _actor(""))
        return gdpr_pb2.PreviewEraseResponse(
            counts=[gdpr_pb2.TableCount(service=s, table=t, rows=n) for s, t, n in rows]
        )

    async def Export(self, request: Any, context: Any) -> gdpr_pb2.ExportResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        ref = person_ref(request, "person", violations)
        violations.raise_any()
        answer = gdpr_pb2.ExportResponse()
        answer.data.update(plain(await self._gdpr.export(shop_id, ref, _actor(""))))
        return answer

    async def Inventory(self, request: Any, context: Any) -> gdpr_pb2.InventoryResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if not 0 <= request.retention_days <= MAX_RETENTION_DAYS:
            violations.add("retention_days", f"0 (the default) to {MAX_RETENTION_DAYS} days")
        violations.raise_any()
        days = request.retention_days or self._retention_days
        found = await self._gdpr.inventory(shop_id, timedelta(days=days), _actor(""))
        persons = found.persons
        oldest = persons.oldest_record_at if persons.HasField("oldest_record_at") else None
        return gdpr_pb2.InventoryResponse(
            customers=persons.persons, with_email=persons.with_email,
            with_phone=persons.with_phone,
            oldest_record_at=oldest,
            past_retention=persons.past_retention, erasures_done=found.erasures_done,
            retained_since=timestamp(found.retained_since),
        )  # fmt: skip

    async def RedactShop(self, request: Any, context: Any) -> gdpr_pb2.RedactShopResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        job_id, when = await self._gdpr.redact_shop(
            shop_id, request.immediately, _actor(""), "requested"
        )
        return gdpr_pb2.RedactShopResponse(job_id=job_id, scheduled_for=timestamp(when))

    async def HandleShopifyRequest(
        self, request: Any, context: Any
    ) -> gdpr_pb2.ShopifyRequestResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        if request.topic not in TOPICS:
            violations.add("topic", f"one of {', '.join(sorted(TOPICS))}")
        text(request.webhook_id, "webhook_id", violations)
        if len(request.body) > MAX_BODY:
            violations.add("body", f"at most {MAX_BODY} bytes")
        violations.raise_any()
        job_id, person_id = await self._gdpr.shopify_request(
            shop_id, request.topic, request.webhook_id, request.body
        )
        return gdpr_pb2.ShopifyRequestResponse(job_id=job_id, person_id=person_id)

    async def ListAudit(self, request: Any, context: Any) -> gdpr_pb2.ListAuditResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        size = bounded(request.page_size, "page_size", 100, 1000, violations)
        before = cursor(request.page_token, "page_token", violations)
        violations.raise_any()
        rows = await self._gdpr.audit(shop_id, before, size)
        return gdpr_pb2.ListAuditResponse(
            entries=[
                gdpr_pb2.AuditEntry(
                    action=r.action, actor=r.actor, at=timestamp(r.at), person_id=r.person_id,
                    job_id=r.job_id, reason=r.reason, counts=r.counts,
                )
                for r in rows
            ],
            next_page_token=str(rows[-1].id) if len(rows) == size else "",
        )  # fmt: skip
