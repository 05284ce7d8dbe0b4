"""PNG plots: accuracy against simulated and wall time for every strategy, and the
paper's Fig. 3 picture of the global initialization (each client at its normalized
(Sig_speed, Sig_acc), the Theta ray and the area-threshold curve)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedhq.report.tables import check_comparison, check_run, strategy_counts  # noqa: E402

DPI = 120
COLORS = {"ptq": "tab:blue", "qat": "tab:red", "fp32": "tab:gray"}


def ptq_region(x, y, xi: float, area_threshold: float) -> np.ndarray:
    """True where global initialization picks PTQ (ALGORITHM.md §4): the hypotenuse
    steeper than Theta's ray, y/x > (1 - xi)/xi, or a triangle smaller than the area
    threshold, x*y/2 < area_threshold."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return (y * xi > x * (1 - xi)) | (x * y / 2 < area_threshold)


def plot_accuracy_vs_time(comparison: Mapping, path: str | Path) -> Path:
    runs = check_comparison(comparison)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "cum_sim_s", "simulated time (s, heterogeneous devices)"),
                           (axes[1], "cum_wall_s", "wall time on this machine (s)")):  # fmt: skip
        spans = []
        for name, run in runs.items():
            t = [r[key] for r in run["rounds"]]
            ax.plot(t, [100 * r["accuracy"] for r in run["rounds"]], marker="o", markersize=3, label=name)
            spans.extend(v for v in t if v > 0)
        if spans and max(spans) / min(spans) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="strategy")
    first = next(iter(runs.values()))
    fig.suptitle(f"{first['dataset']}, {first['model']}, {len(first['clients'])} clients: accuracy vs time")
    fig.tight_layout()
    return _save(fig, path)


def plot_allocation(run: Mapping, path: str | Path) -> Path:
    check_run(run)
    xi, area = run["allocation"]["xi"], run["allocation"]["area_threshold"]
    fig, ax = plt.subplots(figsize=(7.8, 5.2))
    grid = np.linspace(1e-3, 1, 400)
    gx, gy = np.meshgrid(grid, grid)
    ax.contourf(gx, gy, ptq_region(gx, gy, xi, area), levels=[0.5, 1.5], colors=[COLORS["ptq"]], alpha=0.08)
    slope = (1 - xi) / xi
    ax.plot([0, 1 / slope], [0, 1], color="black", lw=1.2, label=f"Theta ray, slope (1-xi)/xi = {slope:.2g}")
    curve_x = grid[grid >= 2 * area]
    ax.plot(curve_x, 2 * area / curve_x, color="black", ls="--", lw=1.2, label=f"area x*y/2 = {area:g}")
    skipped = 0
    for c in run["clients"]:
        if c.get("norm_speed") is None or c.get("norm_acc") is None:
            skipped += 1
            continue
        ax.scatter(c["norm_speed"], c["norm_acc"], color=COLORS.get(c["strategy"], "black"), s=40, zorder=3)
        ax.annotate(str(c["id"]), (c["norm_speed"], c["norm_acc"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=8)  # fmt: skip
    for name in ("ptq", "qat"):
        ax.scatter([], [], color=COLORS[name], label=name.upper())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    orientation = run["allocation"].get("speed_orientation", "time")
    ax.set_xlabel(f"normalized speed significance (Eq. 2, read as {orientation})")
    ax.set_ylabel("normalized accuracy significance (Eq. 3)")
    ptq, qat = strategy_counts(run)
    note = f"; {skipped} without significances not shown" if skipped else ""
    ax.set_title(f"{run['strategy']}: xi = {xi:g}, {ptq} PTQ / {qat} QAT (shaded: PTQ region){note}", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
