"""Bjøntegaard delta rate: how many percent more (or, negative, fewer) bits one codec needs than another
for the same quality, averaged over the quality range both rate curves cover.

G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves", VCEG-M33, 2001. For each
curve, log(rate) is modelled as a function of the quality metric; the two models are integrated over
the metric interval where the curves overlap, and the mean difference d gives (exp(d) − 1) · 100 %.

Choices the method leaves open:
- Model: a cubic polynomial fitted to the curve's points (the original method) when both curves have
  at least 4 points; with fewer, the exact integral of piecewise-linear interpolation. Not PCHIP:
  scipy is not a dependency, and a figure must not change with what else happens to be installed.
  `interpolation_for` names which model a pair of curves gets, so results can say so.
- A metric where lower is better (LPIPS) is negated first, so the curve is again "rate rises with
  quality"; the rate difference at equal quality is unchanged by that.
- Points with the same metric value are merged (their log-rates averaged), since neither model can
  take two rates at one abscissa.
- None, not a number, when the curves do not overlap, when a curve has fewer than 2 distinct points,
  or when any value is not finite (e.g. PSNR = inf for a lossless point).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CUBIC_MIN_POINTS = 4


def interpolation_for(reference_points: int, test_points: int) -> str:
    return "cubic" if min(reference_points, test_points) >= CUBIC_MIN_POINTS else "piecewise-linear"


def bd_rate(
    reference_rates: Sequence[float],
    reference_quality: Sequence[float],
    test_rates: Sequence[float],
    test_quality: Sequence[float],
    higher_is_better: bool = True,
) -> float | None:
    """BD-rate of the test curve against the reference, in percent; negative means the test saves bits."""
    sign = 1.0 if higher_is_better else -1.0
    reference = _log_rate_curve(reference_rates, reference_quality, sign)
    test = _log_rate_curve(test_rates, test_quality, sign)
    if reference is None or test is None:
        return None
    low = max(reference[0][0], test[0][0])
    high = min(reference[0][-1], test[0][-1])
    if not low < high:
        return None
    integrate = _integrate_cubic if interpolation_for(len(reference[0]), len(test[0])) == "cubic" else _integrate_linear
    mean_difference = (integrate(*test, low, high) - integrate(*reference, low, high)) / (high - low)
    return (math.exp(mean_difference) - 1.0) * 100.0


def _log_rate_curve(rates: Sequence[float], quality: Sequence[float], sign: float):
    """(quality ascending, log-rate) with equal qualities merged; None if unusable."""
    rates = np.asarray(rates, dtype=np.float64)
    quality = sign * np.asarray(quality, dtype=np.float64)
    if rates.shape != quality.shape or not (np.all(np.isfinite(rates)) and np.all(np.isfinite(quality))):
        return None
    if np.any(rates <= 0):
        return None
    unique, inverse = np.unique(quality, return_inverse=True)
    if len(unique) < 2:
        return None
    log_rates = np.bincount(inverse, weights=np.log(rates)) / np.bincount(inverse)
    return unique, log_rates


def _integrate_cubic(quality: np.ndarray, log_rates: np.ndarray, low: float, high: float) -> float:
    integral = np.polyint(np.polyfit(quality, log_rates, 3))
    return float(np.polyval(integral, high) - np.polyval(integral, low))


def _integrate_linear(quality: np.ndarray, log_rates: np.ndarray, low: float, high: float) -> float:
    # The trapezoid rule over every breakpoint inside [low, high] is exact for a piecewise-linear curve.
    inside = quality[(quality > low) & (quality < high)]
    xs = np.concatenate([[low], inside, [high]])
    ys = np.interp(xs, quality, log_rates)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
