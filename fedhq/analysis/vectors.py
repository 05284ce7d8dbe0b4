"""One home for the check both significances' inputs need: a non-empty 1-D vector of
finite floats, one value per sample (Alg. 1, Eq. 3) or per client (Eq. 4-6)."""

from __future__ import annotations

from typing import Any

import numpy as np


def finite_vector(values: Any, what: str, *, one_per: str, empty: str, at: str) -> np.ndarray:
    """``values`` as a float64 1-D array, or a ValueError saying what is wrong with it.

    ``what`` names the values in messages, ``one_per`` what each value belongs to,
    ``empty`` is the message for no values, and ``at`` names the position of the first
    non-finite one ("client", "index")."""
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be numeric, got {type(values).__name__}: {err}") from err
    if v.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one value per {one_per}), got shape {v.shape}")
    if v.size == 0:
        raise ValueError(empty)
    bad = ~np.isfinite(v)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"{what} has {int(bad.sum())} non-finite value(s), the first at {at} {first}")
    return v
