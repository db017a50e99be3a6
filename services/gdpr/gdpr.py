"""Data-subject requests across the mesh: durable erasure jobs (each service scrubs its own data
through its own Erase, in order: the gate blocks first, then the profile tombstones and scrubs,
then identity forgets), previews, exports, shop redaction and Shopify's GDPR webhooks."""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from c360.common.v1 import common_pb2, common_pb2_grpc
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.gdpr.store import (
    Audit,
    AuditRow,
    GdprStore,
    JobRow,
    RequestRow,
    StepRow,
    counts_of,
)
from services.runtime.channels import peer_answer
from services.runtime.errors import InvalidArgument, NotFound, PeerRejected
from services.runtime.settings import ServiceName
from services.runtime.validation import PersonRef, json_value, timestamp
from services.runtime.worker import Worker

log = logging.getLogger(__name__)

PERSON_STEPS = ("gate", "profile", "identity")
"""The gate first, so that marketing is blocked before anything else changes; the profile's
step is the tombstone every read honours; identity last, since the profile finds the person's
facts through their identifiers."""
SHOP_STEPS: tuple[ServiceName, ...] = ("gate", "profile", "identity", "enrichment")
DUE_BATCH = 20


@dataclass(frozen=True)
class Inventory:
    """A shop's data inventory: identity's counts of persons, and the erasures done."""

    persons: identity_pb2.InventoryResponse
    erasures_done: int
    retained_since: datetime


@dataclass(frozen=True)
class Peers:
    """The services a job reaches, over channels carrying the service token."""

    identity: "identity_pb2_grpc.IdentityAsyncStub"
    profile: "profile_pb2_grpc.ProfileAsyncStub"
    gate: "gate_pb2_grpc.GateAsyncStub"
    shop_data: dict[str, "common_pb2_grpc.ShopDataAsyncStub"]

    @classmethod
    def over(cls, channels: dict[str, grpc.aio.Channel]) -> "Peers":
        return cls(
            identity_pb2_grpc.IdentityStub(channels["identity"]),
            profile_pb2_grpc.ProfileStub(channels["profile"]),
            gate_pb2_grpc.GateStub(channels["gate"]),
            {name: common_pb2_grpc.ShopDataStub(channels[name]) for name in SHOP_STEPS},
        )


class Gdpr:
    """Runs erasure jobs and answers data-subject requests."""

    def __init__(
        self,
        store: GdprStore,
        peers: Peers,
        clock: Callable[[], datetime],
        interval: float,
        grace: timedelta,
    ) -> None:
        self._store = store
        self._peers = peers
        self._clock = clock
        self._grace = grace
        self._running: dict[str, asyncio.Lock] = {}
        self._worker = Worker("erasures", self.run_due, interval)

    # --- persons ------------------------------------------------------------------------------

    async def person_of(self, shop_id: str, ref: PersonRef) -> str:
        """The person a reference names. NOT_FOUND passes on, before anything is written, when
        identity answers that it knows no such person; while identity cannot answer, a person
        id is taken as given (an erasure is accepted and waits for it)."""
        if not ref.identifier:
            with contextlib.suppress(grpc.aio.AioRpcError):  # unreachable, not a refusal
                await peer_answer(
                    self._peers.identity.GetPerson(
                        identity_pb2.GetPersonRequest(shop_id=shop_id, person_id=ref.person_id)
                    )
                )
            return ref.person_id
        kind, value = ref.identifier
        try:
            found = await peer_answer(
                self._peers.identity.Lookup(
                    identity_pb2.LookupRequest(
                        shop_id=shop_id, identifier=common_pb2.Identifier(type=kind, value=value)
                    )
                )
            )
        except PeerRejected as rejected:
            raise rejected.under(ref.field) from None
        return str(found.person_id)

    async def erase(
        self, shop_id: str, ref: PersonRef, order_ids: list[str], reason: str, actor: str
    ) -> tuple[str, str]:
        """Starts a durable erasure and makes its first attempt at once; returns the job and
        the person. A step that fails is retried by the worker until the job is done."""
        person_id = await self.person_of(shop_id, ref)
        now = self._clock()
        job_id = await self._store.create_job(
            shop_id, person_id, order_ids, PERSON_STEPS, now, now,
            Audit(shop_id, "erase", actor, person_id, reason=reason),
        )  # fmt: skip
        await self.run_job(job_id)
        return job_id, person_id

    async def preview(self, shop_id: str, ref: PersonRef, actor: str) -> list[tuple[str, str, int]]:
        """Per service and table, the rows an erasure would touch now: each service's erasure
        rehearsed (run and rolled back)."""
        person_id = await self.person_of(shop_id, ref)
        job = JobRow(shop_id=shop_id, person_id=person_id, order_ids=[])
        counts = await asyncio.gather(*(self._step(job, s, True) for s in PERSON_STEPS))
        rows = [
            (s, table, n)
            for s, c in zip(PERSON_STEPS, counts, strict=True)
            for table, n in c.items()
        ]
        await self._store.audit(
            Audit(shop_id, "preview", actor, person_id,
                  counts={f"{s}.{t}": n for s, t, n in rows}),
            self._clock(),
        )  # fmt: skip
        return rows

    async def export(self, shop_id: str, ref: PersonRef, actor: str) -> dict[str, Any]:
        """Everything held about the person, in the shape of Shopify's customers/data_request
        (`customer`, `orders_requested`) with every record beside it."""
        person_id = await self.person_of(shop_id, ref)
        person, held, history = await asyncio.gather(
            peer_answer(
                self._peers.identity.GetPerson(
                    identity_pb2.GetPersonRequest(shop_id=shop_id, person_id=person_id)
                )
            ),
            peer_answer(
                self._peers.profile.ExportPerson(
                    profile_pb2.ExportPersonRequest(shop_id=shop_id, person_id=person_id)
                )
            ),
            peer_answer(
                self._peers.gate.GetContactHistory(
                    gate_pb2.GetContactHistoryRequest(
                        shop_id=shop_id, person_id=person_id, include_log=True
                    )
                )
            ),
        )
        data = MessageToDict(held.data)
        identifiers = [
            {"type": i.type, "value": i.normalized_value or i.raw_value} for i in person.identifiers
        ]

        def first(kind: str) -> str:
            return next((i["value"] for i in identifiers if i["type"] == kind), "")

        orders = data.get("orders", [])
        document = {
            "shop_id": shop_id,
            "customer": {
                "id": first("shopify_customer_id"), "email": first("email"),
                "phone": first("phone"), "person_id": person_id,
            },
            "orders_requested": [o["order_id"] for o in orders],
            "identifiers": identifiers,
            **data,
            "messages": [
                MessageToDict(line, preserving_proto_field_name=True) for line in history.log
            ],
            "attribution": _attribution(orders),
        }  # fmt: skip
        await self._store.audit(
            Audit(shop_id, "export", actor, person_id,
                  counts={k: len(v) for k, v in document.items() if isinstance(v, list)}),
            self._clock(),
        )  # fmt: skip
        return document

    async def inventory(self, shop_id: str, retention: timedelta, actor: str) -> Inventory:
        """The shop's data in counts: customers with an email or phone, the oldest record,
        those past retention, the erasures done."""
        since = self._clock() - retention
        persons, erasures = await asyncio.gather(
            peer_answer(
                self._peers.identity.Inventory(
                    identity_pb2.InventoryRequest(shop_id=shop_id, seen_before=timestamp(since))
                )
            ),
            self._store.erasures_done(shop_id),
        )
        found = Inventory(persons, erasures, since)
        await self._store.audit(
            Audit(shop_id, "inventory", actor,
                  counts={"customers": persons.persons, "past_retention": persons.past_retention}),
            self._clock(),
        )  # fmt: skip
        return found

    # --- shops --------------------------------------------------------------------------------

    async def redact_shop(
        self, shop_id: str, immediately: bool, actor: str, reason: str
    ) -> tuple[str, datetime]:
        """Schedules the removal of all of a shop's data in every service after the grace
        period (or now); returns the job and when it runs."""
        now = self._clock()
        when = now if immediately else now + self._grace
        job_id = await self._store.create_job(
            shop_id, "", [], SHOP_STEPS, now, when,
            Audit(shop_id, "redact_shop", actor, reason=reason),
        )  # fmt: skip
        if immediately:
            await self.run_job(job_id)
        return job_id, when

    # --- Shopify ------------------------------------------------------------------------------

    async def shopify_request(
        self, shop_id: str, topic: str, webhook_id: str, body: bytes
    ) -> tuple[str, str]:
        """Acts on a Shopify GDPR webhook once per webhook id; returns the job and person."""
        done = await self._store.request(shop_id, webhook_id)
        if done is not None:
            return done.job_id, done.person_id
        try:
            payload = json_value(body)
        except ValueError as bad:
            raise InvalidArgument([("body", "is not JSON")]) from bad
        if not isinstance(payload, dict):
            raise InvalidArgument([("body", "is not a JSON object")])
        job_id = person_id = ""
        reason = f"shopify {topic}"
        if topic == "shop/redact":
            job_id, _ = await self.redact_shop(shop_id, False, "shopify", reason)
        elif topic in ("customers/redact", "customers/data_request"):
            person_id = await self._customer(shop_id, payload.get("customer") or {})
            if person_id and topic == "customers/redact":
                orders = [str(o) for o in payload.get("orders_to_redact") or []]
                job_id, _ = await self.erase(
                    shop_id, PersonRef(person_id=person_id), orders, reason, "shopify"
                )
            elif person_id:
                request = (payload.get("data_request") or {}).get("id", "")
                await self._store.audit(
                    Audit(shop_id, "data_request", "shopify", person_id,
                          reason=f"{reason} {request}".strip()),
                    self._clock(),
                )  # fmt: skip
        else:
            raise InvalidArgument([("topic", f"{topic!r} is not a GDPR topic")])
        recorded = await self._store.put_request(
            RequestRow(
                shop_id=shop_id, webhook_id=webhook_id, topic=topic, job_id=job_id,
                person_id=person_id, received_at=self._clock(),
            )
        )  # fmt: skip
        return recorded.job_id, recorded.person_id

    async def _customer(self, shop_id: str, customer: dict[str, Any]) -> str:
        """The person a Shopify customer object names: by customer id, else email, else phone
        ("" when none is known)."""
        for kind, key in (("shopify_customer_id", "id"), ("email", "email"), ("phone", "phone")):
            value = customer.get(key)
            if value in (None, ""):
                continue
            try:
                return await self.person_of(shop_id, PersonRef(identifier=(kind, str(value))))
            except (PeerRejected, InvalidArgument) as rejected:
                if rejected.code not in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise
        return ""

    # --- jobs ---------------------------------------------------------------------------------

    async def job(self, job_id: str) -> tuple[JobRow, list[StepRow]]:
        found = await self._store.job(job_id)
        if found is None:
            raise NotFound("erasure", job_id)
        return found

    async def run_job(self, job_id: str) -> bool:
        """Runs a job's remaining steps in order, stopping at the first that fails (the worker
        tries again); returns whether the job is done."""
        lock = self._running.setdefault(job_id, asyncio.Lock())
        async with lock:
            job, steps = await self.job(job_id)
            if job.state == "done":
                return True
            for step in steps:
                if step.done:
                    continue
                try:
                    removed = await self._erase_step(job, step.service)
                except Exception as exc:
                    error = as_text(exc)
                    log.warning(
                        "erasure step failed",
                        extra={"job_id": job_id, "service": step.service, "error": error},
                    )
                    await self._store.step_failed(job_id, step.position, error)
                    return False
                await self._store.step_done(job_id, step.position, removed)
            _, finished = await self.job(job_id)
            totals = {f"{s.service}.{t}": n for s in finished for t, n in s.removed.items()}
            action = "erase_done" if job.person_id else "redact_shop_done"
            await self._store.finish(
                job_id, self._clock(),
                Audit(job.shop_id, action, "gdpr", job.person_id, job_id, counts=totals),
            )  # fmt: skip
        self._running.pop(job_id, None)
        return True

    async def _erase_step(self, job: JobRow, service: str) -> dict[str, int]:
        """One service's part of a job, done; a service that knows no such person holds nothing
        of them (else a job for a person no service holds would retry its steps forever)."""
        try:
            return await self._step(job, service, False)
        except PeerRejected as rejected:
            if rejected.code != grpc.StatusCode.NOT_FOUND:
                raise
            return {}

    async def _step(self, job: JobRow, service: str, dry_run: bool) -> dict[str, int]:
        """One service's part of a job: its rows and keys removed (or, rehearsed, counted)."""
        shop_id, person_id = job.shop_id, job.person_id
        if not person_id:
            answer: Any = await peer_answer(
                self._peers.shop_data[service].RedactShop(
                    common_pb2.RedactShopDataRequest(shop_id=shop_id, dry_run=dry_run)
                )
            )
        elif service == "gate":
            answer = await peer_answer(
                self._peers.gate.Erase(
                    gate_pb2.EraseRequest(shop_id=shop_id, person_id=person_id, dry_run=dry_run)
                )
            )
        elif service == "profile":
            answer = await peer_answer(
                self._peers.profile.Erase(
                    profile_pb2.EraseRequest(
                        shop_id=shop_id, person_id=person_id, order_ids=job.order_ids,
                        dry_run=dry_run,
                    )
                )
            )  # fmt: skip
        else:
            answer = await peer_answer(
                self._peers.identity.Forget(
                    identity_pb2.ForgetRequest(
                        shop_id=shop_id, person_id=person_id, dry_run=dry_run
                    )
                )
            )
        return counts_of(answer.removed)

    async def audit(self, shop_id: str, before: int, limit: int) -> list[AuditRow]:
        """The shop's GDPR actions, newest first."""
        return await self._store.audit_page(shop_id, before, limit)

    async def run_due(self) -> int:
        """Runs every unfinished job whose time has come; returns how many finished."""
        finished = 0
        for job_id in await self._store.due(self._clock(), DUE_BATCH):
            finished += await self.run_job(job_id)
        return finished

    def start(self) -> None:
        self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()


def as_text(exc: BaseException) -> str:
    """What went wrong, without a peer's details (they could quote personal data)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}"
    if isinstance(exc, PeerRejected):
        return f"{exc.code.name}"
    return type(exc).__name__


def _attribution(orders: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the person's orders came from: the first order's source and the count by source."""
    by_source: dict[str, int] = {}
    for order in orders:
        by_source[order.get("source", "")] = by_source.get(order.get("source", ""), 0) + 1
    first = orders[0] if orders else {}
    return {
        "acquisition_source": first.get("source", ""),
        "first_order_at": first.get("placed_at", ""),
        "orders_by_source": by_source,
    }
