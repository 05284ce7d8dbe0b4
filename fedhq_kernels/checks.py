"""Argument checks shared by the ops and the FL layer: one home for what counts as an
int or a number. ``bool`` is an ``int`` to Python but never a count, a width or a
rate here, so both predicates refuse it; numpy scalars are accepted."""

from __future__ import annotations

import math
import numbers


def is_int(value: object) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float that is not a bool (numpy scalars count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
