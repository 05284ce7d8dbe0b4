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
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from fedhq.allocation import geometric_segmentation  # noqa: E402
from fedhq.allocation.round_aware import path_uploads  # noqa: E402
from fedhq.fl.summary import HEADLINE_ROUNDS, mean_ci, row_accuracy, summarize  # noqa: E402
from fedhq.report.schema import check_run  # noqa: E402
from fedhq.report.tables import END_TO_END, HEADLINE, describe, strategy_counts  # noqa: E402

DPI = 120
LOG_X_SPREAD = 20  # above this ratio of slowest to fastest end-to-end time, a linear axis squeezes the fast runs
MAX_MARKERS = 25  # markers per line; more turn a 50-round curve into a thick smear
MAX_LABELLED_CLIENTS = 60  # beyond this, client ids on the allocation plot overlap into noise
CLIENT_COLORS = {"ptq": "tab:blue", "qat": "tab:red", "fp32": "tab:gray"}
DEVICE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one shape per device, in order of appearance
# fixed per strategy so the same run looks the same in every figure; fp32 is the ceiling, dashed
STRATEGY_STYLES = {
    "fedhq": {"color": "tab:blue", "marker": "o"},
    "fedhq+adjust": {"color": "tab:purple", "marker": "P"},
    "fedaqt": {"color": "tab:red", "marker": "s"},
    "fedfq": {"color": "tab:green", "marker": "^"},
    "fedrh": {"color": "tab:orange", "marker": "D"},
    "fp32": {"color": "0.3", "marker": "x", "linestyle": "--"},
    "fedhq-rt": {"color": "tab:cyan", "marker": "*"},
    "slackfill": {"color": "tab:olive", "marker": "v"},
    "fedrh-matched": {"color": "tab:brown", "marker": "d"},
    "aqfl": {"color": "tab:pink", "marker": "h"},
    "fedmpq": {"color": "tab:gray", "marker": "X"},
    "fedlq": {"color": "gold", "marker": "<"},
    "fedhq-budget": {"color": "navy", "marker": ">"},
}


def ptq_region(x, y, xi: float, area_threshold: float) -> np.ndarray:
    """Boolean array, True where global initialization picks PTQ (docs/method.md §4.2):
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


def accuracy_limits(percents: Sequence[float]) -> tuple[float, float]:
    """y-limits (%) that fit the data with a small margin, inside [0, 100]: a run
    that collapses to 10% stays visible, a 97-99% race is not flattened."""
    values = [v for v in percents if v is not None and np.isfinite(v)]
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    pad = max(1.0, 0.05 * (high - low))
    return max(0.0, low - pad), min(100.0, high + pad)


def _accuracy_label(runs: Sequence[Mapping]) -> str:
    deployed = any(r.get("deployed_accuracy") is not None for run in runs for r in run["rounds"])
    return "test accuracy (%)" + (", deployed model" if deployed else "")


def plot_accuracy_vs_time(runs: Mapping[str, Mapping], path: str | Path) -> Path:
    """Time to accuracy for the runs of one seed (strategy -> run), the paper's
    headline trade-off: left on the simulated heterogeneous devices, right as measured
    on this machine."""
    for name, run in runs.items():
        check_run(run, f"run {name!r}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = (
        (axes[0], "cum_sim_s", "simulated time on the clients' devices"),
        (axes[1], "cum_wall_s", "wall time on this machine"),
    )
    every = [100 * row_accuracy(r) for run in runs.values() for r in run["rounds"]]
    for ax, key, label in panels:
        ends = [run["rounds"][-1][key] for run in runs.values() if run["rounds"]]
        divisor, unit = time_unit(max(ends, default=0.0))
        log = use_log_x(ends)
        for name, run in runs.items():
            t = [r[key] / divisor for r in run["rounds"]]
            acc = [100 * row_accuracy(r) for r in run["rounds"]]
            style = STRATEGY_STYLES.get(name, {"marker": "o"})
            ax.plot(t, acc, markersize=4, markevery=max(1, len(t) // MAX_MARKERS), label=name, lw=1.5, **style)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10 rather than 10^-1
        else:
            ax.set_xlim(left=0)
        ax.set_ylim(*accuracy_limits(every))
        ax.set_xlabel(f"{label} ({unit}{', log scale' if log else ''})")
        ax.set_ylabel(_accuracy_label(runs.values()))
        ax.grid(alpha=0.3)
    axes[0].legend(title="strategy", loc="lower right")
    fig.suptitle(
        f"{describe(list(runs.values()))}\ntest accuracy vs cumulative time (one marker per round, thinned when many)"
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_seed_summary(by_seed: Mapping[int, Mapping[str, Mapping]], path: str | Path) -> Path:
    """Several seeds: left, accuracy per round (mean over seeds, shaded confidence
    interval); right, the headline accuracy against simulated end-to-end time, each
    with its confidence interval over seeds."""
    summary = summarize(by_seed)
    level = f"{100 * summary['confidence']:g}%"
    names = list(summary["strategies"])
    runs = [run for runs in by_seed.values() for run in runs.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    shown = []
    for name in names:
        style = STRATEGY_STYLES.get(name, {"marker": "o"})
        curves = [by_seed[s][name]["rounds"] for s in by_seed if name in by_seed[s]]
        count = max(len(rounds) for rounds in curves)
        stats = [mean_ci([100 * row_accuracy(rounds[r]) for rounds in curves if r < len(rounds)]) for r in range(count)]
        x = np.arange(1, count + 1)
        mean = np.array([st["mean"] for st in stats], dtype=float)
        low = np.array([st["mean"] if st["low"] is None else st["low"] for st in stats], dtype=float)
        high = np.array([st["mean"] if st["high"] is None else st["high"] for st in stats], dtype=float)
        left.plot(x, mean, markersize=4, markevery=max(1, count // MAX_MARKERS), label=name, lw=1.5, **style)
        left.fill_between(x, low, high, color=style.get("color"), alpha=0.15, lw=0)
        shown += [*mean, *low, *high]
    headline = _headline_against(right, summary, names, "sim_time_s")
    left.set_ylim(*accuracy_limits(shown))
    right.set_ylim(*accuracy_limits(headline))  # an interval past 100% is cut at the axis
    left.set_xlabel("round")
    left.set_ylabel(_accuracy_label(runs) + f", mean over seeds and {level} CI")
    right.set_xlabel(f"{END_TO_END} (s): simulated on the clients' devices, mean and {level} CI over seeds")
    right.set_ylabel(f"{HEADLINE} (mean of the last {HEADLINE_ROUNDS} rounds)")
    right.set_xlim(left=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(title="strategy", loc="lower right")
    fig.suptitle(
        f"{describe(runs, summary['seeds'])}\naccuracy by round, and accuracy against time "
        f"({len(summary['seeds'])} seeds, Student-t intervals)"
    )
    fig.tight_layout()
    return _save(fig, path)


def _headline_against(ax, summary: Mapping, names: Sequence[str], metric: str, scale: float = 1.0) -> list[float]:
    """Each strategy's headline accuracy (y) against its ``metric`` (x, times ``scale``),
    both with their confidence intervals over seeds; returns the y extent drawn."""
    extent = []
    for name in names:
        s = summary["strategies"][name]
        acc, x = s["headline_accuracy"], s[metric]
        if acc["mean"] is None or x["mean"] is None:
            continue
        style = STRATEGY_STYLES.get(name, {"marker": "o"})
        spread = 0.0 if acc["half_width"] is None else acc["half_width"]
        extent += [100 * (acc["mean"] - spread), 100 * (acc["mean"] + spread)]
        ax.errorbar(
            scale * x["mean"],
            100 * acc["mean"],
            xerr=None if x["half_width"] is None else scale * x["half_width"],
            yerr=None if acc["half_width"] is None else 100 * acc["half_width"],
            capsize=4,
            ms=7,
            color=style.get("color"),
            marker=style["marker"],
            ls="none",
            label=name,
        )
    return extent


def plot_precision_summary(by_seed: Mapping[int, Mapping[str, Mapping]], path: str | Path) -> Path:
    """Several seeds: the headline accuracy against the uploads' mean bits per weight
    (left) and against the bytes the clients uploaded over the run (right), each with
    its confidence interval over seeds: what mixed precision buys and costs."""
    summary = summarize(by_seed)
    level = f"{100 * summary['confidence']:g}%"
    names = list(summary["strategies"])
    runs = [run for runs in by_seed.values() for run in runs.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    extent = _headline_against(left, summary, names, "weight_bits")
    _headline_against(right, summary, names, "upload_bytes", scale=1e-6)
    left.set_xlabel(f"uploads' bits per weight (quantized entries; float: 32), mean and {level} CI over seeds")
    right.set_xlabel(f"bytes uploaded over the run (MB), mean and {level} CI over seeds")
    right.set_xscale("log")
    for ax in (left, right):
        ax.set_ylim(*accuracy_limits(extent))
        ax.set_ylabel(f"{HEADLINE} (mean of the last {HEADLINE_ROUNDS} rounds)")
        ax.grid(alpha=0.3)
    left.legend(title="strategy", loc="lower right")
    fig.suptitle(f"{describe(runs, summary['seeds'])}\naccuracy against upload precision and volume")
    fig.tight_layout()
    return _save(fig, path)


def place_labels(
    ax,
    xy: Sequence[tuple[float, float]],
    texts: Sequence[str],
    fontsize: float = 8,
    marker_pt: float | Sequence[float] = 7.0,
    rings: int = 12,
) -> list:
    """Annotates each point of ``xy`` (data coordinates) with its text where the text
    overlaps no other label, no point and no legend or title: candidate spots on rings
    of growing radius around the point, the first free one wins; beyond the first ring
    a thin leader line points back. ``marker_pt``: the points' diameters (one, or one
    each). Call after the layout is final (offsets are in points, positions in
    pixels). Returns the annotations (None where no ring had room)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    centers = ax.transData.transform(np.asarray(xy, dtype=float).reshape(-1, 2)) if len(xy) else np.zeros((0, 2))
    halves = np.broadcast_to(np.asarray(marker_pt, dtype=float), (len(centers),)) * to_px / 2
    taken = [Bbox.from_extents(x - h, y - h, x + h, y + h) for (x, y), h in zip(centers, halves)]
    for artist in (ax.get_legend(), ax.title):
        if artist is not None and artist.get_visible() and (not hasattr(artist, "get_text") or artist.get_text()):
            taken.append(artist.get_window_extent(renderer))
    placed = []
    for (x, y), text, half in zip(xy, texts, halves / to_px):
        label = None
        for ring in range(1, rings + 1):
            radius = half + 1.5 + 9.0 * (ring - 1)  # points: the first ring just clears the marker
            count = 8 * ring
            for k in range(count):
                angle = 2 * np.pi * (k / count + 1 / 16)  # starts up-right, where the old labels sat
                dx, dy = radius * np.cos(angle), radius * np.sin(angle)
                ha = "left" if dx > 1 else "right" if dx < -1 else "center"
                va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
                arrow = (
                    {"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkA": 1, "shrinkB": 3} if ring > 1 else None
                )
                candidate = ax.annotate(
                    text,
                    (x, y),
                    textcoords="offset points",
                    xytext=(dx, dy),
                    ha=ha,
                    va=va,
                    fontsize=fontsize,
                    zorder=5,
                    annotation_clip=False,
                    arrowprops=arrow,
                )
                candidate.update_positions(renderer)  # places the text; then measure it without its leader line
                box = Text.get_window_extent(candidate, renderer).padded(1.0)
                if not any(box.overlaps(other) for other in taken):
                    label = candidate
                    taken.append(box)
                    break
                candidate.remove()
            if label is not None:
                break
        placed.append(label)
    return placed


def plot_allocation(run: Mapping, path: str | Path) -> Path:
    """Fig. 3: clients at (NormSig_speed, NormSig_acc), colored by the strategy they
    trained with and shaped by their device, over the PTQ region of the rule; a ringed
    point was assigned against the rule (random for fedrh, or flipped by the
    fine-grained adjustment). Client ids never overlap (place_labels)."""
    check_run(run)
    xi, area = float(run["allocation"]["xi"]), float(run["allocation"]["area_threshold"])
    fig, ax = plt.subplots(figsize=(9.0, 6.0))
    grid = np.linspace(0.0, 1.0, 501)[1:]  # x = 0 would divide the slope test by nothing
    gx, gy = np.meshgrid(grid, grid)
    ax.contourf(
        gx, gy, ptq_region(gx, gy, xi, area).astype(float), levels=[0.5, 1.5], colors=[CLIENT_COLORS["ptq"]], alpha=0.12
    )
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
    device = np.array([c.get("device_name") or c["device"] for c in placed], dtype=object)
    markers = {d: DEVICE_MARKERS[i % len(DEVICE_MARKERS)] for i, d in enumerate(dict.fromkeys(device))}
    rule = np.where(ptq_region(x, y, xi, area), "ptq", "qat") if placed else np.array([], dtype=object)
    against = (strategy != rule) & (strategy != "fp32")
    for d, marker in markers.items():
        for name, color in CLIENT_COLORS.items():
            mask = (strategy == name) & (device == d)
            if mask.any():
                ax.scatter(x[mask], y[mask], color=color, marker=marker, s=46, zorder=3, clip_on=False)
    if against.any():
        ax.scatter(
            x[against], y[against], facecolors="none", edgecolors="black", s=150, lw=1.2, zorder=4, clip_on=False
        )

    handles = [
        Patch(facecolor=CLIENT_COLORS["ptq"], alpha=0.12, edgecolor="none", label="PTQ region of the rule"),
        plt.Line2D([], [], color="black", lw=1.2, label=f"Theta ray, slope (1-xi)/xi = {slope:.3g}"),
        plt.Line2D([], [], color="black", ls="--", lw=1.2, label=f"area x*y/2 = {area:g}"),
        *(
            plt.Line2D([], [], color=CLIENT_COLORS[n], marker="o", ls="none", label=f"{n.upper()} client")
            for n in CLIENT_COLORS
            if (strategy == n).any()
        ),
        *(plt.Line2D([], [], color="0.35", marker=m, ls="none", label=f"device: {d}") for d, m in markers.items()),
    ]
    if against.any():
        handles.append(
            plt.Line2D(
                [],
                [],
                marker="o",
                ms=10,
                mfc="none",
                mec="black",
                ls="none",
                label=f"assigned against the rule ({int(against.sum())})",
            )
        )
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
    ax.set_title(
        f"{describe([run])}\n{run['strategy']}: xi = {xi:g}, {ptq} PTQ / {qat} QAT clients; " + "; ".join(notes),
        fontsize=9,
    )
    fig.tight_layout()
    fig.canvas.draw()  # applies the equal aspect, which moves the axes: labels are placed on the final layout
    if len(placed) <= MAX_LABELLED_CLIENTS:
        sizes = np.where(against, 12.5, 7.5)  # points: the ring of s=150 around a marker of s=46
        labels = place_labels(ax, list(zip(x, y)), [str(c["id"]) for c in placed], marker_pt=sizes)
        crowded = [str(c["id"]) for c, label in zip(placed, labels) if label is None]
        if crowded:  # no free spot near them: named below the plot instead
            ax.text(0, -0.18, "no room to label clients " + ", ".join(crowded), transform=ax.transAxes, fontsize=8)
    return _save(fig, path)


def plot_round_times(runs: Mapping[str, Mapping], path: str | Path) -> Path | None:
    """Per strategy, each client's predicted round time (compute plus its uploads up to
    the server) with PTQ and with QAT: the strategy it trained with filled, the other
    hollow; the dashed line is the predicted round time, and the star marks the client
    on its critical path. Runs without predicted times (older results, fp32) are left
    out; None when none is left."""
    shown = {
        name: run
        for name, run in runs.items()
        if run["clients"] and all("predicted_s" in c and c["strategy"] in ("ptq", "qat") for c in run["clients"])
    }
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(9.0, 1.9 * len(shown) + 0.6), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], shown.items()):
        clients = run["clients"]
        parents = run.get("topology", {}).get("parents")
        upload = np.array([c["predicted_s"]["upload"] for c in clients], dtype=float)
        ids = [c["id"] for c in clients]
        if parents is not None and len(parents) == len(clients) and ids == list(range(len(clients))):
            upload = path_uploads(upload, parents)
        ptq = np.array([c["predicted_s"]["ptq"] for c in clients]) + upload
        qat = np.array([c["predicted_s"]["qat"] for c in clients]) + upload
        is_qat = np.array([c["strategy"] == "qat" for c in clients])
        chosen = np.where(is_qat, qat, ptq)
        x = np.arange(len(clients))
        for offset, times, kind in ((-0.2, ptq, "ptq"), (0.2, qat, "qat")):
            mine = is_qat if kind == "qat" else ~is_qat
            color = CLIENT_COLORS[kind]
            ax.bar(x[mine] + offset, times[mine], width=0.4, color=color)
            ax.bar(x[~mine] + offset, times[~mine], width=0.4, facecolor="none", edgecolor=color, lw=0.8)
        critical = int(np.argmax(chosen))
        ax.axhline(chosen[critical], color="black", ls="--", lw=1)
        ax.plot(x[critical], chosen[critical] * 1.04, marker="*", color="black", ms=11)
        ax.set_ylabel("s / round")
        ax.set_title(
            f"{name}: {int(is_qat.sum())} QAT; predicted round {chosen[critical]:.2f} s "
            f"(all PTQ {ptq.max():.2f} s, all QAT {qat.max():.2f} s)",
            fontsize=9,
        )
    axes[-1, 0].set_xticks(np.arange(len(next(iter(shown.values()))["clients"])))
    axes[-1, 0].set_xlabel("client (left bar PTQ, right bar QAT; filled: trained with it; star: critical path)")
    fig.suptitle(describe(list(shown.values())), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # crops the margin left by the equal-aspect square
    plt.close(fig)
    return path
