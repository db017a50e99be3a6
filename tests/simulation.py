"""Shops simulated from known BG/NBD and Gamma-Gamma processes, for parameter recovery and
calibration tests and for the enrichment benchmark."""

import numpy as np
from numpy.typing import NDArray

from services.enrichment.signals import Histories

Floats = NDArray[np.float64]


def bgnbd_purchases(
    rng: np.random.Generator,
    n: int,
    r: float,
    alpha: float,
    a: float,
    b: float,
    first: Floats,
    end: float,
) -> list[Floats]:
    """Purchase times of n customers whose first purchase is at `first`, observed until `end`:
    rates ~ Gamma(r, alpha), dropout with p ~ Beta(a, b) after each repeat purchase (the model
    has no dropout at the first purchase)."""
    rate = rng.gamma(r, 1 / alpha, n)
    dropout = rng.beta(a, b, n)
    times: list[list[float]] = [[float(t)] for t in first]
    now = first.astype(float).copy()
    alive = np.ones(n, dtype=bool)
    while alive.any():
        now = now + rng.exponential(1 / rate)
        alive &= now <= end
        for i in np.flatnonzero(alive):
            times[i].append(float(now[i]))
        alive &= rng.random(n) >= dropout
    return [np.asarray(t) for t in times]


def summaries(times: list[Floats], end: float) -> tuple[Floats, Floats, Floats]:
    """(x, t_x, T) in continuous time."""
    x = np.array([len(t) - 1 for t in times], dtype=float)
    t_x = np.array([t[-1] - t[0] for t in times])
    big_t = np.array([end - t[0] for t in times])
    return x, t_x, big_t


def gamma_gamma_values(
    rng: np.random.Generator, counts: NDArray[np.int64], p: float, q: float, gamma: float
) -> list[Floats]:
    """Order values: per customer nu ~ Gamma(q, gamma), each value ~ Gamma(p, nu)."""
    nu = rng.gamma(q, 1 / gamma, len(counts))
    return [rng.gamma(p, 1 / nu[i], int(c)) for i, c in enumerate(counts)]


SHOP_OPENED_DAY = 19000
"""The day (since 1970-01-01) a simulated shop opened: simulated day 0."""


def histories(
    person_ids: list[str], times: list[Floats], values: list[Floats], through: float
) -> Histories:
    """Enrichment's view of simulated customers up to `through` (days after opening): purchase
    days merged (values added), the last order's instant, no events or products."""
    order_days, day_list, counts, day_values, last = [], [], [], [], []
    for t, v in zip(times, values, strict=True):
        kept = t <= through
        days, inverse = np.unique(np.floor(t[kept]).astype(np.int64), return_inverse=True)
        order_days.append(len(days))
        day_list.extend((days + SHOP_OPENED_DAY).tolist())
        counts.extend(np.bincount(inverse, minlength=len(days)).tolist())
        day_values.extend(np.bincount(inverse, weights=v[kept], minlength=len(days)).tolist())
        last.append(int((t[kept].max() + SHOP_OPENED_DAY) * 86400) if kept.any() else 0)
    n = len(person_ids)
    empty = np.zeros(0, dtype=np.int64)
    return Histories(
        person_ids=person_ids,
        order_days=np.asarray(order_days, dtype=np.int64),
        order_day=np.asarray(day_list, dtype=np.int64),
        order_count=np.asarray(counts, dtype=np.int64),
        order_value=np.asarray(day_values, dtype=float),
        last_order_at=np.asarray(last, dtype=np.int64),
        events=np.zeros(n, dtype=np.int64),
        event_at=empty,
        event_kind=[],
        repeat_products=np.zeros(n, dtype=np.int64),
        product=[],
        product_days=empty,
        product_first_day=empty,
        product_last_day=empty,
    )
