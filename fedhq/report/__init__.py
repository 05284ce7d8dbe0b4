"""Tables and plots of run results (``fedhq.run/1``) and comparisons (``fedhq.compare/1``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedhq.report.plots import plot_accuracy_vs_time, plot_allocation, ptq_region
from fedhq.report.tables import check_comparison, format_comparison_table, format_run_table


def write_report(comparison: Mapping, out_dir: str | Path) -> list[Path]:
    """comparison.txt, accuracy_vs_time.png and the allocation picture of every run
    whose clients were allocated per client (fedhq, fedrh)."""
    runs = check_comparison(comparison)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "comparison.txt"
    table.write_text(format_comparison_table(comparison) + "\n")
    paths = [table, plot_accuracy_vs_time(comparison, out / "accuracy_vs_time.png")]
    for name in ("fedhq", "fedrh"):
        if name in runs:
            paths.append(plot_allocation(runs[name], out / f"allocation_{name}.png"))
    return paths


def write_run_report(run: Mapping, out_dir: str | Path) -> list[Path]:
    """The allocation picture of one run."""
    return [plot_allocation(run, Path(out_dir) / "allocation.png")]


__all__ = [
    "format_comparison_table",
    "format_run_table",
    "plot_accuracy_vs_time",
    "plot_allocation",
    "ptq_region",
    "write_report",
    "write_run_report",
]
