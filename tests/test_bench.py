"""The kernel benchmark stays runnable: its quick mode checks every case for
correctness before timing and writes its JSON rows (no speed is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())
    ops = {row["op"] for row in rows}
    assert any("aggregate_state_dicts" in op for op in ops) and any("fake_quant" in op for op in ops)
    for row in rows:
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["machine"] and row["timestamp"]
        assert row["device"] == "cpu"
    assert {row["backend"] for row in rows} >= {"torch", "fedhq-cpu"}
    assert any("target_met" in row for row in rows)


def test_bench_qat_step_small_model(tmp_path):
    out = tmp_path / "qat.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_qat_step.py"), "--model", "small_cnn@8x8x1:10", "--batch", "4",
         "--repeats", "3", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"fp32", "fedhq-qat", "torch.ao-qat"}
    assert rows["fp32"]["ratio_to_fp32"] == 1.0 and rows["fedhq-qat"]["median_ms"] > 0
    assert isinstance(rows["fedhq-qat"]["goal_met"], bool)
    assert "Goal: fedhq-qat <= 1.3x fp32" in result.stdout


def test_gpu_benchmarks_refuse_cleanly_without_a_gpu():
    for script in ("bench_kernels.py", "bench_qat_step.py"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / script), "--device", "cuda"], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 2 and "torch sees no CUDA GPU" in result.stderr, script
