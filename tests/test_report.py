"""Tables, plots and CSV of results: contents computed independently, valid PNGs, the
plotted PTQ region equals the allocation rule, titles name the setup, labels never
overlap, bad input named."""

import copy
import csv
import math

import numpy as np
import pytest
from scipy import stats

import fedhq.report.plots as plots
from fedhq.allocation import geometric_segmentation
from fedhq.report import (
    format_comparison_table,
    format_run_table,
    plot_allocation,
    ptq_region,
    write_report,
    write_rounds_csv,
    write_run_report,
)
from fedhq.report.plots import accuracy_limits, place_labels, plot_accuracy_vs_time, plot_seed_summary
from fedhq.report.tables import pick_rounds, seeds_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(strategy, accuracies, sim_round_s, strategies, rejected=(), seed=0, bits=8):
    """A fedhq.run/2 document with every key the engine writes; round r of ``rejected``
    (pairs of round, client) lists that client as rejected."""
    rounds, cum = [], 0.0
    for r, acc in enumerate(accuracies, start=1):
        cum += sim_round_s
        bad = [{"client": c, "reason": "non-finite weights"} for rr, c in rejected if rr == r]
        rounds.append(
            {
                "round": r,
                "accuracy": acc,
                "loss": 1 - acc,
                "wall_s": 0.5,
                "sim_s": sim_round_s,
                "sim_epoch_s": sim_round_s / 2,
                "cum_wall_s": 0.5 * r,
                "cum_sim_s": cum,
                "upload_bytes": 1000,
                "participants": [0, 1, 2],
                "rejected": bad,
                "slowest_client": 0,
            }
        )
    clients = [
        {
            "id": i,
            "device": "rtx-a6000",
            "alpha": 0.5,
            "beta": 0.5,
            "samples": 10,
            "batch": 4,
            "strategy": s,
            "speed_time_s": 1.0,
            "speed_sig": 0.5,
            "acc_sig": 0.5,
            "norm_speed": 0.2 + 0.3 * i,
            "norm_acc": 0.9 - 0.3 * i,
        }
        for i, s in enumerate(strategies)
    ]
    return {
        "schema": "fedhq.run/2",
        "config": {"bits": bits, "seed": seed},
        "strategy": strategy,
        "model": "small_cnn@8x8x1:10",
        "dataset": "digits",
        "clients": clients,
        "allocation": {
            "xi": 0.2,
            "area_threshold": 0.0625,
            "speed_orientation": "speed",
            "ptq": [c["id"] for c in clients if c["strategy"] == "ptq"],
            "qat": [c["id"] for c in clients if c["strategy"] == "qat"],
        },
        "rounds": rounds,
        "final_accuracy": accuracies[-1],
        "wall_time_s": 0.5 * len(rounds),
        "sim_time_s": cum,
        "upload_bytes": 1000 * len(rounds),
        "timing": {},
        "reference_profile": "x.json",
    }


def comparison_of(by_seed):
    """A fedhq.compare/2 document of seed -> strategy -> run."""
    return {
        "schema": "fedhq.compare/2",
        "seeds": sorted(by_seed),
        "runs_by_seed": {str(s): r for s, r in by_seed.items()},
    }


def seed_runs(seed=0, shift=0.0, bits=8):
    """One seed's five runs; ``shift`` moves every accuracy (another seed's draw), the
    k-th strategy's by (k + 1) x shift so that paired differences vary between seeds."""
    acc = lambda values, k=0: [v + (k + 1) * shift for v in values]  # noqa: E731
    return {
        "fedhq": fake_run("fedhq", acc([0.5, 0.8, 0.9123]), 20.0, ["ptq", "qat", "ptq"], seed=seed, bits=bits),
        "fedaqt": fake_run("fedaqt", acc([0.4, 0.7, 0.93], 1), 50.0, ["qat"] * 3, seed=seed, bits=bits),
        "fedfq": fake_run("fedfq", acc([0.45, 0.75, 0.88], 2), 10.0, ["ptq"] * 3, seed=seed, bits=bits),
        "fedrh": fake_run(
            "fedrh",
            acc([0.42, 0.72, 0.9]),
            30.0,
            ["qat", "ptq", "qat"],
            rejected=[(2, 1), (3, 1)],
            seed=seed,
            bits=bits,
        ),
        "fp32": fake_run("fp32", acc([0.55, 0.85, 0.95]), 8.0, ["fp32"] * 3, seed=seed, bits=bits),
    }


@pytest.fixture
def comparison():
    return comparison_of({0: seed_runs()})


def main_rows(table, names):
    """The first line starting with each strategy name: its row of the main table."""
    rows = {}
    for line in table.splitlines():
        if line.split() and line.split()[0] in names:
            rows.setdefault(line.split()[0], line)
    return rows


def test_comparison_table(comparison):
    runs = comparison["runs_by_seed"]["0"]
    runs["fedhq"]["upload_bytes"] = 2_469_120
    table = format_comparison_table(comparison)
    rows = main_rows(table, runs)
    assert " 2.47 " in rows["fedhq"]  # MB
    assert set(rows) == set(runs)
    assert table.splitlines()[0] == "digits, small_cnn@8x8x1:10, 8-bit uploads, 3 clients, 3 rounds, seed 0"
    assert "last-5 acc %" in table and "sim end-to-end" in table and "best" not in table and "sim total" not in table
    for name, run in runs.items():
        accuracies = [r["accuracy"] for r in run["rounds"]]
        assert rows[name].split()[1:3] == [f"{100 * sum(accuracies) / 3:.2f}", f"{100 * accuracies[-1]:.2f}"]
        total = sum(r["sim_s"] for r in run["rounds"])  # independently of sim_time_s
        assert f"{150.0 / total:.2f}x" in rows[name]  # fedaqt's total: 3 rounds x 50 s
    assert "1.00x" in rows["fedaqt"] and "5.00x" in rows["fedfq"] and "2.50x" in rows["fedhq"]
    assert rows["fedhq"].split()[-1] == "2/1" and rows["fedaqt"].split()[-1] == "0/3"
    assert rows["fp32"].split()[-1] == "-"  # no PTQ/QAT split for the unquantized ceiling
    assert "upload MB" in table
    assert "fedhq   P Q P" in table and "fedaqt  Q Q Q" in table and "fp32    F F F" in table
    assert "rejected updates: fedrh 2 (client 1 x2: non-finite weights)" in table


def test_comparison_without_fedaqt_has_no_speedup(comparison):
    del comparison["runs_by_seed"]["0"]["fedaqt"]
    table = format_comparison_table(comparison)
    assert "vs fedaqt" not in table
    assert not any(cell.endswith("x") for cell in main_rows(table, comparison["runs_by_seed"]["0"])["fedhq"].split())


def test_accuracy_per_round_subset_keeps_first_and_last():
    accs = [0.01 * r for r in range(1, 51)]
    comparison = comparison_of({0: {"fedhq": fake_run("fedhq", accs, 1.0, ["qat"])}})
    table = format_comparison_table(comparison)
    block = table.split("by round")[1].split("strategy of each client")[0]
    shown = [int(line.split()[0]) for line in block.splitlines() if line.split() and line.split()[0].isdigit()]
    assert shown[0] == 1 and shown[-1] == 50 and 5 <= len(shown) <= 13
    assert "50.0" in block.splitlines()[-2]  # round 50: 0.50 accuracy
    assert pick_rounds(0) == [] and pick_rounds(3) == [1, 2, 3] and pick_rounds(50, 10) == [1, *range(5, 51, 5)]


def test_run_table(comparison):
    run = comparison["runs_by_seed"]["0"]["fedrh"]
    table = format_run_table(run)
    assert table.startswith("fedrh: digits, small_cnn@8x8x1:10, 8-bit uploads, 3 clients, 3 rounds, seed 0")
    assert "1 PTQ / 2 QAT" in table and "last-5 mean accuracy 68.00%, final 90.00%;" in table and "best" not in table
    assert "rtx-a6000" in table and "xi = 0.2" in table
    round_rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[1] for row in round_rows[-3:]] == ["42.00", "72.00", "90.00"]
    for r, deployed in zip(run["rounds"], (0.3, 0.6, 0.75)):  # the quantized model's accuracy, when recorded
        r["deployed_accuracy"] = deployed
    assert "last-5 mean accuracy 55.00%, final 75.00% (of the deployed quantized model)" in format_run_table(run)
    run["rounds"], run["final_accuracy"] = [], None  # a run stopped before round 1
    assert "last-5 mean accuracy -, final -;" in format_run_table(run)


def test_ptq_region_is_the_rule():
    # the rule written out independently (docs/method.md §4.2), at points on either side of each boundary
    points = [
        ((0.1, 0.5), True),  # y/x = 5 > 4
        ((0.2, 0.8), False),  # y/x = 4, not steeper; area 0.08
        ((0.25, 0.5), False),  # area exactly 0.0625, not below; y/x = 2
        ((0.3, 0.3), True),  # area 0.045
        ((0.9, 0.9), False),
    ]
    xy = np.array([p for p, _ in points])
    assert ptq_region(xy[:, 0], xy[:, 1], 0.2, 0.0625).tolist() == [ptq for _, ptq in points]
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.01, 0.99, 5000), rng.uniform(0.01, 0.99, 5000)
    for xi in (0.1, 0.2, 0.5, 0.8):
        rule = (y / x > (1 - xi) / xi) | (x * y / 2 < 0.0625)
        assert np.array_equal(ptq_region(x, y, xi, 0.0625), rule)
        assert np.array_equal(ptq_region(x, y, xi, 0.0625), geometric_segmentation(x, y, xi, 0.0625))
    # raising xi never turns a PTQ point into QAT (the monotonicity the reading was chosen for)
    assert not (ptq_region(x, y, 0.1, 0.0625) & ~ptq_region(x, y, 0.2, 0.0625)).any()
    assert ptq_region(0.5, 0.5, 0.2, 0.0).shape == ()  # scalars in, a 0-d array out


def test_allocation_plot_shades_with_ptq_region(comparison, tmp_path, monkeypatch):
    calls = []

    def spy(x, y, xi, area_threshold):
        calls.append((np.shape(x), xi, area_threshold))
        return ptq_region(x, y, xi, area_threshold)

    monkeypatch.setattr(plots, "ptq_region", spy)
    run = comparison["runs_by_seed"]["0"]["fedhq"]
    run["allocation"]["xi"], run["allocation"]["area_threshold"] = 0.3, 0.01
    run["clients"][0]["norm_acc"] = None  # left out of the picture, not an error
    path = plot_allocation(run, tmp_path / "a.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    grid_calls = [c for c in calls if len(c[0]) == 2 and min(c[0]) > 100]
    assert grid_calls and all(c[1:] == (0.3, 0.01) for c in grid_calls)


def test_write_report(comparison, tmp_path):
    paths = write_report(comparison, tmp_path / "out")
    top = {p.name for p in paths if p.parent == tmp_path / "out"}
    assert top == {
        "comparison.txt",
        "accuracy_vs_time.png",
        "allocation_fedhq.png",
        "allocation_fedrh.png",
        "rounds.csv",
    }
    runs = {p.relative_to(tmp_path / "out").as_posix() for p in paths if p.parent != tmp_path / "out"}
    assert runs == {f"seed0/{name}/rounds.csv" for name in ("fedhq", "fedaqt", "fedfq", "fedrh", "fp32")}
    for p in paths:
        assert p.exists()
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert (tmp_path / "out" / "comparison.txt").read_text().strip() == format_comparison_table(comparison)
    del comparison["runs_by_seed"]["0"]["fedrh"], comparison["runs_by_seed"]["0"]["fedhq"]
    top = {p.name for p in write_report(comparison, tmp_path / "b") if p.parent == tmp_path / "b"}
    assert top == {"comparison.txt", "accuracy_vs_time.png", "rounds.csv"}


def test_write_run_report(comparison, tmp_path):
    paths = write_run_report(comparison["runs_by_seed"]["0"]["fedhq"], tmp_path)
    assert [p.name for p in paths] == ["run.txt", "rounds.csv", "accuracy_vs_time.png", "allocation.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths[2:])


def test_time_axis_choices():
    assert plots.time_unit(59.0) == (1.0, "s") and plots.time_unit(3000.0) == (60.0, "min")
    assert plots.time_unit(40000.0) == (3600.0, "h")
    assert plots.use_log_x([10.0, 500.0]) and not plots.use_log_x([10.0, 150.0]) and not plots.use_log_x([])


def test_bad_input(comparison):
    with pytest.raises(ValueError, match="schema 'fedhq.compare/2', got None"):
        format_comparison_table({"runs": comparison["runs_by_seed"]["0"]})
    with pytest.raises(ValueError, match="got 'fedhq.run/2' .*format_run_table"):
        format_comparison_table(comparison["runs_by_seed"]["0"]["fedhq"])
    with pytest.raises(ValueError, match="no runs"):
        format_comparison_table({"schema": "fedhq.compare/1", "runs": {}})
    with pytest.raises(ValueError, match="no runs"):
        format_comparison_table({"schema": "fedhq.compare/2", "runs_by_seed": {}})
    with pytest.raises(ValueError, match="seeds must be ints"):
        format_comparison_table({"schema": "fedhq.compare/2", "runs_by_seed": {"x": comparison["runs_by_seed"]["0"]}})
    with pytest.raises(ValueError, match="schema 'fedhq.run/2', got schema 'fedhq.compare/2'"):
        format_run_table(comparison)
    with pytest.raises(ValueError, match="expected a results dict"):
        write_run_report([1, 2], "/nonexistent")
    cases = [
        (lambda runs: runs["fedfq"].pop("sim_time_s"), r"run 'fedfq': missing \['sim_time_s'\]"),
        (
            lambda runs: runs["fedhq"]["rounds"][1].pop("cum_sim_s"),
            r"run 'fedhq': rounds\[1\]: missing \['cum_sim_s'\]",
        ),
        (
            lambda runs: runs["fedrh"]["clients"][2].pop("strategy"),
            r"run 'fedrh': clients\[2\]: missing \['strategy'\]",
        ),
        (lambda runs: runs["fedhq"]["allocation"].pop("xi"), r"run 'fedhq': allocation: missing \['xi'\]"),
        (lambda runs: runs["fp32"].update(rounds="none"), r"run 'fp32': 'rounds' must be a list"),
        (lambda runs: runs["fedfq"]["config"].pop("bits"), r"run 'fedfq': config: missing \['bits'\]"),
    ]
    for breaks, message in cases:
        broken = copy.deepcopy(comparison)
        breaks(broken["runs_by_seed"]["0"])
        with pytest.raises(ValueError, match=message):
            format_comparison_table(broken)
        with pytest.raises(ValueError, match=message):
            write_report(broken, "/nonexistent/never-created")


# ---- several seeds, titles, axes, labels, CSV ----


def several_seeds():
    """Three seeds; seed s moves every accuracy by SHIFTS[s] and fedaqt's time by 10 s * s."""
    by_seed = {s: seed_runs(seed=s, shift=shift, bits=4) for s, shift in zip((0, 1, 2), (0.0, 0.02, -0.01))}
    for s, runs in by_seed.items():
        runs["fedaqt"]["sim_time_s"] += 10.0 * s
    return by_seed


def test_summary_table_gives_student_t_intervals_and_paired_differences():
    by_seed = several_seeds()
    table = format_comparison_table(comparison_of(by_seed))
    assert table.splitlines()[0] == "digits, small_cnn@8x8x1:10, 4-bit uploads, 3 clients, 3 rounds, seeds 0-2"

    def ci(values):  # written out with scipy.stats.t, apart from fedhq.fl.summary
        values = np.array(values)
        half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
        return f"{values.mean():.2f} +- {half:.2f}"

    rows = main_rows(table.split("paired by seed")[0], by_seed[0])
    fedhq = [np.mean([r["accuracy"] for r in by_seed[s]["fedhq"]["rounds"]]) * 100 for s in by_seed]
    assert ci(fedhq) in rows["fedhq"]
    assert ci([by_seed[s]["fedhq"]["rounds"][-1]["accuracy"] * 100 for s in by_seed]) in rows["fedhq"]
    speedups = [by_seed[s]["fedaqt"]["sim_time_s"] / by_seed[s]["fedhq"]["sim_time_s"] for s in by_seed]
    assert ci(speedups) + "x" in rows["fedhq"]
    paired = main_rows(table.split("paired by seed")[1].split("of each run")[0], by_seed[0])
    fedaqt = [np.mean([r["accuracy"] for r in by_seed[s]["fedaqt"]["rounds"]]) * 100 for s in by_seed]
    differences = np.array(fedhq) - np.array(fedaqt)
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / math.sqrt(3)
    assert f"{differences.mean():+.2f} +- {half:.2f}" in paired["fedaqt"]
    assert "fedhq" not in paired and "last-5 acc diff pts" in table  # no difference against itself
    per_seed = table.split("of each run")[1]
    assert half > 0.5 and [line.split()[1] for line in per_seed.splitlines()[3:6]] == [f"{v:.1f}" for v in fedhq]
    assert "seed 0: rejected updates: fedrh 2" in table


def test_seeds_text_and_accuracy_limits():
    assert (
        seeds_text([3]) == "seed 3"
        and seeds_text([2, 0, 1]) == "seeds 0-2"
        and seeds_text([0, 2, 7]) == "seeds 0, 2, 7"
    )
    assert accuracy_limits([97.0, 99.0]) == (96.0, 100.0)  # a 97-99% race is not flattened into 0-100
    assert accuracy_limits([10.0, 90.0]) == (6.0, 94.0)  # margin 5% of the span
    assert accuracy_limits([]) == (0.0, 100.0) and accuracy_limits([0.0, 100.0]) == (0.0, 100.0)


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save, kept open for inspection."""
    saved = []

    def keep(fig, path):
        saved.append(fig)
        fig.canvas.draw()  # final text and limits
        fig.savefig(path, dpi=plots.DPI, bbox_inches="tight")
        return plots.Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    yield saved
    for fig in saved:
        plots.plt.close(fig)


def test_titles_name_dataset_bits_and_seeds_and_axes_fit(figures, tmp_path):
    runs = seed_runs(seed=3, bits=4)
    plot_accuracy_vs_time(runs, tmp_path / "a.png")
    plot_allocation(runs["fedhq"], tmp_path / "b.png")
    plot_seed_summary(several_seeds(), tmp_path / "c.png")
    titles = [figures[0]._suptitle.get_text(), figures[1].axes[0].get_title(), figures[2]._suptitle.get_text()]
    for title, seeds in zip(titles, ("seed 3", "seed 3", "seeds 0-2")):
        assert title.startswith(f"digits, small_cnn@8x8x1:10, 4-bit uploads, 3 clients, 3 rounds, {seeds}"), title
    every = [100 * r["accuracy"] for run in runs.values() for r in run["rounds"]]
    assert figures[0].axes[0].get_ylim() == pytest.approx(accuracy_limits(every))
    assert figures[0].axes[0].get_ylim() == pytest.approx((37.25, 97.75))  # 40% .. 95% +- 5%, not a fixed range


def test_allocation_labels_never_overlap_and_devices_are_shown(figures, tmp_path):
    rng = np.random.default_rng(0)
    run = fake_run("fedhq", [0.5], 1.0, ["ptq" if i % 3 else "qat" for i in range(40)])
    devices = ["rtx-a6000", "jetson-orin-nano-8gb", "phone-snapdragon-8-gen-2"]
    for i, c in enumerate(run["clients"]):  # 30 clients in a tight cluster, 10 spread out
        spread = 0.02 if i < 30 else 0.4
        c["norm_speed"], c["norm_acc"] = (float(v) for v in np.clip(0.5 + spread * rng.standard_normal(2), 0.02, 0.98))
        c["device"] = devices[i % 3]
    plot_allocation(run, tmp_path / "a.png")
    ax = figures[0].axes[0]
    renderer = figures[0].canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().isdigit()]
    assert sorted(int(t.get_text()) for t in labels) == list(range(40))  # every client named
    for t in labels:
        t.update_positions(renderer)
    boxes = [plots.Text.get_window_extent(t, renderer) for t in labels]  # the text, without its leader line
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), labels[i].get_text()
    points = ax.transData.transform([(c["norm_speed"], c["norm_acc"]) for c in run["clients"]])
    for box in boxes:  # and no label covers a point
        assert not any(box.x0 < x < box.x1 and box.y0 < y < box.y1 for x, y in points)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [f"device: {d}" for d in devices] == [t for t in legend if t.startswith("device:")]


def test_place_labels_reports_points_it_has_no_room_for():
    fig, ax = plots.plt.subplots(figsize=(2, 2))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    placed = place_labels(ax, [(0.5, 0.5)] * 12, [f"client {i}" for i in range(12)], rings=1)
    plots.plt.close(fig)
    assert placed[0] is not None and None in placed  # one ring around one spot cannot hold twelve labels


def test_rounds_csv(tmp_path):
    by_seed = several_seeds()
    by_seed[1]["fedhq"]["rounds"][0]["deployed_accuracy"] = 0.25
    paths = write_report(comparison_of(by_seed), tmp_path)
    with open(tmp_path / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 5 * 3  # seeds x strategies x rounds
    assert list(rows[0])[:8] == [
        "dataset",
        "model",
        "bits",
        "seed",
        "strategy",
        "round",
        "accuracy",
        "deployed_accuracy",
    ]
    row = next(r for r in rows if r["seed"] == "1" and r["strategy"] == "fedrh" and r["round"] == "2")
    source = by_seed[1]["fedrh"]["rounds"][1]
    assert float(row["accuracy"]) == source["accuracy"] and float(row["cum_sim_s"]) == source["cum_sim_s"]
    assert (
        row["rejected"] == "1" and row["participants"] == "3" and row["bits"] == "4" and row["deployed_accuracy"] == ""
    )
    assert [r["deployed_accuracy"] for r in rows if r["seed"] == "1" and r["strategy"] == "fedhq"] == ["0.25", "", ""]
    with open(tmp_path / "seed2" / "fedfq" / "rounds.csv", newline="") as f:
        own = list(csv.DictReader(f))
    same = [r for r in rows if r["seed"] == "2" and r["strategy"] == "fedfq"]
    assert own == [{k: v for k, v in r.items() if k != "deployed_accuracy"} for r in same]  # none recorded there
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert {
        "comparison.txt",
        "seed_summary.png",
        "seed0/comparison.txt",
        "seed2/accuracy_vs_time.png",
        "seed1/allocation_fedhq.png",
    } <= names
    assert (tmp_path / "seed_summary.png").read_bytes()[:8] == PNG_MAGIC
    write_rounds_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text().startswith("dataset,model,bits,seed,strategy,round,accuracy,loss")


def test_a_version_1_comparison_still_reads(comparison):
    v1 = {"schema": "fedhq.compare/1", "runs": comparison["runs_by_seed"]["0"]}
    assert format_comparison_table(v1) == format_comparison_table(comparison)


def test_precision_summary_plots_accuracy_against_bits_per_weight_and_bytes(figures, tmp_path):
    from fedhq.fl.summary import summarize

    by_seed = several_seeds()
    widths = {name: 2.0 + k for k, name in enumerate(by_seed[0])}
    for s, runs in by_seed.items():
        for name, run in runs.items():
            run["weight_bits"] = widths[name] + 0.5 * s
            run["upload_bytes"] = int(1e6 * widths[name])
    summary = summarize(by_seed)
    plots.plot_precision_summary(by_seed, tmp_path / "p.png")
    left, right = figures[0].axes
    for name, width in widths.items():
        assert summary["strategies"][name]["weight_bits"]["mean"] == pytest.approx(width + 0.5)
        assert summary["strategies"][name]["upload_bytes"]["mean"] == pytest.approx(1e6 * width)
    # one marker per strategy, at its mean bits per weight (left) and megabytes (right)
    assert sorted(c.lines[0].get_xdata()[0] for c in left.containers) == pytest.approx(
        sorted(w + 0.5 for w in widths.values())
    )
    assert sorted(c.lines[0].get_xdata()[0] for c in right.containers) == pytest.approx(sorted(widths.values()))
    assert right.get_xscale() == "log" and (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
