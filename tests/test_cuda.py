"""The CUDA backend (csrc/cuda/, csrc/cuda_ops.cpp, fedhq_kernels/cuda.py).

Without a GPU, with nvcc: every csrc/cuda/*.cu compiles for setup.py's architectures
(sm_75 to sm_90) with its flags and warnings, spills or local memory as errors; the PTX
keeps the arithmetic exact (no FMA, no flush-to-zero or approximations, cvt.rni for the
codes); tests/cuda/tiles_test.cu checks the work decomposition as host code; the torch
binding compiles. On a GPU (marker `gpu`): bit-equal to the reference backend, the CPU
backend's error messages, no synchronization in fake_quant with given parameters, the
current stream. What each backend is: README, "Backends".
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import assert_equal
from test_fake_quant import DTYPES, PER_CHANNEL, random_qparams, sample

import fedhq_kernels as fk
from fedhq_kernels import dispatch, reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (a CUDA toolkit) is not on PATH")


def _setup_module():
    """setup.py's helpers and constants (it calls setup() only when run as a script)."""
    spec = importlib.util.spec_from_file_location("fedhq_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _setup_module()
# every architecture the build compiles by default (Turing to Hopper; A6000 is sm_86)
ARCHS = tuple(arch.replace(".", "") for arch in SETUP.DEFAULT_CUDA_ARCHS.split(";"))


def setup_nvcc_flags() -> list[str]:
    return SETUP.NVCC_FLAGS


def toolkit_include() -> str:
    """The CUDA toolkit's include directory, as nvcc itself reports it."""
    out = subprocess.run(
        [NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60
    )
    match = re.search(r'INCLUDES="-I([^"]+)"', out.stdout + out.stderr)
    assert match, f"cannot find the toolkit's include directory in nvcc --dryrun:\n{out.stderr}"
    return match.group(1).strip()


@dataclasses.dataclass
class Build:
    command: list[str]
    returncode: int
    output: str
    ptx: dict[str, str]  # arch -> PTX text (kernel sources)

    def report(self) -> str:
        return f"$ {' '.join(self.command)}\n{self.output}"


def _run(command: list[str], ptx_dir: Path | None = None, stem: str = "") -> Build:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    ptx = {}
    if ptx_dir is not None:
        for arch in ARCHS:
            found = list(ptx_dir.glob(f"{stem}*compute_{arch}*.ptx")) or list(ptx_dir.glob(f"{stem}*sm_{arch}*.ptx"))
            if found:
                ptx[arch] = found[0].read_text()
    return Build(command, result.returncode, result.stdout + result.stderr, ptx)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compiles everything once, in parallel: name -> Build."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the defines the real build adds

    flags = [f for f in setup_nvcc_flags() if f != "--fmad=false"] + ["--fmad=true"]  # see test_ptx_is_exact
    strict = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    out = tmp_path_factory.mktemp("cuda")
    jobs = {}
    for source in CUDA_SOURCES:
        keep = out / source.stem
        keep.mkdir()
        jobs[source.name] = (
            [
                NVCC,
                *COMMON_NVCC_FLAGS,
                *flags,
                *gencode,
                *strict,
                "--keep",
                "--keep-dir",
                str(keep),
                "-c",
                str(source),
                "-o",
                str(keep / f"{source.stem}.o"),
            ],
            keep,
            source.stem,
        )
    jobs["tiles_test"] = (
        [
            NVCC,
            *flags,
            "-arch=sm_90",
            "-Werror",
            "all-warnings",
            "-Xcompiler",
            "-Wall,-Wextra",
            str(ROOT / "tests" / "cuda" / "tiles_test.cu"),
            str(CUDA_DIR / "aggregate.cu"),
            "-o",
            str(out / "tiles_test"),
        ],
        None,
        "",
    )
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is not None:
        from torch.utils.cpp_extension import include_paths

        system = [
            arg
            for path in include_paths() + [sysconfig.get_paths()["include"], toolkit_include()]
            for arg in ("-isystem", path)
        ]
        jobs["binding"] = (
            [
                cxx,
                "-std=c++20",
                "-fsyntax-only",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                *system,
                str(ROOT / "csrc" / "cuda_ops.cpp"),
            ],
            None,
            "",
        )
    # the binding (torch headers) takes longest: submitted first
    order = sorted(jobs, key=lambda name: name != "binding")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_run, *jobs[name]) for name in order}
        results = {name: future.result() for name, future in futures.items()}
    if "tiles_test" in results and results["tiles_test"].returncode == 0:
        run = subprocess.run([str(out / "tiles_test")], capture_output=True, text=True, timeout=120)
        results["tiles_test_run"] = Build([str(out / "tiles_test")], run.returncode, run.stdout + run.stderr, {})
    return results


def test_every_cuda_source_is_checked():
    assert {p.name for p in CUDA_SOURCES} >= {"fake_quant.cu", "quantize.cu", "aggregate.cu"}
    # a plain-C++ launcher API, so the binding needs no CUDA compiler and the kernels no torch
    for path in [*CUDA_SOURCES, *CUDA_DIR.glob("*.h"), *CUDA_DIR.glob("*.cuh")]:
        text = path.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f"{path.name} includes torch headers"
        assert "printf" not in text, f"{path.name}: report errors through return codes, not printf"
        # every launch names its stream (the binding passes torch's current stream), never stream 0
        for config in re.findall(r"<<<(.*?)>>>", text, flags=re.S):
            assert re.fullmatch(r".*,\s*stream", config.strip(), flags=re.S), f"{path.name}: launch <<<{config}>>>"


def test_build_flags_keep_results_exact():
    flags = setup_nvcc_flags()
    assert not {"--use_fast_math", "-use_fast_math", "--ftz=true", "-ftz=true", "-prec-div=false"} & set(flags)
    assert {"--fmad=false", "-ftz=false", "-prec-div=true"} <= set(flags)


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_without_warnings(builds, source):
    build = builds[source]
    assert build.returncode == 0, build.report()
    assert "warning" not in build.output.lower(), build.report()
    for arch in ARCHS:
        assert f"for 'sm_{arch}'" in build.output, f"no sm_{arch} code was compiled\n{build.report()}"
        assert arch in build.ptx, f"no PTX kept for sm_{arch}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", build.output)
    assert spills and all(s == ("0", "0") for s in spills), build.report()


# Forbidden anywhere in the kernels' PTX: each would change a result somewhere.
INEXACT_PTX = {
    r"\bfma\.rn(\.ftz)?(\.sat)?\.f32\b": "a fused multiply-add (x * inv_scale must round before the add)",
    r"\bmad(\.rn)?(\.ftz)?(\.sat)?\.f32\b": "a fused multiply-add",
    r"\.ftz\b": "flush-to-zero (subnormal inputs and scales must survive)",
    r"\.approx\b": "approximate arithmetic",
    r"\bdiv\.full\b": "approximate division",
    r"\bcvt\.r[zmp]i?\.(f32|f16|bf16)\.f32\b": "rounding other than to nearest even",
}


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in CUDA_SOURCES])
def test_ptx_is_exact(builds, source):
    """Compiled with contraction allowed (nvcc's default, --fmad=true): the source
    itself must keep multiplies unfused (quant_math.h's __fmul_rn); the build's
    --fmad=false is only a second guard."""
    build = builds[source]
    assert build.returncode == 0, build.report()
    for arch, ptx in build.ptx.items():
        for pattern, why in INEXACT_PTX.items():
            found = re.search(pattern, ptx)
            assert found is None, f"{source} sm_{arch}: '{found and found.group()}' in the PTX: {why}"
        # round half to even: every op family computes codes
        assert "cvt.rni.f32.f32" in ptx, f"{source} sm_{arch}: no cvt.rni (round half to even)"
        if source != "aggregate.cu":  # 16-bit outputs: fake_quant, backward, dequantize
            assert "cvt.rn.f16.f32" in ptx, f"{source} sm_{arch}"
            # sm_75 has no bfloat16 conversion: cuda_bf16.h rounds to nearest even in integers
            assert "cvt.rn.bf16.f32" in ptx or int(arch) < 80, f"{source} sm_{arch}"


@needs_nvcc
def test_tile_decomposition_host_test(builds):
    build = builds["tiles_test"]
    assert build.returncode == 0, build.report()
    run = builds["tiles_test_run"]
    assert run.returncode == 0 and run.output.strip() == "ok", run.report()


@needs_nvcc
def test_binding_compiles_against_torch_headers(builds):
    if "binding" not in builds:
        pytest.skip("no C++ compiler (CXX or c++) on PATH")
    build = builds["binding"]
    assert build.returncode == 0, build.report()


def test_backend_module_imports_quietly_without_cuda():
    from fedhq_kernels import cuda

    if torch.version.cuda is None:
        assert cuda.UNAVAILABLE and "CPU build" in cuda.UNAVAILABLE and cuda.KERNELS == {}
        assert "cuda" in dispatch.unavailable_backends()
    assert cuda.DEVICES == ("cuda",)


# ---- on a GPU ----

gpu = pytest.mark.gpu


@pytest.fixture
def cuda_backend(monkeypatch):
    """Skips unless the cuda backend can run here (tests using it are marked `gpu`, so
    there is a GPU); forces it for the test."""
    if "cuda" not in fk.backends():
        pytest.skip(f"the cuda backend is unavailable: {dispatch.unavailable_backends().get('cuda')}")
    monkeypatch.setenv("FEDHQ_BACKEND", "cuda")
    return torch.device("cuda", torch.cuda.current_device())  # indexed: compares equal to tensors' devices


def on(device, qt: fk.QuantizedTensor) -> fk.QuantizedTensor:
    return dataclasses.replace(
        qt, data=qt.data.to(device), scale=qt.scale.to(device), zero_point=qt.zero_point.to(device)
    )


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x whose data pointer is not 16-byte aligned (the kernels'
    element-by-element path)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    assert x.numel() == 0 or view.data_ptr() % 16 != 0  # (empty tensors have no data pointer)
    return view


GPU_LAYOUTS = [((), None), ((1,), None), ((7,), None), ((33, 17), None), ((70001,), None), (((1 << 22) + 3,), None)]
GPU_LAYOUTS += PER_CHANNEL + [((5, 3, 7), 2), ((64, 3, 3, 3), 0), ((2, 33), 1)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", GPU_LAYOUTS)
@pytest.mark.parametrize("aligned", [True, False])
def test_fake_quant_and_backward_match_reference(cuda_backend, gen, dtype, shape, axis, aligned):
    a = -1 if axis is None else axis
    scale, zero_point = random_qparams(gen, None if axis is None else shape[axis])
    x = sample(shape, float(scale.mean()), gen, dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    grad.view(-1)[::7] = float("nan")  # passes through where the mask is 1 or 0, as torch's
    xd, gd = x.to(cuda_backend), grad.to(cuda_backend)
    if not aligned:
        xd, gd = misaligned(xd), misaligned(gd)
    sd, zd = scale.to(cuda_backend), zero_point.to(cuda_backend)
    got = torch.ops.fedhq.fake_quant(xd, sd, zd, -128, 127, a)
    assert_equal(got.cpu(), reference.fake_quant(x, scale, zero_point, -128, 127, a), "forward")
    got_grad = torch.ops.fedhq.fake_quant_backward(gd, xd, sd, zd, -128, 127, a)
    assert_equal(got_grad.cpu(), reference.fake_quant_backward(grad, x, scale, zero_point, -128, 127, a), "gradient")


@gpu
@pytest.mark.parametrize("bits", range(2, 9))
def test_fake_quant_every_bit_width_matches_torch(cuda_backend, gen, bits):
    qmin, qmax = fk.quant_range(bits)
    scale, zero_point = random_qparams(gen, zp_range=(qmin, qmax + 1))
    s, z = float(scale), int(zero_point)
    x = sample((3001,), s / 16, gen).to(cuda_backend).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y, yt = fk.fake_quant(x, s, z, bits=bits), torch.fake_quantize_per_tensor_affine(xt, s, z, qmin, qmax)
    assert_equal(y, yt, "forward")
    y.sum().backward()
    yt.sum().backward()
    assert_equal(x.grad, xt.grad, "gradient")


@gpu
def test_half_subnormal_outputs(cuda_backend, gen):
    x = sample((5000,), 3e-7, gen, torch.float16)
    got = fk.fake_quant(x.to(cuda_backend), 3e-7, 1)
    assert_equal(
        got.cpu(), reference.fake_quant(x, torch.tensor(3e-7), torch.tensor(1, dtype=torch.int32), -128, 127, -1)
    )


@gpu
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", GPU_LAYOUTS + [((0, 4), None), ((0, 4), 1), ((0, 4), 0)])
def test_observed_ops_match_reference(cuda_backend, gen, symmetric, dtype, shape, axis):
    a = -1 if axis is None else axis
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    for xd in (x.to(cuda_backend), misaligned(x.to(cuda_backend))):
        got = torch.ops.fedhq.fake_quant_observed(xd, -128, 127, symmetric, a)
        for g, e, what in zip(got, reference.fake_quant_observed(x, -128, 127, symmetric, a), ("y", "scale", "zp")):
            assert_equal(g.cpu(), e, f"fake_quant_observed {what}")
        got = torch.ops.fedhq.quantize(xd, -128, 127, symmetric, a)
        for g, e, what in zip(got, reference.quantize(x, -128, 127, symmetric, a), ("codes", "scale", "zp")):
            assert_equal(g.cpu(), e, f"quantize {what}")


@gpu
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_observed_every_bit_width(cuda_backend, gen, bits, axis):
    qmin, qmax = fk.quant_range(bits)
    a = -1 if axis is None else axis
    x = torch.randn(17, 500, generator=gen) * 10
    for symmetric in (True, False):
        got = torch.ops.fedhq.quantize(x.to(cuda_backend), qmin, qmax, symmetric, a)
        for g, e in zip(got, reference.quantize(x, qmin, qmax, symmetric, a)):
            assert_equal(g.cpu(), e, f"bits={bits} symmetric={symmetric}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", GPU_LAYOUTS)
def test_dequantize_matches_reference(cuda_backend, gen, dtype, shape, axis):
    a = -1 if axis is None else axis
    codes = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    scale, zero_point = random_qparams(gen, None if axis is None else shape[axis])
    expected = reference.dequantize(codes, scale, zero_point, a, dtype)
    sd, zd = scale.to(cuda_backend), zero_point.to(cuda_backend)
    for cd in (codes.to(cuda_backend), misaligned(codes.to(cuda_backend))):
        assert_equal(torch.ops.fedhq.dequantize(cd, sd, zd, a, dtype).cpu(), expected)


@gpu
@pytest.mark.parametrize("clients", [1, 3, 10])  # 10: the average is kept in a workspace
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_aggregate_matches_reference(cuda_backend, gen, clients, dtype, symmetric):
    from test_aggregate import MODEL, client_state_dicts, reference_state_dict

    sds = client_state_dicts(gen, clients, dtype, symmetric=symmetric)
    weights = torch.randint(1, 500, (clients,), generator=gen).tolist()
    expected = reference_state_dict(sds, weights)
    got = fk.aggregate_state_dicts([{k: on(cuda_backend, q) for k, q in sd.items()} for sd in sds], weights)
    assert list(got) == list(MODEL)
    for name, q in got.items():
        assert q.data.device == q.scale.device == cuda_backend
        for actual, wanted, what in zip((q.data, q.scale, q.zero_point), expected[name], ("codes", "scale", "zp")):
            assert_equal(actual.cpu(), wanted, f"{name} {what}")


@gpu
@pytest.mark.parametrize("clients", [1, 10])
def test_streaming_aggregator_matches_reference(cuda_backend, gen, clients):
    from test_aggregate import client_state_dicts, reference_state_dict
    from test_aggregator import streamed

    sds = client_state_dicts(gen, clients, torch.bfloat16, symmetric=False)
    weights = torch.randint(1, 500, (clients,), generator=gen).tolist()
    expected = reference_state_dict(sds, weights)
    got = streamed([{k: on(cuda_backend, q) for k, q in sd.items()} for sd in sds], weights)
    for name, q in got.items():
        assert q.data.device == cuda_backend
        for actual, wanted, what in zip((q.data, q.scale, q.zero_point), expected[name], ("codes", "scale", "zp")):
            assert_equal(actual.cpu(), wanted, f"{name} {what}")
    bad = {k: on(cuda_backend, q) for k, q in sds[0].items()}
    aggregator = fk.Aggregator(bad)
    bad["fc.weight"].scale[2] = float("nan")
    with pytest.raises(ValueError, match="Aggregator: the update's 'fc.weight' scale must be finite and > 0"):
        aggregator.add(bad, 1)
    assert not bool(aggregator.acc.any())


@gpu
@pytest.mark.parametrize(
    "k,method,trim", [(1, "median", 0.1), (4, "median", 0.1), (9, "median", 0.1), (7, "trimmed-mean", 0.3)]
)
def test_robust_aggregate_matches_reference(cuda_backend, gen, k, method, trim):
    from test_robust_aggregate import MODEL, clients, expected

    sds = clients(gen, k, 2 + k % 7, symmetric=k % 2 == 0, ties=k % 3 == 0)
    cut = (k - 1) // 2 if method == "median" else int(trim * k)
    got = fk.aggregate_state_dicts(
        [
            {n: on(cuda_backend, q) if isinstance(q, fk.QuantizedTensor) else q.to(cuda_backend) for n, q in sd.items()}
            for sd in sds
        ],
        [1] * k,
        method=method,
        trim=trim,
    )
    for name, wanted in expected(sds, cut).items():
        assert name in MODEL
        q = got[name]
        for actual, want, what in zip((q.data, q.scale, q.zero_point), wanted, ("codes", "scale", "zp")):
            assert_equal(actual.cpu().flatten(), want, f"{name} {what}")


@gpu
@pytest.mark.parametrize("clients", [3, 10])
@pytest.mark.parametrize("method", ["mean", "median"])
def test_mixed_bits_aggregate_matches_reference(cuda_backend, gen, clients, method):
    """Each client's tensor at its own width, the result at the widest."""
    from test_aggregate import client_state_dicts, reference_state_dict
    from test_robust_aggregate import clients as robust_clients
    from test_robust_aggregate import expected as robust_expected

    if method == "mean":
        sds = client_state_dicts(gen, clients, torch.bfloat16, bits="mixed", symmetric=False)
        weights = torch.randint(1, 500, (clients,), generator=gen).tolist()
        expected = {k: [v.flatten() for v in vs] for k, vs in reference_state_dict(sds, weights).items()}
    else:
        sds, weights = robust_clients(gen, clients, "mixed", ties=True), [1] * clients
        expected = robust_expected(sds, (clients - 1) // 2)
    moved = [
        {k: on(cuda_backend, q) if isinstance(q, fk.QuantizedTensor) else q.to(cuda_backend) for k, q in sd.items()}
        for sd in sds
    ]
    got = fk.aggregate_state_dicts(moved, weights, method=method)
    for name, wanted in expected.items():
        q = got[name]
        assert q.bits == max(sd[name].bits for sd in sds), name
        for actual, want, what in zip((q.data, q.scale, q.zero_point), wanted, ("codes", "scale", "zp")):
            assert_equal(actual.cpu().flatten(), want, f"{name} {what}")


@gpu
def test_aggregate_checks_each_entry_against_its_own_width(cuda_backend, gen):
    """The kernel's check: client 1's 4-bit zero point 9 (valid at 8 bits) is named."""
    q8, q4 = (on(cuda_backend, fk.quantize(torch.randn(6, 5, generator=gen), bits=b, axis=0)) for b in (8, 4))
    zero_point = q4.zero_point.clone()
    zero_point[3] = 9
    args = ([q8.data, q4.data], [q8.scale, q4.scale], [q8.zero_point, zero_point])
    weights = torch.tensor([0.5, 0.5], device=cuda_backend)
    with pytest.raises(
        ValueError, match=r"aggregate: client 1's 'w' zero_point must lie in \[-8, 7\], got 9 at channel 3"
    ):
        torch.ops.fedhq.aggregate(*args, weights, [0], [8, 4], -128, 127, True, ["w"], -1)
    codes, _, _ = torch.ops.fedhq.aggregate(
        *args[:2], [q8.zero_point, q4.zero_point], weights, [0], [8, 4], -8, 7, True, ["w"], -1
    )
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


@gpu
def test_aggregate_misaligned_and_odd_sized_tensors(cuda_backend, gen):
    """Tensors whose packed offsets are not multiples of 16 and clients whose codes
    are not 16-byte aligned take the element-by-element path."""
    shapes = {"odd": ((13,), None), "rows": ((9, 70), 0), "cols": ((70, 9), 1), "big": ((5000,), None)}
    sds = []
    for k in range(3):
        sd = {}
        for name, (shape, axis) in shapes.items():
            q = fk.quantize(torch.randn(shape, generator=gen), axis=axis, symmetric=False)
            q = on(cuda_backend, q)
            if k == 1:
                q = dataclasses.replace(q, data=misaligned(q.data))
            sd[name] = q
        sds.append(sd)
    weights = [1, 2, 3]
    got = fk.aggregate_state_dicts(sds, weights)
    from test_aggregate import reference_state_dict

    expected = reference_state_dict([{k: on("cpu", q) for k, q in sd.items()} for sd in sds], weights)
    for name, q in got.items():
        for actual, wanted in zip((q.data, q.scale, q.zero_point), expected[name]):
            assert_equal(actual.cpu(), wanted, name)


# ---- bad input on the GPU: the CPU backend's messages ----


@gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("axis", [None, 1])
def test_observed_rejects_non_finite(cuda_backend, bad, axis):
    x = torch.randn(3, 5000)
    x[2, 4321] = bad
    x = x.to(cuda_backend)
    with pytest.raises(ValueError, match="fake_quant: the input contains NaN or Inf"):
        fk.fake_quant(x, axis=axis)
    with pytest.raises(ValueError, match="quantize: the input contains NaN or Inf"):
        fk.quantize(x, axis=axis)


@gpu
def test_dequantize_rejects_bad_parameters(cuda_backend):
    codes = torch.zeros(4, 6, dtype=torch.int8, device=cuda_backend)
    scale = torch.full((6,), 0.1, device=cuda_backend)
    zero_point = torch.zeros(6, dtype=torch.int32, device=cuda_backend)
    bad_scale = scale.clone()
    bad_scale[4] = 0.0
    with pytest.raises(ValueError, match="dequantize: the scale must be finite and > 0, got 0 at channel 4"):
        torch.ops.fedhq.dequantize(codes, bad_scale, zero_point, 1, torch.float32)
    bad_zero_point = zero_point.clone()
    bad_zero_point[2] = 200
    with pytest.raises(ValueError, match=r"zero_point must lie in \[-128, 127\], got 200 at channel 2"):
        torch.ops.fedhq.dequantize(codes, scale, bad_zero_point, 1, torch.float32)
    with pytest.raises(ValueError, match="dequantize: the scale must be finite and > 0, got -1"):
        torch.ops.fedhq.dequantize(codes, torch.tensor(-1.0, device=cuda_backend), zero_point[0], -1, torch.half)


@gpu
@pytest.mark.parametrize(
    "name,what,value,channel,message",
    [
        ("bn.weight", "scale", float("nan"), None, "client 1's 'bn.weight' scale must be finite and > 0, got nan"),
        ("bn.weight", "zero_point", 300, None, r"client 1's 'bn.weight' zero_point must lie in \[-128, 127\], got 300"),
        ("conv.weight", "scale", 0.0, 5, "client 1's 'conv.weight' scale must be finite and > 0, got 0 at channel 5"),
        (
            "emb.weight",
            "scale",
            -2.0,
            4100,
            "client 1's 'emb.weight' scale must be finite and > 0, got -2 at channel 4100",
        ),
    ],
)
def test_aggregate_rejects_bad_parameters(cuda_backend, gen, name, what, value, channel, message):
    from test_aggregate import client_state_dicts

    sds = [{k: on(cuda_backend, q) for k, q in sd.items()} for sd in client_state_dicts(gen, 3)]
    q = sds[1][name]
    field = getattr(q, what).clone()
    if channel is None:
        field.fill_(value)
    else:
        field[channel] = value
    sds[1][name] = dataclasses.replace(q, **{what: field})
    with pytest.raises(ValueError, match=message):
        fk.aggregate_state_dicts(sds, [1, 1, 1])


@gpu
def test_aggregate_rejects_overflowing_average(cuda_backend, gen):
    from test_aggregate import client_state_dicts

    sds = [{k: on(cuda_backend, q) for k, q in sd.items()} for sd in client_state_dicts(gen, 2)]
    for sd in sds:
        q = sd["fc.weight"]
        sd["fc.weight"] = dataclasses.replace(
            q, data=torch.full_like(q.data, 127), scale=torch.full_like(q.scale, 3e38)
        )
    with pytest.raises(ValueError, match="aggregate: the weighted average of 'fc.weight' is not finite"):
        fk.aggregate_state_dicts(sds, [1, 1])


# ---- host synchronization, streams, the op registration ----


@gpu
def test_fake_quant_does_not_synchronize(cuda_backend):
    for shape, axis in (((1000,), -1), ((16, 300), 0)):
        x = torch.randn(shape, device=cuda_backend, requires_grad=True)
        channels = 1 if axis < 0 else shape[axis]
        scale = torch.full((channels,), 0.02, device=cuda_backend).reshape(() if axis < 0 else (channels,))
        zero_point = torch.ones_like(scale, dtype=torch.int32)
        grad = torch.ones(shape, device=cuda_backend)
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
        try:
            y = torch.ops.fedhq.fake_quant(x, scale, zero_point, -128, 127, axis)
            y.backward(grad)
            if axis < 0:  # Python numbers too: made on the device, not copied there
                fk.fake_quant(x, 0.02, 1).backward(grad)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
        assert x.grad is not None


@gpu
def test_kernels_run_on_the_current_stream(cuda_backend):
    """With the default stream kept busy, the op is run and its result read back on a
    side stream. Launched on the side (current) stream, the result is there; launched
    on the default stream, it would still be queued behind the sleep when read."""
    x = torch.randn(1 << 20, device=cuda_backend)
    scale = torch.tensor(0.01, device=cuda_backend)
    zero_point = torch.tensor(0, dtype=torch.int32, device=cuda_backend)
    expected = torch.ops.fedhq.fake_quant(x, scale, zero_point, -128, 127, -1).cpu()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # keeps the default stream busy for about a second
    with torch.cuda.stream(side):
        got = torch.ops.fedhq.fake_quant(x, scale, zero_point, -128, 127, -1).cpu()  # syncs `side` only
    still_busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "the default stream finished first; the test proves nothing (make the sleep longer)"
    assert_equal(got, expected)


@gpu
def test_cuda_is_preferred_on_cuda_tensors(cuda_backend, monkeypatch):
    monkeypatch.delenv("FEDHQ_BACKEND")
    assert dispatch.select(torch.device("cuda")) == "cuda"
    assert dispatch.select(torch.device("cpu")) == "cpu"


@gpu
def test_opcheck_on_cuda(cuda_backend):
    dev = cuda_backend
    x = torch.randn(6, 33, device=dev)
    for scale, zero_point, axis in (
        (torch.tensor(0.02, device=dev), torch.tensor(3, dtype=torch.int32, device=dev), -1),
        (torch.rand(33, device=dev) * 0.05 + 0.01, torch.randint(-4, 4, (33,), dtype=torch.int32, device=dev), 1),
    ):
        torch.library.opcheck(
            torch.ops.fedhq.fake_quant, (x.clone().requires_grad_(), scale, zero_point, -128, 127, axis)
        )
        torch.library.opcheck(
            torch.ops.fedhq.fake_quant_backward, (torch.randn_like(x), x, scale, zero_point, -8, 7, axis)
        )
        torch.library.opcheck(torch.ops.fedhq.fake_quant_observed, (x.clone().requires_grad_(), -128, 127, False, axis))
        torch.library.opcheck(torch.ops.fedhq.quantize, (x, -8, 7, True, axis))
        codes = torch.randint(-128, 128, (6, 33), dtype=torch.int8, device=dev)
        torch.library.opcheck(torch.ops.fedhq.dequantize, (codes, scale, zero_point, axis, torch.bfloat16))
    q = [on(dev, fk.quantize(torch.randn(5, 7), axis=0)) for _ in range(2)]
    torch.library.opcheck(
        torch.ops.fedhq.aggregate,
        (
            [t.data for t in q],
            [t.scale for t in q],
            [t.zero_point for t in q],
            torch.tensor([0.4, 0.6], device=dev),
            [0],
            [8, 8],
            -128,
            127,
            True,
            ["w"],
            -1,
        ),
    )
