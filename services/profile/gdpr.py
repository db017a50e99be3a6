"""The profile's part of GDPR: erasing one person (the tombstone every read of the profile
honours, and the scrub, in one transaction) and exporting everything it holds of them."""

import re
from collections.abc import Callable, Iterator
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


def mentions(
    emails: set[str], phones: set[str], names: set[tuple[str, str]]
) -> Callable[[Any], bool]:
    """Whether a parsed JSON document names the person: one of their emails (any case) or
    phones (any formatting of the national number) in any of its strings, or one of their full
    names (the first and last name of one of their customer records, any case) as words
    anywhere in it. A first or a last name alone is not searched for: other people's deliveries
    share them, and an erasure must not destroy those."""
    addresses = {e.lower() for e in emails}
    digits = {_national(p) for p in phones} - {""}
    full_names = [
        set(f"{first} {last}".lower().split())
        for first, last in names
        if len(first) >= MIN_NAME and len(last) >= MIN_NAME
    ]

    def found(document: Any) -> bool:
        words: set[str] = set()
        for value in _strings(document):
            text = value.strip().lower()
            split = text.split()
            if text in addresses or any(w in addresses for w in split):
                return True
            number = re.sub(r"\D", "", text)
            if number and any(number.endswith(d) for d in digits):
                return True
            words.update(split)
        return any(name <= words for name in full_names)

    return found


def _strings(value: Any) -> Iterator[str]:
    """Every string a parsed JSON document holds."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


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
