"""Per-round metrics as CSV, for people's own plots: one row per (seed, strategy,
round), the same columns in a run's rounds.csv and a comparison's combined one."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

# setup columns first, then the round's own numbers; any other number a round
# records (deployed_accuracy, Flower's record_bytes, ...) follows, sorted by name
SETUP_COLUMNS = ("dataset", "model", "bits", "seed", "strategy")
ROUND_COLUMNS = (
    "round",
    "accuracy",
    "deployed_accuracy",
    "loss",
    "train_loss",
    "wall_s",
    "sim_s",
    "sim_epoch_s",
    "cum_wall_s",
    "cum_sim_s",
    "upload_bytes",
    "available",
    "sampled",
    "participants",
    "rejected",
    "slowest_client",
)
COUNTED = ("participants", "rejected")  # lists in results.json, their lengths here
LISTED = ("sampled",)  # lists of client ids in results.json, space-separated ids here


def round_rows(name: str, run: Mapping) -> list[dict]:
    """The run's rounds as flat dicts (``name``: the strategy column, e.g. fedhq+adjust)."""
    setup = {
        "dataset": run["dataset"],
        "model": run["model"],
        "bits": run["config"]["bits"],
        "seed": run["config"]["seed"],
        "strategy": name,
    }
    rows = []
    for r in run["rounds"]:
        row = dict(setup)
        for key, value in r.items():
            if key in COUNTED:
                row[key] = len(value)
            elif key in LISTED:
                row[key] = " ".join(str(v) for v in value)
            elif value is None or isinstance(value, (int, float, str)):
                row[key] = value
        rows.append(row)
    return rows


def write_rounds_csv(path: str | Path, runs: Iterable[tuple[str, Mapping]]) -> Path:
    """Writes the rounds of every (name, run) to ``path``; returns it."""
    rows = [row for name, run in runs for row in round_rows(name, run)]
    present = {k for row in rows for k in row}
    columns = [c for c in (*SETUP_COLUMNS, *ROUND_COLUMNS) if c != "deployed_accuracy" or c in present]
    columns += sorted(present - set(columns))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
