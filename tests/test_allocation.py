"""Global initialization (Eq. 4-6): normalization, the Theta and area rules, properties."""

import time
import zlib

import numpy as np
import pytest
from conftest import SESSION_SEED

from fedhq.allocation import Strategy, geometric_segmentation, global_init, normalize_significance


@pytest.fixture
def rng(request):
    """Fresh inputs every run, reproducible with FEDHQ_TEST_SEED (see the report header)."""
    return np.random.default_rng(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def random_significances(rng, n):
    """Significances of several shapes: spread, heavy-tailed, and tied (few distinct values)."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.random(n) * 10 ** rng.uniform(-3, 3)
    if kind == 1:
        return rng.lognormal(0, 2, n)
    return rng.integers(0, 4, n).astype(float)


def test_strategy_is_a_string_enum():
    assert Strategy.PTQ == "ptq" and Strategy.QAT == "qat"
    assert str(Strategy.QAT) == "qat" and Strategy("ptq") is Strategy.PTQ


def test_normalization_is_min_max_strictly_inside_the_unit_interval():
    v = np.array([3.0, -1.0, 7.0, 5.0])
    n = normalize_significance(v, margin=0.01)
    assert n.tolist() == pytest.approx([0.01 + 0.98 * 0.5, 0.01, 0.99, 0.01 + 0.98 * 0.75])
    assert np.all((n > 0) & (n < 1))
    assert normalize_significance(2.5 * v + 7) == pytest.approx(normalize_significance(v))  # Eq. 5 is affine-free
    assert normalize_significance([4.2] * 5).tolist() == [0.5] * 5
    assert normalize_significance([-1e308, 0.0, 1e308]).tolist() == pytest.approx([0.01, 0.5, 0.99])  # no overflow


def test_slope_rule_at_xi_0_2_is_slope_4():
    # Every triangle here has area >= 0.0625 so only the Theta rule decides.
    x = np.array([0.20, 0.25, 0.20, 0.50, 0.90])
    y = np.array([0.90, 0.90, 0.80, 0.90, 0.50])
    # y / x:       4.5   3.6   4.0 (on the ray: not steeper)   1.8   0.56
    assert np.all(x * y / 2 >= 0.0625)
    assert geometric_segmentation(x, y, 0.2, 0.0625).tolist() == [True, False, False, False, False]
    assert global_init([0, 1], [0, 1]).theta_slope == pytest.approx(4.0)


def test_area_rule():
    x = np.array([0.30, 0.30, 0.01])
    y = np.array([0.40, 0.45, 0.01])
    # area:         0.06  0.0675  0.00005; all slopes < 4
    assert geometric_segmentation(x, y, 0.2, 0.0625).tolist() == [True, False, True]
    assert geometric_segmentation(x, y, 0.2, 0.0).tolist() == [False, False, False]  # rule off


def test_global_init_end_to_end_and_orientation():
    speed = [0.0, 10.0, 10.0, 5.0]
    acc = [10.0, 0.0, 10.0, 5.0]
    # time (Eq. 2 as printed): x = [.01, .99, .99, .5], y = [.99, .01, .99, .5]
    out = global_init(speed, acc)
    assert out.x.tolist() == pytest.approx([0.01, 0.99, 0.99, 0.5])
    assert out.y.tolist() == pytest.approx([0.99, 0.01, 0.99, 0.5])
    # steep -> PTQ; tiny area -> PTQ; slope 1, area 0.49 -> QAT; slope 1, area 0.125 -> QAT
    assert out.strategies == [Strategy.PTQ, Strategy.PTQ, Strategy.QAT, Strategy.QAT]
    assert out.ptq.tolist() == [True, True, False, False]
    assert (out.xi, out.area_threshold, out.speed_orientation) == (0.2, 0.0625, "time")
    # speed (the prose's reading): x = 1 - NormSig_speed = [.99, .01, .01, .5]
    flipped = global_init(speed, acc, speed_orientation="speed")
    assert flipped.x.tolist() == pytest.approx([0.99, 0.01, 0.01, 0.5])
    assert flipped.strategies == [Strategy.QAT, Strategy.PTQ, Strategy.PTQ, Strategy.QAT]


def test_all_equal_inputs_put_every_client_at_the_centre():
    out = global_init([3.0] * 6, [0.7] * 6)
    assert out.x.tolist() == [0.5] * 6 and out.y.tolist() == [0.5] * 6
    # slope 1 < 4 and area 0.125 >= 0.0625: all QAT; a larger area threshold makes all PTQ.
    assert out.strategies == [Strategy.QAT] * 6
    assert global_init([3.0] * 6, [0.7] * 6, area_threshold=0.2).strategies == [Strategy.PTQ] * 6
    assert global_init([1.0], [2.0]).strategies == [Strategy.QAT]  # a single client


def test_raising_xi_never_turns_ptq_into_qat(rng):
    for trial in range(300):
        n = int(rng.integers(1, 200))
        speed, acc = random_significances(rng, n), random_significances(rng, n)
        xi_low, xi_high = np.sort(rng.uniform(1e-6, 1 - 1e-6, 2))
        area = float(rng.choice([0.0, 0.0625, rng.uniform(0, 0.3)]))
        orientation = ("time", "speed")[trial % 2]
        low = global_init(speed, acc, xi_low, area, speed_orientation=orientation).ptq
        high = global_init(speed, acc, xi_high, area, speed_orientation=orientation).ptq
        turned = np.flatnonzero(low & ~high)
        assert turned.size == 0, f"trial {trial}: xi {xi_low} -> {xi_high} turned clients {turned} PTQ -> QAT"


def test_lower_xi_gives_more_qat_on_average(rng):
    # The paper's Table 3: xi = 0.1 trains slower than xi = 0.2 (more QAT clients).
    speed, acc = rng.random(1000), rng.random(1000)
    counts = [global_init(speed, acc, xi).ptq.sum() for xi in (0.1, 0.2, 0.5)]
    assert counts[0] < counts[1] < counts[2], counts


def test_independent_of_client_order(rng):
    for trial in range(50):
        n = int(rng.integers(1, 300))
        speed, acc = random_significances(rng, n), random_significances(rng, n)
        perm = rng.permutation(n)
        xi = float(rng.uniform(0.05, 0.95))
        base = global_init(speed, acc, xi)
        permuted = global_init(speed[perm], acc[perm], xi)
        assert np.array_equal(permuted.ptq, base.ptq[perm]), f"trial {trial}"
        assert np.array_equal(permuted.x, base.x[perm]) and np.array_equal(permuted.y, base.y[perm])


def test_100k_clients_well_under_a_second(rng):
    speed, acc = rng.random(100_000), rng.lognormal(size=100_000)
    start = time.perf_counter()
    out = global_init(speed, acc)
    elapsed = time.perf_counter() - start
    assert len(out.strategies) == 100_000
    assert elapsed < 0.5, f"{elapsed:.3f} s for 100k clients (a few ms expected)"  # coarse complexity guard


@pytest.mark.parametrize(
    "speed, acc, kwargs, match",
    [
        ([1, 2], [1, 2, 3], {}, "2 clients but acc_sig has 3"),
        ([], [], {}, "empty"),
        ([1, np.nan], [1, 2], {}, "speed_sig has 1 non-finite"),
        ([1, 2], [np.inf, 2], {}, "acc_sig has 1 non-finite"),
        ([[1, 2]], [[1, 2]], {}, "1-D"),
        (["fast", "slow"], [1, 2], {}, "numeric"),
        ([1, 2], [1, 2], {"xi": 0.0}, "xi"),
        ([1, 2], [1, 2], {"xi": 1.0}, "xi"),
        ([1, 2], [1, 2], {"xi": float("nan")}, "xi"),
        ([1, 2], [1, 2], {"area_threshold": -0.1}, "area_threshold"),
        ([1, 2], [1, 2], {"area_threshold": float("inf")}, "area_threshold"),
        ([1, 2], [1, 2], {"speed_orientation": "fast"}, "speed_orientation"),
        ([1, 2], [1, 2], {"margin": 0.5}, "margin"),
    ],
)
def test_bad_input_raises(speed, acc, kwargs, match):
    with pytest.raises(ValueError, match=match):
        global_init(speed, acc, **kwargs)
