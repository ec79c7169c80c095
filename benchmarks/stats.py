"""Student-t intervals for figures over a few seeds: the 0.975 quantile of Student's t
(``t_975``) and a mean with its 95% interval (``mean_ci95``), without scipy."""

from __future__ import annotations

import math
from collections.abc import Sequence

T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
"""0.975 quantiles of Student's t with 1, 2, ..., 30 degrees of freedom."""
Z_975 = 1.959963984540054
"""0.975 quantile of the standard normal."""


def t_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (the half-width
    factor of a two-sided 95% interval): ``T_975`` up to 30, beyond it the Cornish-Fisher
    expansion around the normal quantile (Abramowitz & Stegun 26.7.5; error below 1e-7)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = Z_975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / dof**power for power, term in enumerate(terms, 1))


def mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean of ``values`` (one per seed) and its 95% interval, ``mean ± t_975(n - 1) * s /
    sqrt(n)`` with ``s`` the sample standard deviation; no interval for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    half = t_975(n - 1) * std / math.sqrt(n)
    return mean, (mean - half, mean + half)
