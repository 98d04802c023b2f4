"""Statistics over seeds with numpy and math only: mean, std, the paired t interval.

The paired difference of loss A against the first loss B over seeds
``s = 1..n`` is ``d_s = A_s - B_s`` (both runs of seed ``s`` share the
initialisation and the data order). Its two-sided ``level`` confidence
interval is ``mean(d) +- t_{(1 + level)/2, n-1} * std(d, ddof=1) / sqrt(n)``
(Student's t with ``n - 1`` degrees of freedom), undefined for ``n < 2``.
"""

from __future__ import annotations

import math
from typing import Sequence, TypedDict

import numpy as np


class Summary(TypedDict):
    """Mean and sample standard deviation (ddof=1; NaN for one value) of ``n`` values."""

    mean: float
    std: float
    n: int


class PairedDifference(TypedDict):
    """Mean paired difference and its t interval (NaN bounds for ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int
    level: float


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample std of ``values`` (NaN entries are not dropped: they propagate).

    Raises:
      ValueError: no values.
    """
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("summarize: no values")
    std = float(np.std(x, ddof=1)) if x.size > 1 else float("nan")
    return {"mean": float(np.mean(x)), "std": std, "n": int(x.size)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"student_t_cdf: df must be > 0, got {df}")
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the ``t`` with ``student_t_cdf(t, df) == p`` (bisection, ~1e-12).

    Raises:
      ValueError: ``p`` outside (0, 1) or ``df <= 0``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_ppf: p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_t_interval(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> PairedDifference:
    """Mean of ``a - b`` (paired by position: the same seed) and its two-sided t interval.

    Args:
      a, b: one value per seed, in the same seed order.
      level: confidence level of the interval.

    Returns:
      ``{"mean", "low", "high", "n", "level"}``; ``low`` and ``high`` are NaN for one pair.

    Raises:
      ValueError: lengths differ or are 0, or ``level`` is not in (0, 1).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_t_interval: need two equal-length, non-empty sequences, got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_t_interval: level must be in (0, 1), got {level}")
    d = a - b
    n = int(d.size)
    mean = float(np.mean(d))
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n, "level": level}
    half = student_t_ppf(0.5 * (1.0 + level), n - 1) * float(np.std(d, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "level": level}
