"""Tables and plots of results: contents computed independently, valid PNGs, the
plotted PTQ region equals the allocation rule, bad input named."""

import copy

import numpy as np
import pytest

import fedhq.report.plots as plots
from fedhq.allocation import geometric_segmentation
from fedhq.report import (
    format_comparison_table,
    format_run_table,
    plot_allocation,
    ptq_region,
    write_report,
    write_run_report,
)
from fedhq.report.tables import pick_rounds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(strategy, accuracies, sim_round_s, strategies, rejected=()):
    """A fedhq.run/1 document with every key the engine writes; round r of ``rejected``
    (pairs of round, client) lists that client as rejected."""
    rounds, cum = [], 0.0
    for r, acc in enumerate(accuracies, start=1):
        cum += sim_round_s
        bad = [{"client": c, "reason": "non-finite weights"} for rr, c in rejected if rr == r]
        rounds.append({"round": r, "accuracy": acc, "loss": 1 - acc, "wall_s": 0.5, "sim_s": sim_round_s,
                       "sim_epoch_s": sim_round_s / 2, "cum_wall_s": 0.5 * r, "cum_sim_s": cum,
                       "upload_bytes": 1000, "participants": [0, 1, 2], "rejected": bad, "slowest_client": 0})  # fmt: skip
    clients = [{"id": i, "device": "rtx-a6000", "alpha": 0.5, "beta": 0.5, "samples": 10, "batch": 4, "strategy": s,
                "speed_time_s": 1.0, "speed_sig": 0.5, "acc_sig": 0.5, "norm_speed": 0.2 + 0.3 * i,
                "norm_acc": 0.9 - 0.3 * i} for i, s in enumerate(strategies)]  # fmt: skip
    return {"schema": "fedhq.run/2", "config": {"bits": 8, "seed": 0}, "strategy": strategy, "model": "small_cnn@8x8x1:10",
            "dataset": "digits", "clients": clients,
            "allocation": {"xi": 0.2, "area_threshold": 0.0625, "speed_orientation": "speed",
                           "ptq": [c["id"] for c in clients if c["strategy"] == "ptq"],
                           "qat": [c["id"] for c in clients if c["strategy"] == "qat"]},
            "rounds": rounds, "final_accuracy": accuracies[-1], "best_accuracy": max(accuracies),
            "wall_time_s": 0.5 * len(rounds), "sim_time_s": cum, "upload_bytes": 1000 * len(rounds),
            "timing": {}, "reference_profile": "x.json"}  # fmt: skip


@pytest.fixture
def comparison():
    return {"schema": "fedhq.compare/1", "runs": {
        "fedhq": fake_run("fedhq", [0.5, 0.8, 0.9123], 20.0, ["ptq", "qat", "ptq"]),
        "fedaqt": fake_run("fedaqt", [0.4, 0.7, 0.93], 50.0, ["qat"] * 3),
        "fedfq": fake_run("fedfq", [0.45, 0.75, 0.88], 10.0, ["ptq"] * 3),
        "fedrh": fake_run("fedrh", [0.42, 0.72, 0.9], 30.0, ["qat", "ptq", "qat"], rejected=[(2, 1), (3, 1)]),
        "fp32": fake_run("fp32", [0.55, 0.85, 0.95], 8.0, ["fp32"] * 3),
    }}  # fmt: skip


def main_rows(table, names):
    """The first line starting with each strategy name: its row of the main table."""
    rows = {}
    for line in table.splitlines():
        if line.split() and line.split()[0] in names:
            rows.setdefault(line.split()[0], line)
    return rows


def test_comparison_table(comparison):
    runs = comparison["runs"]
    runs["fedhq"]["upload_bytes"] = 2_469_120
    table = format_comparison_table(comparison)
    rows = main_rows(table, runs)
    assert " 2.47 " in rows["fedhq"]  # MB
    assert set(rows) == set(runs)
    for name, run in runs.items():
        assert f"{100 * run['final_accuracy']:.2f}" in rows[name]
        assert f"{100 * run['best_accuracy']:.2f}" in rows[name]
        total = sum(r["sim_s"] for r in run["rounds"])  # independently of sim_time_s
        assert f"{150.0 / total:.2f}x" in rows[name]  # fedaqt's total: 3 rounds x 50 s
    assert "1.00x" in rows["fedaqt"] and "5.00x" in rows["fedfq"] and "2.50x" in rows["fedhq"]
    assert rows["fedhq"].split()[-1] == "2/1" and rows["fedaqt"].split()[-1] == "0/3"
    assert rows["fp32"].split()[-1] == "-"  # no PTQ/QAT split for the unquantized ceiling
    assert "upload MB" in table
    assert "fedhq   P Q P" in table and "fedaqt  Q Q Q" in table and "fp32    F F F" in table
    assert "rejected updates: fedrh 2 (client 1 x2: non-finite weights)" in table


def test_comparison_without_fedaqt_has_no_speedup(comparison):
    del comparison["runs"]["fedaqt"]
    table = format_comparison_table(comparison)
    assert "vs fedaqt" not in table
    assert not any(cell.endswith("x") for cell in main_rows(table, comparison["runs"])["fedhq"].split())


def test_accuracy_per_round_subset_keeps_first_and_last():
    accs = [0.01 * r for r in range(1, 51)]
    comparison = {"schema": "fedhq.compare/1", "runs": {"fedhq": fake_run("fedhq", accs, 1.0, ["qat"])}}
    table = format_comparison_table(comparison)
    block = table.split("by round")[1].split("strategy of each client")[0]
    shown = [int(line.split()[0]) for line in block.splitlines() if line.split() and line.split()[0].isdigit()]
    assert shown[0] == 1 and shown[-1] == 50 and 5 <= len(shown) <= 13
    assert "50.0" in block.splitlines()[-2]  # round 50: 0.50 accuracy
    assert pick_rounds(0) == [] and pick_rounds(3) == [1, 2, 3] and pick_rounds(50, 10) == [1, *range(5, 51, 5)]


def test_run_table(comparison):
    run = comparison["runs"]["fedrh"]
    table = format_run_table(run)
    assert "1 PTQ / 2 QAT" in table and "final accuracy 90.00% (best 90.00%)" in table
    assert "rtx-a6000" in table and "xi = 0.2" in table
    round_rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[1] for row in round_rows[-3:]] == ["42.00", "72.00", "90.00"]
    run["rounds"], run["final_accuracy"], run["best_accuracy"] = [], None, None  # a run stopped before round 1
    assert "final accuracy - (best -)" in format_run_table(run)


def test_ptq_region_is_the_rule():
    # the rule written out independently (ALGORITHM.md §4), at points on either side of each boundary
    points = [((0.1, 0.5), True),  # y/x = 5 > 4
              ((0.2, 0.8), False),  # y/x = 4, not steeper; area 0.08
              ((0.25, 0.5), False),  # area exactly 0.0625, not below; y/x = 2
              ((0.3, 0.3), True),  # area 0.045
              ((0.9, 0.9), False)]  # fmt: skip
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
    run = comparison["runs"]["fedhq"]
    run["allocation"]["xi"], run["allocation"]["area_threshold"] = 0.3, 0.01
    run["clients"][0]["norm_acc"] = None  # left out of the picture, not an error
    path = plot_allocation(run, tmp_path / "a.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    grid_calls = [c for c in calls if len(c[0]) == 2 and min(c[0]) > 100]
    assert grid_calls and all(c[1:] == (0.3, 0.01) for c in grid_calls)


def test_write_report(comparison, tmp_path):
    paths = write_report(comparison, tmp_path / "out")
    assert {p.name for p in paths} == {"comparison.txt", "accuracy_vs_time.png", "allocation_fedhq.png",
                                       "allocation_fedrh.png"}  # fmt: skip
    for p in paths:
        assert p.parent == tmp_path / "out" and p.exists()
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert (tmp_path / "out" / "comparison.txt").read_text().strip() == format_comparison_table(comparison)
    del comparison["runs"]["fedrh"], comparison["runs"]["fedhq"]
    assert {p.name for p in write_report(comparison, tmp_path / "b")} == {"comparison.txt", "accuracy_vs_time.png"}


def test_write_run_report(comparison, tmp_path):
    paths = write_run_report(comparison["runs"]["fedhq"], tmp_path)
    assert [p.name for p in paths] == ["run.txt", "accuracy_vs_time.png", "allocation.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths[1:])


def test_time_axis_choices():
    assert plots.time_unit(59.0) == (1.0, "s") and plots.time_unit(3000.0) == (60.0, "min")
    assert plots.time_unit(40000.0) == (3600.0, "h")
    assert plots.use_log_x([10.0, 500.0]) and not plots.use_log_x([10.0, 150.0]) and not plots.use_log_x([])


def test_bad_input(comparison):
    with pytest.raises(ValueError, match="schema 'fedhq.compare/1', got None"):
        format_comparison_table({"runs": comparison["runs"]})
    with pytest.raises(ValueError, match="got 'fedhq.run/1' .*format_run_table"):
        format_comparison_table(comparison["runs"]["fedhq"])
    with pytest.raises(ValueError, match="no runs"):
        format_comparison_table({"schema": "fedhq.compare/1", "runs": {}})
    with pytest.raises(ValueError, match="schema 'fedhq.run/1', got schema 'fedhq.compare/1'"):
        format_run_table(comparison)
    with pytest.raises(ValueError, match="expected a results dict"):
        write_run_report([1, 2], "/nonexistent")
    cases = [
        (lambda runs: runs["fedfq"].pop("sim_time_s"), r"run 'fedfq': missing \['sim_time_s'\]"),
        (lambda runs: runs["fedhq"]["rounds"][1].pop("cum_sim_s"), r"run 'fedhq': rounds\[1\]: missing \['cum_sim_s'\]"),
        (lambda runs: runs["fedrh"]["clients"][2].pop("strategy"), r"run 'fedrh': clients\[2\]: missing \['strategy'\]"),
        (lambda runs: runs["fedhq"]["allocation"].pop("xi"), r"run 'fedhq': allocation: missing \['xi'\]"),
        (lambda runs: runs["fp32"].update(rounds="none"), r"run 'fp32': 'rounds' must be a list"),
    ]
    for breaks, message in cases:
        broken = copy.deepcopy(comparison)
        breaks(broken["runs"])
        with pytest.raises(ValueError, match=message):
            format_comparison_table(broken)
        with pytest.raises(ValueError, match=message):
            write_report(broken, "/nonexistent/never-created")
