"""Shared fixtures. Tests run on the CPU; GPU tests carry the `gpu` marker and skip
with a reason when no GPU is present (never touching CUDA at collection time)."""

import contextlib
import os
import zlib

# Triton kernels can only run on CPU tensors under the interpreter, and only if this
# is set before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# As the fedhq command does (fedhq/cli.py): a spinning OpenMP team stalls badly when
# the 2 cores are shared with other processes; libgomp reads this when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import fedhq_kernels  # noqa: E402
from fedhq_kernels import dispatch  # noqa: E402


def _runs_on_cpu(name: str) -> bool:
    """Available here and able to take CPU tensors (triton: only under the interpreter)."""
    return name in fedhq_kernels.backends() and "cpu" in dispatch._module(name).DEVICES


CPU_BACKENDS = [b for b in ("cpu", "triton", "reference") if _runs_on_cpu(b)]

# Fresh random inputs every run; FEDHQ_TEST_SEED=<seed from the header> reproduces one.
SESSION_SEED = int(os.environ.get("FEDHQ_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_configure(config):
    # Kernels run by Triton's interpreter compute with numpy, which warns about the IEEE
    # NaN / Inf arithmetic that the non-finite-input tests cause on purpose.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def pytest_runtest_setup(item):
    # every `gpu` test skips here, before its fixtures, rather than through a skipif
    # evaluated at collection (which would touch CUDA for every run)
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")


def pytest_report_header(config):
    return f"fedhq: test seed {SESSION_SEED} (FEDHQ_TEST_SEED to repeat); backends {fedhq_kernels.backends()}"


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend that can run on CPU tensors."""
    monkeypatch.setenv("FEDHQ_BACKEND", request.param)
    return request.param


@pytest.fixture
def gen(request):
    """A generator seeded from the session seed and the test's id."""
    return torch.Generator().manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@contextlib.contextmanager
def single_thread():
    """torch on one thread inside the block, the previous count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One thread for the test: correctness is the same and timings are steadier on a
    busy 2-core machine (a 2-thread OpenMP team stalls when another process holds a
    core). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One measured reference profile (its path) of the default RunConfig's model, the
    small CNN on digits, for every run of a module."""
    from fedhq.fl import RunConfig, engine
    from fedhq.models import ModelSpec

    out = tmp_path_factory.mktemp("reference")
    config = RunConfig(output_dir=str(out))
    return engine.reference_profile(config, ModelSpec.parse(config.model_spec_text), out, echo=lambda s: None)[1]


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (NaNs equal where both are NaN), printing the first
    mismatches when it fails."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    same = (
        (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
        if actual.is_floating_point()
        else (actual == expected)
    )
    if not bool(same.all()):
        idx = (~same).nonzero()[:5]
        rows = [
            f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item()!r}, expected {expected[tuple(i)].item()!r}"
            for i in idx
        ]
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} elements differ\n" + "\n".join(rows))
