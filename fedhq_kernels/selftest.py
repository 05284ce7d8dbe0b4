"""One-command GPU self test: ``python -m fedhq_kernels.selftest [--no-bench] [extra pytest args]``.

Run from a source checkout on a machine with a CUDA GPU, after installing (it builds
nothing). It says which GPU backends can run here and why the others cannot, then:
  1. runs every test marked ``gpu`` (tests/test_cuda.py and any other GPU tests), and
  2. runs the op test-suite (tests/test_fake_quant.py, test_quantize.py,
     test_aggregate.py, test_ops.py) once per GPU backend, with this module loaded as
     a pytest plugin: each op call the suite makes on CPU tensors is run by that
     backend on CUDA copies of its arguments and the results are copied back, so the
     suite's exact comparisons against PyTorch and the reference hold on the GPU.
and prints a summary, then
  3. runs the GPU benchmarks (bench/bench_kernels.py --device cuda: every op on every
     GPU backend against PyTorch's ops and a device-to-device copy, 64M elements; and
     bench/bench_qat_step.py --device cuda: a ResNet-18 QAT step against FP32 and
     torch.ao's QAT) and prints their tables (``--no-bench`` skips them).
Exit status 0 when everything that could run passed.

One deliberate difference is marked as an expected failure in step 2: on a GPU,
fake_quant with given parameters does not read the scale / zero point back to check
their values (that would synchronize every QAT step), so the suite's cases passing a
bad scale or zero point as a tensor are not rejected there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

GPU_BACKENDS = ("cuda", "triton")
OP_SUITE = ("test_fake_quant.py", "test_quantize.py", "test_aggregate.py", "test_ops.py")
_ENV = "FEDHQ_SELFTEST_BACKEND"  # set for step 2: the backend the plugin routes op calls to


# ---- the pytest plugin (step 2) ----


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value


def pytest_configure(config):
    name = os.environ.get(_ENV)
    if not name:
        return
    import pytest

    from fedhq_kernels import dispatch

    module = dispatch._module(name)
    if module is None or "cuda" not in module.DEVICES or not torch.cuda.is_available():
        raise pytest.UsageError(f"{_ENV}={name}: that backend cannot run on a GPU here: "
                                f"{dispatch.unavailable_backends().get(name, 'no CUDA device')}")
    on_device = dispatch.kernel

    def kernel(op, device):
        if device.type != "cpu":
            return on_device(op, device)
        run = module.KERNELS[op]

        def on_gpu(*args):
            return _move(run(*_move(args, "cuda")), device)

        return on_gpu

    dispatch.kernel = kernel
    config.addinivalue_line("markers", "selftest: rerouted to a GPU backend by fedhq_kernels.selftest")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get(_ENV):
        return
    import pytest

    first_backend, kept, dropped = None, [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "backend" in params:  # every CPU backend now runs the same GPU kernels: run each case once
            first_backend = first_backend or params["backend"]
            if params["backend"] != first_backend:
                dropped.append(item)
                continue
        if item.originalname == "test_bad_arguments" and _bad_tensor_qparams(params.get("kwargs")):
            item.add_marker(pytest.mark.xfail(
                reason="given-parameter fake_quant does not read CUDA scales / zero points back (no host sync)",
                strict=False,
            ))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _bad_tensor_qparams(kwargs) -> bool:
    """A scale or zero point given as a tensor whose values (not shape) are invalid."""
    if not isinstance(kwargs, dict):
        return False
    scale, zero_point = kwargs.get("scale"), kwargs.get("zero_point")
    bad_scale = isinstance(scale, torch.Tensor) and scale.is_floating_point() and not bool(
        (torch.isfinite(scale) & (scale > 0)).all()
    )
    bad_zero_point = isinstance(zero_point, torch.Tensor) and not zero_point.is_floating_point() and bool(
        ((zero_point < -128) | (zero_point > 127)).any()
    )
    return bad_scale or bad_zero_point


# ---- the command ----


def _pytest(args: list[str], env: dict[str, str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                            env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    lines = [line for line in result.stdout.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    if result.returncode not in (0, 5):  # 5: nothing collected
        sys.stdout.write(result.stdout[-6000:] + result.stderr[-2000:])
    return result.returncode, (lines[-1].strip("= ") if lines else "no result"), elapsed


BENCHMARKS = (("bench_kernels.py", "--device", "cuda"), ("bench_qat_step.py", "--device", "cuda"))


def _benchmarks(bench: Path, env: dict[str, str]) -> list[tuple]:
    """Runs each GPU benchmark with its output shown; a row per benchmark for the summary."""
    rows = []
    for script, *args in BENCHMARKS:
        print(f"\n$ python bench/{script} {' '.join(args)}", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, str(bench / script), *args], env=env).returncode
        rows.append(("benchmark", script, code, "table above" if code == 0 else f"exit {code}", time.perf_counter() - started))
    return rows


def main(argv: list[str]) -> int:
    from fedhq_kernels import dispatch

    run_benchmarks = "--no-bench" not in argv
    argv = [a for a in argv if a != "--no-bench"]
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not (tests / "test_cuda.py").exists():
        print(f"fedhq selftest: no test-suite at {tests}; run it from a source checkout")
        return 2
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    if not torch.cuda.is_available():
        print("fedhq selftest: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to test")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    available = [b for b in GPU_BACKENDS if b in dispatch.backends()]
    for name in GPU_BACKENDS:
        print(f"  {name:7s} {'available' if name in available else 'unavailable: ' + dispatch.unavailable_backends()[name]}")

    # real Triton kernels, not its CPU interpreter (tests/conftest.py defaults to it)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("FEDHQ_BACKEND", None)
    env.pop(_ENV, None)
    rows = [("gpu-marked tests", "all", *_pytest([str(tests), "-m", "gpu", *argv], env))]
    for name in available:
        suite = [str(tests / f) for f in OP_SUITE]
        rows.append(("op test-suite", name, *_pytest([*suite, "-p", __name__, *argv], {**env, _ENV: name})))
    if run_benchmarks and available:
        rows.extend(_benchmarks(tests.parent / "bench", env))

    print("\nfedhq selftest summary")
    for step, backend, code, result, seconds in rows:
        print(f"  {'ok  ' if code in (0, 5) else 'FAIL'} {step:17s} {backend:7s} {seconds:7.1f} s  {result}")
    if not available:
        print("  no GPU backend is available: the op test-suite did not run on the GPU")
    return 0 if available and all(row[2] in (0, 5) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
