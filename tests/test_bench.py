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
