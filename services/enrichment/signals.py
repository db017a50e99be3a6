"""The signals of a shop's persons, computed together from their histories: lifecycle stage,
RFM, calibrated churn risk, LTV, next order, products due and engagement (docs/enrichment.md)."""

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.enrichment import calibration, ltv

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]
DAY = 86400

MIN_RANKED = 20
"""Buyers a shop needs before F and M are ranked (below it RFM is null)."""
MIN_CUSTOMERS = 200
"""Buyers a shop needs before BG/NBD and Gamma-Gamma are fitted..."""
MIN_REPEAT = 50
"""...and repeat buyers (with a positive repeat order value); below either, the heuristic."""
RANK_POINTS = 1001
"""Quantiles kept of a ranked metric when a shop has more buyers than this."""
LTV_DAYS = 90
ENGAGEMENT_DAYS = 90
ENGAGEMENT_HALF_LIFE_DAYS = 14.0
ENGAGEMENT_SATURATION = 2.0
ENGAGEMENT_WEIGHTS = {"click": 1.0, "reply": 1.0, "open": 0.5, "visit": 0.5, "dismiss": 0.2}
DUE_AHEAD_DAYS = 7
"""A product is due when its next purchase day, at its own average gap, is at most this far off."""


@dataclass(frozen=True)
class ShopConfig:
    """A shop's windows (days). Lifecycle: at risk after `at_risk_days` without an order,
    churned after `churned_days`; engaged with `engaged_min_events` events in the last
    `engaged_days`. R bands: R = 5 within recency_bands[0] days of the last order, 4 within
    [1], 3 within [2], 2 within [3], else 1. Churn: no order in the next `horizon_days`."""

    at_risk_days: int = 30
    churned_days: int = 90
    engaged_days: int = 30
    engaged_min_events: int = 2
    horizon_days: int = 90
    recency_bands: tuple[int, int, int, int] = (30, 60, 90, 180)


def engagement_days(config: ShopConfig) -> int:
    """How many days of events scoring needs: the engagement score's and the engaged window."""
    return max(ENGAGEMENT_DAYS, config.engaged_days)


@dataclass
class Histories:
    """A shop's persons with their histories, columnar (profile.proto HistoryPage)."""

    person_ids: list[str]
    order_days: Ints
    order_day: Ints
    order_count: Ints
    order_value: Floats
    last_order_at: Ints
    events: Ints
    event_at: Ints
    event_kind: list[str]
    repeat_products: Ints
    product: list[str]
    product_days: Ints
    product_first_day: Ints
    product_last_day: Ints

    @property
    def size(self) -> int:
        return len(self.person_ids)


@dataclass(frozen=True)
class Purchases:
    """Per person, purchase days up to a day: count, first and last, spend, orders, and the
    BG/NBD and Gamma-Gamma summaries."""

    days: Floats
    first: Floats
    last: Floats
    spend: Floats
    orders: Floats
    first_value: Floats
    through: int

    @property
    def buyer(self) -> NDArray[np.bool_]:
        return self.days > 0

    @property
    def x(self) -> Floats:
        return np.maximum(self.days - 1, 0)

    @property
    def t_x(self) -> Floats:
        return np.where(self.buyer, self.last - self.first, 0.0)

    @property
    def big_t(self) -> Floats:
        return np.where(self.buyer, self.through - self.first, 0.0)

    @property
    def repeat_value(self) -> Floats:
        """Mean value of the repeat purchase days (0 without repeats)."""
        x = self.x
        return np.where(x > 0, (self.spend - self.first_value) / np.maximum(x, 1), 0.0)

    @property
    def aov(self) -> Floats:
        return np.where(self.orders > 0, self.spend / np.maximum(self.orders, 1), 0.0)


def purchases(h: Histories, through: int) -> Purchases:
    """Each person's purchases on days up to `through` (a prefix of their ascending days)."""
    kept = h.order_day <= through
    owner = np.repeat(np.arange(h.size), h.order_days)[kept]
    n = h.size
    days = np.bincount(owner, minlength=n).astype(float)
    start = np.concatenate([[0], np.cumsum(h.order_days)[:-1]]).astype(np.int64)
    has = days > 0
    first_index = np.where(has, start, 0)
    last_index = np.where(has, start + days.astype(np.int64) - 1, 0)
    day, value = h.order_day, h.order_value
    pick = len(day) > 0
    return Purchases(
        days=days,
        first=np.where(has, day[first_index], 0.0) if pick else np.zeros(n),
        last=np.where(has, day[last_index], 0.0) if pick else np.zeros(n),
        spend=np.bincount(owner, weights=value[kept], minlength=n).astype(float),
        orders=np.bincount(owner, weights=h.order_count[kept], minlength=n).astype(float),
        first_value=np.where(has, value[first_index], 0.0) if pick else np.zeros(n),
        through=through,
    )


@dataclass(frozen=True)
class Ranking:
    """The sorted values of a metric over a shop's buyers (or RANK_POINTS quantiles of them):
    the share of buyers strictly below a value is its percent rank, so ties share the lower."""

    points: tuple[float, ...]

    @classmethod
    def of(cls, values: Floats) -> "Ranking":
        ordered = np.sort(values)
        if len(ordered) > RANK_POINTS:
            ordered = np.quantile(ordered, np.linspace(0, 1, RANK_POINTS), method="lower")
        return cls(tuple(float(v) for v in ordered))

    def below(self, values: Floats) -> Floats:
        """The share of buyers with a strictly lower value (0 to just under 1)."""
        points = np.asarray(self.points)
        return np.searchsorted(points, values, side="left") / max(len(points), 1)


def quintile(share_below: Floats) -> Ints:
    """1 to 5 by share of buyers below: 5 when at least 80% are below (the top 20%)."""
    return np.asarray(np.minimum(1 + np.floor(share_below * 5 + 1e-9), 5), dtype=np.int64)


def seed_score(p: Purchases, frequency: Ranking, spend: Ranking, config: ShopConfig) -> Floats:
    """The seed's churn score of buyers: 60% recency (days since the last order over the
    churned window, capped at 1), 25% frequency and 15% spend, each as the share of the shop's
    buyers ranking above."""
    recency = np.minimum((p.through - p.last) / config.churned_days, 1.0)
    rarely = 1 - frequency.below(p.orders)
    little = 1 - spend.below(p.spend)
    return 0.6 * recency + 0.25 * rarely + 0.15 * little


@dataclass(frozen=True)
class Model:
    """What a run fits for a shop and what scoring a person needs besides their history."""

    as_of: datetime
    config: ShopConfig
    frequency: Ranking
    aov: Ranking
    spend: Ranking
    calibrator: calibration.Calibrator
    report: calibration.Report | None
    ltv_model: str
    bgnbd: ltv.BgNbd | None
    gamma_gamma: ltv.GammaGamma | None
    customers: int
    repeat_customers: int
    fitted_at: datetime
    fit_seconds: float = 0.0

    @property
    def version(self) -> datetime | None:
        """What the profile orders signals by: when the model was fitted (None: not fitted)."""
        return self.fitted_at if self.customers else None


def fit(h: Histories, as_of: datetime, config: ShopConfig, now: datetime) -> Model:
    """Fits a shop on its histories up to as_of: the rankings, the churn calibration (back-tested
    at as_of minus the horizon) and the LTV models."""
    started = time.perf_counter()
    through = _day(as_of)
    p = purchases(h, through)
    buyer = p.buyer
    frequency, aov, spend = (Ranking.of(v[buyer]) for v in (p.orders, p.aov, p.spend))
    x, t_x, big_t, value = p.x[buyer], p.t_x[buyer], p.big_t[buyer], p.repeat_value[buyer]
    positive = (x > 0) & (value > 0)
    bgnbd = gamma_gamma = None
    if buyer.sum() >= MIN_CUSTOMERS and positive.sum() >= MIN_REPEAT:
        bgnbd = ltv.fit_bgnbd(x, t_x, big_t)
        gamma_gamma = ltv.fit_gamma_gamma(x[positive], value[positive])
    back = purchases(h, through - config.horizon_days)
    labelled = back.buyer
    back_frequency, back_spend = Ranking.of(back.orders[labelled]), Ranking.of(back.spend[labelled])
    score = seed_score(back, back_frequency, back_spend, config)[labelled]
    churned = (p.days[labelled] == back.days[labelled]).astype(float)
    calibrator, report = calibration.evaluate(score, churned, config.horizon_days)
    return Model(
        as_of=as_of,
        config=config,
        frequency=frequency,
        aov=aov,
        spend=spend,
        calibrator=calibrator,
        report=report if len(score) else None,
        ltv_model="fitted" if bgnbd else "heuristic",
        bgnbd=bgnbd,
        gamma_gamma=gamma_gamma,
        customers=int(buyer.sum()),
        repeat_customers=int((x > 0).sum()),
        fitted_at=now,
        fit_seconds=time.perf_counter() - started,
    )


def dump(model: Model) -> dict[str, Any]:
    """A model as JSON-ready data (instants as ISO 8601)."""
    data = asdict(model)
    data["as_of"] = model.as_of.isoformat()
    data["fitted_at"] = model.fitted_at.isoformat()
    return data


def load(data: dict[str, Any]) -> Model:
    """The model `dump` wrote."""
    report = data["report"]
    return Model(
        as_of=datetime.fromisoformat(data["as_of"]),
        config=config_of(data["config"]),
        frequency=Ranking(tuple(data["frequency"]["points"])),
        aov=Ranking(tuple(data["aov"]["points"])),
        spend=Ranking(tuple(data["spend"]["points"])),
        calibrator=calibration.Calibrator(
            data["calibrator"]["method"],
            tuple(data["calibrator"]["knots_x"]),
            tuple(data["calibrator"]["knots_y"]),
        ),
        report=calibration.Report(
            **{**report, "reliability": tuple(calibration.Bin(**b) for b in report["reliability"])}
        )
        if report
        else None,
        ltv_model=data["ltv_model"],
        bgnbd=ltv.BgNbd(**data["bgnbd"]) if data["bgnbd"] else None,
        gamma_gamma=ltv.GammaGamma(**data["gamma_gamma"]) if data["gamma_gamma"] else None,
        customers=data["customers"],
        repeat_customers=data["repeat_customers"],
        fitted_at=datetime.fromisoformat(data["fitted_at"]),
        fit_seconds=data["fit_seconds"],
    )


def config_of(data: dict[str, Any]) -> ShopConfig:
    """A shop's windows from stored data (missing keys: the defaults)."""
    known = {k: v for k, v in data.items() if k in ShopConfig.__dataclass_fields__}
    if "recency_bands" in known:
        known["recency_bands"] = tuple(known["recency_bands"])
    return ShopConfig(**known)


def bare(config: ShopConfig, now: datetime) -> Model:
    """The model of a shop not fitted yet: lifecycle, engagement, history-based next order and
    products due only (no RFM, churn risk or predictions)."""
    empty = Ranking(())
    return Model(
        now, config, empty, empty, empty, calibration.Calibrator("uncalibrated"), None,
        "none", None, None, 0, 0, now,
    )  # fmt: skip


def _day(instant: datetime) -> int:
    return int(instant.timestamp() // DAY)


@dataclass
class Scored:
    """A person's signals, ready for Profile.PutSignals; `stage_changes_at` is when time alone
    will move their lifecycle stage (None: only a new fact can)."""

    person_id: str
    lifecycle_stage: str
    stage_changes_at: datetime | None
    rfm: tuple[int, int, int] | None
    churn_risk: float | None
    engagement: float
    historical_ltv: str = ""
    predicted_ltv_90d: str = ""
    next_order_at: datetime | None = None
    next_order_overdue: bool = False
    p_order_30d: float | None = None
    p_order_90d: float | None = None
    products_due: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Scores:
    """A shop's persons' signals as columns (NaN: none), made into each person's `Scored` a
    slice at a time: a run publishes them batch by batch."""

    person_ids: list[str]
    stage: NDArray[np.str_]
    stage_changes_at: Floats
    engagement: Floats
    historical_ltv: Floats
    rfm: Ints
    churn_risk: Floats
    predicted_ltv_90d: Floats
    p_order_30d: Floats
    p_order_90d: Floats
    next_order_day: Floats
    through: int
    products_due: dict[int, list[str]]

    @property
    def size(self) -> int:
        return len(self.person_ids)

    def persons(self, start: int, stop: int) -> list[Scored]:
        """The signals of persons start to stop, person by person."""
        # Python numbers, a list per column: indexing numpy arrays a person at a time is slow.
        part = slice(start, stop)
        stage, changes_at = self.stage[part].tolist(), self.stage_changes_at[part].tolist()
        engagement, spend = self.engagement[part].tolist(), self.historical_ltv[part].tolist()
        rfm, risk = [tuple(r) for r in self.rfm[part].tolist()], self.churn_risk[part].tolist()
        worth, within_30 = self.predicted_ltv_90d[part].tolist(), self.p_order_30d[part].tolist()
        within_90, next_day = self.p_order_90d[part].tolist(), self.next_order_day[part].tolist()
        scored = []
        for i, person_id in enumerate(self.person_ids[part]):
            at = changes_at[i]
            s = Scored(
                person_id, stage[i], datetime.fromtimestamp(at, UTC) if at == at else None,
                None, None, round(engagement[i], 4),
            )  # fmt: skip
            if spend[i] == spend[i]:
                s.historical_ltv = f"{spend[i]:.2f}"
            if risk[i] == risk[i]:
                if rfm[i][0]:
                    s.rfm = rfm[i]
                s.churn_risk = round(risk[i], 4)
                s.predicted_ltv_90d = f"{worth[i]:.2f}"
                s.p_order_30d = round(within_30[i], 4)
                s.p_order_90d = round(within_90[i], 4)
            if next_day[i] >= self.through:
                s.next_order_at = datetime.fromtimestamp(next_day[i] * DAY, UTC)
            elif next_day[i] == next_day[i]:
                s.next_order_overdue = True
            s.products_due = self.products_due.get(start + i, [])
            scored.append(s)
        return scored


def score(h: Histories, model: Model, now: datetime) -> list[Scored]:
    """Every person's signals at `now` (their histories read up to `now`) under the shop's model."""
    s = scores(h, model, now)
    return s.persons(0, s.size)


def scores(h: Histories, model: Model, now: datetime) -> Scores:
    """Every person's signals at `now`, as columns (see `score`)."""
    config = model.config
    through = _day(now)
    p = purchases(h, through)
    scored = p.buyer & (model.customers > 0)
    ranked = scored & (model.customers >= MIN_RANKED)
    r = 5 - np.searchsorted(np.asarray(config.recency_bands), through - p.last, side="left")
    f = quintile(model.frequency.below(p.orders))
    m = quintile(model.aov.below(p.aov))
    purchases_90, p30, p90, value = _predictions(model, p)

    def of_scored(values: Floats) -> Floats:
        return np.where(scored, values, np.nan)

    stage, changes_at = lifecycle(h, p, config, now)
    return Scores(
        person_ids=h.person_ids,
        stage=stage,
        stage_changes_at=changes_at,
        engagement=engagement_score(h, now),
        historical_ltv=np.where(p.buyer, p.spend, np.nan),
        rfm=np.where(ranked[:, None], np.column_stack([r, f, m]), 0),
        churn_risk=of_scored(model.calibrator(seed_score(p, model.frequency, model.spend, config))),
        predicted_ltv_90d=of_scored(purchases_90 * value),
        p_order_30d=of_scored(p30),
        p_order_90d=of_scored(p90),
        next_order_day=np.where(p.days >= 2, p.last + np.round(p.t_x / np.maximum(p.x, 1)), np.nan),
        through=through,
        products_due=_products_due(h, through),
    )


def _predictions(model: Model, p: Purchases) -> tuple[Floats, Floats, Floats, Floats]:
    """Expected purchase days in the next 90 days, P(an order within 30 and 90 days) and the
    expected value of a purchase day. Heuristic: each buyer's own repeat rate x / T (none in
    their first 90 days), orders as a Poisson process at that rate, valued at their own mean."""
    x, t_x, big_t = p.x, p.t_x, p.big_t
    if model.bgnbd is not None and model.gamma_gamma is not None and model.gamma_gamma.q > 1:
        value = ltv.expected_order_value(model.gamma_gamma, x, p.repeat_value)
        return (
            ltv.expected_purchases(model.bgnbd, LTV_DAYS, x, t_x, big_t),
            ltv.probability_of_order(model.bgnbd, 30, x, t_x, big_t),
            ltv.probability_of_order(model.bgnbd, 90, x, t_x, big_t),
            np.maximum(value, 0.0),
        )
    rate = np.where(big_t >= LTV_DAYS, x / np.maximum(big_t, 1), 0.0)
    value = np.where(p.days > 0, p.spend / np.maximum(p.days, 1), 0.0)
    return rate * LTV_DAYS, 1 - np.exp(-rate * 30), 1 - np.exp(-rate * 90), np.maximum(value, 0)


def lifecycle(
    h: Histories, p: Purchases, config: ShopConfig, now: datetime
) -> tuple[NDArray[np.str_], Floats]:
    """Each person's stage at `now`, and when time alone will change it (Unix seconds; NaN:
    never). Buyers: churned after
    `churned_days` without an order, at_risk after `at_risk_days`, else loyal (two or more
    orders) or converted (one). Others: engaged with `engaged_min_events` engagement events in
    the last `engaged_days`, else new."""
    instant = now.timestamp()
    quiet = (instant - h.last_order_at) / DAY
    window = instant - config.engaged_days * DAY
    owner = np.repeat(np.arange(h.size), h.events)
    recent = h.event_at > window
    counts = np.bincount(owner[recent], minlength=h.size)
    stages = np.where(
        p.orders > 0,
        np.where(
            quiet >= config.churned_days, "churned",
            np.where(quiet >= config.at_risk_days, "at_risk",
                     np.where(p.orders >= 2, "loyal", "converted")),
        ),
        np.where(counts >= config.engaged_min_events, "engaged", "new"),
    )  # fmt: skip
    # The engaged: when the event that keeps their count at the minimum leaves the window.
    kept = np.cumsum(h.events) - config.engaged_min_events
    engaged = stages == "engaged"
    kept_at = h.event_at[np.where(engaged, kept, 0)] if len(h.event_at) else np.zeros(h.size)
    at = np.select(
        [(stages == "loyal") | (stages == "converted"), stages == "at_risk", engaged],
        [h.last_order_at + config.at_risk_days * DAY, h.last_order_at + config.churned_days * DAY,
         kept_at + config.engaged_days * DAY],
        np.nan,
    )  # fmt: skip
    return stages, np.asarray(at, dtype=float)


def engagement_score(h: Histories, now: datetime) -> Floats:
    """0 to 1: 1 - exp(-sum / 2) over the events of the last 90 days, each weighted by kind
    (click and reply 1, open and visit 0.5, dismiss 0.2) and halved every 14 days of age."""
    owner = np.repeat(np.arange(h.size), h.events)
    age = (now.timestamp() - h.event_at) / DAY
    weight = np.array([ENGAGEMENT_WEIGHTS.get(k, 0.0) for k in h.event_kind])
    keep = (age >= 0) & (age < ENGAGEMENT_DAYS)
    decayed = weight * np.power(0.5, age / ENGAGEMENT_HALF_LIFE_DAYS)
    total = np.bincount(owner[keep], weights=decayed[keep], minlength=h.size)
    return 1 - np.exp(-total / ENGAGEMENT_SATURATION)


def _products_due(h: Histories, through: int) -> dict[int, list[str]]:
    """Per person, the repeat products whose next purchase (last day plus their own average gap)
    is at most DUE_AHEAD_DAYS away, soonest first."""
    owner = np.repeat(np.arange(h.size), h.repeat_products)
    gap = (h.product_last_day - h.product_first_day) / np.maximum(h.product_days - 1, 1)
    next_day = h.product_last_day + gap
    due: dict[int, list[tuple[float, str]]] = {}
    for j in np.flatnonzero(next_day <= through + DUE_AHEAD_DAYS):
        due.setdefault(int(owner[j]), []).append((float(next_day[j]), h.product[j]))
    return {i: [name for _, name in sorted(items)] for i, items in due.items()}
