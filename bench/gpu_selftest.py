"""One-command GPU self test, run from a source checkout on a CUDA machine:

    python bench/gpu_selftest.py [--build] [--no-bench] [extra pytest args]

``--build`` compiles the extensions in place for this GPU first. Then: the ``gpu``-marked
tests, the GPU benchmarks (BENCHMARKS; ``--no-bench`` skips them), and the op test-suite
once per GPU backend, with this file loaded as a pytest plugin that reroutes the suite's
op calls to the GPU; a summary last. Exit 0: all passed; 2: no GPU; 1 otherwise. Each
step has a time limit (FEDHQ_SELFTEST_STEP_TIMEOUT, default 300 s). See csrc/README.md.
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
_ENV = "FEDHQ_SELFTEST_BACKEND"  # set for step 3: the backend the plugin routes op calls to
# The plugin's import name (bench/ is put on the children's path). Not __name__: run as a
# script that is "__main__", and ``pytest -p __main__`` registers pytest's own __main__
# without a word, so the suite would run on the CPU and pass. The plugin also reports
# how many calls it rerouted, and step 3 fails when that line is missing or says none.
PLUGIN = "gpu_selftest"
_REROUTED = re.compile(r"fedhq selftest: (\d+) op calls rerouted to (\w+) on the GPU")
_calls = 0  # op calls the plugin ran on the GPU in this pytest process
_BUILT = "--built"  # passed to the re-run after --build: the cuda backend must load
_BUILD_FAILED = "--build-failed"  # ... after a failed build: the rest still runs (triton)


# ---- the pytest plugin (step 3) ----


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
        raise pytest.UsageError(
            f"{_ENV}={name}: that backend cannot run on a GPU here: "
            f"{dispatch.unavailable_backends().get(name, 'no CUDA device')}"
        )
    on_device = dispatch.kernel

    def kernel(op, device):
        if device.type != "cpu":
            return on_device(op, device)
        run = module.KERNELS[op]

        def on_gpu(*args):
            global _calls
            _calls += 1
            return _move(run(*_move(args, "cuda")), device)

        return on_gpu

    dispatch.kernel = kernel
    config.addinivalue_line("markers", "selftest: rerouted to a GPU backend by bench/gpu_selftest.py")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get(_ENV):
        terminalreporter.write_line(f"fedhq selftest: {_calls} op calls rerouted to {os.environ[_ENV]} on the GPU")


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
            item.add_marker(
                pytest.mark.xfail(
                    reason="given-parameter fake_quant does not read CUDA scales / zero points back (no host sync)",
                    strict=False,
                )
            )
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _bad_tensor_qparams(kwargs) -> bool:
    """A scale or zero point given as a tensor whose values (not shape) are invalid."""
    if not isinstance(kwargs, dict):
        return False
    scale, zero_point = kwargs.get("scale"), kwargs.get("zero_point")
    bad_scale = (
        isinstance(scale, torch.Tensor)
        and scale.is_floating_point()
        and not bool((torch.isfinite(scale) & (scale > 0)).all())
    )
    bad_zero_point = (
        isinstance(zero_point, torch.Tensor)
        and not zero_point.is_floating_point()
        and bool(((zero_point < -128) | (zero_point > 127)).any())
    )
    return bad_scale or bad_zero_point


# ---- the command ----


def _step_timeout() -> float:
    return float(os.environ.get("FEDHQ_SELFTEST_STEP_TIMEOUT", "300"))


def _run(command: list[str], env: dict[str, str], capture: bool, cwd: Path | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a step; status 124 when it ran out of time."""
    try:
        result = subprocess.run(command, env=env, cwd=cwd, capture_output=capture, text=True, timeout=_step_timeout())
    except subprocess.TimeoutExpired as expired:

        def text(out):
            return out.decode(errors="replace") if isinstance(out, bytes) else out or ""

        return 124, text(expired.stdout), text(expired.stderr) + f"\n(stopped after {_step_timeout():.0f} s)\n"
    return result.returncode, result.stdout or "", result.stderr or ""


def _pytest(args: list[str], env: dict[str, str], rerouted_to: str | None = None) -> tuple[int, str, float]:
    """Runs pytest; with ``rerouted_to``, the run fails unless the plugin reports op calls
    it ran on the GPU with that backend."""
    start = time.perf_counter()
    code, stdout, stderr = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], env, True)
    elapsed = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    summary = lines[-1].strip("= ") if lines else "no result"
    if code == 124:
        summary = f"timed out after {_step_timeout():.0f} s"
    elif rerouted_to is not None:
        match = _REROUTED.search(stdout)
        if match is None or match.group(2) != rerouted_to or int(match.group(1)) == 0:
            code, summary = code or 1, f"{summary}; but no op call ran on the GPU (plugin {PLUGIN} not active?)"
        else:
            summary = f"{summary}; {match.group(1)} op calls on the GPU"
    if code not in (0, 5):  # 5: nothing collected
        sys.stdout.write(stdout[-6000:] + stderr[-2000:])
    return code, summary, elapsed


# Run from the checkout's root. The second QAT row is the FL default model and batch
# (fedhq.fl.config), a few seconds more on a GPU.
BENCHMARKS = (
    ("bench_kernels.py", "--device", "cuda"),
    ("bench_qat_step.py", "--device", "cuda", "--batch", "32"),  # the GPU goal's batch (the default is the CPU's 8)
    (
        "bench_qat_step.py",
        "--device",
        "cuda",
        "--model",
        "small_cnn@8x8x1:10",
        "--batch",
        "16",
        "--json",
        "bench/results/qat-step-cuda-small_cnn.json",
    ),
)


def _benchmarks(bench: Path, env: dict[str, str]) -> list[tuple]:
    """Runs each GPU benchmark with its output shown; a row per benchmark for the summary."""
    rows = []
    for script, *args in BENCHMARKS:
        print(f"\n$ python bench/{script} {' '.join(args)}", flush=True)
        started = time.perf_counter()
        code, _, stderr = _run([sys.executable, str(bench / script), *args], env, False, cwd=bench.parent)
        sys.stderr.write(stderr)
        label = f"{script} {args[args.index('--model') + 1]}" if "--model" in args else script
        result = "table above" if code == 0 else "timed out" if code == 124 else f"exit {code}"
        rows.append(("benchmark", label, code, result, time.perf_counter() - started))
    return rows


def _build(root: Path) -> int:
    """``--build``: compiles the extensions into the checkout; returns setup.py's exit
    status, showing the end of its log (and all of it on failure)."""
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "FEDHQ_BUILD_CUDA": "1"}
    env.setdefault("FEDHQ_CUDA_ARCHS", f"{major}.{minor}")
    print(
        f"\n$ FEDHQ_BUILD_CUDA=1 FEDHQ_CUDA_ARCHS={env['FEDHQ_CUDA_ARCHS']} python setup.py build_ext --inplace",
        flush=True,
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root, env=env, capture_output=True, text=True
    )
    log = result.stdout + result.stderr
    fedhq_lines = [line for line in log.splitlines() if line.startswith("fedhq:")]
    sys.stdout.write(log[-8000:] if result.returncode else "\n".join(fedhq_lines) + "\n")
    print(f"build: exit {result.returncode} after {time.perf_counter() - started:.0f} s", flush=True)
    return result.returncode


def main(argv: list[str]) -> int:
    build, built, build_failed = "--build" in argv, _BUILT in argv, _BUILD_FAILED in argv
    run_benchmarks = "--no-bench" not in argv
    argv = [a for a in argv if a not in ("--build", "--no-bench", _BUILT, _BUILD_FAILED)]
    root = Path(__file__).resolve().parents[1]
    tests = root / "tests"
    if not (tests / "test_cuda.py").exists():
        print(f"fedhq selftest: no test-suite at {tests}; run it from a source checkout")
        return 2
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    if not torch.cuda.is_available():
        print("fedhq selftest: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to test")
        return 2
    # The checkout first on the path of every child (tests, benchmarks, the re-run below),
    # whether or not the package is installed: the code under test is this tree.
    # bench/ too: the op-suite step loads this file as the pytest plugin PLUGIN.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), here, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(root))  # this process too (run as a script, its path starts at bench/)
    if build:
        # A failed build is reported and the rest still runs: on a lent GPU the triton
        # backend's tests and figures are worth the time even when the CUDA build is not.
        outcome = _BUILT if _build(root) == 0 else _BUILD_FAILED
        # Start afresh, so that nothing imported before the build shadows the new extensions.
        sys.stdout.flush()
        rerun = [sys.executable, str(Path(__file__).resolve()), outcome, *argv]
        rerun += [] if run_benchmarks else ["--no-bench"]
        os.execv(sys.executable, rerun)
    from fedhq_kernels import dispatch

    print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    available = [b for b in GPU_BACKENDS if b in dispatch.backends()]
    for name in GPU_BACKENDS:
        state = "available" if name in available else "unavailable: " + dispatch.unavailable_backends()[name]
        print(f"  {name:7s} {state}")

    # one seed for every step, so that a failure can be repeated (tests/conftest.py)
    os.environ.setdefault("FEDHQ_TEST_SEED", str(int.from_bytes(os.urandom(4), "little")))
    print(f"test seed {os.environ['FEDHQ_TEST_SEED']} (FEDHQ_TEST_SEED={os.environ['FEDHQ_TEST_SEED']} repeats it)")
    # real Triton kernels, not its CPU interpreter (tests/conftest.py defaults to it)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("FEDHQ_BACKEND", None)
    env.pop(_ENV, None)
    rows = []
    if build_failed:
        rows.append(("cuda extension", "cuda", 1, "build failed (its log is above)", 0.0))
    elif built and "cuda" not in available:  # built, yet not loadable: the GPU run must not look complete
        rows.append(("cuda extension", "cuda", 1, dispatch.unavailable_backends()["cuda"], 0.0))
    # a test module that cannot be imported here (a missing package) must not stop the GPU tests
    gpu_tests = [str(tests), "-m", "gpu", "--continue-on-collection-errors", *argv]
    rows.append(("gpu-marked tests", "all", *_pytest(gpu_tests, env)))
    if run_benchmarks and available:
        rows.extend(_benchmarks(tests.parent / "bench", env))
    for name in available:
        suite = [str(tests / f) for f in OP_SUITE]
        rows.append(("op test-suite", name, *_pytest([*suite, "-p", PLUGIN, *argv], {**env, _ENV: name}, name)))

    print("\nfedhq selftest summary")
    for step, backend, code, result, seconds in rows:
        print(f"  {'ok  ' if code in (0, 5) else 'FAIL'} {step:17s} {backend:7s} {seconds:7.1f} s  {result}")
    if not available:
        print("  no GPU backend is available: the op test-suite did not run on the GPU")
    return 0 if available and all(row[2] in (0, 5) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
