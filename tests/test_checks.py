import math

import numpy as np
import pytest

from fedhq_kernels.checks import is_int, is_real


@pytest.mark.parametrize("value", [0, -3, 2**70, np.int64(5), np.uint8(1)])
def test_is_int_accepts_integers(value):
    assert is_int(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, "1", None, [1]])
def test_is_int_refuses_bools_floats_and_others(value):
    assert not is_int(value)


@pytest.mark.parametrize("value", [0, 1.5, -2, np.float32(0.25), np.int16(3), 1e308])
def test_is_real_accepts_finite_numbers(value):
    assert is_real(value)


@pytest.mark.parametrize("value", [True, math.nan, math.inf, -math.inf, np.float64("nan"), "1", None, 1j])
def test_is_real_refuses_bools_non_finite_and_others(value):
    assert not is_real(value)
