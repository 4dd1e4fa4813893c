"""Confidence intervals for evaluation scores: a proportion, a mean, and a paired difference of means.

Each function returns `(low, high)` of a two-sided interval at `confidence` (95 % by default) around the
obvious point estimate (k / n, the mean, the mean of the differences):

- `proportion_ci(k, n)`: the Wilson score interval (Wilson 1927; Newcombe 1998, method 3, without
  continuity correction). Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps its
  coverage for accuracies near 0, 1 or chance at small n, which is where MMLU subsets of a small model live.
- `mean_ci(values)`: the Student t interval, mean +- t_{(1+c)/2, n-1} * s / sqrt(n) with the sample standard
  deviation s (n - 1 in the denominator).
- `paired_difference_ci(a, b)`: the paired t interval, i.e. `mean_ci` of the per-item differences a_i - b_i.
  Pairing removes the item-to-item variance that two models share (the same questions are hard for both),
  which is what makes a model-vs-base difference measurable on a few hundred items.

With fewer than two values a t interval is undefined and `(nan, nan)` is returned. The t quantile is
computed here (`t_quantile`: the regularised incomplete beta function by its continued fraction, inverted
by bisection), so the module needs only the standard library and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

__all__ = ["mean_ci", "paired_difference_ci", "proportion_ci", "t_quantile"]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion of `k` successes in `n` trials."""
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in 0..n={n}, got {k}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half_width), min(1.0, center + half_width)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t distribution with `df` degrees of freedom (e.g. 0.975, 10 -> 2.228)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if _t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student t interval for the mean of `values`; (nan, nan) for fewer than two values."""
    _check_confidence(confidence)
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    if x.size < 2:
        return math.nan, math.nan
    mean = float(x.mean())
    half_width = t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean - half_width, mean + half_width


def paired_difference_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Paired t interval for mean(a - b) over items measured twice (e.g. a model and its base)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same length, got {x.shape} and {y.shape}")
    return mean_ci(x - y, confidence)
