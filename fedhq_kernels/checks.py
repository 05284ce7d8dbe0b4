"""Argument rules shared by the ops, the QAT layer and the FL layer, each in one place:
what counts as an int or a finite number (``bool`` never does; numpy scalars do), the
supported bit widths and the float dtypes."""

from __future__ import annotations

import math
import numbers

import torch

MIN_BITS, MAX_BITS = 2, 8
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}


def is_int(value: object) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    # the exact-type test first: the ABC check costs ~1 us, and servers run this per tensor per client
    return type(value) is int or isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float that is not a bool (numpy scalars count)."""
    try:
        if type(value) is float or type(value) is int:
            return math.isfinite(value)
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int beyond float's range (10**400): not a usable number
        return False


def valid_bits(bits: object) -> bool:
    return is_int(bits) and MIN_BITS <= bits <= MAX_BITS


def check_bits(op: str, bits: object, name: str = "bits") -> int:
    """``bits`` if it is an int in [MIN_BITS, MAX_BITS], else ValueError naming ``op``
    and the argument ``name``."""
    if not valid_bits(bits):
        raise ValueError(f"{op}: {name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def check_float_dtype(op: str, dtype: object, message: str = "expected a {} tensor") -> None:
    """TypeError naming ``op`` unless ``dtype`` is one of FLOAT_DTYPES; ``message``
    says what was expected, ``{}`` standing for the dtypes' names."""
    if dtype not in FLOAT_DTYPES:
        *rest, last = FLOAT_DTYPE_NAMES
        raise TypeError(f"{op}: {message.format(', '.join(rest) + ' or ' + last)}, got {dtype}")
