"""Accuracy analysis: Alg. 1 picks the family the data came from, Eq. 3, degenerate input."""

import time

import numpy as np
import pytest
from scipy import stats

from fedhq.analysis.accuracy import (
    FAMILIES,
    accuracy_significance,
    class_label,
    feature_mean,
    fit_distribution,
    ks_statistic,
    weighted_distance,
)

N = 5000  # samples per known-distribution test; see the note on near-ties below

# (family, sampler, true mean). Fixed seeds: whether a fit is recovered is a statistical
# statement, and these parameters make it hold by a margin, not by luck of the seed.
# Near-ties and how each is made clear:
# - normal: Student t (df -> infinity) and a rescaled Beta (a, b large) reach the same
#   fit with more parameters; Alg. 1's tie rule takes the one with fewer. Logistic has
#   the same parameter count and is told apart by its heavier tails, which needs a few
#   thousand samples (at V = 1,000 4 seeds in 30 chose Logistic; at 5,000 none in 40).
# - poisson: a Binomial with large n matches it with one parameter more (tie rule).
# - binomial: n = 10, p = 0.7 has variance 2.1 against mean 7, far from any Poisson,
#   and is too skewed and discrete for a Normal.
# - logistic: a Student t with df near 9 is within noise of it; the tie rule prefers
#   the two-parameter Logistic.
# - student_t: df = 3 has tails no Normal or Logistic matches.
# - gamma (shape 2) and lognormal (sigma 0.8): shapes small enough to stay skewed and
#   tell apart by their tails.
# - beta(0.5, 0.5): U-shaped, which no other family can be.
# - power_law: Pareto alpha = 2.5 (finite mean, Eq. 3 needs one), x_min = 2.
KNOWN = [
    ("normal", lambda r: r.normal(3.0, 2.0, N), 3.0),
    ("poisson", lambda r: r.poisson(4.0, N), 4.0),
    ("binomial", lambda r: r.binomial(10, 0.7, N), 7.0),
    ("gamma", lambda r: r.gamma(2.0, 1.5, N), 3.0),
    ("beta", lambda r: r.beta(0.5, 0.5, N), 0.5),
    ("logistic", lambda r: r.logistic(1.0, 2.0, N), 1.0),
    ("student_t", lambda r: 1.0 + 2.0 * r.standard_t(3, N), 1.0),
    ("lognormal", lambda r: r.lognormal(0.5, 0.8, N), float(np.exp(0.5 + 0.8**2 / 2))),
    ("power_law", lambda r: 2.0 * (1.0 + r.pareto(2.5, N)), 2.0 * 2.5 / 1.5),
]


@pytest.mark.parametrize("family, sample, true_mean", KNOWN, ids=[k[0] for k in KNOWN])
def test_alg1_recovers_the_sampled_family(family, sample, true_mean):
    x = sample(np.random.default_rng(FAMILIES.index(family)))
    fit = fit_distribution(x)
    table = ", ".join(f"{f.family} {f.ks:.4f}" for f in fit.table)
    assert fit.family == family, f"picked {fit.family}; KS: {table}; skipped: {fit.skipped}"
    assert {f.family for f in fit.table} | set(fit.skipped) == set(FAMILIES)  # all nine tried
    assert fit.ks < 1.63 / np.sqrt(N), "KS above the 1% critical value for a correct fit"
    # mean(F_out) feeds Eq. 3: it must estimate the true mean (within 5 standard errors).
    assert abs(fit.mean - true_mean) < 5 * x.std() / np.sqrt(N)


def test_support_maps_are_recorded_and_the_mean_mapped_back():
    labels = np.random.default_rng(1).integers(0, 10, 1500)  # includes 0: needs a shift
    rows = {f.family: f for f in fit_distribution(labels).table}
    assert rows["normal"].transform == "none"
    assert rows["gamma"].transform == "z = x + 0.9"  # min -> 10% of the range 0..9
    assert rows["beta"].transform == "z = (x + 0.45) / 9.9"  # 5% margin each side
    # Gamma's MLE (location 0) reproduces the sample mean exactly in the shifted
    # coordinate; mapped back it must be the labels' mean.
    assert rows["gamma"].mean == pytest.approx(labels.mean(), rel=1e-9)
    assert rows["beta"].mean == pytest.approx(labels.mean(), rel=0.02)


def test_ks_statistic_matches_scipy_for_continuous_and_brute_force_for_discrete():
    rng = np.random.default_rng(2)
    x = np.sort(rng.normal(size=500))
    dist = stats.norm(0.1, 1.2)
    ours = ks_statistic(x, np.arange(1, x.size + 1) / x.size, dist, discrete=False)
    assert ours == pytest.approx(stats.kstest(x, dist.cdf).statistic, abs=1e-12)

    counts = rng.poisson(3.0, 400)
    unique, n = np.unique(counts, return_counts=True)
    ecdf = np.cumsum(n) / counts.size
    dist = stats.poisson(3.3)
    grid = np.arange(unique[0] - 1, unique[-1] + 1.5, 0.5)  # both sides of every jump
    brute = np.max(np.abs((counts[:, None] <= grid).mean(axis=0) - dist.cdf(grid)))
    assert ks_statistic(unique, ecdf, dist, discrete=True) == pytest.approx(brute, abs=1e-12)


def test_eq3_by_hand():
    # |x - 1.5| = 1.5, 0.5, 0.5, 2.5 -> 5; V^(-a) = 4^(-0.5) = 0.5 (Eq. 3).
    assert weighted_distance([0, 1, 1, 4], 1.5) == pytest.approx(2.5)
    assert weighted_distance([0, 1, 1, 4], 1.5, a=0.25) == pytest.approx(5 / np.sqrt(2))
    # The V^(-a) weight: four copies of the same data, a = 0.5 -> 4 * 5 / 2 = 2x.
    x = np.random.default_rng(3).normal(size=100)
    assert weighted_distance(np.tile(x, 4), 0.3) == pytest.approx(2 * weighted_distance(x, 0.3))


def test_accuracy_significance_is_statistic_then_alg1_then_eq3():
    images = np.random.default_rng(4).random((300, 1, 8, 8))
    values = images.mean(axis=(1, 2, 3))  # a pluggable statistic: mean pixel intensity
    assert np.array_equal(feature_mean(images), values)
    expected = weighted_distance(values, fit_distribution(values).mean, a=0.3)
    assert accuracy_significance(images, statistic=feature_mean, a=0.3) == pytest.approx(expected, rel=1e-12)
    assert np.array_equal(class_label([2, 0, 1]), [2, 0, 1])  # the default statistic


def test_label_skew_lowers_significance():
    # Same V, ten classes. Eq. 3 sums each label's distance to the fitted mean, so a
    # client whose labels concentrate in few classes scores lower than an IID client,
    # and a single-class client scores 0: ordered one-class < skewed < IID.
    rng = np.random.default_rng(5)
    v = 3000
    iid = rng.integers(0, 10, v)
    skewed = np.where(rng.random(v) < 0.9, 3, rng.integers(0, 10, v))  # 90% class 3
    one_class = np.full(v, 7)
    sig = [accuracy_significance(c) for c in (one_class, skewed, iid)]
    assert sig[0] == 0.0
    assert sig[0] < sig[1] < sig[2] / 3, sig


def test_independent_of_sample_order():
    x = np.random.default_rng(6).gamma(2.0, 1.0, 4000)  # above max_fit_samples: subsampled
    permuted = x[np.random.default_rng(7).permutation(x.size)]
    fit = fit_distribution(x)
    assert fit == fit_distribution(permuted)  # the fit sees sorted values only
    # Eq. 3 sums in input order: equal up to float rounding.
    assert weighted_distance(permuted, fit.mean) == pytest.approx(weighted_distance(x, fit.mean), rel=1e-12)


def test_fast_on_a_large_client():
    labels = np.random.default_rng(9).integers(0, 10, 50_000)
    start = time.perf_counter()
    accuracy_significance(labels)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"{elapsed:.2f} s for 50k samples (about 0.2 s expected)"  # coarse guard


def test_constant_data_is_a_point_mass():
    fit = fit_distribution([3.0] * 20)
    assert (fit.family, fit.mean, fit.ks, fit.table) == ("point_mass", 3.0, 0.0, ())
    assert set(fit.skipped) == set(FAMILIES)
    assert all("zero variance" in why for why in fit.skipped.values())
    assert accuracy_significance([5]) == 0.0  # a single sample


def test_families_that_do_not_apply_are_skipped_with_a_reason():
    rng = np.random.default_rng(10)
    uniform = fit_distribution(rng.integers(0, 10, 300))  # variance 8.25 > mean 4.5
    assert "dispersed" in uniform.skipped["binomial"]
    assert "kurtosis" in uniform.skipped["student_t"]  # flatter than a Normal: df -> infinity
    heavy = fit_distribution(1.0 + rng.pareto(0.8, 300))  # alpha < 1: infinite mean
    assert "non-negative integer" in heavy.skipped["poisson"]
    assert "non-negative integer" in heavy.skipped["binomial"]
    assert "no finite mean" in heavy.skipped["power_law"]


TINY = {
    "two values": [0.0, 1.0],
    "three normals": np.random.default_rng(11).normal(size=3),
    "small counts": [0, 1, 1, 2, 0],
    "one outlier": [0.0, 0.0, 0.0, 0.0, 1e6],
    "an atom": [3] * 18 + [0, 9],
}


@pytest.mark.parametrize("values", TINY.values(), ids=TINY.keys())
def test_tiny_or_odd_samples_never_crash(values):
    fit = fit_distribution(values)
    assert fit.family in FAMILIES and np.isfinite(fit.mean) and 0 <= fit.ks <= 1
    assert np.isfinite(weighted_distance(values, fit.mean))


@pytest.mark.parametrize(
    "values, match",
    [
        ([], "no samples"),
        ([0.0, np.nan, 1.0], "non-finite"),
        ([0.0, np.inf], "non-finite"),
        ([[0, 1], [1, 0]], "1-D"),
        (["a", "b"], "numeric"),
    ],
)
def test_bad_values_raise(values, match):
    with pytest.raises(ValueError, match=match):
        fit_distribution(values)
    with pytest.raises(ValueError, match=match):
        accuracy_significance(values)


@pytest.mark.parametrize("a", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_outside_the_open_unit_interval_raises(a):
    with pytest.raises(ValueError, match=r"a must lie in \(0, 1\)"):
        accuracy_significance([0, 1, 2], a=a)
    with pytest.raises(ValueError, match=r"a must lie in \(0, 1\)"):
        weighted_distance([0, 1, 2], 1.0, a=a)


def test_bad_fit_settings_raise():
    with pytest.raises(ValueError, match="max_fit_samples"):
        fit_distribution([0, 1, 2], max_fit_samples=1)
    with pytest.raises(ValueError, match="tie_fraction"):
        fit_distribution([0, 1, 2], tie_fraction=-1)
    with pytest.raises(ValueError, match="center"):
        weighted_distance([0, 1, 2], float("inf"))
    with pytest.raises(ValueError, match="overflows"):
        weighted_distance([1e308, -1e308], 1e308)
