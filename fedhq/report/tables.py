"""Plain-text tables of run and comparison results (the paper's Table 2 layout, plus
accuracy and allocation), for the terminal and comparison.txt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RUN_SCHEMA = "fedhq.run/1"
COMPARE_SCHEMA = "fedhq.compare/1"
_RUN_KEYS = ("strategy", "clients", "rounds", "final_accuracy", "best_accuracy", "wall_time_s", "sim_time_s",
             "upload_bytes", "allocation")  # fmt: skip


def check_run(run: Mapping, where: str = "run") -> None:
    if not isinstance(run, Mapping) or run.get("schema") != RUN_SCHEMA:
        raise ValueError(f"{where}: expected a results dict with schema {RUN_SCHEMA!r}")
    missing = [k for k in _RUN_KEYS if k not in run]
    if missing:
        raise ValueError(f"{where}: missing {missing}")


def check_comparison(comparison: Mapping) -> Mapping[str, Mapping]:
    if not isinstance(comparison, Mapping) or comparison.get("schema") != COMPARE_SCHEMA:
        raise ValueError(f"expected a comparison dict with schema {COMPARE_SCHEMA!r}")
    runs = comparison.get("runs")
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("the comparison has no runs")
    for name, run in runs.items():
        check_run(run, f"run {name!r}")
    return runs


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 600 else f"{s:.1f} s"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def strategy_counts(run: Mapping) -> tuple[int, int]:
    return len(run["allocation"]["ptq"]), len(run["allocation"]["qat"])


def format_comparison_table(comparison: Mapping) -> str:
    """Per strategy: accuracy, simulated time per epoch / round / end to end, wall time,
    bytes uploaded, PTQ/QAT counts and speedup against fedaqt; then accuracy per round;
    then each client's strategy."""
    runs = check_comparison(comparison)
    base = runs.get("fedaqt")
    rows = []
    for name, run in runs.items():
        rounds = run["rounds"]
        ptq, qat = strategy_counts(run)
        speedup = f"{base['sim_time_s'] / run['sim_time_s']:.2f}x" if base and run["sim_time_s"] > 0 else "-"
        rows.append([
            name, f"{100 * run['final_accuracy']:.2f}", f"{100 * run['best_accuracy']:.2f}",
            _seconds(_mean([r["sim_epoch_s"] for r in rounds])), _seconds(_mean([r["sim_s"] for r in rounds])),
            _seconds(run["sim_time_s"]), speedup, _seconds(run["wall_time_s"]),
            f"{run['upload_bytes'] / 1e6:.2f}", f"{ptq}/{qat}",
        ])  # fmt: skip
    header = ["strategy", "final acc %", "best acc %", "sim/epoch", "sim/round", "sim total", "vs fedaqt",
              "wall here", "upload MB", "PTQ/QAT"]  # fmt: skip
    first = next(iter(runs.values()))
    parts = [
        f"{first['dataset']}, {first['model']}, {len(first['clients'])} clients, {len(first['rounds'])} rounds "
        f"(simulated time: heterogeneous devices; wall: this machine)",
        _table(header, rows),
        "",
        "accuracy (%) per round",
        _accuracy_per_round(runs),
        "",
        "client strategies (P = PTQ, Q = QAT, F = fp32), clients " + " ".join(str(c["id"]) for c in first["clients"]),
    ]
    for name, run in runs.items():
        parts.append(f"  {name:<8} " + " ".join(c["strategy"][0].upper() for c in run["clients"]))
    rejected = {name: sum(len(r["rejected"]) for r in run["rounds"]) for name, run in runs.items()}
    if any(rejected.values()):
        parts.append("rejected updates: " + ", ".join(f"{n} {k}" for n, k in rejected.items() if k))
    return "\n".join(parts)


def _accuracy_per_round(runs: Mapping[str, Mapping], max_rows: int = 12) -> str:
    count = max(len(run["rounds"]) for run in runs.values())
    step = max(1, -(-count // max_rows))
    picks = sorted(set(range(step, count + 1, step)) | {1, count})
    rows = []
    for r in picks:
        cells = [str(r)]
        for run in runs.values():
            row = run["rounds"][r - 1] if r <= len(run["rounds"]) else None
            cells.append(f"{100 * row['accuracy']:.1f}" if row else "-")
        rows.append(cells)
    return _table(["round", *runs], rows)


def format_run_table(run: Mapping) -> str:
    """One run: its clients (device, fractions, batch, strategy, significances) and
    the per-round progress."""
    check_run(run)
    client_rows = [
        [str(c["id"]), c["device"], f"{c['alpha']:.2f}", f"{c['beta']:.2f}", str(c["samples"]), str(c["batch"]),
         c["strategy"], f"{c['speed_time_s']:.3g}", f"{c['speed_sig']:.3f}", f"{c['acc_sig']:.3f}"]
        for c in run["clients"]
    ]  # fmt: skip
    round_rows = [
        [str(r["round"]), f"{100 * r['accuracy']:.2f}", f"{r['loss']:.3f}", f"{r['wall_s']:.2f}", f"{r['sim_s']:.2f}",
         f"{r['cum_sim_s']:.1f}", f"{r['upload_bytes'] / 1e6:.2f}", str(len(r["rejected"]))]
        for r in run["rounds"]
    ]  # fmt: skip
    ptq, qat = strategy_counts(run)
    return "\n".join([
        f"{run['strategy']}: {run['dataset']}, {run['model']}, {ptq} PTQ / {qat} QAT clients",
        _table(["client", "device", "alpha", "beta", "samples", "batch", "strategy", "T_m s", "Sig_speed", "Sig_acc"],
               client_rows),
        "",
        _table(["round", "acc %", "loss", "wall s", "sim s", "sim total s", "upload MB", "rejected"], round_rows),
        f"final accuracy {100 * run['final_accuracy']:.2f}% (best {100 * run['best_accuracy']:.2f}%), "
        f"simulated {_seconds(run['sim_time_s'])}, wall {_seconds(run['wall_time_s'])}",
    ])  # fmt: skip
