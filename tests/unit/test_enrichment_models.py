"""Enrichment's models on simulated shops: parameter recovery, the likelihood against direct
numerical integration, churn calibration against what happened next, RFM ranks and lifecycle
stages under a passed-in clock."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.integrate import dblquad, quad
from scipy.stats import beta, gamma

from services.enrichment import calibration, ltv, signals
from tests.simulation import (
    SHOP_OPENED_DAY,
    bgnbd_purchases,
    gamma_gamma_values,
    histories,
    summaries,
)

END = 365.0


@pytest.mark.parametrize(
    ("r", "alpha", "a", "b"), [(0.25, 4.0, 0.8, 2.5), (0.5, 10.0, 1.2, 3.0), (1.5, 30.0, 0.5, 5.0)]
)
def test_bgnbd_recovers_the_parameters_it_was_simulated_with(
    r: float, alpha: float, a: float, b: float
) -> None:
    rng = np.random.default_rng(7)
    n = 30_000
    times = bgnbd_purchases(rng, n, r, alpha, a, b, rng.uniform(0, 180, n), END)
    fitted = ltv.fit_bgnbd(*summaries(times, END))
    for got, truth in zip(
        (fitted.r, fitted.alpha, fitted.a, fitted.b), (r, alpha, a, b), strict=True
    ):
        assert got == pytest.approx(truth, rel=0.05)


@pytest.mark.parametrize(("p", "q", "g"), [(6.0, 4.0, 15.0), (2.0, 3.0, 50.0), (4.0, 6.0, 120.0)])
def test_gamma_gamma_recovers_the_parameters_it_was_simulated_with(
    p: float, q: float, g: float
) -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 8, 50_000)
    values = gamma_gamma_values(rng, counts, p, q, g)
    fitted = ltv.fit_gamma_gamma(counts.astype(float), np.array([v.mean() for v in values]))
    for got, truth in zip((fitted.p, fitted.q, fitted.gamma), (p, q, g), strict=True):
        assert got == pytest.approx(truth, rel=0.05)


def test_the_bgnbd_log_likelihood_matches_direct_integration_over_rates_and_dropouts() -> None:
    r, alpha, a, b = 0.6, 8.0, 1.3, 2.7

    def direct(x: int, t_x: float, big_t: float) -> float:
        def integrand(p: float, lam: float) -> float:
            alive = (1 - p) ** x * lam**x * np.exp(-lam * big_t)
            dropped = p * (1 - p) ** (x - 1) * lam**x * np.exp(-lam * t_x) if x > 0 else 0.0
            return float((alive + dropped) * gamma.pdf(lam, r, scale=1 / alpha) * beta.pdf(p, a, b))

        value, _ = dblquad(integrand, 0, 2, 0, 1, epsabs=1e-13, epsrel=1e-7)
        return float(np.log(value))

    for x, t_x, big_t in [(0, 0.0, 40.0), (1, 10.0, 60.0), (4, 30.5, 90.0), (7, 80.0, 81.0)]:
        closed, _ = ltv.bgnbd_log_likelihood(
            np.array([r, alpha, a, b]), np.array([x]), np.array([t_x]), np.array([big_t])
        )
        assert closed[0] == pytest.approx(direct(x, t_x, big_t), abs=1e-5)


def test_the_gamma_gamma_log_likelihood_matches_direct_integration_over_nu() -> None:
    p, q, g = 3.0, 4.0, 60.0
    for x, mean in [(1, 25.0), (3, 18.5), (6, 40.0)]:

        def integrand(nu: float, x: int = x, mean: float = mean) -> float:
            # The mean of x Gamma(p, nu) values is Gamma(p x, nu x).
            return float(gamma.pdf(mean, p * x, scale=1 / (nu * x)) * gamma.pdf(nu, q, scale=1 / g))

        direct, _ = quad(integrand, 0, np.inf, epsabs=1e-16, epsrel=1e-10)
        closed, _ = ltv.gamma_gamma_log_likelihood(
            np.array([p, q, g]), np.array([float(x)]), np.array([mean])
        )
        assert closed[0] == pytest.approx(np.log(direct), abs=1e-6)


@pytest.mark.parametrize(("seed", "n", "r", "alpha", "a", "b"), [
    (1, 20_000, 0.5, 20.0, 0.8, 4.0),
    (2, 20_000, 1.2, 60.0, 1.5, 3.0),
])  # fmt: skip
def test_calibrated_churn_risk_matches_what_happens_next_and_beats_the_seed_score(
    seed: int, n: int, r: float, alpha: float, a: float, b: float
) -> None:
    horizon, end = 90, 720.0
    rng = np.random.default_rng(seed)
    times = bgnbd_purchases(rng, n, r, alpha, a, b, rng.uniform(0, 540, n), end + horizon)
    values = gamma_gamma_values(rng, np.array([len(t) for t in times]), 4.0, 5.0, 100.0)
    h = histories([f"p{i:06d}" for i in range(n)], times, values, end)
    as_of = datetime.fromtimestamp((SHOP_OPENED_DAY + end) * 86400, UTC)
    model = signals.fit(h, as_of, signals.ShopConfig(horizon_days=horizon), as_of)
    risk = np.array([s.churn_risk for s in signals.score(h, model, as_of)], dtype=float)
    churned = np.array([float(not ((t > end) & (t <= end + horizon)).any()) for t in times])
    p = signals.purchases(h, int(SHOP_OPENED_DAY + end))
    seed_score = signals.seed_score(p, model.frequency, model.spend, model.config)

    assert model.calibrator.method == "isotonic"
    assert model.report is not None
    assert model.report.samples > 10_000
    assert calibration.expected_calibration_error(risk, churned) <= 0.05
    assert calibration.brier(risk, churned) < calibration.brier(seed_score, churned)
    assert model.report.brier_score < model.report.baseline_brier_score


def _shop(orders: dict[str, list[tuple[float, float]]], now: datetime) -> signals.Histories:
    """Persons with (days before now, value) orders."""
    opened = now.timestamp() / 86400 - SHOP_OPENED_DAY
    ids = sorted(orders)
    times = [np.array([opened - d for d, _ in orders[i]]) for i in ids]
    values = [np.array([v for _, v in orders[i]]) for i in ids]
    return histories(ids, times, values, opened)


NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_rfm_ties_share_the_lower_score_and_tiny_shops_get_none() -> None:
    # 25 buyers: 15 with one order, 5 with two, 5 with three; spend per order all 50 except 5.
    orders = {f"c{i:02d}": [(10.0, 50.0)] for i in range(15)}
    orders |= {f"d{i:02d}": [(10.0, 50.0), (40.0, 50.0)] for i in range(5)}
    orders |= {f"e{i:02d}": [(100.0, 80.0), (150.0, 80.0), (200.0, 80.0)] for i in range(5)}
    h = _shop(orders, NOW)
    scored = {
        s.person_id: s
        for s in signals.score(h, signals.fit(h, NOW, signals.ShopConfig(), NOW), NOW)
    }
    # F: 60% have one order (nobody below: 1), 20% two (60% below: 4), top 20% three (80%: 5).
    assert scored["c00"].rfm == (5, 1, 1)
    assert scored["d00"].rfm == (5, 4, 1)
    assert scored["e00"].rfm == (2, 5, 5)  # last order 100 days ago: in the 180-day band

    tiny = _shop({f"c{i:02d}": [(10.0, 50.0)] for i in range(signals.MIN_RANKED - 1)}, NOW)
    small = signals.score(tiny, signals.fit(tiny, NOW, signals.ShopConfig(), NOW), NOW)
    assert {s.rfm for s in small} == {None}
    assert {s.churn_risk is not None for s in small} == {True}


def test_lifecycle_moves_with_the_passed_in_clock_alone() -> None:
    config = signals.ShopConfig(at_risk_days=30, churned_days=90)
    h = _shop({"once": [(1.0, 20.0)], "twice": [(1.0, 20.0), (5.0, 20.0)]}, NOW)
    model = signals.bare(config, NOW)

    def stages(at: datetime) -> dict[str, tuple[str, datetime | None]]:
        return {
            s.person_id: (s.lifecycle_stage, s.stage_changes_at)
            for s in signals.score(h, model, at)
        }

    last = NOW - timedelta(days=1)
    assert stages(NOW) == {
        "once": ("converted", last + timedelta(days=30)),
        "twice": ("loyal", last + timedelta(days=30)),
    }
    just_before = last + timedelta(days=30, seconds=-1)
    assert stages(just_before)["twice"][0] == "loyal"
    assert stages(last + timedelta(days=30))["twice"] == ("at_risk", last + timedelta(days=90))
    assert stages(last + timedelta(days=90))["once"] == ("churned", None)


def test_the_next_order_is_never_a_date_in_the_past() -> None:
    # Every 10 days, last 3 days ago: next in 7 days. Every 10 days, last 25 days ago: overdue.
    h = _shop(
        {
            "due": [(23.0, 10.0), (13.0, 10.0), (3.0, 10.0)],
            "late": [(45.0, 10.0), (35.0, 10.0), (25.0, 10.0)],
            "once": [(3.0, 10.0)],
        },
        NOW,
    )
    scored = {
        s.person_id: s for s in signals.score(h, signals.bare(signals.ShopConfig(), NOW), NOW)
    }
    today = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    assert scored["due"].next_order_at == today + timedelta(days=7)
    assert (scored["due"].next_order_overdue, scored["late"].next_order_overdue) == (False, True)
    assert scored["late"].next_order_at is None
    assert (scored["once"].next_order_at, scored["once"].next_order_overdue) == (None, False)


def test_engagement_weighs_kinds_and_halves_every_fourteen_days() -> None:
    at = int(NOW.timestamp())
    h = replace(
        _shop({"fan": [], "quiet": []}, NOW),
        events=np.array([3, 0]),
        event_at=np.array([at - 14 * 86400, at, at - 100 * 86400]),
        event_kind=["click", "open", "reply"],
    )
    # A click 14 days ago (1 halved once) and an open now (0.5); the reply is past 90 days.
    fan, quiet = signals.engagement_score(h, NOW)
    assert fan == pytest.approx(1 - np.exp(-(0.5 + 0.5) / 2))
    assert quiet == 0.0


def test_products_are_due_when_their_own_gap_comes_round_soonest_first() -> None:
    today = int(NOW.timestamp() // 86400)
    h = replace(
        _shop({"ana": [(5.0, 30.0)]}, NOW),
        repeat_products=np.array([3]),
        product=["coffee", "mug", "tea"],
        product_days=np.array([2, 2, 2]),
        product_first_day=np.array([today - 40, today - 100, today - 30]),
        product_last_day=np.array([today - 20, today - 10, today - 22]),
    )
    # coffee: every 20 days, next today; mug: every 90, in 80 days; tea: every 8, 14 days late.
    (ana,) = signals.score(h, signals.bare(signals.ShopConfig(), NOW), NOW)
    assert ana.products_due == ["tea", "coffee"]
