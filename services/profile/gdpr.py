"""The profile's part of GDPR: erasing one person (the tombstone every read of the profile
honours, and the scrub, in one transaction) and exporting everything it holds of them."""

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import phonenumbers

from services.profile import segments
from services.profile.audience_store import AudienceStore
from services.profile.gdpr_store import GdprStore, Subject
from services.profile.peers import Group, IdentityPeer
from services.profile.profiles import hidden

MIN_NAME = 2
"""Shorter names (an initial) are not searched for in deliveries: they would match anything."""


def mentions(emails: set[str], phones: set[str], names: set[str]) -> Callable[[Any], bool]:
    """Whether a parsed JSON document names the person anywhere: one of their emails (any
    case), phones (any formatting of the national number) or names (any case)."""
    words = {e.lower() for e in emails} | {n.lower() for n in names if len(n) >= MIN_NAME}
    digits = {_national(p) for p in phones} - {""}

    def found(value: Any) -> bool:
        if isinstance(value, dict):
            return any(found(v) for v in value.values())
        if isinstance(value, list):
            return any(found(v) for v in value)
        if not isinstance(value, str):
            return False
        text = value.strip().lower()
        if text in words or any(w in text.split() for w in words):
            return True
        number = re.sub(r"\D", "", text)
        return bool(number) and any(number.endswith(d) for d in digits)

    return found


def _national(phone: str) -> str:
    try:
        return str(phonenumbers.parse(phone).national_number)
    except phonenumbers.NumberParseException:
        return ""


class PersonData:
    """Erasure and export of one person's profile data."""

    def __init__(
        self,
        store: GdprStore,
        audiences: AudienceStore,
        identity: IdentityPeer,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._audiences = audiences
        self._identity = identity
        self._clock = clock

    async def _subject(self, shop_id: str, person_id: str) -> Subject:
        group = await self._identity.group(shop_id, person_id)
        emails = {v for t, v, _ in group.identifiers if t == "email"}
        phones = {v for t, v, _ in group.identifiers if t == "phone"}
        names = set(await self._store.names(shop_id, group.anchors))
        return Subject(
            shop_id, group.person_id, group.members, group.anchors,
            mentions(emails, phones, names), lambda key: hidden(shop_id, key),
        )  # fmt: skip

    async def erase(
        self, shop_id: str, person_id: str, order_ids: list[str], dry_run: bool
    ) -> dict[str, int]:
        """Tombstones and scrubs the person (their whole group); returns the rows touched."""
        subject = await self._subject(shop_id, person_id)
        return await self._store.erase(subject, order_ids, self._clock(), dry_run)

    async def export(self, shop_id: str, person_id: str) -> dict[str, Any]:
        """Everything the profile holds of the person, with the segments they are in now."""
        group: Group = await self._identity.group(shop_id, person_id)
        data: dict[str, Any] = await self._store.export(shop_id, group.anchors)
        now = self._clock()
        data["segments"] = [
            row.name
            for row in await self._audiences.segments(shop_id)
            if await self._audiences.count(
                segments.members(row.filter, shop_id, now).where(
                    segments.S.person_id == group.person_id
                )
            )
        ]
        return data
