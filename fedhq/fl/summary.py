"""The numbers a comparison is judged by, each defined once: a round's accuracy, a
run's headline (mean of the last rounds, robust to 4-bit round-to-round swings) and
final accuracy, and statistics over seeds (mean with a Student-t confidence interval,
paired differences). No "best accuracy": it would be chosen on the test set. Why, and
what the numbers mean: docs/fl.md, "Comparing over seeds".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy import stats

HEADLINE_ROUNDS = 5  # the headline accuracy is the mean over this many last rounds
CONFIDENCE = 0.95
BASELINE = "fedaqt"  # speedups are against all-QAT, as the paper's claim (1.50x-2.47x) is
# the project's allocators: each one present gets its paired differences against every other strategy
# (fedmpq: whether its gain over aqfl reproduces, docs/mixed-precision.md)
FOCUSES = ("fedhq", "fedhq-rt", "fedmpq")


def row_accuracy(row: Mapping) -> float:
    """A round's accuracy: of the deployed (quantized) global model when the run
    recorded it, else of the float global model."""
    value = row.get("deployed_accuracy")
    return row["accuracy"] if value is None else value


def headline_accuracy(run: Mapping, last: int = HEADLINE_ROUNDS) -> float | None:
    """Mean accuracy over the run's last ``last`` rounds (all of them if fewer)."""
    rows = run["rounds"][-last:]
    return sum(row_accuracy(r) for r in rows) / len(rows) if rows else None


def final_accuracy(run: Mapping) -> float | None:
    return row_accuracy(run["rounds"][-1]) if run["rounds"] else None


def speedup(baseline_s: float, run_s: float) -> float | None:
    """How many times faster ``run_s`` is than ``baseline_s`` (None if either is not > 0)."""
    return baseline_s / run_s if baseline_s > 0 and run_s > 0 else None


def mean_ci(values: Sequence[float | None], confidence: float = CONFIDENCE) -> dict:
    """Mean of ``values`` with the two-sided Student-t interval over them: mean +-
    t(confidence, n - 1) * s / sqrt(n). ``low``/``high``/``half_width`` are None below
    two values (no spread to measure); None values (a run with no rounds) are left out."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    result = {"n": n, "mean": sum(xs) / n if n else None, "low": None, "high": None, "half_width": None, "values": xs}
    if n >= 2:
        mean = result["mean"]
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        result.update(low=mean - half, high=mean + half, half_width=half)
    return result


def paired_differences(a: Sequence[float | None], b: Sequence[float | None], confidence: float = CONFIDENCE) -> dict:
    """mean_ci of a[i] - b[i] over the pairs where both exist (one pair per seed:
    the seed's shared partition and devices cancel out)."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need as many values on each side, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b) if x is not None and y is not None], confidence)


def run_metrics(run: Mapping, baseline: Mapping | None) -> dict:
    """One run's numbers that are averaged over seeds."""
    base_s = baseline["sim_time_s"] if baseline is not None else None
    return {
        "headline_accuracy": headline_accuracy(run),
        "final_accuracy": final_accuracy(run),
        "sim_time_s": run["sim_time_s"],
        "speedup": speedup(base_s, run["sim_time_s"]) if base_s is not None else None,
        "weight_bits": run.get("weight_bits"),  # absent from runs before mixed precision
        "upload_bytes": run["upload_bytes"],
    }


METRICS = ("headline_accuracy", "final_accuracy", "sim_time_s", "speedup", "weight_bits", "upload_bytes")


def summarize(runs_by_seed: Mapping[int, Mapping[str, Mapping]], confidence: float = CONFIDENCE) -> dict:
    """Per strategy, mean and CI over seeds of every METRICS entry; and, for each of
    FOCUSES present, ``paired[focus][other]``: its paired differences against every
    other strategy (accuracy in fractions, time as the other's simulated time over the
    focus's). ``runs_by_seed``: seed -> strategy -> run."""
    seeds = sorted(runs_by_seed)
    names = list(dict.fromkeys(name for s in seeds for name in runs_by_seed[s]))
    per_seed = {
        name: {
            s: run_metrics(runs_by_seed[s][name], runs_by_seed[s].get(BASELINE))
            for s in seeds
            if name in runs_by_seed[s]
        }
        for name in names
    }
    strategies = {
        name: {m: mean_ci([per_seed[name][s][m] for s in per_seed[name]], confidence) for m in METRICS}
        for name in names
    }
    paired = {focus: _paired(per_seed, focus, seeds, confidence) for focus in FOCUSES if focus in names}
    return {
        "confidence": confidence,
        "headline": f"mean accuracy of the last {HEADLINE_ROUNDS} rounds (deployed accuracy when recorded)",
        "baseline": BASELINE,
        "seeds": seeds,
        "strategies": strategies,
        "per_seed": {name: {str(s): v for s, v in rows.items()} for name, rows in per_seed.items()},
        "paired": paired,
    }


def _paired(per_seed: Mapping[str, Mapping[int, Mapping]], focus: str, seeds: Sequence[int], confidence: float) -> dict:
    """``focus``'s paired differences against every other strategy, over the seeds both ran."""
    paired = {}
    for other, base in per_seed.items():
        if other == focus:
            continue
        mine = per_seed[focus]
        both = [s for s in seeds if s in mine and s in base]
        paired[other] = {
            **{
                metric: paired_differences([mine[s][metric] for s in both], [base[s][metric] for s in both], confidence)
                for metric in ("headline_accuracy", "final_accuracy")
            },
            "time_ratio": mean_ci([speedup(base[s]["sim_time_s"], mine[s]["sim_time_s"]) for s in both], confidence),
            "seeds": both,
        }
    return paired
