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


def group(*columns: Floats) -> tuple[list[Floats], Floats, NDArray[np.intp]]:
    """Identical rows collapsed: (the unique columns, how many customers each row stands for,
    the index of each customer's row)."""
    stacked = np.column_stack(columns)
    unique, inverse, counts = np.unique(stacked, axis=0, return_inverse=True, return_counts=True)
    return [unique[:, i] for i in range(unique.shape[1])], counts.astype(float), inverse.ravel()


def bgnbd_log_likelihood(
    params: Floats, x: Floats, t_x: Floats, big_t: Floats
) -> tuple[Floats, Floats]:
    """Each customer's log-likelihood under (r, alpha, a, b) and its gradient with respect to the
    log of each parameter (shape 4 by n)."""
    r, alpha, a, b = params
    repeat = x > 0
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = betaln(a, b + x) - betaln(a, b)
    a3 = -(r + x) * np.log(alpha + big_t)
    shifted = np.where(repeat, b + x - 1, 1.0)
    a4 = np.where(repeat, np.log(a) - np.log(shifted) - (r + x) * np.log(alpha + t_x), -np.inf)
    top = np.maximum(a3, a4)
    mix = np.log(np.exp(a3 - top) + np.exp(a4 - top)) + top
    w3, w4 = np.exp(a3 - mix), np.exp(a4 - mix)
    d_r = (
        digamma(r + x)
        - digamma(r)
        + np.log(alpha)
        - w3 * np.log(alpha + big_t)
        - w4 * np.log(alpha + t_x)
    )
    d_alpha = r / alpha - w3 * (r + x) / (alpha + big_t) - w4 * (r + x) / (alpha + t_x)
    d_a = digamma(a + b) - digamma(a + b + x) + w4 / a
    d_b = digamma(a + b) + digamma(b + x) - digamma(b) - digamma(a + b + x) - w4 / shifted
    gradient = np.vstack([d_r * r, d_alpha * alpha, d_a * a, d_b * b])
    return a1 + a2 + mix, gradient


def fit_bgnbd(x: Floats, t_x: Floats, big_t: Floats) -> BgNbd:
    """Maximum-likelihood BG/NBD on the customers' (x, t_x, T), grouped so that customers with the
    same summary are evaluated once."""
    (gx, gt, gbig), weight, _ = group(x, t_x, big_t)
    total = weight.sum()

    def objective(theta: Floats) -> tuple[float, Floats]:
        ll, gradient = bgnbd_log_likelihood(np.exp(theta), gx, gt, gbig)
        return -float(weight @ ll) / total, -(gradient @ weight) / total

    start = np.log([1.0, max(float(np.mean(big_t)), 1.0), 1.0, 1.0])
    theta = _maximise(objective, start)
    r, alpha, a, b = np.exp(theta)
    ll, _ = bgnbd_log_likelihood(np.exp(theta), gx, gt, gbig)
    return BgNbd(float(r), float(alpha), float(a), float(b), float(weight @ ll))


def gamma_gamma_log_likelihood(
    params: Floats, x: Floats, mean_value: Floats
) -> tuple[Floats, Floats]:
    """Each repeat customer's log-likelihood of their mean repeat order value under
    (p, q, gamma), and its gradient with respect to the log of each parameter (3 by n)."""
    p, q, gamma = params
    px = p * x
    spread = np.log(x * mean_value + gamma)
    ll = (
        gammaln(px + q)
        - gammaln(px)
        - gammaln(q)
        + q * np.log(gamma)
        + (px - 1) * np.log(mean_value)
        + px * np.log(x)
        - (px + q) * spread
    )
    d_p = x * (digamma(px + q) - digamma(px) + np.log(mean_value) + np.log(x) - spread)
    d_q = digamma(px + q) - digamma(q) + np.log(gamma) - spread
    d_gamma = q / gamma - (px + q) / (x * mean_value + gamma)
    return ll, np.vstack([d_p * p, d_q * q, d_gamma * gamma])


def fit_gamma_gamma(x: Floats, mean_value: Floats) -> GammaGamma:
    """Maximum-likelihood Gamma-Gamma on repeat customers (x ≥ 1) and the mean value of their
    repeat purchase days; values are grouped to the cent."""
    (gx, gm), weight, _ = group(x, np.round(mean_value, 2))
    total = weight.sum()

    def objective(theta: Floats) -> tuple[float, Floats]:
        ll, gradient = gamma_gamma_log_likelihood(np.exp(theta), gx, gm)
        return -float(weight @ ll) / total, -(gradient @ weight) / total

    start = np.log([1.0, 2.0, max(float(np.mean(mean_value)), 1.0)])
    p, q, gamma = np.exp(_maximise(objective, start))
    return GammaGamma(float(p), float(q), float(gamma))


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
