"""Confidence intervals against published and hand-computed values: Wilson intervals from Newcombe (1998),
Student t quantiles from the standard table, a t interval and a paired t interval worked by hand."""

import math

import pytest

from jaxcollab.evaluation.stats import mean_ci, paired_difference_ci, proportion_ci, t_quantile


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0000),
    ],
)
def test_wilson_interval_equals_newcombe(k, n, low, high):
    got = proportion_ci(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_by_hand_and_errors():
    # k=5, n=10, z=1.959964: center 0.5, half-width z/(1+z^2/n) * sqrt(0.025 + z^2/400) = 0.2634
    low, high = proportion_ci(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert proportion_ci(5, 10, confidence=0.5)[1] - proportion_ci(5, 10, confidence=0.5)[0] < high - low
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            proportion_ci(*bad)


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 5, 2.571), (0.975, 10, 2.228),
     (0.975, 30, 2.042), (0.975, 120, 1.980), (0.95, 10, 1.812), (0.995, 3, 5.841), (0.025, 10, -2.228)],
)
def test_t_quantile_equals_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_limits():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy, closed form
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)  # (2p-1)/sqrt(2p(1-p))
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal limit


def test_mean_ci_by_hand():
    # values 2, 4, 4, 4, 5, 5, 7, 9: mean 5, s^2 = 32/7, se = sqrt(32/7/8) = 0.75593, t(0.975, 7) = 2.36462
    low, high = mean_ci([2, 4, 4, 4, 5, 5, 7, 9])
    assert (low, high) == pytest.approx((5 - 2.36462 * 0.755929, 5 + 2.36462 * 0.755929), abs=1e-4)
    assert all(math.isnan(v) for v in mean_ci([3.0]))
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, math.nan])


def test_paired_difference_ci_by_hand():
    # differences 1, 1, 0, 1, 2: mean 1, s = sqrt(0.5), se = 0.316228, t(0.975, 4) = 2.776445
    a, b = [5, 7, 8, 6, 9], [4, 6, 8, 5, 7]
    assert paired_difference_ci(a, b) == pytest.approx((1 - 2.776445 * 0.316228, 1 + 2.776445 * 0.316228), abs=1e-5)
    # Pairing matters: the unpaired intervals of a and b overlap although every difference is >= 0.
    assert mean_ci(a)[0] < mean_ci(b)[1] and paired_difference_ci(a, b)[0] > 0
    with pytest.raises(ValueError, match="same length"):
        paired_difference_ci([1, 2], [1, 2, 3])
