"""Loyalty (seeds 001, 003): a shop's programme, and a member's standing from the ledger.

Each order that arrived under a programme has its terms fixed (rate, expiry). Its points are its
total net of its refunds and returns times the rate, rounded down: a clawback is always against
the original order, never more than it earned, and replaying an order or a refund changes
nothing. Points expire with their order; the tier follows lifetime points (net of clawbacks,
expired points included).
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal


@dataclass(frozen=True)
class Tier:
    name: str
    threshold: int
    benefits: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Programme:
    """Tiers lowest threshold first, points per currency unit, expiry in days (0 = never)."""

    tiers: list[Tier]
    points_per_unit: Decimal
    expiry_days: int


@dataclass(frozen=True)
class Earning:
    """One order's place in the ledger."""

    total: Decimal
    refunded: Decimal
    rate: Decimal
    earned_at: datetime
    expires_at: datetime | None

    @property
    def points(self) -> int:
        net = max(self.total - min(self.refunded, self.total), Decimal(0))
        return math.floor(net * self.rate)


@dataclass(frozen=True)
class Standing:
    """A person's loyalty as the profile and the exports show it."""

    member: bool = False
    tier: str = ""
    points_balance: int = 0
    points_to_next_tier: int = 0
    next_tier: str = ""
    benefits: list[str] = field(default_factory=list)
    points_expiring: int = 0
    points_expiration_date: date | None = None
    member_since: datetime | None = None
    lifetime_points: int = 0


def tier_of(programme: Programme, lifetime: int) -> tuple[Tier | None, Tier | None]:
    """The tier reached with these lifetime points, and the next one (None past the top)."""
    reached = [t for t in programme.tiers if t.threshold <= lifetime]
    above = [t for t in programme.tiers if t.threshold > lifetime]
    return (reached[-1] if reached else None), (above[0] if above else None)


def standing(programme: Programme | None, earnings: Iterable[Earning], now: datetime) -> Standing:
    """A person's standing now, from the ledger entries of their orders."""
    entries: Sequence[Earning] = list(earnings)
    if programme is None or not entries:
        return Standing()
    lifetime = sum(e.points for e in entries)
    live = [e for e in entries if e.expires_at is None or e.expires_at > now]
    expiring = [e for e in live if e.expires_at is not None and e.points > 0]
    next_date = min((e.expires_at.date() for e in expiring if e.expires_at), default=None)
    tier, above = tier_of(programme, lifetime)
    return Standing(
        member=True,
        tier=tier.name if tier else "",
        points_balance=sum(e.points for e in live),
        points_to_next_tier=above.threshold - lifetime if above else 0,
        next_tier=above.name if above else "",
        benefits=list(tier.benefits) if tier else [],
        points_expiring=sum(
            e.points for e in expiring if e.expires_at and e.expires_at.date() == next_date
        ),
        points_expiration_date=next_date,
        member_since=min(e.earned_at for e in entries),
        lifetime_points=lifetime,
    )
