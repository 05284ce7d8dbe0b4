"""FedHQ's fine-grained adjustment (paper §4.3): after the global initialization and a
few rounds, find the clients where it went wrong (`detect`) and fix them: a flagged
leaf flips its strategy (`flip_leaf`, Situation 1); a flagged inner node's subtree is
searched top-down with few-round trials ranked by a ridge regression
(`search_subtree`, Situation 2).

Everything is driven through an injected ``trial(assignment) -> (seconds, accuracy)``
so it is testable without the engine. The rules, tolerances and budget:
docs/method.md §5 and docs/hierarchical.md.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import Ridge

Trial = Callable[[dict[int, str]], tuple[float, float]]
MAX_LEVEL_CANDIDATES = 256  # 2^8: a level wider than 8 nodes is sampled, not enumerated
SEED_TRIALS = 2  # trained before the regression has anything to fit


@dataclass
class Flag:
    client: int
    reasons: list[str]


def detect(
    round_time: Mapping[int, float],
    contribution: Mapping[int, float],
    *,
    time_tolerance: float,
    acc_tolerance: float,
    predicted: Mapping[int, float] | None = None,
) -> list[Flag]:
    """The flagged clients (docs/method.md §5.1). ``round_time``: each client's training
    + upload seconds in the observed round; ``predicted``: what the initialization
    expected of it; ``contribution``: validation accuracy with its update minus without it."""
    if time_tolerance < 0 or acc_tolerance < 0:
        raise ValueError(f"tolerances must be >= 0, got time {time_tolerance}, accuracy {acc_tolerance}")
    median = statistics.median(round_time.values()) if round_time else 0.0
    flags = []
    for client in sorted(set(round_time) | set(contribution)):
        reasons = []
        expected = (predicted or {}).get(client)
        if client in round_time and expected is not None and round_time[client] > (1 + time_tolerance) * expected:
            reasons.append(f"time: {round_time[client]:.3g} s > (1 + {time_tolerance}) x predicted {expected:.3g} s")
        elif client in round_time and round_time[client] > (1 + time_tolerance) * median:
            reasons.append(f"time: {round_time[client]:.3g} s > (1 + {time_tolerance}) x median {median:.3g} s")
        if contribution.get(client, 0.0) < -acc_tolerance:
            reasons.append(
                f"accuracy: leaving its update out raises validation accuracy by {-contribution[client]:.3f}"
            )
        if reasons:
            flags.append(Flag(client, reasons))
    return flags


@dataclass
class SearchReport:
    """What the cost model did for one flagged inner node."""

    node: int
    ranked: int = 0  # distinct candidates scored by the regression
    trained: int = 0  # candidates actually trained (trials)
    predictions: list[tuple[float, float, float, float]] = field(default_factory=list)  # (pred t, t, pred acc, acc)
    chosen: dict[int, str] = field(default_factory=dict)

    def prediction_error(self) -> dict[str, float] | None:
        """Mean relative error of predicted time and mean absolute error of predicted
        accuracy over the candidates trained after being ranked."""
        if not self.predictions:
            return None
        p = np.array(self.predictions)
        return {
            "time_rel": float(np.mean(np.abs(p[:, 0] / p[:, 1] - 1))),
            "accuracy_abs": float(np.mean(np.abs(p[:, 2] - p[:, 3]))),
        }

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "ranked": self.ranked,
            "trained": self.trained,
            "prediction_error": self.prediction_error(),
            "chosen": {str(k): v for k, v in self.chosen.items()},
        }


def _features(assignment: Mapping[int, str], nodes: list[int]) -> list[float]:
    return [1.0 if assignment[n] == "qat" else 0.0 for n in nodes]


def search_subtree(
    levels: list[list[int]],
    current: Mapping[int, str],
    trial: Trial,
    *,
    budget: int,
    acc_tolerance: float,
    rng: np.random.Generator,
) -> SearchReport:
    """Situation 2 for the subtree whose top-down levels are ``levels`` (levels[0] =
    [the flagged node]). Returns the report with the chosen assignment of its nodes."""
    nodes = [n for level in levels for n in level]
    report = SearchReport(node=levels[0][0], chosen={n: current[n] for n in nodes})
    if budget <= 0:
        return report
    measured: list[tuple[dict[int, str], float, float]] = []

    def run(assignment: dict[int, str]) -> tuple[float, float]:
        seconds, accuracy = trial(dict(assignment))
        measured.append((dict(assignment), seconds, accuracy))
        report.trained += 1
        return seconds, accuracy

    ranked: set[tuple] = set()  # distinct candidates the regression scored
    base_time, base_acc = run(dict(report.chosen))
    floor = base_acc - acc_tolerance
    for level in levels:
        if report.trained >= budget:
            break
        options = list(itertools.product(("ptq", "qat"), repeat=len(level)))
        if len(options) > MAX_LEVEL_CANDIDATES:
            options = [options[i] for i in rng.choice(len(options), MAX_LEVEL_CANDIDATES, replace=False)]
        candidates = [{**report.chosen, **dict(zip(level, o))} for o in options]
        candidates = [c for c in candidates if all(c != m[0] for m in measured)]
        while candidates and report.trained < budget:
            if len(measured) < SEED_TRIALS:
                pick = candidates.pop(int(rng.integers(len(candidates))))
                run(pick)
                continue
            x = np.array([_features(m[0], nodes) for m in measured])
            time_model = Ridge(alpha=1.0).fit(x, [m[1] for m in measured])
            acc_model = Ridge(alpha=1.0).fit(x, [m[2] for m in measured])
            xc = np.array([_features(c, nodes) for c in candidates])
            pred_t, pred_a = time_model.predict(xc), acc_model.predict(xc)
            ranked.update(tuple(sorted(c.items())) for c in candidates)
            report.ranked = len(ranked)
            # fastest predicted among those predicted accurate enough; else most accurate
            ok = pred_a >= floor
            best = int(np.argmin(np.where(ok, pred_t, np.inf))) if ok.any() else int(np.argmax(pred_a))
            seconds, accuracy = run(candidates.pop(best))
            report.predictions.append((float(pred_t[best]), seconds, float(pred_a[best]), accuracy))
        good = [m for m in measured if m[2] >= floor]
        winner = min(good, key=lambda m: m[1]) if good else max(measured, key=lambda m: m[2])
        report.chosen = {n: winner[0][n] for n in nodes}
    return report


def flip_leaf(flag: Flag, strategy: str) -> tuple[str, str]:
    """Situation 1: (new strategy, why) for a flagged leaf."""
    wants = "qat" if any(r.startswith("accuracy") for r in flag.reasons) else "ptq"
    if strategy == wants:
        return strategy, f"already {strategy.upper()}: flipping would not help ({'; '.join(flag.reasons)})"
    return wants, f"flipped {strategy.upper()} -> {wants.upper()} ({'; '.join(flag.reasons)})"
