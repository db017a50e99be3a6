"""When identifiers seen together may join one person, and why not when they may not (spec §3).

A record reaches parties: the persons holding some of its identifiers, and the record's own new
identifiers. They join into one person only when nothing conflicts; a conflict keeps them apart
and becomes a merge candidate with its reason.
"""

from dataclasses import dataclass, field

from services.identity.identifiers import CAPS, SINGLE_VALUED, Normalized


@dataclass
class Party:
    """A person reached by a record (`person_id` set), or the record's new identifiers (None).
    `held` is every identifier the party holds, by type; `links` the record's identifiers that
    reach it, strongest first."""

    person_id: str | None
    held: dict[str, set[str]]
    links: list[Normalized] = field(default_factory=list)

    @property
    def known(self) -> bool:
        """Whether it holds more than web sessions: an anonymous visitor is not a known person."""
        return any(keys for type_, keys in self.held.items() if type_ != "cookie")

    @property
    def emails(self) -> set[str]:
        return self.held.get("email", set())

    def absorb(self, other: "Party") -> None:
        """Takes the other party's identifiers (after a link or a merge)."""
        for type_, keys in other.held.items():
            self.held.setdefault(type_, set()).update(keys)


def conflict(group: "Party", other: "Party", asserted: bool, not_same_person: bool) -> str | None:
    """Why `other` may not join `group`, or None when it may. `asserted` when the record is only
    asserted (typed into a form); `not_same_person` when someone decided the two persons are
    different people."""
    if not_same_person:
        return "not_same_person"
    for type_ in sorted(SINGLE_VALUED):
        if len(group.held.get(type_, set()) | other.held.get(type_, set())) > 1:
            return f"two_{type_}s"
    for type_, cap in CAPS.items():
        if len(group.held.get(type_, set()) | other.held.get(type_, set())) > cap:
            return f"type_cap_exceeded:{type_}"
    two_persons = group.person_id is not None and other.person_id is not None
    if two_persons and group.known and other.known:
        if asserted:
            return "asserted_link"
        if all(link.type == "cookie" for link in other.links):
            return "cookie_bridge"
    linked_by = {link.type for link in other.links} - {"cookie"}
    if (
        linked_by == {"phone"}
        and group.emails
        and other.emails
        and group.emails.isdisjoint(other.emails)
    ):
        return "phone_only_link"
    return None
