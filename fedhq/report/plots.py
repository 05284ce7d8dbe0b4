"""PNG plots: accuracy against simulated and wall time for every strategy, and the
paper's Fig. 3 picture of the global initialization (each client at its normalized
(Sig_speed, Sig_acc), the Theta ray and the area-threshold curve)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from fedhq.allocation import geometric_segmentation  # noqa: E402
from fedhq.report.schema import check_comparison, check_run  # noqa: E402
from fedhq.report.tables import strategy_counts  # noqa: E402

DPI = 120
LOG_X_SPREAD = 20  # above this ratio of slowest to fastest end-to-end time, a linear axis squeezes the fast runs
MAX_MARKERS = 25  # markers per line; more turn a 50-round curve into a thick smear
MAX_LABELLED_CLIENTS = 60  # beyond this, client ids on the allocation plot overlap into noise
CLIENT_COLORS = {"ptq": "tab:blue", "qat": "tab:red", "fp32": "tab:gray"}
# fixed per strategy so the same run looks the same in every figure; fp32 is the ceiling, dashed
STRATEGY_STYLES = {
    "fedhq": {"color": "tab:blue", "marker": "o"},
    "fedaqt": {"color": "tab:red", "marker": "s"},
    "fedfq": {"color": "tab:green", "marker": "^"},
    "fedrh": {"color": "tab:orange", "marker": "D"},
    "fp32": {"color": "0.3", "marker": "x", "linestyle": "--"},
}


def ptq_region(x, y, xi: float, area_threshold: float) -> np.ndarray:
    """Boolean array, True where global initialization picks PTQ (ALGORITHM.md §4):
    y/x > (1 - xi)/xi or x*y/2 < area_threshold. It is the allocation's own rule
    (``geometric_segmentation``), so the shaded region cannot drift from it."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return np.asarray(geometric_segmentation(x, y, xi, area_threshold), dtype=bool)


def time_unit(max_s: float) -> tuple[float, str]:
    """(divisor, unit) that keeps tick labels short: s below 10 min, min below 10 h, else h."""
    if max_s >= 36000:
        return 3600.0, "h"
    if max_s >= 600:
        return 60.0, "min"
    return 1.0, "s"


def use_log_x(end_times_s: Sequence[float]) -> bool:
    """Log-x when the strategies' end-to-end times differ by more than LOG_X_SPREAD."""
    ends = [t for t in end_times_s if t > 0]
    return bool(ends) and max(ends) / min(ends) > LOG_X_SPREAD


def plot_accuracy_vs_time(comparison: Mapping, path: str | Path) -> Path:
    """Time to accuracy, the paper's headline trade-off: left on the simulated
    heterogeneous devices, right as measured on this machine."""
    runs = check_comparison(comparison)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = ((axes[0], "cum_sim_s", "simulated time on the clients' devices"),
              (axes[1], "cum_wall_s", "wall time on this machine"))  # fmt: skip
    for ax, key, label in panels:
        ends = [run["rounds"][-1][key] for run in runs.values() if run["rounds"]]
        divisor, unit = time_unit(max(ends, default=0.0))
        log = use_log_x(ends)
        for name, run in runs.items():
            t = [r[key] / divisor for r in run["rounds"]]
            acc = [100 * r["accuracy"] for r in run["rounds"]]
            style = STRATEGY_STYLES.get(name, {"marker": "o"})
            ax.plot(t, acc, markersize=4, markevery=max(1, len(t) // MAX_MARKERS), label=name, lw=1.5, **style)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10 rather than 10^-1
        else:
            ax.set_xlim(left=0)
        ax.set_xlabel(f"{label} ({unit}{', log scale' if log else ''})")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="strategy", loc="lower right")
    first = next(iter(runs.values()))
    count = max(len(run["rounds"]) for run in runs.values())
    fig.suptitle(f"{first['dataset']}, {first['model']}, {len(first['clients'])} clients, {count} rounds: "
                 "test accuracy vs cumulative time (one marker per round, thinned when many)")  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def plot_allocation(run: Mapping, path: str | Path) -> Path:
    """Fig. 3: clients at (NormSig_speed, NormSig_acc), colored by the strategy they
    trained with, over the PTQ region of the rule; a ringed point was assigned against
    the rule (random for fedrh, or flipped by the fine-grained adjustment)."""
    check_run(run)
    xi, area = float(run["allocation"]["xi"]), float(run["allocation"]["area_threshold"])
    fig, ax = plt.subplots(figsize=(9.0, 6.0))
    grid = np.linspace(0.0, 1.0, 501)[1:]  # x = 0 would divide the slope test by nothing
    gx, gy = np.meshgrid(grid, grid)
    ax.contourf(gx, gy, ptq_region(gx, gy, xi, area).astype(float), levels=[0.5, 1.5], colors=[CLIENT_COLORS["ptq"]],
                alpha=0.12)  # fmt: skip
    slope = (1 - xi) / xi  # Eq. 6: the ray through (xi, 1 - xi)
    ray_x = min(1.0, 1.0 / slope)
    ax.plot([0, ray_x], [0, slope * ray_x], color="black", lw=1.2)
    if area > 0:
        curve_x = grid[grid >= 2 * area]  # where y = 2 * area / x stays inside the square
        ax.plot(curve_x, 2 * area / curve_x, color="black", ls="--", lw=1.2)

    placed = [c for c in run["clients"] if c.get("norm_speed") is not None and c.get("norm_acc") is not None]
    skipped = len(run["clients"]) - len(placed)
    x = np.array([c["norm_speed"] for c in placed], dtype=float)
    y = np.array([c["norm_acc"] for c in placed], dtype=float)
    strategy = np.array([c["strategy"] for c in placed], dtype=object)
    rule = np.where(ptq_region(x, y, xi, area), "ptq", "qat") if placed else np.array([], dtype=object)
    against = (strategy != rule) & (strategy != "fp32")
    for name, color in CLIENT_COLORS.items():
        mask = strategy == name
        if mask.any():
            ax.scatter(x[mask], y[mask], color=color, s=46, zorder=3, clip_on=False, label=f"{name.upper()} client")
    if against.any():
        ax.scatter(x[against], y[against], facecolors="none", edgecolors="black", s=150, lw=1.2, zorder=4,
                   clip_on=False, label=f"assigned against the rule ({int(against.sum())})")  # fmt: skip
    if len(placed) <= MAX_LABELLED_CLIENTS:
        for c in placed:
            ax.annotate(str(c["id"]), (c["norm_speed"], c["norm_acc"]), textcoords="offset points", xytext=(6, 5),
                        fontsize=8, zorder=5)  # fmt: skip

    handles, _ = ax.get_legend_handles_labels()
    handles = [
        Patch(facecolor=CLIENT_COLORS["ptq"], alpha=0.12, edgecolor="none", label="PTQ region of the rule"),
        plt.Line2D([], [], color="black", lw=1.2, label=f"Theta ray, slope (1-xi)/xi = {slope:.3g}"),
        plt.Line2D([], [], color="black", ls="--", lw=1.2, label=f"area x*y/2 = {area:g}"),
        *handles,
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    orientation = run["allocation"].get("speed_orientation", "time")
    ax.set_xlabel(f"NormSig_speed, x (Eq. 2, read as {orientation})")
    ax.set_ylabel("NormSig_acc, y (Eq. 3)")
    ptq, qat = strategy_counts(run)
    notes = [f"PTQ iff y/x > {slope:.3g} or x*y/2 < {area:g}"]
    if skipped:
        notes.append(f"{skipped} of {len(run['clients'])} clients without significances not shown")
    if len(placed) > MAX_LABELLED_CLIENTS:
        notes.append("ids not shown")
    ax.set_title(f"{run['strategy']}: xi = {xi:g}, {ptq} PTQ / {qat} QAT clients\n" + "; ".join(notes), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # crops the margin left by the equal-aspect square
    plt.close(fig)
    return path
