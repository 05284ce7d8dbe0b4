"""Tables, plots and CSV files of run results (``fedhq.run/*``) and comparisons
(``fedhq.compare/*``).

``schema`` checks the keys read here, ``tables`` formats text, ``plots`` draws PNGs,
``csvfiles`` writes per-round rows; this module writes them into an output folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedhq.fl.compare import run_dir, seed_dir
from fedhq.report.csvfiles import write_rounds_csv
from fedhq.report.plots import (
    plot_accuracy_vs_time,
    plot_allocation,
    plot_precision_summary,
    plot_round_times,
    plot_seed_summary,
    ptq_region,
)
from fedhq.report.schema import COMPARE_SCHEMA, RUN_SCHEMA, check_comparison, check_run
from fedhq.report.tables import format_comparison_table, format_run_table, format_seed_table

ALLOCATED = (
    "fedhq",
    "fedhq+adjust",
    "fedrh",
)  # strategies whose clients differ, so their Fig. 3 picture says something
ROUNDS_CSV = "rounds.csv"


def _seed_report(runs: Mapping[str, Mapping], out: Path) -> list[Path]:
    table = out / "comparison.txt"
    table.write_text(format_seed_table(runs) + "\n")
    paths = [table, plot_accuracy_vs_time(runs, out / "accuracy_vs_time.png")]
    for name in ALLOCATED:
        if name in runs:
            paths.append(plot_allocation(runs[name], out / f"allocation_{name.replace('+', '_')}.png"))
    times = plot_round_times(runs, out / "round_times.png")
    return paths + ([times] if times else [])


def write_report(comparison: Mapping, out_dir: str | Path) -> list[Path]:
    """Into ``out_dir`` (the comparison's folder): comparison.txt and rounds.csv of every
    run; with one seed accuracy_vs_time.png and allocation_<strategy>.png (fedhq,
    fedhq+adjust, fedrh) and round_times.png beside them, with several seeds seed_summary.png
    and precision_summary.png (accuracy against bits per weight and bytes uploaded), and each
    seed's own table and plots in its folder. Every run's folder gets its rounds.csv.
    Returns the paths written."""
    by_seed = check_comparison(comparison)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(by_seed) == 1:
        paths = _seed_report(next(iter(by_seed.values())), out)
    else:
        table = out / "comparison.txt"
        table.write_text(format_comparison_table(comparison) + "\n")
        paths = [
            table,
            plot_seed_summary(by_seed, out / "seed_summary.png"),
            plot_precision_summary(by_seed, out / "precision_summary.png"),
        ]
        for seed, runs in by_seed.items():
            folder = seed_dir(out, seed)
            folder.mkdir(parents=True, exist_ok=True)
            paths += _seed_report(runs, folder)
    for seed, runs in by_seed.items():
        for name, run in runs.items():
            paths.append(write_rounds_csv(run_dir(out, seed, name) / ROUNDS_CSV, [(name, run)]))
    entries = [(name, run) for runs in by_seed.values() for name, run in runs.items()]
    paths.append(write_rounds_csv(out / ROUNDS_CSV, entries))
    return paths


def write_run_report(run: Mapping, out_dir: str | Path) -> list[Path]:
    """One run: run.txt, rounds.csv, accuracy_vs_time.png and allocation.png; returns the paths."""
    check_run(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "run.txt"
    table.write_text(format_run_table(run) + "\n")
    return [
        table,
        write_rounds_csv(out / ROUNDS_CSV, [(run["strategy"], run)]),
        plot_accuracy_vs_time({run["strategy"]: run}, out / "accuracy_vs_time.png"),
        plot_allocation(run, out / "allocation.png"),
    ]


__all__ = [
    "COMPARE_SCHEMA",
    "ROUNDS_CSV",
    "RUN_SCHEMA",
    "check_comparison",
    "check_run",
    "format_comparison_table",
    "format_run_table",
    "format_seed_table",
    "plot_accuracy_vs_time",
    "plot_allocation",
    "plot_precision_summary",
    "plot_seed_summary",
    "ptq_region",
    "write_report",
    "write_rounds_csv",
    "write_run_report",
]
