"""The keys the report reads from run (``fedhq.run/*``) and comparison
(``fedhq.compare/*``) documents, checked once up front so that a malformed document
fails with a ValueError naming the missing key rather than a KeyError deep inside a
table or a plot. The writers (fedhq.fl.engine, fedhq.fl.compare) own the schema names;
older versions are still read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedhq.fl.compare import COMPARE_SCHEMA
from fedhq.fl.engine import RESULTS_SCHEMA as RUN_SCHEMA

# /1 also had best_accuracy, which is not read
RUN_SCHEMAS = (RUN_SCHEMA, "fedhq.run/1")
COMPARE_SCHEMA_V1 = "fedhq.compare/1"  # one seed's runs by strategy, under "runs"

RUN_KEYS = (
    "config",
    "strategy",
    "model",
    "dataset",
    "clients",
    "allocation",
    "rounds",
    "final_accuracy",
    "wall_time_s",
    "sim_time_s",
    "upload_bytes",
)
CONFIG_KEYS = ("bits", "seed")  # named in every title
# norm_speed / norm_acc are optional (absent or None: the client is left out of the allocation plot)
CLIENT_KEYS = ("id", "device", "alpha", "beta", "samples", "batch", "strategy", "speed_time_s", "speed_sig", "acc_sig")
# participants, slowest_client and deployed_accuracy are optional
ROUND_KEYS = (
    "round",
    "accuracy",
    "loss",
    "wall_s",
    "sim_s",
    "sim_epoch_s",
    "cum_wall_s",
    "cum_sim_s",
    "upload_bytes",
    "rejected",
)
ALLOCATION_KEYS = ("xi", "area_threshold", "ptq", "qat")  # speed_orientation is optional


def _require(obj: object, keys: Sequence[str], where: str) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {missing}")


def _require_list(obj: Mapping, key: str, where: str) -> Sequence:
    value = obj[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{where}: {key!r} must be a list, got {type(value).__name__}")
    return value


def check_run(run: object, where: str = "run") -> Mapping:
    """Raises ValueError naming the first missing key (or wrong schema); returns ``run``."""
    if not isinstance(run, Mapping):
        raise ValueError(f"{where}: expected a results dict with schema {RUN_SCHEMA!r}, got {type(run).__name__}")
    if run.get("schema") not in RUN_SCHEMAS:
        raise ValueError(
            f"{where}: expected a results dict with schema {RUN_SCHEMA!r}, got schema {run.get('schema')!r}"
        )
    _require(run, RUN_KEYS, where)
    _require(run["config"], CONFIG_KEYS, f"{where}: config")
    for i, client in enumerate(_require_list(run, "clients", where)):
        _require(client, CLIENT_KEYS, f"{where}: clients[{i}]")
    for i, row in enumerate(_require_list(run, "rounds", where)):
        _require(row, ROUND_KEYS, f"{where}: rounds[{i}]")
    _require(run["allocation"], ALLOCATION_KEYS, f"{where}: allocation")
    return run


def _check_runs(runs: object, where: str) -> Mapping[str, Mapping]:
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(f"{where} has no runs: expected a non-empty dict of strategy -> run")
    for name, run in runs.items():
        check_run(run, f"{where}: run {name!r}" if where != "the comparison" else f"run {name!r}")
    return runs


def check_comparison(comparison: object) -> dict[int, Mapping[str, Mapping]]:
    """Raises ValueError on a wrong schema, no runs or a malformed run; returns the
    runs as seed -> strategy -> run (a /1 document is one seed, its runs' own)."""
    found = comparison.get("schema") if isinstance(comparison, Mapping) else type(comparison).__name__
    if found == COMPARE_SCHEMA_V1:
        runs = _check_runs(comparison.get("runs"), "the comparison")
        return {int(next(iter(runs.values()))["config"]["seed"]): runs}
    if found != COMPARE_SCHEMA:
        hint = " (a single run: use format_run_table)" if found in RUN_SCHEMAS else ""
        raise ValueError(f"expected a comparison dict with schema {COMPARE_SCHEMA!r}, got {found!r}{hint}")
    by_seed = comparison.get("runs_by_seed")
    if not isinstance(by_seed, Mapping) or not by_seed:
        raise ValueError("the comparison has no runs: 'runs_by_seed' must be a non-empty dict of seed -> runs")
    result = {}
    for seed, runs in by_seed.items():
        if not str(seed).isdigit():
            raise ValueError(f"the comparison's runs_by_seed: seeds must be ints >= 0, got {seed!r}")
        where = "the comparison" if len(by_seed) == 1 else f"seed {seed}"
        result[int(seed)] = _check_runs(runs, where)
    return dict(sorted(result.items()))
