"""The one-command GPU self test, checked where no GPU is: it refuses clearly, its
benchmark steps name scripts that exist, and its op-suite step cannot pass without
the rerouting plugin having run op calls on the GPU (run as a script the module's
``__name__`` is "__main__", and ``pytest -p __main__`` loaded no plugin, silently)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_selftest.py"
# loaded under the name the op-suite step's children import it by (bench/ on their path)
_spec = importlib.util.spec_from_file_location("gpu_selftest", SCRIPT)
selftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selftest)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the self test would run")
def test_refuses_without_a_gpu_before_building():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--build", "--no-bench"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA GPU visible" in result.stdout and "setup.py" not in result.stdout


def test_plugin_is_named_by_its_import_name():
    assert selftest.PLUGIN == selftest.__name__ == "gpu_selftest"


def test_benchmark_steps_exist():
    for script, *args in selftest.BENCHMARKS:
        assert (ROOT / "bench" / script).is_file() and args[args.index("--device") + 1] == "cuda"


def _suite(tmp_path: Path, conftest: str) -> Path:
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    return tmp_path / "test_x.py"


def test_op_suite_step_fails_when_nothing_ran_on_the_gpu(tmp_path):
    test = _suite(tmp_path, "")
    code, summary, _ = selftest._pytest([str(test)], dict(os.environ), rerouted_to="cuda")
    assert code == 1 and "no op call ran on the GPU" in summary


def test_op_suite_step_reads_the_plugins_count(tmp_path):
    line = "fedhq selftest: 7 op calls rerouted to cuda on the GPU"
    test = _suite(
        tmp_path, f"def pytest_terminal_summary(terminalreporter):\n    terminalreporter.write_line({line!r})\n"
    )
    code, summary, _ = selftest._pytest([str(test)], dict(os.environ), rerouted_to="cuda")
    assert code == 0 and "1 passed" in summary and "7 op calls on the GPU" in summary
    code, _, _ = selftest._pytest([str(test)], dict(os.environ), rerouted_to="triton")  # another backend's count
    assert code == 1


def test_a_step_that_runs_out_of_time_fails_and_shows_its_output(tmp_path, monkeypatch, capsys):
    test = tmp_path / "test_slow.py"
    test.write_text("import time\n\ndef test_slow():\n    print('started', flush=True)\n    time.sleep(60)\n")
    monkeypatch.setenv("FEDHQ_SELFTEST_STEP_TIMEOUT", "5")
    code, summary, elapsed = selftest._pytest([str(test), "-s"], dict(os.environ))
    assert code == 124 and summary == "timed out after 5 s" and elapsed < 30
    assert "started" in capsys.readouterr().out


@pytest.mark.parametrize("build_status,flag", [(0, "--built"), (1, "--build-failed")])
def test_build_outcome_is_passed_to_the_rerun(monkeypatch, build_status, flag):
    # after --build the command re-executes itself so the new extensions are imported;
    # a failed build still goes on (triton can run), told so by the flag
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(selftest, "_build", lambda root: build_status)
    calls = []

    def execv(path, args):  # the real one never returns
        calls.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main() prepends the checkout
    with pytest.raises(SystemExit):
        selftest.main(["--build", "--no-bench", "-x"])
    assert calls == [[sys.executable, str(SCRIPT), flag, "-x", "--no-bench"]]
    assert str(SCRIPT.parent) in os.environ["PYTHONPATH"].split(os.pathsep)  # where the children find PLUGIN
