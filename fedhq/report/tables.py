"""Plain-text tables of run and comparison results (the paper's Table 2 layout, plus
accuracy and allocation), for the terminal and comparison.txt. Every table's first
line names the dataset, model, bits and seed(s)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from fedhq.fl.summary import (
    BASELINE,
    HEADLINE_ROUNDS,
    final_accuracy,
    headline_accuracy,
    row_accuracy,
    speedup,
    summarize,
)
from fedhq.report.schema import check_comparison, check_run

LETTERS = {"ptq": "P", "qat": "Q", "fp32": "F"}
LEGEND = "P = PTQ, Q = QAT, F = fp32 unquantized, . = not in this run"
IDS_PER_LINE = 30  # keeps a 100-client strategy line under ~100 characters
HEADLINE = f"last-{HEADLINE_ROUNDS} acc %"  # the column's one name, in tables, plots and README
END_TO_END = "sim end-to-end"


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


def seeds_text(seeds: Sequence[int]) -> str:
    """'seed 3', 'seeds 0-4' (consecutive) or 'seeds 0, 2, 7'."""
    seeds = sorted(seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def describe(runs: Sequence[Mapping], seeds: Sequence[int] | None = None) -> str:
    """What a table or plot shows: dataset, model, bits, clients, rounds and seed(s)."""
    first = runs[0]
    quantized = sorted({r["config"]["bits"] for r in runs if r["strategy"] != "fp32"})
    bits = "/".join(map(str, quantized)) + "-bit uploads" if quantized else "float uploads"
    seeds = sorted({r["config"]["seed"] for r in runs}) if seeds is None else seeds
    count = max(len(r["rounds"]) for r in runs)
    clients = len(first["clients"])
    return f"{first['dataset']}, {first['model']}, {bits}, {clients} clients, {count} rounds, {seeds_text(seeds)}"


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
    """One seed: format_seed_table. Several: format_summary_table."""
    by_seed = check_comparison(comparison)
    if len(by_seed) == 1:
        return format_seed_table(next(iter(by_seed.values())))
    return format_summary_table(by_seed)


def format_seed_table(runs: Mapping[str, Mapping]) -> str:
    """The runs of one seed: per strategy the headline (last-5) and final accuracy,
    simulated time per epoch / round / end to end, wall time, bytes uploaded, PTQ/QAT
    counts and speedup against fedaqt; then accuracy per round; then each client's
    strategy and any rejected updates."""
    base = runs.get(BASELINE)
    header = ["strategy", HEADLINE, "final acc %", "sim/epoch", "sim/round", END_TO_END]
    header += [f"vs {BASELINE}"] if base else []
    header += ["wall here", "upload MB", "PTQ/QAT"]
    rows = []
    for name, run in runs.items():
        rounds = run["rounds"]
        ptq, qat = strategy_counts(run)
        row = [
            name,
            _percent(headline_accuracy(run)),
            _percent(final_accuracy(run)),
            _seconds(_mean([r["sim_epoch_s"] for r in rounds])),
            _seconds(_mean([r["sim_s"] for r in rounds])),
            _seconds(run["sim_time_s"]),
        ]
        if base:
            x = speedup(base["sim_time_s"], run["sim_time_s"])
            row.append("-" if x is None else f"{x:.2f}x")
        row += [_seconds(run["wall_time_s"]), f"{run['upload_bytes'] / 1e6:.2f}", f"{ptq}/{qat}" if ptq or qat else "-"]
        rows.append(row)
    parts = [
        describe(list(runs.values())),
        _table(header, rows),
        f"{HEADLINE}: mean test accuracy of the last {HEADLINE_ROUNDS} rounds{_deployed_note(runs.values())}; "
        "sim: simulated time on the clients' devices (per epoch and per round: mean over rounds); "
        "wall: this machine" + (f"; vs {BASELINE}: its {END_TO_END} time / this one's" if base else ""),
        "",
        _accuracy_per_round(runs),
        "",
        *_client_strategies(runs),
    ]
    rejected = _rejected_summary(runs)
    if rejected:
        parts.append(rejected)
    return "\n".join(parts)


def _deployed_note(runs) -> str:
    deployed = any(r.get("deployed_accuracy") is not None for run in runs for r in run["rounds"])
    return " (of the deployed quantized model)" if deployed else ""


def _ci(stat: Mapping, scale: float = 1.0, fmt: str = "{:.2f}", unit: str = "", sign: bool = False) -> str:
    """'mean +- half-width' of a fedhq.fl.summary.mean_ci result; the mean alone below two seeds."""
    if stat["mean"] is None:
        return "-"
    spec = fmt.replace("{:", "{:+") if sign else fmt
    text = spec.format(stat["mean"] * scale)
    if stat["half_width"] is not None:
        text += " +- " + fmt.format(stat["half_width"] * scale)
    return text + unit


def format_summary_table(by_seed: Mapping[int, Mapping[str, Mapping]]) -> str:
    """Several seeds: per strategy the mean and confidence interval over seeds of the
    headline and final accuracy, simulated end-to-end time and speedup; the paired
    differences of FedHQ (and fedhq-rt) against every other strategy; the headline
    accuracy of every run."""
    summary = summarize(by_seed)
    seeds, level = summary["seeds"], f"{100 * summary['confidence']:g}%"
    runs = [run for runs in by_seed.values() for run in runs.values()]
    stats = summary["strategies"]
    header = ["strategy", HEADLINE, "final acc %", END_TO_END, f"vs {BASELINE}", "bits/weight", "upload MB", "seeds"]
    rows = [
        [
            name,
            _ci(s["headline_accuracy"], 100),
            _ci(s["final_accuracy"], 100),
            _ci(s["sim_time_s"], fmt="{:.1f}", unit=" s"),
            _ci(s["speedup"], unit="x"),
            _ci(s["weight_bits"]),
            _ci(s["upload_bytes"], 1e-6, fmt="{:.1f}"),
            str(s["headline_accuracy"]["n"]),
        ]
        for name, s in stats.items()
    ]
    parts = [
        describe(runs, seeds),
        _table(header, rows),
        f"mean +- half-width of the {level} confidence interval over seeds (Student t); {HEADLINE}: mean test "
        f"accuracy of the last {HEADLINE_ROUNDS} rounds{_deployed_note(runs)}; vs {BASELINE}: its {END_TO_END} "
        "time / this one's, per seed; bits/weight: the uploads' mean bits per weight (float: 32); upload MB: "
        "over the run",
    ]
    for focus, paired in summary["paired"].items():
        paired_rows = [
            [
                other,
                _ci(p["headline_accuracy"], 100, sign=True),
                _ci(p["final_accuracy"], 100, sign=True),
                _ci(p["time_ratio"], unit="x"),
                str(p["headline_accuracy"]["n"]),
            ]
            for other, p in paired.items()
        ]
        parts += [
            "",
            f"{focus} against each strategy, paired by seed (same partition and devices): {focus}'s "
            f"accuracy minus its, mean +- {level} half-width over the per-seed differences",
            _table(
                ["vs", f"{HEADLINE[:-2]} diff pts", "final acc diff pts", f"its time / {focus}'s", "seeds"], paired_rows
            ),
        ]
    names = list(stats)
    per_seed = [
        [str(seed), *(_percent(headline_accuracy(by_seed[seed][n]), 1) if n in by_seed[seed] else "-" for n in names)]
        for seed in seeds
    ]
    parts += ["", f"{HEADLINE} of each run", _table(["seed", *names], per_seed)]
    rejected = [f"seed {seed}: {line}" for seed in seeds if (line := _rejected_summary(by_seed[seed]))]
    parts += rejected
    return "\n".join(parts)


def _accuracy_per_round(runs: Mapping[str, Mapping], max_rows: int = 12) -> str:
    count = max(len(run["rounds"]) for run in runs.values())
    picks = pick_rounds(count, max_rows)
    by_round = {name: {r["round"]: r for r in run["rounds"]} for name, run in runs.items()}
    rows = [
        [str(n), *(_percent(row_accuracy(by_round[name][n]), 1) if n in by_round[name] else "-" for name in runs)]
        for n in picks
    ]
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
        block = ids[start : start + IDS_PER_LINE]
        lines.append("  " + "client".ljust(name_width) + "  " + " ".join(str(i).rjust(width) for i in block))
        for name in letters:
            cells = " ".join(letters[name].get(i, ".").rjust(width) for i in block)
            lines.append("  " + name.ljust(name_width) + "  " + cells)
    for name, run in runs.items():
        adjustment = run.get("adjustment")
        if adjustment:
            total = sum(v for v in run.get("timing", {}).values() if isinstance(v, (int, float)))
            share = f", {100 * adjustment['time_s'] / total:.0f}% of the run" if total > 0 else ""
            lines.append(
                f"  {name}: {len(adjustment['flagged'])} flagged after round {adjustment['after_round']}, "
                f"{adjustment['before']} -> {adjustment['after']}; {adjustment['trained']} candidates trained "
                f"of {adjustment['ranked']} ranked; {adjustment['time_s']:.1f} s{share}"
            )
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
        [
            str(c["id"]),
            str(c["device"]),
            c["strategy"],
            f"{c['alpha']:.2f}",
            f"{c['beta']:.2f}",
            str(c["samples"]),
            str(c["batch"]),
            f"{c['speed_time_s']:.3g}",
            f"{c['speed_sig']:.3f}",
            f"{c['acc_sig']:.3f}",
            norm(c.get("norm_speed")),
            norm(c.get("norm_acc")),
        ]
        for c in run["clients"]
    ]
    by_round = {r["round"]: r for r in run["rounds"]}
    shown = [by_round[n] for n in pick_rounds(max(by_round, default=0), max_rounds) if n in by_round]
    round_rows = [
        [
            str(r["round"]),
            _percent(row_accuracy(r)),
            f"{r['loss']:.3f}",
            f"{r['wall_s']:.2f}",
            _seconds(r["sim_s"]),
            _seconds(r["cum_sim_s"]),
            f"{r['upload_bytes'] / 1e6:.2f}",
            str(len(r.get("participants", []))),
            str(len(r["rejected"])),
            str(r.get("slowest_client", "-")),
        ]
        for r in shown
    ]
    ptq, qat = strategy_counts(run)
    alloc = run["allocation"]
    lines = [
        f"{run['strategy']}: {describe([run])}; {ptq} PTQ / {qat} QAT clients; "
        f"xi = {alloc['xi']:g}, area threshold {alloc['area_threshold']:g}, "
        f"Sig_speed read as {alloc.get('speed_orientation', '?')}",
        _table(
            [
                "client",
                "device",
                "strategy",
                "alpha",
                "beta",
                "samples",
                "batch",
                "T_m s",
                "Sig_speed",
                "Sig_acc",
                "norm x",
                "norm y",
            ],
            client_rows,
            left=3,
        ),
        "T_m: Eq. 1 local training time; Sig: Eq. 2 / Eq. 3; norm x, y: the normalized pair placed in Fig. 3",
        "",
        _table(
            ["round", "acc %", "loss", "wall s", "sim", "sim so far", "upload MB", "clients", "rejected", "slowest"],
            round_rows,
        ),
    ]
    if len(shown) < len(run["rounds"]):
        lines.append(f"({len(shown)} of {len(run['rounds'])} rounds shown)")
    pct = lambda v: "-" if v is None else _percent(v) + "%"  # noqa: E731
    lines.append(
        f"last-{HEADLINE_ROUNDS} mean accuracy {pct(headline_accuracy(run))}, final "
        f"{pct(final_accuracy(run))}{_deployed_note([run])}; {END_TO_END} simulated "
        f"{_seconds(run['sim_time_s'])}, wall {_seconds(run['wall_time_s'])}, "
        f"uploaded {run['upload_bytes'] / 1e6:.2f} MB"
    )
    rejected = _rejected_summary({run["strategy"]: run})
    if rejected:
        lines.append(rejected)
    return "\n".join(lines)
