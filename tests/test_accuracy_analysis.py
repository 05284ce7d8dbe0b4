"""Accuracy analysis: Alg. 1 picks the family the data came from, Eq. 3, degenerate
input, and the per-sample statistics' requirements: (1) renaming classes and reordering
samples change nothing, (2) a skewed client never scores above a balanced one."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from fedhq.analysis.accuracy import (
    DEFAULT_STATISTIC,
    FAMILIES,
    STATISTICS,
    Statistic,
    client_significance,
    feature_mean,
    fit_distribution,
    ks_statistic,
    label_surprisal,
    register_statistic,
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


def test_client_significance_is_statistic_then_alg1_then_eq3():
    images = np.random.default_rng(4).random((300, 1, 8, 8))
    labels = np.random.default_rng(4).integers(0, 10, 300)
    for name, a in (("feature_mean", 0.3), (DEFAULT_STATISTIC, 0.5)):
        values = STATISTICS[name].fn(images, labels)
        expected = weighted_distance(values, fit_distribution(values).mean, a=a)
        assert client_significance(images, labels, statistic=name, a=a) == pytest.approx(expected, rel=1e-12)
    assert np.array_equal(feature_mean(images), images.mean(axis=(1, 2, 3)))


def test_label_skew_lowers_significance():
    # Same V, ten classes: one-class < skewed < IID, and a single class scores 0.
    rng = np.random.default_rng(5)
    v = 3000
    iid = rng.integers(0, 10, v)
    skewed = np.where(rng.random(v) < 0.9, 3, rng.integers(0, 10, v))  # 90% class 3
    one_class = np.full(v, 7)
    sig = [client_significance(None, c) for c in (one_class, skewed, iid)]
    assert sig[0] == 0.0
    assert sig[0] < sig[1] < sig[2] / 2, sig


def test_label_surprisal_makes_eq3_the_label_entropy():
    # Mirrored, the surprisals are symmetric about 0, so mean(F_out) ~ 0 and Eq. 3 is
    # V^(1-a) * H(labels); the signs differ by at most one sample (odd-sized classes).
    rng = np.random.default_rng(12)
    for _ in range(20):
        v = int(rng.integers(50, 3000))
        k = int(rng.integers(2, 12))
        labels = rng.choice(k, v, p=rng.dirichlet(np.full(k, 0.5)))
        values = label_surprisal(None, labels)
        assert abs(np.sign(values).sum()) <= 1
        share = np.unique(labels, return_counts=True)[1] / v
        entropy = -(share * np.log(share)).sum()
        assert client_significance(None, labels) == pytest.approx(v**0.5 * entropy, rel=2e-3)


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
    client_significance(None, labels)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"{elapsed:.2f} s for 50k samples (about 0.2 s expected)"  # coarse guard


def test_constant_data_is_a_point_mass():
    fit = fit_distribution([3.0] * 20)
    assert (fit.family, fit.mean, fit.ks, fit.table) == ("point_mass", 3.0, 0.0, ())
    assert set(fit.skipped) == set(FAMILIES)
    assert all("zero variance" in why for why in fit.skipped.values())
    assert client_significance(None, [5]) == 0.0  # a single sample
    assert client_significance(None, [4] * 30) == 0.0  # a single class


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


@pytest.mark.parametrize("a", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_outside_the_open_unit_interval_raises(a):
    with pytest.raises(ValueError, match=r"a must lie in \(0, 1\)"):
        client_significance(None, [0, 1, 2], a=a)
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


# ---- the statistics' requirements -----------------------------------------------------


def labels_with_shares(share, v: int) -> np.ndarray:
    """v labels whose class counts are `share` * v, rounded by largest remainder."""
    share = np.asarray(share, dtype=np.float64) / np.sum(share)
    counts = np.floor(share * v).astype(np.int64)
    counts[np.argsort(-(share * v - counts), kind="stable")[: v - counts.sum()]] += 1
    return np.repeat(np.arange(share.size), counts)


def class_features(labels: np.ndarray, k: int, rng) -> np.ndarray:
    """Images whose intensity grows with the class (class c: c / (k - 1), plus noise),
    the case that makes a feature statistic follow the labels."""
    level = labels / max(k - 1, 1)
    return (level[:, None, None, None] + 0.05 * rng.standard_normal((labels.size, 1, 4, 4))).astype(np.float32)


@pytest.mark.parametrize("name", list(STATISTICS))
def test_renaming_classes_and_reordering_samples_change_nothing(name):
    rng = np.random.default_rng(20)
    for trial in range(25):
        k = int(rng.integers(1, 15))
        v = int(rng.integers(1, 3000))
        labels = rng.choice(k, v, p=rng.dirichlet(np.full(k, float(rng.choice([0.1, 0.5, 5.0])))))
        features = class_features(labels, k, rng)
        sig = client_significance(features, labels, statistic=name)
        names = rng.choice(np.arange(-50, 1000), k, replace=False)  # any distinct integers
        order = rng.permutation(v)
        renamed = client_significance(features, names[labels], statistic=name)
        reordered = client_significance(features[order], names[labels][order], statistic=name)
        assert renamed == pytest.approx(sig, rel=1e-9, abs=1e-12), (trial, k, v)
        assert reordered == pytest.approx(sig, rel=1e-9, abs=1e-12), (trial, k, v)


def test_equal_skew_over_different_classes_scores_the_same():
    # The label-index statistic scored 45 vs 5 for the 50:50 clients of 100 samples.
    for counts in ([50, 50], [300, 100]):
        a, b = np.repeat([0, 9], counts), np.repeat([4, 5], counts)
        for name, stat in STATISTICS.items():
            if not stat.needs_features:
                assert client_significance(None, a, statistic=name) == client_significance(None, b, statistic=name)


def skew_families(k: int) -> dict[str, list[np.ndarray]]:
    """Class shares over k classes, each list from balanced to one class."""
    uniform, one = np.full(k, 1 / k), np.eye(k)[0]
    return {
        "mixture with one class": [(1 - w) * uniform + w * one for w in np.linspace(0, 1, 21)],
        "geometric": [r ** np.arange(k) for r in np.linspace(1, 0.02, 25)],
        "fewer classes, balanced": [np.r_[np.ones(j), np.zeros(k - j)] for j in range(k, 0, -1)],
        "two classes": [np.r_[1, w, np.zeros(k - 2)] for w in np.linspace(1, 0, 11)] if k > 2 else [],
    }


def skew_violations(name: str, k: int, v: int, rng) -> list[str]:
    """Where more skew scores higher: along each family (non-increasing), and any of 100
    Dirichlet draws against the balanced client of the same size."""

    def sig(share):
        labels = labels_with_shares(share, v)
        return client_significance(class_features(labels, k, rng), labels, statistic=name)

    balanced = sig(np.ones(k))
    found = []
    for family, shares in skew_families(k).items():
        scores = [sig(p) for p in shares]
        for i in range(1, len(scores)):
            if scores[i] > scores[i - 1] * (1 + 1e-9) or scores[i] > balanced * (1 + 1e-9):
                found.append(f"{family} step {i}: {scores[i]:.6g} after {scores[i - 1]:.6g} (balanced {balanced:.6g})")
    for alpha in (0.1, 0.5, 2.0, 20.0):
        for _ in range(25):
            score = sig(rng.dirichlet(np.full(k, alpha)))
            if score > balanced * (1 + 1e-9):
                found.append(f"Dirichlet({alpha}): {score:.6g} > balanced {balanced:.6g}")
    return found


@pytest.mark.parametrize("k, v", [(2, 100), (3, 999), (9, 900), (10, 1000), (10, 60), (100, 5000)])
@pytest.mark.parametrize("name", [n for n, s in STATISTICS.items() if s.skew_monotone])
def test_more_skew_never_scores_above_balanced(name, k, v):
    found = skew_violations(name, k, v, np.random.default_rng(k * v))
    assert not found, found[:5]


@pytest.mark.parametrize("name", [n for n, s in STATISTICS.items() if not s.skew_monotone])
def test_statistics_not_marked_skew_monotone_have_a_counterexample(name):
    # The flag is a claim: a statistic that is not marked monotone must show why.
    assert skew_violations(name, 10, 1000, np.random.default_rng(21))


@pytest.mark.parametrize(
    "features, labels, statistic, match",
    [
        (None, [], DEFAULT_STATISTIC, "no samples"),
        (None, [[0, 1], [1, 0]], DEFAULT_STATISTIC, "1-D"),
        (None, [0.0, np.nan, 1.0], DEFAULT_STATISTIC, "non-finite label"),
        (None, [0.0, 1.5], DEFAULT_STATISTIC, "fractional"),
        (None, ["a", "b"], DEFAULT_STATISTIC, "integer class indices"),
        (np.zeros((3, 4)), [0, 1], DEFAULT_STATISTIC, "3 samples .* labels hold 2"),
        (np.zeros((2, 4)), [0, 1, 1], "feature_mean", "2 samples .* labels hold 3"),
        (np.array([[0.0, np.inf], [1.0, 1.0]]), [0, 1], "feature_mean", "non-finite features, the first at index 0"),
        (np.array([[0.0, 1.0], [1.0, np.nan]]), [0, 1], DEFAULT_STATISTIC, "non-finite features, the first at index 1"),
        (np.array([["x"], ["y"]]), [0, 1], "feature_mean", "numeric"),
        (None, [0, 1], "feature_mean", "reads the features"),
        (None, [0, 1], "label_index", "unknown statistic 'label_index'; choose one of: label_surprisal"),
    ],
)
def test_bad_client_inputs_raise_one_clear_error(features, labels, statistic, match):
    with pytest.raises(ValueError, match=match):
        client_significance(features, labels, statistic=statistic)


def test_registered_statistics_are_checked(monkeypatch):
    monkeypatch.setitem(STATISTICS, "half", Statistic("half", lambda x, y: y[: y.size // 2], False, False, "bad"))
    with pytest.raises(ValueError, match="gave 2 values for 4 samples"):
        client_significance(None, [0, 1, 2, 3], statistic="half")
    monkeypatch.setitem(STATISTICS, "nan", Statistic("nan", lambda x, y: y / 0.0, False, False, "bad"))
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(ValueError, match="statistic has 2 non-finite"):
        client_significance(None, [0, 1], statistic="nan")
    with pytest.raises(ValueError, match="already registered"):
        register_statistic(STATISTICS[DEFAULT_STATISTIC])


class LinearSpec:
    """A model spec as the engine uses one (hashable: the engine caches per spec)."""

    key = "m"

    def build(self):
        return torch.nn.Linear(1, 1)


def test_both_engines_use_the_configured_statistic():
    # engine.client_analysis is what the embedded engine and the Flower ClientApp call.
    from fedhq.data.base import Split
    from fedhq.fl import engine
    from fedhq.fl.config import ConfigError, RunConfig

    rng = np.random.default_rng(22)
    labels = rng.choice(10, 400, p=rng.dirichlet(np.full(10, 0.5)))
    data = Split(torch.from_numpy(class_features(labels, 10, rng)), torch.from_numpy(labels))
    estimate = SimpleNamespace(time_s=2.5)
    client = SimpleNamespace(
        data=data,
        alpha=1.0,
        beta=1.0,
        batch=16,
        device=SimpleNamespace(speed=SimpleNamespace(estimate=lambda *a, **k: estimate)),
    )
    for name in STATISTICS:
        config = RunConfig(acc_statistic=name).validated()
        expected = client_significance(data.x.numpy(), labels, statistic=name)
        spec = LinearSpec()
        assert engine.client_analysis(client, spec, config) == (2.5, expected)
    assert RunConfig().acc_statistic == DEFAULT_STATISTIC
    with pytest.raises(ConfigError, match="unknown acc_statistic 'label_index'"):
        RunConfig(acc_statistic="label_index").validated()
