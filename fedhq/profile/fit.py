"""Affine fits and interpolation over batch sizes.

A training step's time and memory are affine in the batch size to first order:
a fixed part (parameters, gradients, optimizer state; per-op dispatch) plus a part
per sample (activations; arithmetic). The profile measures a few batch sizes and
these helpers read values between and beyond them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AffineFit:
    """y = intercept + slope * x, with the largest relative residual at the points."""

    intercept: float
    slope: float
    max_rel_residual: float

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit_affine(xs: Sequence[float], ys: Sequence[float]) -> AffineFit:
    """Least squares on relative error (weights 1/y): every point counts the same
    whatever its magnitude. One point gives a line through the origin."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"fit_affine: need as many x as y values, at least one; got {len(xs)} and {len(ys)}")
    if any(y <= 0 for y in ys):
        raise ValueError(f"fit_affine: values must be > 0, got {list(ys)}")
    if len(xs) == 1:
        return AffineFit(0.0, ys[0] / xs[0], 0.0)
    w = [1.0 / (y * y) for y in ys]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    if sxx == 0:
        raise ValueError(f"fit_affine: need at least two distinct x values, got {list(xs)}")
    slope = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys)) / sxx
    intercept = my - slope * mx
    residual = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys))
    return AffineFit(intercept, slope, residual)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through the points (sorted by x), extended linearly beyond the
    ends with the slope of the end segment: exact at measured batch sizes, affine
    between and beyond them. One point: proportional (y * x / x0)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"interpolate: need as many x as y values, at least one; got {len(xs)} and {len(ys)}")
    points = sorted(zip(xs, ys))
    if len(points) == 1:
        x0, y0 = points[0]
        return y0 * x / x0
    if x <= points[0][0]:
        (x0, y0), (x1, y1) = points[0], points[1]
    elif x >= points[-1][0]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
    else:
        k = next(i for i in range(1, len(points)) if x <= points[i][0])
        (x0, y0), (x1, y1) = points[k - 1], points[k]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def interpolate_monotone(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """A noise-robust reading of a quantity that cannot decrease with x (a step's
    time as the batch grows): piecewise-linear through the running maximum of the
    points (a noisy dip cannot make a larger batch look cheaper); beyond the largest
    point, extended with the per-unit slope of ``fit_affine`` over all points (one
    noisy end segment cannot bend the extrapolation; a non-positive fitted slope
    falls back to proportional growth); below the smallest, the first segment,
    never under proportional scaling of the first point."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"interpolate_monotone: need as many x as y values, at least one; got {len(xs)} and {len(ys)}")
    points = sorted(zip(xs, ys))
    px = [p[0] for p in points]
    envelope, running = [], -float("inf")
    for _, y in points:
        running = max(running, y)
        envelope.append(running)
    x_last, y_last = px[-1], envelope[-1]
    if x > x_last:
        slope = fit_affine(px, [p[1] for p in points]).slope if len(points) > 1 else 0.0
        if slope <= 0:
            slope = y_last / x_last
        return y_last + slope * (x - x_last)
    value = interpolate(px, envelope, x)
    if x < px[0]:
        value = max(value, envelope[0] * x / px[0])
    return value
