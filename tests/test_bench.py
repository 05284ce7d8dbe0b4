"""The benchmarks stay runnable: quick CPU runs of both scripts check every case before
timing, write JSON rows with the fields the reports read, and evaluate the project's
targets (no speed is asserted here: this machine's timings say nothing about a GPU's).
A GPU run is one command later (python bench/gpu_selftest.py), so a script that
broke in the meantime, or that fails unclearly without a GPU, is caught here."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout)


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "rows.json"
    # 256K elements, 2 repeats: every case still validated against its baseline first.
    result = _run("bench_kernels.py", "--quick", "--size", str(2**18), "--repeats", "2", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("checking, then timing") == 9  # 7 (mixed bits too) + median and trimmed mean
    rows = json.loads(out.read_text())
    ops = {row["op"] for row in rows}
    assert {"numpy", "fedhq-cpu"} <= {row["backend"] for row in rows if "median" in row["op"]}
    assert any("aggregate_state_dicts" in op for op in ops) and any("fake_quant" in op for op in ops)
    assert any("at 2/4/8 bits" in op for op in ops)
    assert any("copy_" in op for op in ops)
    fields = {
        "op",
        "size",
        "elements",
        "backend",
        "impl",
        "bytes",
        "median_ms",
        "p10_ms",
        "p90_ms",
        "repeats",
        "gbps",
        "baseline",
        "speedup",
        "copy_gbps",
        "pct_of_copy",
        "machine",
        "device",
        "torch",
        "timestamp",
        "warmup_calls",
        "warmup_extra_ms",
    }
    for row in rows:
        assert fields <= set(row), fields - set(row)
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["pct_of_copy"] > 0 and row["device"] == "cpu"
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert {row["backend"] for row in rows} >= {"torch", "torch.ao", "torch.ao-fused", "fedhq-cpu"}
    assert "end of run" in rows[-1]["op"] and rows[-1]["copy_gbps"] == max(rows[0]["gbps"], rows[-1]["gbps"])
    assert "fedhq-triton" not in {row["backend"] for row in rows}  # its CPU interpreter is not timed
    ours = [row for row in rows if row["backend"].startswith("fedhq-")]
    # 9 allocating rows, and an out= row for fake_quant (given x2, observed) and dequantize
    assert len(ours) == 13 and all(row["speedup"] > 0 for row in ours)
    out_rows = [row for row in ours if row["backend"] == "fedhq-cpu out="]
    assert len(out_rows) == 4 and all("out=" in row["impl"] for row in out_rows)
    # the CPU goals are evaluated: a speedup target on seven ops (two robust aggregates),
    # a share of the copy on the two given-scale fake_quant out= rows
    assert sum(isinstance(row.get("target_met"), bool) for row in ours) == 7
    assert [row["backend"] for row in ours if isinstance(row.get("aim_met"), bool)] == ["fedhq-cpu out="] * 2
    assert result.stdout.count("-> MET") + result.stdout.count("-> NOT MET") + result.stdout.count("-> not met") == 9
    # steady state after the warm-up, whose calls are reported apart
    for row in rows:
        assert row["warmup_calls"] == 2 and row["first_call_ms"] > 0 and row["warmup_median_ms"] > 0


@pytest.fixture(scope="module")
def bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_failed_check_skips_that_side_only(bench_kernels):
    m = bench_kernels

    def fails_on_reference():
        if m.dispatch.forced_backend() == "reference":
            raise m.Mismatch("planted")

    def broken_check():
        raise m.Mismatch("x")

    slow = m.Baseline("slow", "torch", lambda: sum(range(20000)))
    fast = m.Baseline("fast", "torch-fast", lambda: None)
    broken = m.Baseline("broken", "torch-broken", lambda: None, validate=broken_check)
    case = m.Case("fq_observed", "op", "(1,)", 1, 8, lambda: None, [slow, broken, fast], fails_on_reference)
    args = m.parse_args(["--quick", "--backends", "cpu", "--repeats", "2"])
    args.backends = ["cpu", "reference"]  # reference is not timed by default; here it is the failing side
    rows, failures = m.time_case(case, args, torch.device("cpu"))
    assert [r["backend"] for r in rows] == ["torch", "torch-fast", "fedhq-cpu"]
    assert failures == ["op [torch-broken]: x", "op [fedhq-reference]: planted"]
    ours = rows[-1]
    assert ours["baseline"] == "fast"  # speedup against the strongest baseline...
    assert ours["target_speedup"] == pytest.approx(
        rows[0]["median_ms"] / ours["median_ms"]
    )  # ...the target against its named one
    assert rows[1]["speedup"] == 1.0 and rows[0]["speedup"] < 1.0


def test_gpu_samples_queue_a_few_milliseconds(bench_kernels):
    assert bench_kernels.calls_per_sample(0.1) == 50 and bench_kernels.calls_per_sample(20.0) == 1
    assert bench_kernels.calls_per_sample(0.0) == 1000


def test_gpu_goals_are_the_projects_targets(bench_kernels):
    module = bench_kernels
    gpu = module.GOALS["cuda"]
    assert {key: aim for key, (_, aim) in gpu.items() if aim is not None} == {
        "fq_tensor": 85,
        "fq_channel": 85,
        "quantize": 85,
        "dequantize": 85,
        "aggregate": 80,
    }
    assert {key: target for key, (target, _) in gpu.items() if target is not None} == {"fq_observed": 2.0}
    assert module.FULL_SIZE["cuda"] == 64 * 2**20


def test_bench_qat_step_small_model(tmp_path):
    out = tmp_path / "qat.json"
    result = _run(
        "bench_qat_step.py",
        "--model",
        "small_cnn@8x8x1:10",
        "--batch",
        "4",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"fp32", "fedhq-qat", "torch.ao-qat"}
    for row in rows.values():
        assert row["repeats"] == 3 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and row["median_ms"] > 0
        assert row["model"] == "small_cnn@8x8x1:10" and row["batch"] == 4 and row["device"] == "cpu"
        assert row["ratio_to_fp32"] == pytest.approx(row["median_ms"] / rows["fp32"]["median_ms"])
    assert rows["fp32"]["ratio_to_fp32"] == 1.0
    ours = rows["fedhq-qat"]
    assert isinstance(ours["goal_met"], bool) and ours["speedup_vs_torch_ao"] > 0
    assert ours["goal_met"] == (ours[ours["goal_figure"]] <= 1.2)
    assert ours["paired_ratio_p10"] <= ours["paired_ratio_median"] <= ours["paired_ratio_p90"]
    assert "Goal: fedhq-qat <= 1.2x fp32" in result.stdout
    for row in rows.values():  # the warm-up step is timed apart from the steady-state rounds
        assert row["warmup_steps"] == 1 and row["first_step_ms"] == row["warmup_median_ms"] > 0
    assert ("-> MET" in result.stdout) != ("-> NOT MET" in result.stdout)
    assert "deprecated" not in result.stderr  # torch.ao's notices are filtered


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda would run")
def test_gpu_benchmarks_refuse_cleanly_without_a_gpu():
    for script in ("bench_kernels.py", "bench_qat_step.py"):
        result = _run(script, "--device", "cuda")
        assert result.returncode == 2, (script, result.stdout, result.stderr)
        assert "torch sees no CUDA GPU" in result.stderr and "Traceback" not in result.stderr, script


def test_bench_qat_recipe_quick(tmp_path):
    out = tmp_path / "recipe.json"
    result = _run("bench_qat_recipe.py", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())
    runs = [r for r in rows if not r.get("summary")]
    assert {(r["strategy"], r["bits"]) for r in runs} == {
        ("fp32", None),
        ("ptq", 8),
        ("qat", 8),
        ("ptq", 4),
        ("qat", 4),
    }
    assert sorted({r["seed"] for r in runs}) == [0, 1] and len(runs) == 10
    for r in runs:
        assert 0 < r["accuracy"] <= 1 and 0 < r["deployed_accuracy"] <= 1 and r["train_s"] > 0
        assert r["dataset"] == "digits" and r["train_samples"] == 300 and r["observer"] == "envelope"
    summary = {r["bits"]: r for r in rows if r.get("summary")}
    assert set(summary) == {8, 4} and all(s["n"] == 2 for s in summary.values())
    assert all(isinstance(s["goal_at_least_ptq"], bool) and s["qat_minus_ptq_ci95"] >= 0 for s in summary.values())
    assert result.stdout.count("QAT - PTQ deployed (paired)") == 2 and "-> " in result.stdout


def test_bench_qat_recipe_goals_use_the_paired_interval():
    spec = importlib.util.spec_from_file_location("bench_qat_recipe", BENCH / "bench_qat_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def rows(gains):
        """Three runs per seed; QAT's deployed accuracy is PTQ's + gain (None: it diverged)."""
        out = []
        for seed, gain in enumerate(gains):
            base = {"dataset": "fashion-mnist", "seed": seed, "epochs": 1, "train_samples": 10}
            qat = None if gain is None else 0.7 + gain
            out += [
                base | {"strategy": "fp32", "bits": None, "accuracy": 0.8, "deployed_accuracy": 0.8},
                base | {"strategy": "ptq", "bits": 4, "accuracy": 0.8, "deployed_accuracy": 0.7},
                base | {"strategy": "qat", "bits": 4, "accuracy": qat, "deployed_accuracy": qat},
            ]
        return module.summarize(out)[0][0]

    clear = rows([0.010, 0.012, 0.011])
    assert clear["goal_at_least_ptq"] and clear["goal_clearly_above"]
    assert clear["qat_minus_ptq"] == pytest.approx(1.1)
    assert clear["qat_minus_ptq_ci95"] == pytest.approx(4.302653 * 0.1 / 3**0.5)  # t(0.975, 2) * sd / sqrt(n)
    one = rows([0.010])  # one seed: no spread to measure, nan in the JSON as before
    assert one["qat_minus_ptq"] == pytest.approx(1.0) and math.isnan(one["qat_minus_ptq_ci95"])
    assert one["goal_at_least_ptq"] and not one["goal_clearly_above"]
    noisy = rows([0.02, -0.015, 0.001])  # above on average, but the interval holds 0
    assert noisy["goal_at_least_ptq"] and not noisy["goal_clearly_above"]
    assert not rows([-0.01, -0.01, 0.0])["goal_at_least_ptq"]
    diverged = rows([0.010, None, 0.011, 0.012])  # a diverged QAT run is left out, not counted as a loss or a win
    assert diverged["qat_diverged"] == 1 and diverged["qat_minus_ptq"] == pytest.approx(1.1)
