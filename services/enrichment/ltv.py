"""Predictive LTV: BG/NBD purchase counts and Gamma-Gamma spend per order, fitted by maximum
likelihood on grouped customer summaries (Fader, Hardie and Lee 2005, "Counting your customers
the easy way" and "RFM and CLV"). Time is in days; a customer's summary follows the published
conventions: frequency x = repeat purchase days, recency t_x = days from the first to the last
purchase day, T = days from the first purchase day to the end of observation."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import betaln, digamma, gammaln, hyp2f1

Floats = NDArray[np.float64]


@dataclass(frozen=True)
class BgNbd:
    """Fitted BG/NBD parameters: purchase rates ~ Gamma(r, alpha) per day, dropout after each
    purchase ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float


@dataclass(frozen=True)
class GammaGamma:
    """Fitted Gamma-Gamma parameters: order values ~ Gamma(p, nu), nu ~ Gamma(q, gamma)."""

    p: float
    q: float
    gamma: float


@dataclass(frozen=True)
class Distinct:
    """A column as its distinct values and each row's index among them, so that what depends on
    the column alone is computed once per value."""

    values: Floats
    index: NDArray[np.intp]

    @classmethod
    def of(cls, column: Floats) -> "Distinct":
        values, index = np.unique(column, return_inverse=True)
        return cls(values, index.ravel())

    @property
    def rows(self) -> Floats:
        return self.per_row(self.values)

    def per_row(self, table: Floats) -> Floats:
        """A function of the distinct values, given as its value at each, at every row."""
        return np.take(table, self.index)

    def total(self, weight: Floats) -> Floats:
        """The weights summed per distinct value."""
        return np.asarray(
            np.bincount(self.index, weights=weight, minlength=len(self.values)), dtype=float
        )


def group(*columns: Floats) -> tuple[list[Distinct], Floats]:
    """Identical rows collapsed: the columns of the distinct rows (in lexicographic order) and
    how many customers each row stands for."""
    distinct = [Distinct.of(column) for column in columns]
    key = np.zeros(len(columns[0]), dtype=np.int64)
    for column in distinct:  # the row's rank among the distinct rows of the columns so far
        _, first, key, counts = np.unique(
            key * len(column.values) + column.index,
            return_index=True, return_inverse=True, return_counts=True,
        )  # fmt: skip
    return [Distinct(c.values, c.index[first]) for c in distinct], counts.astype(float)


def bgnbd_log_likelihood(
    params: Floats, x: Floats, t_x: Floats, big_t: Floats
) -> tuple[Floats, Floats]:
    """Each customer's log-likelihood under (r, alpha, a, b), and the gradient of their sum with
    respect to the log of each parameter."""
    columns = Distinct.of(x), Distinct.of(t_x), Distinct.of(big_t)
    return _bgnbd(params, *columns, np.ones(len(x)))


def _bgnbd(
    params: Floats, x: Distinct, t_x: Distinct, big_t: Distinct, weight: Floats
) -> tuple[Floats, Floats]:
    """Rows' log-likelihoods and the gradient of their weighted sum (log-parameters)."""
    r, alpha, a, b = params
    xs = x.values
    repeat = xs > 0
    shifted = np.where(repeat, b + xs - 1, 1.0)
    by_x = gammaln(r + xs) - gammaln(r) + r * np.log(alpha) + betaln(a, b + xs) - betaln(a, b)
    rx = x.per_row(r + xs)
    log_big_t = big_t.per_row(np.log(alpha + big_t.values))
    log_t = t_x.per_row(np.log(alpha + t_x.values))
    a3 = -rx * log_big_t
    a4 = x.per_row(np.where(repeat, np.log(a) - np.log(shifted), -np.inf)) - rx * log_t
    top = np.maximum(a3, a4)
    e3, e4 = np.exp(a3 - top), np.exp(a4 - top)
    mix = e3 + e4
    w3, w4 = weight * e3 / mix, weight * e4 / mix
    per_x = x.total(weight)
    d_r = (
        per_x @ (digamma(r + xs) - digamma(r) + np.log(alpha))
        - _dot(w3, log_big_t)
        - _dot(w4, log_t)
    )
    d_alpha = (
        weight.sum() * r / alpha
        - _dot(w3 * rx, big_t.per_row(1 / (alpha + big_t.values)))
        - _dot(w4 * rx, t_x.per_row(1 / (alpha + t_x.values)))
    )
    d_a = per_x @ (digamma(a + b) - digamma(a + b + xs)) + w4.sum() / a
    d_b = per_x @ (digamma(a + b) + digamma(b + xs) - digamma(b) - digamma(a + b + xs)) - _dot(
        w4, x.per_row(1 / shifted)
    )
    ll = x.per_row(by_x) + np.log(mix) + top
    return ll, np.array([d_r * r, d_alpha * alpha, d_a * a, d_b * b])


def fit_bgnbd(x: Floats, t_x: Floats, big_t: Floats) -> BgNbd:
    """Maximum-likelihood BG/NBD on the customers' (x, t_x, T), grouped so that customers with the
    same summary are evaluated once."""
    (gx, gt, gbig), weight = group(x, t_x, big_t)
    total = weight.sum()

    def objective(theta: Floats) -> tuple[float, Floats]:
        ll, gradient = _bgnbd(np.exp(theta), gx, gt, gbig, weight)
        return -_dot(weight, ll) / total, -gradient / total

    start = np.log([1.0, max(float(np.mean(big_t)), 1.0), 1.0, 1.0])
    theta = _maximise(objective, start)
    r, alpha, a, b = np.exp(theta)
    ll, _ = _bgnbd(np.exp(theta), gx, gt, gbig, weight)
    return BgNbd(float(r), float(alpha), float(a), float(b), _dot(weight, ll))


def gamma_gamma_log_likelihood(
    params: Floats, x: Floats, mean_value: Floats
) -> tuple[Floats, Floats]:
    """Each repeat customer's log-likelihood of their mean repeat order value under
    (p, q, gamma), and the gradient of their sum with respect to the log of each parameter."""
    return _gamma_gamma(params, Distinct.of(x), mean_value, np.ones(len(x)))


def _gamma_gamma(
    params: Floats, x: Distinct, mean_value: Floats, weight: Floats
) -> tuple[Floats, Floats]:
    """Rows' log-likelihoods and the gradient of their weighted sum (log-parameters)."""
    p, q, gamma = params
    px = p * x.values
    xs = x.rows
    spent = xs * mean_value + gamma
    spread = np.log(spent)
    log_mean = np.log(mean_value)
    by_x = gammaln(px + q) - gammaln(px) - gammaln(q) + q * np.log(gamma) + px * np.log(x.values)
    ll = x.per_row(by_x) + (p * xs - 1) * log_mean - (p * xs + q) * spread
    per_x = x.total(weight)
    d_p = per_x @ (x.values * (digamma(px + q) - digamma(px) + np.log(x.values))) + _dot(
        weight * xs, log_mean - spread
    )
    d_q = per_x @ (digamma(px + q) - digamma(q) + np.log(gamma)) - _dot(weight, spread)
    d_gamma = weight.sum() * q / gamma - _dot(weight * (p * xs + q), 1 / spent)
    return ll, np.array([d_p * p, d_q * q, d_gamma * gamma])


def fit_gamma_gamma(x: Floats, mean_value: Floats) -> GammaGamma:
    """Maximum-likelihood Gamma-Gamma on repeat customers (x ≥ 1) and the mean value of their
    repeat purchase days; values are grouped to the cent."""
    (gx, gm), weight = group(x, np.round(mean_value, 2))
    values = gm.rows
    total = weight.sum()

    def objective(theta: Floats) -> tuple[float, Floats]:
        ll, gradient = _gamma_gamma(np.exp(theta), gx, values, weight)
        return -_dot(weight, ll) / total, -gradient / total

    start = np.log([1.0, 2.0, max(float(np.mean(mean_value)), 1.0)])
    p, q, gamma = np.exp(_maximise(objective, start))
    return GammaGamma(float(p), float(q), float(gamma))


def _dot(a: Floats, b: Floats) -> float:
    """The sum of products, in this thread: BLAS's threads only contend on a busy machine."""
    return float(np.einsum("i,i", a, b))


def _maximise(objective: Callable[[Floats], tuple[float, Floats]], start: Floats) -> Floats:
    """L-BFGS on log-parameters, kept within [e^-12, e^12] so a flat likelihood cannot run off."""
    result = minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=[(-12.0, 12.0)] * len(start),
        options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9},
    )
    return np.asarray(result.x, dtype=float)


def expected_purchases(
    model: BgNbd, horizon: float, x: Floats, t_x: Floats, big_t: Floats
) -> Floats:
    """Expected purchase days in the next `horizon` days given each customer's history."""
    r, alpha, a, b = model.r, model.alpha, model.a, model.b
    z = horizon / (alpha + big_t + horizon)
    c = a + b + x - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        hyp = np.log(hyp2f1(r + x, b + x, c, z))
        alternative = np.log(hyp2f1(c - r - x, c - b - x, c, z)) + (c - r - x - b - x) * np.log1p(
            -z
        )
        hyp = np.where(np.isfinite(hyp), hyp, alternative)
    unconditional = (
        (a + b + x - 1)
        / (a - 1)
        * (1 - np.exp(hyp + (r + x) * np.log((alpha + big_t) / (alpha + big_t + horizon))))
    )
    return np.asarray(unconditional / (1 + _dropout_odds(model, x, t_x, big_t)), dtype=float)


def probability_of_order(
    model: BgNbd, horizon: float, x: Floats, t_x: Floats, big_t: Floats
) -> Floats:
    """P(at least one purchase in the next `horizon` days): alive now, times the first arrival
    under the posterior Gamma(r + x, alpha + T) rate."""
    alive = 1 / (1 + _dropout_odds(model, x, t_x, big_t))
    wait = 1 - ((model.alpha + big_t) / (model.alpha + big_t + horizon)) ** (model.r + x)
    return np.asarray(alive * wait, dtype=float)


def _dropout_odds(model: BgNbd, x: Floats, t_x: Floats, big_t: Floats) -> Floats:
    """Odds that the customer dropped out after their last purchase (0 for x = 0)."""
    repeat = x > 0
    odds = (model.a / np.where(repeat, model.b + x - 1, 1.0)) * (
        (model.alpha + big_t) / (model.alpha + t_x)
    ) ** (model.r + x)
    return np.where(repeat, odds, 0.0)


def expected_order_value(model: GammaGamma, x: Floats, mean_value: Floats) -> Floats:
    """Expected value of a future purchase day: the posterior mean of nu's inverse, which for
    customers without repeats is the population mean p * gamma / (q - 1)."""
    population = model.p * model.gamma / (model.q - 1)
    conditional = model.p * (model.gamma + x * mean_value) / (model.p * x + model.q - 1)
    return np.where(x > 0, conditional, population)
