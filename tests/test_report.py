"""Tables and plots of results: contents computed independently, valid PNGs, the
plotted PTQ region equals the allocation rule, bad input named."""

import copy

import numpy as np
import pytest

from fedhq.allocation import geometric_segmentation
from fedhq.report import format_comparison_table, format_run_table, ptq_region, write_report


def fake_run(strategy, accuracies, sim_round_s, strategies):
    rounds, cum = [], 0.0
    for r, acc in enumerate(accuracies, start=1):
        cum += sim_round_s
        rounds.append({"round": r, "accuracy": acc, "loss": 1 - acc, "wall_s": 0.5, "sim_s": sim_round_s,
                       "sim_epoch_s": sim_round_s / 2, "cum_wall_s": 0.5 * r, "cum_sim_s": cum,
                       "upload_bytes": 1000, "participants": [0, 1, 2], "rejected": [], "slowest_client": 0})  # fmt: skip
    clients = [{"id": i, "device": "rtx-a6000", "alpha": 0.5, "beta": 0.5, "samples": 10, "batch": 4, "strategy": s,
                "speed_time_s": 1.0, "speed_sig": 0.5, "acc_sig": 0.5, "norm_speed": 0.2 + 0.3 * i,
                "norm_acc": 0.9 - 0.3 * i} for i, s in enumerate(strategies)]  # fmt: skip
    return {"schema": "fedhq.run/1", "config": {}, "strategy": strategy, "model": "small_cnn@8x8x1:10",
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
    }}  # fmt: skip


def test_comparison_table(comparison):
    table = format_comparison_table(comparison)
    line = {}
    for row in table.splitlines():  # the first line naming a strategy is its row of the main table
        if row.split() and row.split()[0] in comparison["runs"]:
            line.setdefault(row.split()[0], row)
    assert "91.23" in line["fedhq"] and "93.00" in line["fedaqt"]
    assert f"{150 / 60:.2f}x" in line["fedhq"] and f"{150 / 30:.2f}x" in line["fedfq"]  # sim totals 60, 150, 30 s
    assert "1.00x" in line["fedaqt"] and "2/1" in line["fedhq"]
    assert "fedhq    P Q P" in table and "fedaqt   Q Q Q" in table


def test_run_table(comparison):
    table = format_run_table(comparison["runs"]["fedhq"])
    assert "2 PTQ / 1 QAT" in table and "final accuracy 91.23%" in table


def test_ptq_region_is_the_allocation_rule():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.01, 0.99, 5000), rng.uniform(0.01, 0.99, 5000)
    for xi in (0.1, 0.2, 0.5):
        assert np.array_equal(ptq_region(x, y, xi, 0.0625), geometric_segmentation(x, y, xi, 0.0625).astype(bool))


def test_write_report(comparison, tmp_path):
    paths = write_report(comparison, tmp_path)
    names = {p.name for p in paths}
    assert names == {"comparison.txt", "accuracy_vs_time.png", "allocation_fedhq.png"}
    for p in paths:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_input(comparison):
    with pytest.raises(ValueError, match="schema 'fedhq.compare/1'"):
        format_comparison_table({"runs": comparison["runs"]})
    with pytest.raises(ValueError, match="no runs"):
        format_comparison_table({"schema": "fedhq.compare/1", "runs": {}})
    broken = copy.deepcopy(comparison)
    del broken["runs"]["fedfq"]["sim_time_s"]
    with pytest.raises(ValueError, match=r"run 'fedfq': missing \['sim_time_s'\]"):
        format_comparison_table(broken)
