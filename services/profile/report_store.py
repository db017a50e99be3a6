"""Shop-level figures for reports, counted in the database: customers by lifecycle stage, the
RFM grid and what the profiles cover (email, orders, consent), from one grouped scan of the
shop's summaries and enrichment's signals, so that every figure of a shop is of one moment."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.profile.segments import CHANNELS, STAGES
from services.profile.store import SignalRow, SummaryDueRow, SummaryRow

UNSCORED = "unscored"
S, G = SummaryRow, SignalRow


@dataclass
class ShopFigures:
    """One shop's customers, counted every way a report shows them."""

    shop_id: str
    customers: int = 0
    lifecycle: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*STAGES, UNSCORED), 0))
    rfm: dict[tuple[int, int], int] = field(default_factory=dict)
    with_email: int = 0
    with_order: int = 0
    opted_in: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    reachable: int = 0
    unsubscribed: int = 0
    loyalty_members: int = 0
    refreshing: int = 0

    @property
    def rfm_unscored(self) -> int:
        return self.customers - sum(self.rfm.values())


def _count_if(condition: ColumnElement[bool]) -> Any:
    return func.sum(case((condition, 1), else_=0))


class ReportStore:
    """Reads shop-level figures."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def figures(self, shops: Sequence[str] | None) -> list[ShopFigures]:
        """The figures of these shops (each one listed, with no customers too), or with None
        of every shop with customers or profiles being refreshed; by shop id."""
        opted_in = [getattr(S, f"consent_{channel}").is_(True) for channel in CHANNELS]
        grouped = (
            select(
                S.shop_id,
                G.lifecycle_stage,
                G.rfm_r,
                G.rfm_f,
                func.count(),
                _count_if(S.email != ""),
                _count_if(S.order_count > 0),
                _count_if(or_(*opted_in)),
                _count_if(S.unsubscribed.is_(True)),
                _count_if(S.loyalty_member.is_(True)),
                *(_count_if(condition) for condition in opted_in),
            )
            .select_from(S)
            .outerjoin(G, (G.shop_id == S.shop_id) & (G.person_id == S.person_id))
            .group_by(S.shop_id, G.lifecycle_stage, G.rfm_r, G.rfm_f)
        )
        due = select(SummaryDueRow.shop_id, func.count()).group_by(SummaryDueRow.shop_id)
        if shops is not None:
            grouped = grouped.where(S.shop_id.in_(shops))
            due = due.where(SummaryDueRow.shop_id.in_(shops))
        found = {shop: ShopFigures(shop) for shop in shops or ()}
        async with self._sessions() as session:
            for (
                shop,
                stage,
                r,
                f,
                n,
                email,
                ordered,
                reachable,
                unsubscribed,
                members,
                *by,
            ) in await session.execute(grouped):
                figures = found.setdefault(shop, ShopFigures(shop))
                figures.customers += n
                figures.lifecycle[stage if stage in STAGES else UNSCORED] += n
                if r is not None and f is not None:
                    figures.rfm[(r, f)] = figures.rfm.get((r, f), 0) + n
                figures.with_email += email
                figures.with_order += ordered
                figures.reachable += reachable
                figures.unsubscribed += unsubscribed
                figures.loyalty_members += members
                for channel, count in zip(CHANNELS, by, strict=True):
                    figures.opted_in[channel] += count
            for shop, n in await session.execute(due):
                found.setdefault(shop, ShopFigures(shop)).refreshing = n
        return [found[shop] for shop in sorted(found)]
