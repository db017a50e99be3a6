"""`c360 demo`: loads a generated shop (cli/demo_shop.py) into a running mesh through the public
RPCs, waits for the profiles to settle and runs enrichment, so that every report, segment,
duplicate and gate answer has something to show. Every write is idempotent by its id, so
loading the same shop again changes nothing."""

import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time
from typing import Any

import click
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from c360.common.v1 import common_pb2
from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.demo_shop import CONSENT_TEXT, DemoShop, Shopper, generate
from cli.enrich import run_shop
from cli.mesh import Mesh, run
from cli.shop_report import model_report

IN_FLIGHT = 8
# An UNAVAILABLE answer (a dependency busy or restarting) is retried: every write is idempotent.
RETRIES = 8
RECORDS_PER_UPLOAD = 200
SETTLE_SECONDS = 600.0
POLL_SECONDS = 0.5
SOURCES = {
    "online": profile_pb2.ORDER_SOURCE_ONLINE,
    "pos": profile_pb2.ORDER_SOURCE_POS,
    "marketplace": profile_pb2.ORDER_SOURCE_MARKETPLACE,
}
KINDS = {
    "visit": profile_pb2.EVENT_KIND_VISIT,
    "open": profile_pb2.EVENT_KIND_OPEN,
    "click": profile_pb2.EVENT_KIND_CLICK,
    "reply": profile_pb2.EVENT_KIND_REPLY,
}
CHANNELS = {
    "": common_pb2.CHANNEL_UNSPECIFIED,
    "email": common_pb2.CHANNEL_EMAIL,
    "sms": common_pb2.CHANNEL_SMS,
    "whatsapp": common_pb2.CHANNEL_WHATSAPP,
    "push": common_pb2.CHANNEL_PUSH,
}
# The demo shop's loyalty programme: a point per euro, three tiers, points kept a year.
PROGRAMME = profile_pb2.LoyaltyProgramme(
    points_per_currency_unit="1",
    expiry_days=365,
    tiers=[
        profile_pb2.LoyaltyTier(name="Bean", threshold=0, benefits=["Birthday coffee"]),
        profile_pb2.LoyaltyTier(name="Roast", threshold=300, benefits=["Free shipping"]),
        profile_pb2.LoyaltyTier(
            name="Reserve", threshold=1000, benefits=["Free shipping", "Early access"]
        ),
    ],
)
# A week of campaigns goes out today, so the caps are lifted; fatigue still blocks at 0.70.
GATE_POLICY = gate_pb2.PutShopPolicyRequest(
    global_daily_cap=10,
    channel_caps=[gate_pb2.ChannelCap(channel=common_pb2.CHANNEL_EMAIL, daily_cap=10)],
    time_zone="Europe/Amsterdam",
)


def _stamp(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def _ids(pairs: tuple[tuple[str, str], ...]) -> list[common_pb2.Identifier]:
    return [common_pb2.Identifier(type=t, value=v) for t, v in pairs]


def _ref(shopper: Shopper) -> common_pb2.PersonRef:
    """The shopper, by the identifier their first record carried."""
    kind, value = shopper.key
    return common_pb2.PersonRef(identifier=common_pb2.Identifier(type=kind, value=value))


class Loader:
    """Writes a demo shop through the profile and the gate; counts what was new."""

    def __init__(self, mesh: Mesh, profile: Any, gate: Any, shop_id: str) -> None:
        self._mesh = mesh
        self._profile = profile
        self._gate = gate
        self.shop_id = shop_id
        self.written: Counter[str] = Counter()
        self.repeated: Counter[str] = Counter()

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        """One call with the token, again after UNAVAILABLE (RETRIES times at most, with
        backoff): every write of the demo is idempotent."""
        for attempt in range(RETRIES):
            try:
                return await method(request, metadata=self._mesh.metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    async def _ingest(self, what: str, method: str, request: Any) -> str:
        """One ingestion call; counts it as written, or as already there when it changed
        nothing. Returns the person it is about."""
        answer = await self._call(getattr(self._profile, method), request)
        (self.written if answer.applied else self.repeated)[what] += 1
        return str(answer.person_id)

    async def setup(self) -> None:
        """The shop's loyalty programme (before any order, so that every order earns) and its
        gate policy."""
        programme = profile_pb2.LoyaltyProgramme()
        programme.CopyFrom(PROGRAMME)
        programme.shop_id = self.shop_id
        await self._call(self._profile.PutLoyaltyProgramme, programme)
        policy = gate_pb2.PutShopPolicyRequest()
        policy.CopyFrom(GATE_POLICY)
        policy.shop_id = self.shop_id
        await self._call(self._gate.PutShopPolicy, policy)

    async def shopper(self, shopper: Shopper) -> str:
        """Everything a shopper did, in the order it happened; returns their person id."""
        shop_id, persons = self.shop_id, []
        for order in shopper.orders:
            items = [
                profile_pb2.LineItem(
                    product_id=i.product_id, title=i.title, category=i.category,
                    quantity=i.quantity, price=i.price,
                )
                for i in order.items
            ]  # fmt: skip
            order_request = profile_pb2.IngestOrderRequest(
                shop_id=shop_id, order_id=order.order_id, identifiers=_ids(order.identifiers),
                placed_at=_stamp(order.placed_at), total=order.total, currency="EUR",
                source=SOURCES[order.source], location=order.location, cancelled=order.cancelled,
                line_items=items,
            )  # fmt: skip
            persons.append(await self._ingest("orders", "IngestOrder", order_request))
        for refund in shopper.refunds:
            refund_request = profile_pb2.IngestRefundRequest(
                shop_id=shop_id, refund_id=refund.refund_id, order_id=refund.order_id,
                amount=refund.amount, refunded_at=_stamp(refund.refunded_at),
                is_return=refund.is_return,
            )  # fmt: skip
            await self._ingest("refunds", "IngestRefund", refund_request)
        for event in shopper.events:
            event_request = profile_pb2.IngestEventRequest(
                shop_id=shop_id, event_id=event.event_id, identifiers=_ids(event.identifiers),
                kind=KINDS[event.kind], channel=CHANNELS[event.channel], at=_stamp(event.at),
            )  # fmt: skip
            persons.append(await self._ingest("events", "IngestEvent", event_request))
        for consent in shopper.consents:
            consent_request = profile_pb2.SetConsentRequest(
                shop_id=shop_id, person=_ref(shopper), channel=CHANNELS[consent.channel],
                granted=consent.granted, consent_text=CONSENT_TEXT[consent.channel],
                source=consent.source, at=_stamp(consent.at),
            )  # fmt: skip
            await self._ingest("consents", "SetConsent", consent_request)
        if shopper.unsubscribed_at is not None:
            unsubscribe = profile_pb2.UnsubscribeRequest(
                shop_id=shop_id, person=_ref(shopper), source="email_footer",
                at=_stamp(shopper.unsubscribed_at),
            )  # fmt: skip
            await self._ingest("unsubscribes", "Unsubscribe", unsubscribe)
        return persons[0]

    async def records(self, shoppers: list[Shopper]) -> None:
        """The shoppers' CRM records (names, email, phone), in Custobar's upload format, unless
        the last of them is in already (an upload is applied again however often it comes,
        so it is sent once)."""
        named = [s for s in shoppers if s.record is not None]
        if not named or await self._has_name(named[-1]):
            self.repeated["customer records"] += len(named)
            return
        records = [s.record for s in named if s.record is not None]
        for start in range(0, len(records), RECORDS_PER_UPLOAD):
            upload = profile_pb2.UpsertCustomersRequest(shop_id=self.shop_id)
            for record in records[start : start + RECORDS_PER_UPLOAD]:
                upload.customers.add().update(record)
            answer = await self._call(self._profile.UpsertCustomers, upload)
            if answer.errors:
                raise click.ClickException(f"a CRM record was refused: {answer.errors[0]}")
            self.written["customer records"] += answer.accepted

    async def _has_name(self, shopper: Shopper) -> bool:
        found = await self._call(
            self._profile.Get, profile_pb2.GetRequest(shop_id=self.shop_id, person=_ref(shopper))
        )
        return bool(found.name.first_name)

    async def campaigns(self, persons: dict[int, str], shoppers: list[Shopper]) -> None:
        """This week's marketing emails, checked at the gate: one batch per round, so that a
        shopper's messages are decided in order and the one past fatigue 0.70 is blocked. A
        round the gate has decided already is not sent again (an allowed message would only be
        replayed, but a blocked one would be decided, and logged, once more)."""
        rounds = max((s.emails_this_week for s in shoppers), default=0)
        for n in range(rounds):
            items = [
                gate_pb2.BatchItem(person_id=persons[s.index], message_id=f"M-{s.index}-{n}")
                for s in shoppers
                if n < s.emails_this_week
            ]
            if await self._decided(items[0]):
                self.repeated["messages"] += len(items)
                continue
            answer = await self._call(
                self._gate.CheckBatch,
                gate_pb2.CheckBatchRequest(
                    shop_id=self.shop_id, channel=common_pb2.CHANNEL_EMAIL, items=items
                ),
            )
            for result in answer.results:
                if result.replayed:  # decided before, and allowed: counted once
                    self.repeated["messages"] += 1
                elif result.allowed:
                    self.written["messages allowed"] += 1
                else:
                    self.written[f"messages blocked ({result.reason.split(':')[0]})"] += 1

    async def _decided(self, item: gate_pb2.BatchItem) -> bool:
        """Whether the gate's log holds a decision on the message."""
        history = await self._call(
            self._gate.GetContactHistory,
            gate_pb2.GetContactHistoryRequest(
                shop_id=self.shop_id, person_id=item.person_id, include_log=True, log_limit=50
            ),
        )
        return any(line.message_id == item.message_id for line in history.log)

    async def settled(self, progress: Callable[[Any], None]) -> Any:
        """The shop's report once no profile is waiting to be refreshed (every write before
        asked for its refresh in its own transaction), polling; a ClickException after
        SETTLE_SECONDS."""
        deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
        while True:
            answer = await self._call(
                self._profile.GetShopReports,
                profile_pb2.GetShopReportsRequest(shops=[self.shop_id]),
            )
            [report] = answer.reports
            progress(report)
            if report.refreshing == 0:
                return report
            if asyncio.get_running_loop().time() > deadline:
                raise click.ClickException(
                    f"profiles still refreshing after {SETTLE_SECONDS:.0f} s "
                    f"({report.refreshing} waiting); run `c360 demo` again to carry on"
                )
            await asyncio.sleep(POLL_SECONDS)


async def loaded_day(profile: Any, mesh: Mesh, shop_id: str, plan: DemoShop) -> date | None:
    """The day the shop was first loaded as: read from when its first customer first ordered
    (None when the shop holds no such customer)."""
    first = plan.shoppers[0]
    try:
        found = await profile.Get(
            profile_pb2.GetRequest(shop_id=shop_id, person=_ref(first)), metadata=mesh.metadata
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    if not found.purchases.HasField("first_order_at"):
        return None
    before = datetime.combine(plan.today, time(0), tzinfo=UTC) - first.orders[0].placed_at
    day = found.purchases.first_order_at.ToDatetime(UTC) + before
    return day.date() if day.time() == time(0) else None


async def has_model(mesh: Mesh, shop_id: str) -> bool:
    async with mesh.channel("enrichment") as channel:
        return (
            await model_report(enrichment_pb2_grpc.EnrichmentStub(channel), mesh, shop_id)
            is not None
        )


async def load(
    mesh: Mesh, shop_id: str, customers: int, seed: int, today: date | None, enrich: bool
) -> tuple[DemoShop, Loader, Any]:
    """Generates the shop and loads it; returns the plan, what was written and the report."""
    async with mesh.channel("profile") as to_profile, mesh.channel("gate") as to_gate:
        profile = profile_pb2_grpc.ProfileStub(to_profile)
        plan = generate(seed, customers, today or datetime.now(UTC).date())
        if today is None:
            earlier = await loaded_day(profile, mesh, shop_id, plan)
            if earlier is not None and earlier != plan.today:
                plan = generate(seed, customers, earlier)
        loader = Loader(mesh, profile, gate_pb2_grpc.GateStub(to_gate), shop_id)
        await loader.setup()
        shoppers = [s for s in plan.shoppers if s.duplicate_of is None]
        persons: dict[int, str] = {}
        limit = asyncio.Semaphore(IN_FLIGHT)
        with click.progressbar(
            length=len(plan.shoppers), label=f"loading {shop_id}", file=sys.stderr
        ) as bar:

            async def one(shopper: Shopper) -> None:
                async with limit:
                    persons[shopper.index] = await loader.shopper(shopper)
                bar.update(1)

            await asyncio.gather(*(one(s) for s in shoppers))
            # Duplicates after the shoppers they duplicate: each raises a merge candidate.
            await asyncio.gather(*(one(s) for s in plan.duplicates))
        await loader.records(shoppers)
        await loader.campaigns(persons, shoppers)
        with click.progressbar(length=customers, label="building profiles", file=sys.stderr) as bar:

            def progress(report: Any) -> None:
                bar.update(min(report.customers, customers) - bar.pos)

            report = await loader.settled(progress)
    if enrich and (loader.written or not await has_model(mesh, shop_id)):
        await run_shop(mesh, enrichment_pb2.RunShopRequest(shop_id=shop_id))
    return plan, loader, report


@click.command()
@click.option("--shop", default="demo", show_default=True, help="The shop to load.")
@click.option(
    "--customers",
    type=click.IntRange(10, 100_000),
    default=2000,
    show_default=True,
    help="How many customers (persons), a few of them duplicates of others.",
)
@click.option("--seed", default=1, show_default=True, help="Another seed, another shop.")
@click.option(
    "--today",
    type=click.DateTime(["%Y-%m-%d"]),
    help="The day the shop's two years of history end (default: the day this shop was first "
    "loaded, else today).",
)
@click.option("--enrich/--no-enrich", default=True, show_default=True, help="Run enrichment after.")
@click.pass_obj
def demo(
    mesh: Mesh, shop: str, customers: int, seed: int, today: datetime | None, enrich: bool
) -> None:
    """Load a realistic generated shop into a running mesh: customers buying online, in store
    and on marketplaces over two years, refunds, engagement, consents, a few duplicates, this
    week's emails through the gate; then run enrichment. The same --seed and --customers give
    the same shop, and loading it again changes nothing."""
    plan, loader, report = run(
        load(mesh, shop, customers, seed, today.date() if today else None, enrich)
    )
    written = ", ".join(f"{n:,} {what}" for what, n in sorted(loader.written.items()))
    repeated = ", ".join(f"{n:,} {what}" for what, n in sorted(loader.repeated.items()))
    click.echo(f"shop {shop}: {report.customers:,} customers as of {plan.today:%Y-%m-%d}, "
               f"{len(plan.duplicates)} of them duplicates waiting for review")  # fmt: skip
    click.echo(f"written: {written or 'nothing'}")
    click.echo(f"already there, unchanged: {repeated or 'nothing'}")
    click.echo(f"next: c360 report --shop {shop} --out report; c360 duplicates list --shop {shop}")
