"""Tables and plots of run results (``fedhq.run/1``) and comparisons (``fedhq.compare/1``).

``schema`` checks the keys read here, ``tables`` formats text, ``plots`` draws PNGs;
this module writes them into an output folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedhq.report.plots import plot_accuracy_vs_time, plot_allocation, ptq_region
from fedhq.report.schema import COMPARE_SCHEMA, RUN_SCHEMA, check_comparison, check_run
from fedhq.report.tables import format_comparison_table, format_run_table

ALLOCATED = ("fedhq", "fedhq+adjust", "fedrh")  # strategies whose clients differ, so their Fig. 3 picture says something


def write_report(comparison: Mapping, out_dir: str | Path) -> list[Path]:
    """comparison.txt, accuracy_vs_time.png and allocation_<strategy>.png for fedhq,
    fedhq+adjust and fedrh when present; returns the paths written."""
    runs = check_comparison(comparison)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "comparison.txt"
    table.write_text(format_comparison_table(comparison) + "\n")
    paths = [table, plot_accuracy_vs_time(comparison, out / "accuracy_vs_time.png")]
    for name in ALLOCATED:
        if name in runs:
            paths.append(plot_allocation(runs[name], out / f"allocation_{name.replace('+', '_')}.png"))
    return paths


def write_run_report(run: Mapping, out_dir: str | Path) -> list[Path]:
    """One run: run.txt, accuracy_vs_time.png and allocation.png; returns the paths."""
    check_run(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "run.txt"
    table.write_text(format_run_table(run) + "\n")
    single = {"schema": COMPARE_SCHEMA, "runs": {run["strategy"]: run}}
    return [table, plot_accuracy_vs_time(single, out / "accuracy_vs_time.png"),
            plot_allocation(run, out / "allocation.png")]  # fmt: skip


__all__ = [
    "COMPARE_SCHEMA",
    "RUN_SCHEMA",
    "check_comparison",
    "check_run",
    "format_comparison_table",
    "format_run_table",
    "plot_accuracy_vs_time",
    "plot_allocation",
    "ptq_region",
    "write_report",
    "write_run_report",
]
