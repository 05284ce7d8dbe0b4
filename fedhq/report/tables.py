"""Plain-text tables of run and comparison results (the paper's Table 2 layout, plus
accuracy and allocation), for the terminal and comparison.txt."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from fedhq.report.schema import check_comparison, check_run

BASELINE = "fedaqt"  # speedups are against all-QAT, as the paper's claim (1.50x-2.47x) is
LETTERS = {"ptq": "P", "qat": "Q", "fp32": "F"}
LEGEND = "P = PTQ, Q = QAT, F = fp32 unquantized, . = not in this run"
IDS_PER_LINE = 30  # keeps a 100-client strategy line under ~100 characters


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` columns (names) flush
    left, the rest (numbers) flush right so that digits line up."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = (str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _seconds(s: float | None) -> str:
    """Seconds below ten minutes, minutes above (the paper's Table 2 is in minutes)."""
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 600 else f"{s:.1f} s"


def _percent(fraction: float | None, digits: int = 2) -> str:
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def speedup(baseline_s: float, run_s: float) -> float | None:
    """How many times faster ``run_s`` is than ``baseline_s`` (None if either is not > 0)."""
    return baseline_s / run_s if baseline_s > 0 and run_s > 0 else None


def strategy_counts(run: Mapping) -> tuple[int, int]:
    """(#PTQ, #QAT) clients as the run's allocation reports them."""
    return len(run["allocation"]["ptq"]), len(run["allocation"]["qat"])


def pick_rounds(count: int, max_rows: int = 12) -> list[int]:
    """Round numbers to show when there are too many for one screen: every k-th round
    plus the first and the last."""
    if count <= 0:
        return []
    step = max(1, math.ceil(count / max_rows))
    return sorted({1, count, *range(step, count + 1, step)})


def format_comparison_table(comparison: Mapping) -> str:
    """Per strategy: accuracy, simulated time per epoch / round / end to end, wall time,
    bytes uploaded, PTQ/QAT counts and speedup against fedaqt; then accuracy per round;
    then each client's strategy and any rejected updates."""
    runs = check_comparison(comparison)
    base = runs.get(BASELINE)
    header = ["strategy", "final acc %", "best acc %", "sim/epoch", "sim/round", "sim total"]
    header += [f"vs {BASELINE}"] if base else []
    header += ["wall here", "upload MB", "PTQ/QAT"]
    rows = []
    for name, run in runs.items():
        rounds = run["rounds"]
        ptq, qat = strategy_counts(run)
        row = [name, _percent(run["final_accuracy"]), _percent(run["best_accuracy"]),
               _seconds(_mean([r["sim_epoch_s"] for r in rounds])), _seconds(_mean([r["sim_s"] for r in rounds])),
               _seconds(run["sim_time_s"])]  # fmt: skip
        if base:
            x = speedup(base["sim_time_s"], run["sim_time_s"])
            row.append("-" if x is None else f"{x:.2f}x")
        row += [_seconds(run["wall_time_s"]), f"{run['upload_bytes'] / 1e6:.2f}", f"{ptq}/{qat}" if ptq or qat else "-"]
        rows.append(row)
    first = next(iter(runs.values()))
    count = max(len(run["rounds"]) for run in runs.values())
    parts = [
        f"{first['dataset']}, {first['model']}, {len(first['clients'])} clients, {count} rounds",
        _table(header, rows),
        "sim: simulated time on the clients' devices (per epoch and per round: mean over rounds); "
        "wall: this machine" + (f"; vs {BASELINE}: its simulated total / this one's" if base else ""),
        "",
        _accuracy_per_round(runs),
        "",
        *_client_strategies(runs),
    ]
    rejected = _rejected_summary(runs)
    if rejected:
        parts.append(rejected)
    return "\n".join(parts)


def _accuracy_per_round(runs: Mapping[str, Mapping], max_rows: int = 12) -> str:
    count = max(len(run["rounds"]) for run in runs.values())
    picks = pick_rounds(count, max_rows)
    by_round = {name: {r["round"]: r for r in run["rounds"]} for name, run in runs.items()}
    rows = [[str(n), *(_percent(by_round[name][n]["accuracy"], 1) if n in by_round[name] else "-" for name in runs)]
            for n in picks]  # fmt: skip
    step = math.ceil(count / max_rows) if count else 1
    title = "test accuracy (%) by round" + (f" (every {step} rounds, and the last)" if len(picks) < count else "")
    return title + "\n" + _table(["round", *runs], rows)


def _client_strategies(runs: Mapping[str, Mapping]) -> list[str]:
    """One line per strategy, a letter under each client id; long lists wrap in blocks."""
    ids = sorted({c["id"] for run in runs.values() for c in run["clients"]})
    letters = {name: {c["id"]: LETTERS.get(c["strategy"], "?") for c in run["clients"]} for name, run in runs.items()}
    for name, run in list(runs.items()):  # an adjusted run also shows its assignment before the adjustment
        if run.get("adjustment"):
            letters[f"{name} (before)"] = {i: LETTERS.get(s, "?") for i, s in enumerate(run["assignment_before"])}
    width = max(len(str(i)) for i in ids) if ids else 1
    name_width = max(len("client"), *(len(n) for n in letters))
    lines = [f"strategy of each client ({LEGEND})"]
    for start in range(0, len(ids), IDS_PER_LINE):
        block = ids[start:start + IDS_PER_LINE]
        lines.append("  " + "client".ljust(name_width) + "  " + " ".join(str(i).rjust(width) for i in block))
        for name in letters:
            cells = " ".join(letters[name].get(i, ".").rjust(width) for i in block)
            lines.append("  " + name.ljust(name_width) + "  " + cells)
    for name, run in runs.items():
        adjustment = run.get("adjustment")
        if adjustment:
            total = sum(v for v in run.get("timing", {}).values() if isinstance(v, (int, float)))
            share = f", {100 * adjustment['time_s'] / total:.0f}% of the run" if total > 0 else ""
            lines.append(f"  {name}: {len(adjustment['flagged'])} flagged after round {adjustment['after_round']}, "
                         f"{adjustment['before']} -> {adjustment['after']}; {adjustment['trained']} candidates trained "
                         f"of {adjustment['ranked']} ranked; {adjustment['time_s']:.1f} s{share}")  # fmt: skip
    return lines


def _rejected_summary(runs: Mapping[str, Mapping], max_reasons: int = 3) -> str | None:
    """One short line: how many updates the server rejected per strategy, with the most
    frequent (client, reason) pairs."""
    parts = []
    for name, run in runs.items():
        seen = Counter((x.get("client"), x.get("reason", "?")) for r in run["rounds"] for x in r["rejected"])
        if not seen:
            continue
        common = "; ".join(f"client {c} x{k}: {reason}" for (c, reason), k in seen.most_common(max_reasons))
        more = f"; +{len(seen) - max_reasons} more" if len(seen) > max_reasons else ""
        parts.append(f"{name} {sum(seen.values())} ({common}{more})")
    return "rejected updates: " + ", ".join(parts) if parts else None


def format_run_table(run: Mapping, max_rounds: int = 60) -> str:
    """One run: its clients (device, fractions, batch, strategy, significances) and the
    per-round progress (every k-th round when there are more than ``max_rounds``)."""
    check_run(run)
    norm = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    client_rows = [
        [str(c["id"]), str(c["device"]), c["strategy"], f"{c['alpha']:.2f}", f"{c['beta']:.2f}", str(c["samples"]),
         str(c["batch"]), f"{c['speed_time_s']:.3g}", f"{c['speed_sig']:.3f}", f"{c['acc_sig']:.3f}",
         norm(c.get("norm_speed")), norm(c.get("norm_acc"))]
        for c in run["clients"]
    ]  # fmt: skip
    by_round = {r["round"]: r for r in run["rounds"]}
    shown = [by_round[n] for n in pick_rounds(max(by_round, default=0), max_rounds) if n in by_round]
    round_rows = [
        [str(r["round"]), _percent(r["accuracy"]), f"{r['loss']:.3f}", f"{r['wall_s']:.2f}", _seconds(r["sim_s"]),
         _seconds(r["cum_sim_s"]), f"{r['upload_bytes'] / 1e6:.2f}", str(len(r.get("participants", []))),
         str(len(r["rejected"])), str(r.get("slowest_client", "-"))]
        for r in shown
    ]  # fmt: skip
    ptq, qat = strategy_counts(run)
    alloc = run["allocation"]
    lines = [
        f"{run['strategy']}: {run['dataset']}, {run['model']}, {len(run['clients'])} clients ({ptq} PTQ / {qat} QAT); "
        f"xi = {alloc['xi']:g}, area threshold {alloc['area_threshold']:g}, "
        f"Sig_speed read as {alloc.get('speed_orientation', '?')}",
        _table(["client", "device", "strategy", "alpha", "beta", "samples", "batch", "T_m s", "Sig_speed", "Sig_acc",
                "norm x", "norm y"], client_rows, left=3),
        "T_m: Eq. 1 local training time; Sig: Eq. 2 / Eq. 3; norm x, y: the normalized pair placed in Fig. 3",
        "",
        _table(["round", "acc %", "loss", "wall s", "sim", "sim total", "upload MB", "clients", "rejected", "slowest"],
               round_rows),
    ]  # fmt: skip
    if len(shown) < len(run["rounds"]):
        lines.append(f"({len(shown)} of {len(run['rounds'])} rounds shown)")
    pct = lambda v: "-" if v is None else _percent(v) + "%"  # noqa: E731
    lines.append(f"final accuracy {pct(run['final_accuracy'])} (best {pct(run['best_accuracy'])}), "
                 f"simulated {_seconds(run['sim_time_s'])}, wall {_seconds(run['wall_time_s'])}, "
                 f"uploaded {run['upload_bytes'] / 1e6:.2f} MB")  # fmt: skip
    rejected = _rejected_summary({run["strategy"]: run})
    if rejected:
        lines.append(rejected)
    return "\n".join(lines)
