"""The profile's HTTP endpoints: Shopify webhooks (`POST /webhooks/shopify`) with the inbox
behind them, and the Custobar-format customer upload (`POST /api/customers/upload/`).

A delivery is verified (HMAC of the raw body with the app secret, or the previous one during a
rotation), stored durably, and only then answered 200, well within Shopify's 5 seconds. A
background task processes the inbox: orders, refunds and customers become profile records; the
GDPR topics are recorded for the gdpr service. A delivery that keeps failing (or can never
succeed, like a malformed payload) is kept as a dead letter, listable and replayable; nothing is
dropped. Deliveries are idempotent by webhook id, and records by their own ids and versions.
"""

import contextlib
import json
import logging
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from aiohttp import web
from sqlalchemy.exc import DataError

from c360.common.v1 import common_pb2
from services.profile import shopify
from services.profile.peers import GdprPeer
from services.profile.profiles import Profiles
from services.profile.store import Inbox, WebhookRow
from services.runtime.auth import TokenRegistry
from services.runtime.errors import DEPENDENCY_ERRORS, as_c360_error
from services.runtime.validation import SHOP_ID, UnreadableJson, json_value
from services.runtime.worker import Worker

log = logging.getLogger(__name__)

PATH = "/webhooks/shopify"
UPLOAD_PATH = "/api/customers/upload/"
MAX_UPLOAD = 10_000
MAX_BODY = 5 * 1024 * 1024
BATCH = 100
# Failures no retry can cure: the delivery goes straight to the dead letters.
PERMANENT = (
    shopify.PayloadError, json.JSONDecodeError, UnicodeDecodeError, UnreadableJson, DataError,
)  # fmt: skip


class Webhooks:
    """Accepts Shopify deliveries into the inbox and processes it in the background."""

    def __init__(
        self,
        inbox: Inbox,
        profiles: Profiles,
        gdpr: GdprPeer,
        secrets: Sequence[str],
        shops: dict[str, str],
        clock: Callable[[], datetime],
        tokens: TokenRegistry,
        max_attempts: int = 12,
        interval: float = 0.5,
    ) -> None:
        self._tokens = tokens
        self._inbox = inbox
        self._profiles = profiles
        self._gdpr = gdpr
        self._secrets = list(secrets)
        self._shops = shops
        self._clock = clock
        self._max_attempts = max_attempts
        self._processor = Worker("webhook-inbox", self.process_due, interval)
        self._runner: web.AppRunner | None = None

    # --- the endpoint ---------------------------------------------------------------------------

    async def receive(self, request: web.Request) -> web.Response:
        """Verifies, stores and answers one delivery."""
        body = await request.read()
        if not self._secrets:
            log.error("webhook refused: SHOPIFY_API_SECRET is not set")
            return web.json_response({"error": "webhook secret not configured"}, status=503)
        if not shopify.verified(self._secrets, body, request.headers.get("X-Shopify-Hmac-Sha256")):
            return web.json_response({"error": "invalid or missing HMAC"}, status=401)
        topic = request.headers.get("X-Shopify-Topic", "")
        domain = request.headers.get("X-Shopify-Shop-Domain", "")
        webhook_id = request.headers.get("X-Shopify-Webhook-Id", "")
        missing = [
            name
            for name, value in (
                ("X-Shopify-Topic", topic),
                ("X-Shopify-Shop-Domain", domain),
                ("X-Shopify-Webhook-Id", webhook_id),
            )
            if not value
        ]
        if missing:
            return web.json_response({"error": f"missing {', '.join(missing)}"}, status=400)
        if self._shops and domain not in self._shops:
            # With a map configured, only the shops in it may deliver: the domain header is not
            # covered by the signature.
            return web.json_response({"error": "unknown shop domain"}, status=401)
        shop_id = self._shops.get(domain, domain)
        if not SHOP_ID.fullmatch(shop_id) or len(webhook_id) > 128:
            return web.json_response({"error": "unusable shop domain or webhook id"}, status=400)
        if topic not in shopify.TOPICS:
            return web.json_response({"accepted": False, "ignored_topic": topic})
        now = self._clock()
        try:
            new = await self._inbox.accept(
                {
                    "shop_id": shop_id,
                    "webhook_id": webhook_id,
                    "topic": topic,
                    "body": body,
                    "triggered_at": _triggered_at(request.headers.get("X-Shopify-Triggered-At")),
                    "received_at": now,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                }
            )
        except DEPENDENCY_ERRORS:
            log.warning("webhook not stored: the database is unavailable")
            return web.json_response({"error": "unavailable; retry"}, status=503)
        self._processor.wake()
        return web.json_response({"accepted": True, "duplicate": not new})

    async def upload(self, request: web.Request) -> web.Response:
        """A Custobar-format upload, `{"customers": [...]}`, for the shop in `?shop_id=`, with a
        bearer token holding the write role for it."""
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        principal = self._tokens.principal(token) if token else None
        if principal is None:
            return web.json_response({"error": "a valid bearer token is required"}, status=401)
        shop_id = request.query.get("shop_id", "")
        if not SHOP_ID.fullmatch(shop_id):
            return web.json_response({"error": "shop_id (query) is required"}, status=400)
        if not principal.may_access(shop_id) or not principal.has_role(common_pb2.ROLE_WRITE):
            return web.json_response({"error": "no write access to this shop"}, status=403)
        try:
            body = json_value(await request.read())
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        records = body.get("customers") if isinstance(body, dict) else None
        if not isinstance(records, list):
            return web.json_response({"error": 'expected {"customers": [...]}'}, status=400)
        if len(records) > MAX_UPLOAD:
            return web.json_response(
                {"error": f"at most {MAX_UPLOAD} customers an upload"}, status=413
            )
        try:
            accepted, errors = await self._profiles.upsert_customers(shop_id, records)
        except Exception as exc:
            if as_c360_error(exc) is None:
                log.error("customer upload failed", exc_info=exc)
            return web.json_response({"error": "unavailable; retry"}, status=503)
        return web.json_response(
            {
                "accepted": accepted,
                "errors": [
                    {"index": i, "field": field, "description": why} for i, field, why in errors
                ],
            }
        )

    # --- the inbox ------------------------------------------------------------------------------

    async def process_due(self) -> int:
        """Processes every delivery that is due; returns how many succeeded."""
        done = 0
        for row in await self._inbox.due(self._clock(), BATCH):
            done += await self._attempt(row)
        return done

    async def _attempt(self, row: WebhookRow) -> bool:
        now = self._clock()
        try:
            await self._apply(row)
        except Exception as exc:
            attempts = row.attempts + 1
            error = as_c360_error(exc)
            permanent = isinstance(exc, PERMANENT) or (
                error is not None and error.code.name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")
            )
            dead = permanent or attempts >= self._max_attempts
            if error is None and not isinstance(exc, (*PERMANENT, *DEPENDENCY_ERRORS)):
                log.error("webhook processing failed", exc_info=exc)
            await self._inbox.settle(
                row.id,
                {
                    "state": "dead" if dead else "pending",
                    "attempts": attempts,
                    "next_attempt_at": now + timedelta(seconds=min(300, 2**attempts)),
                    "error": f"{type(exc).__name__}: {exc}"[:1000],
                    "first_failed_at": row.first_failed_at or now,
                },
            )
            return False
        # Processed: the body (personal data) is kept no longer than it is needed.
        await self._inbox.settle(row.id, {"state": "done", "error": None, "body": b""})
        return True

    async def _apply(self, row: WebhookRow) -> None:
        """Turns a delivery into profile records, or hands a GDPR request to the gdpr service."""
        payload = json_value(row.body)  # integers stay exact
        if not isinstance(payload, dict):
            raise shopify.PayloadError("the body is not a JSON object")
        if row.topic in shopify.ORDER_TOPICS:
            await self._profiles.ingest_order(
                shopify.order(row.shop_id, payload), skip_invalid=True
            )
        elif row.topic in shopify.REFUND_TOPICS:
            refund_id, order_id, amount, at = shopify.refund(payload, row.received_at)
            await self._profiles.ingest_refund(row.shop_id, refund_id, order_id, amount, at, False)
        elif row.topic in shopify.CUSTOMER_TOPICS:
            await self._profiles.ingest_customer(shopify.customer(row.shop_id, payload))
        else:
            await self._gdpr.hand_over(row.shop_id, row.topic, row.webhook_id, row.body)

    async def dead_letters(self, shop_id: str, after_id: int, limit: int) -> list[WebhookRow]:
        return await self._inbox.dead(shop_id, after_id, limit)

    async def replay(self, shop_id: str, ids: Sequence[int]) -> tuple[int, int]:
        """Processes dead letters again now; returns (replayed, failed again)."""
        replayed = failed = 0
        for row_id in await self._inbox.revive(shop_id, ids, self._clock()):
            row = await self._inbox.get(row_id)
            if row is None:
                continue
            if await self._attempt(row):
                replayed += 1
            else:
                failed += 1
        return replayed, failed

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Serves the endpoint on host:port (0 = any free port) and starts processing; returns
        the port."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(PATH, self.receive)
        app.router.add_post(UPLOAD_PATH, self.upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listener = _listener(host, port)
        await web.SockSite(self._runner, listener).start()
        self._processor.start()
        bound: int = listener.getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stops taking deliveries, then finishes the inbox batch in hand."""
        if self._runner is not None:
            await self._runner.cleanup()
        await self._processor.stop()


def _triggered_at(value: str | None) -> datetime | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value)
    return None


def _listener(host: str, port: int) -> socket.socket:
    """A listening socket on the service's host as gRPC spells it ("[::]" for every address,
    IPv4 too where the system allows)."""
    address = host.strip("[]")
    if ":" not in address:
        return socket.create_server((address, port))
    dual = address == "::" and socket.has_dualstack_ipv6()
    return socket.create_server((address, port), family=socket.AF_INET6, dualstack_ipv6=dual)
