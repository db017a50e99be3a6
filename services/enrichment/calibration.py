"""Churn calibration: a map from the seed's churn score to the observed churn rate, learned by
back-testing a shop on its own history, and the report that says how well it holds."""

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import isotonic_regression, minimize
from scipy.special import expit

Floats = NDArray[np.float64]

ISOTONIC_MINIMUM = 1000
"""Labelled customers from which isotonic regression is used; below it, Platt scaling."""
PLATT_MINIMUM = 30
"""Labelled customers (with both outcomes present) below which the seed score stays uncalibrated."""
BINS = 10
KNOT_DECIMALS = 3
"""Isotonic regression runs on scores rounded to this many decimals: at most 1,001 knots."""


@dataclass(frozen=True)
class Calibrator:
    """Maps seed scores to churn probabilities. `method` is "isotonic" (knots are the
    non-decreasing step values at the given scores), "platt" (knots hold the slope and intercept)
    or "uncalibrated" (the score is passed through)."""

    method: str
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()

    def __call__(self, score: Floats) -> Floats:
        if self.method == "isotonic":
            return np.interp(score, self.knots_x, self.knots_y)
        if self.method == "platt":
            slope, intercept = self.knots_y
            return np.asarray(expit(slope * score + intercept), dtype=float)
        return np.clip(score, 0.0, 1.0)


@dataclass(frozen=True)
class Bin:
    """One bin of the reliability curve."""

    mean_predicted: float
    observed_rate: float
    count: int


@dataclass(frozen=True)
class Report:
    """How well calibrated churn risk matched what happened, out of fold."""

    method: str
    horizon_days: int
    samples: int
    brier_score: float
    baseline_brier_score: float
    expected_calibration_error: float
    reliability: tuple[Bin, ...]


def fit(score: Floats, churned: Floats) -> Calibrator:
    """The calibrator for a shop's back-test: isotonic for a large sample, Platt scaling for a
    small one, none when there is too little to learn from."""
    n = len(score)
    if n < PLATT_MINIMUM or churned.min(initial=1) == churned.max(initial=0):
        return Calibrator("uncalibrated")
    if n >= ISOTONIC_MINIMUM:
        xs, inverse = np.unique(np.round(score, KNOT_DECIMALS), return_inverse=True)
        weights = np.bincount(inverse).astype(float)
        means = np.bincount(inverse, weights=churned) / weights
        fitted = isotonic_regression(means, weights=weights).x
        return Calibrator("isotonic", tuple(xs.tolist()), tuple(fitted.tolist()))

    def loss(theta: Floats) -> tuple[float, Floats]:
        p = np.clip(expit(theta[0] * score + theta[1]), 1e-12, 1 - 1e-12)
        residual = p - churned
        value = -np.mean(churned * np.log(p) + (1 - churned) * np.log(1 - p))
        return float(value), np.array([np.mean(residual * score), np.mean(residual)])

    theta = minimize(loss, np.zeros(2), jac=True, method="BFGS").x
    return Calibrator("platt", (), (float(theta[0]), float(theta[1])))


def evaluate(score: Floats, churned: Floats, horizon_days: int) -> tuple[Calibrator, Report]:
    """Fits the calibrator on every labelled customer and reports its quality two-fold out of
    sample (each half scored by a calibrator fitted on the other), next to the seed score's own
    Brier score on the same customers."""
    calibrator = fit(score, churned)
    fold = np.arange(len(score)) % 2 == 0
    predicted = np.empty_like(score)
    for held_out in (fold, ~fold):
        predicted[held_out] = fit(score[~held_out], churned[~held_out])(score[held_out])
    if calibrator.method == "uncalibrated":
        predicted = calibrator(score)
    report = Report(
        method=calibrator.method,
        horizon_days=horizon_days,
        samples=len(score),
        brier_score=brier(predicted, churned),
        baseline_brier_score=brier(np.clip(score, 0, 1), churned),
        expected_calibration_error=expected_calibration_error(predicted, churned),
        reliability=reliability(predicted, churned),
    )
    return calibrator, report


def brier(predicted: Floats, outcome: Floats) -> float:
    """Mean squared difference between predicted probability and outcome (0 when empty)."""
    return float(np.mean((predicted - outcome) ** 2)) if len(outcome) else 0.0


def reliability(predicted: Floats, outcome: Floats) -> tuple[Bin, ...]:
    """Ten equal-width bins of predicted probability, each with its mean prediction and observed
    rate; empty bins are left out."""
    index = np.minimum((predicted * BINS).astype(int), BINS - 1)
    count = np.bincount(index, minlength=BINS)
    mean = np.bincount(index, weights=predicted, minlength=BINS)
    rate = np.bincount(index, weights=outcome, minlength=BINS)
    return tuple(
        Bin(float(mean[i] / count[i]), float(rate[i] / count[i]), int(count[i]))
        for i in range(BINS)
        if count[i]
    )


def expected_calibration_error(predicted: Floats, outcome: Floats) -> float:
    """The count-weighted mean gap between mean prediction and observed rate over the bins."""
    total = len(outcome)
    return (
        sum(
            b.count * abs(b.mean_predicted - b.observed_rate)
            for b in reliability(predicted, outcome)
        )
        / total
        if total
        else 0.0
    )
