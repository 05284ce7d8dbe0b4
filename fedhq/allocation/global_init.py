"""Coarse-grained global initialization: one PTQ/QAT strategy per client (paper §3.3, §4.2).

The server min-max normalizes the clients' (Sig_speed, Sig_acc) into (0, 1) (Eq. 5),
places client m at x = NormSig_speed, y = NormSig_acc and gives it PTQ iff

    y / x > (1 - xi) / xi   (steeper than Theta, Eq. 6)   or   x * y / 2 < area_threshold

and QAT otherwise. The reading of "the slope of Theta", the `speed_orientation`
option and the measurements behind both: docs/method.md §4.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, get_args

import numpy as np

from fedhq.analysis.vectors import finite_vector
from fedhq_kernels.checks import is_real

DEFAULT_XI = 0.2
DEFAULT_AREA_THRESHOLD = 0.0625
NORMALIZATION_MARGIN = 0.01

SpeedOrientation = Literal["time", "speed"]
_ORIENTATIONS = get_args(SpeedOrientation)


class Strategy(str, Enum):
    """A client's quantization strategy; compares equal to its string value."""

    PTQ = "ptq"
    QAT = "qat"

    def __str__(self) -> str:
        return self.value


_BY_PTQ_FLAG = np.array([Strategy.QAT, Strategy.PTQ], dtype=object)  # index with the PTQ mask


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class Allocation:
    """global_init's result: the strategies and what is needed to draw Fig. 3."""

    strategies: list[Strategy]  # one per client, in input order
    ptq: np.ndarray  # bool mask, True where the client got PTQ
    x: np.ndarray  # NormSig_speed after orientation
    y: np.ndarray  # NormSig_acc
    xi: float
    theta_slope: float  # (1 - xi) / xi, Eq. 6's threshold ray
    area_threshold: float
    speed_orientation: SpeedOrientation


def _as_significances(values: Any, name: str) -> np.ndarray:
    return finite_vector(
        values, name, one_per="client", empty=f"{name} is empty: need at least one client", at="client"
    )


def normalize_significance(values: Any, margin: float = NORMALIZATION_MARGIN) -> np.ndarray:
    """Eq. 5: min-max map into [margin, 1 - margin], strictly inside (0, 1); all equal -> 0.5."""
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must lie in (0, 0.5), got {margin}")
    half = _as_significances(values, "significances") / 2  # so that hi - lo cannot overflow
    lo, hi = half.min(), half.max()
    if lo == hi:
        return np.full_like(half, 0.5)
    return margin + (1 - 2 * margin) * ((half - lo) / (hi - lo))


def geometric_segmentation(x: np.ndarray, y: np.ndarray, xi: float, area_threshold: float) -> np.ndarray:
    """The PTQ mask for normalized coordinates: steeper than Theta, or a small triangle.

    y / x > (1 - xi) / xi is evaluated as y * xi > x * (1 - xi) (x > 0), which keeps the
    monotonicity in xi exact in floating point as well.
    """
    steeper_than_theta = y * xi > x * (1 - xi)  # Eq. 6, slope of the ray (xi, 1 - xi)
    small_triangle = x * y / 2 < area_threshold  # "unimportant" client
    return steeper_than_theta | small_triangle


def _validate_parameters(xi: float, area_threshold: float, speed_orientation: str) -> None:
    if not (is_real(xi) and 0 < xi < 1):
        raise ValueError(f"xi must lie in (0, 1), got {xi}")
    if not (is_real(area_threshold) and area_threshold >= 0):
        raise ValueError(f"area_threshold must be finite and >= 0, got {area_threshold}")
    if speed_orientation not in _ORIENTATIONS:
        raise ValueError(f"speed_orientation must be one of {_ORIENTATIONS}, got {speed_orientation!r}")


def global_init(
    speed_sig: Any,
    acc_sig: Any,
    xi: float = DEFAULT_XI,
    area_threshold: float = DEFAULT_AREA_THRESHOLD,
    *,
    speed_orientation: SpeedOrientation = "time",
    margin: float = NORMALIZATION_MARGIN,
) -> Allocation:
    """Assign PTQ or QAT to every client from its (Sig_speed, Sig_acc) pair (Eq. 4-6).

    Vectorized over clients; the result depends on each client's own pair and the lists'
    min and max only, so it does not depend on client order. `speed_orientation` is the
    "time"/"speed" reading of Sig_speed (docs/method.md §4.3); `margin` is how far Eq. 5
    keeps normalized values from 0 and 1.
    """
    _validate_parameters(xi, area_threshold, speed_orientation)
    speed = _as_significances(speed_sig, "speed_sig")
    acc = _as_significances(acc_sig, "acc_sig")
    if speed.size != acc.size:
        raise ValueError(f"speed_sig has {speed.size} clients but acc_sig has {acc.size}")
    x = normalize_significance(speed, margin)  # Eq. 5
    if speed_orientation == "speed":
        x = 1 - x
    y = normalize_significance(acc, margin)  # Eq. 5
    ptq = geometric_segmentation(x, y, xi, area_threshold)
    strategies = _BY_PTQ_FLAG[ptq.astype(np.intp)].tolist()
    theta_slope = (1 - xi) / xi  # Eq. 6
    return Allocation(strategies, ptq, x, y, float(xi), theta_slope, float(area_threshold), speed_orientation)
