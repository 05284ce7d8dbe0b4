"""The keys the report reads from ``fedhq.run/1`` and ``fedhq.compare/1`` documents,
checked once up front so that a malformed document fails with a ValueError naming
the missing key rather than a KeyError deep inside a table or a plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RUN_SCHEMA = "fedhq.run/1"
COMPARE_SCHEMA = "fedhq.compare/1"

RUN_KEYS = ("strategy", "model", "dataset", "clients", "allocation", "rounds", "final_accuracy", "best_accuracy",
            "wall_time_s", "sim_time_s", "upload_bytes")  # fmt: skip
# norm_speed / norm_acc are optional (absent or None: the client is left out of the allocation plot)
CLIENT_KEYS = ("id", "device", "alpha", "beta", "samples", "batch", "strategy", "speed_time_s", "speed_sig", "acc_sig")
# participants and slowest_client are optional
ROUND_KEYS = ("round", "accuracy", "loss", "wall_s", "sim_s", "sim_epoch_s", "cum_wall_s", "cum_sim_s",
              "upload_bytes", "rejected")  # fmt: skip
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
    if run.get("schema") != RUN_SCHEMA:
        raise ValueError(f"{where}: expected a results dict with schema {RUN_SCHEMA!r}, got schema {run.get('schema')!r}")
    _require(run, RUN_KEYS, where)
    for i, client in enumerate(_require_list(run, "clients", where)):
        _require(client, CLIENT_KEYS, f"{where}: clients[{i}]")
    for i, row in enumerate(_require_list(run, "rounds", where)):
        _require(row, ROUND_KEYS, f"{where}: rounds[{i}]")
    _require(run["allocation"], ALLOCATION_KEYS, f"{where}: allocation")
    return run


def check_comparison(comparison: object) -> Mapping[str, Mapping]:
    """Raises ValueError on a wrong schema, an empty ``runs`` or a malformed run;
    returns the runs by strategy name."""
    if not isinstance(comparison, Mapping) or comparison.get("schema") != COMPARE_SCHEMA:
        found = comparison.get("schema") if isinstance(comparison, Mapping) else type(comparison).__name__
        hint = " (a single run: use format_run_table)" if found == RUN_SCHEMA else ""
        raise ValueError(f"expected a comparison dict with schema {COMPARE_SCHEMA!r}, got {found!r}{hint}")
    runs = comparison.get("runs")
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("the comparison has no runs: 'runs' must be a non-empty dict of strategy -> run")
    for name, run in runs.items():
        check_run(run, f"run {name!r}")
    return runs
