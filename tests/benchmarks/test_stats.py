"""``benchmarks.stats``: Student-t quantiles checked against textbook values and against
the density integrated here, and a mean's interval worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.stats import T_975, mean_ci95, t_975


def _t_cdf(t: float, dof: int) -> float:
    """Student-t CDF at ``t > 0`` by integrating the density (trapezoid rule)."""
    scale = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    x = np.linspace(0.0, t, 200_001)
    density = scale * (1 + x * x / dof) ** (-(dof + 1) / 2)
    return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))


def test_t_quantiles() -> None:
    assert len(T_975) == 30
    # Textbook values (3 decimals).
    for dof, known in {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 30: 2.042}.items():
        assert t_975(dof) == pytest.approx(known, abs=5e-4)
    # Every one, and the expansion beyond the table, is the 0.975 point of the density.
    for dof in [*range(1, 31), 31, 45, 120, 1000]:
        assert _t_cdf(t_975(dof), dof) == pytest.approx(0.975, abs=1e-5), dof
    assert t_975(10**9) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError):
        t_975(0)


def test_mean_and_t_interval_by_hand() -> None:
    mean, (low, high) = mean_ci95([0.5, 0.6, 0.7])
    half = 4.303 * 0.1 / math.sqrt(3)  # sample std 0.1, t with 2 dof
    assert mean == pytest.approx(0.6)
    assert (low, high) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-4)
    assert mean_ci95([0.4]) == (0.4, None)
