"""Triton backend specifics; the op suite already runs the Triton kernels under the
interpreter (the `backend` fixture). Here: every kernel variant the launchers really
launch compiles to PTX and cubin for sm_80, sm_86 and sm_90 without a GPU, and its PTX
keeps the arithmetic exact (no FMA contraction, exact division, round-half-even, 16-byte
vector loads on the per-tensor path); tile and block boundaries and the one-program
path, forced with small tiles; on a real GPU (marker `gpu`) the compiled kernels
against the reference. What each backend is: README, "Backends".
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_equal

from fedhq_kernels import dispatch, reference
from fedhq_kernels.quantized_tensor import quant_range

ARCHS = (80, 86, 90)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _triton_modules():
    from fedhq_kernels.triton import _common, aggregate, fake_quant, quantize

    return _common, fake_quant, quantize, aggregate


# ---------------------------------------------------------------------------------
# Real GPU compilation (in a subprocess: under TRITON_INTERPRET=1 the kernels are
# interpreter functions, which triton.compile cannot take)
# ---------------------------------------------------------------------------------

# The calls whose kernel launches CI compiles for real GPUs: every op, in float32,
# float16 and bfloat16, on the layouts a GPU run takes: per-tensor above and below the
# one-program limit (SMALL_NUMEL), a 0-d tensor, axis 0 with long rows (conv weights),
# a middle axis, a last axis wider than a tile and one with few channels, a size-1
# channel axis, and a view whose data is not 16-byte aligned; aggregate over a small
# mixed model in both schemes.
RECORDED_LAYOUTS = [
    ((100_003,), -1),
    ((1000,), -1),
    ((), -1),
    ((64, 576), 0),
    ((3, 7, 40), 1),
    ((33, 1000), 1),
    ((100, 3), 1),
    ((9, 1), 0),
]
AGGREGATE_MODEL = [((300,), -1), ((64, 3, 3, 3), 0), ((512, 10), 1), ((), -1), ((7,), 0)]
# kernels (name -> the values of their KIND or WRITE constexpr that qualify, None: all)
# that compute codes (round half to even, exact 1 / scale), that write a float output
# (float16: cvt.rn), and that stream a tensor (vector loads when all aligned). KIND:
# 0 fake_quant, 1 its backward, 2 quantize, 3 dequantize (_common.py).
CODE_KERNELS = {"_elementwise_kernel": {0, 2}, "_observed_small_kernel": None, "_aggregate_kernel": {True}}
FLOAT_OUT_KERNELS = {"_elementwise_kernel": {0, 3}, "_observed_small_kernel": {0}}
STREAM_KERNELS = {"_elementwise_kernel": None, "_range_kernel": None}


def _among(kernels: dict, name: str, values: dict) -> bool:
    return name in kernels and (kernels[name] is None or values.get("KIND", values.get("WRITE")) in kernels[name])


def _recorded_launches(dtypes: list[torch.dtype], with_aggregate: bool) -> list[tuple]:
    """(kernel, args, constexprs, num_warps) of every launch the GPU launchers make for
    the recorded calls. Run without TRITON_INTERPRET: the launchers choose their GPU
    tiles and one-program limits; ``launch`` records instead of running, so CPU tensors
    stand in for CUDA ones and no GPU is needed."""
    cm, fq, qz, ag = _triton_modules()
    records = []

    def record(kernel, grid, *args, num_warps=cm.NUM_WARPS, **constexprs):
        records.append((kernel, args, constexprs, num_warps))

    for module in (cm, fq, qz, ag):
        module.launch = record
    cm.raise_if_flagged = lambda op, flag: None  # flags are never written: nothing ran
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for shape, axis in RECORDED_LAYOUTS:
            x = torch.randn(shape, generator=g).to(dtype)
            c = 1 if axis < 0 else shape[axis]
            scale = (torch.rand(c, generator=g) + 0.01).reshape(() if axis < 0 else (c,))
            zero_point = torch.zeros(scale.shape, dtype=torch.int32)
            fq.fake_quant(x, scale, zero_point, -128, 127, axis)
            fq.fake_quant_backward(x, x, scale, zero_point, -128, 127, axis)
            for symmetric in (True, False):
                fq.fake_quant_observed(x, -128, 127, symmetric, axis)
                qz.quantize(x, -128, 127, symmetric, axis)
            qz.dequantize(torch.zeros(shape, dtype=torch.int8), scale, zero_point, axis, dtype)
        unaligned = torch.randn(100_004, generator=g).to(dtype)[1:]
        fq.fake_quant(unaligned, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -128, 127, -1)
        fq.fake_quant_observed(unaligned, -128, 127, True, -1)
    if with_aggregate:
        codes, scales, zero_points = [], [], []
        for _ in range(3):
            for shape, axis in AGGREGATE_MODEL:
                for out, value in zip(
                    (codes, scales, zero_points),
                    reference.quantize(torch.randn(shape, generator=g), -128, 127, False, axis),
                ):
                    out.append(value)
        axes = [axis for _, axis in AGGREGATE_MODEL]
        for symmetric, trim in ((True, -1), (False, -1), (True, 1)):  # trim 1: the median of 3
            names = [str(i) for i in axes]
            bits = [8] * len(codes)
            ag.aggregate(
                codes, scales, zero_points, torch.tensor([0.2, 0.3, 0.5]), axes, bits, -128, 127, symmetric, names, trim
            )
        tensors = len(AGGREGATE_MODEL)  # the streaming step: one client into the running mean
        acc = torch.zeros(sum(c.numel() for c in codes[:tensors]))
        ag.accumulate(acc, codes[:tensors], scales[:tensors], zero_points[:tensors], axes, 0.25, names)
    return records


def _specialization(kernel, args, constexprs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) as Triton's JIT would build them from these
    arguments: ints equal to 1 become constants, 16-divisible ints and 16-byte aligned
    pointers get a divisibility hint, ints of 2^31 and more are i64."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    given = dict(zip([name for name in kernel.arg_names if name not in constexprs], args))
    assert len(given) + len(constexprs) == len(kernel.arg_names) == len(args) + len(constexprs), kernel.fn.__name__
    signature, values, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, key = native_specialize_impl(BaseBackend, given[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            values[name] = key
        elif key == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, values, attrs


def _expectations(name: str, signature: dict, values: dict, attrs: dict) -> dict:
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    aligned = all((i,) in attrs for i in pointers)
    return dict(
        rounds=_among(CODE_KERNELS, name, values) or (name == "_qparams_kernel" and not values.get("SYMMETRIC")),
        f16=_among(FLOAT_OUT_KERNELS, name, values) and "*fp16" in signature.values(),
        # 16-byte loads need 16 bytes per thread: full streaming tiles (BLOCK elements)
        vector=_among(STREAM_KERNELS, name, values)
        and values.get("MODE") == 0
        and aligned
        and values["BR"] * values["BW"] >= _triton_modules()[0].BLOCK,
        aligned=aligned,
    )


def _ptx_stats(ptx: str) -> dict:
    lines = ptx.splitlines()
    return {
        "fma_f32": len(re.findall(r"\bfma\.rn(\.ftz)?\.f32\b", ptx)),
        # no rounding modifier: ptxas may contract these into an FMA (PTX ISA, "mul")
        "contractible": len(re.findall(r"\b(mul|add|sub)(\.ftz)?\.f32\b", ptx)),
        "div_rn": len(re.findall(r"\bdiv\.rn(\.ftz)?\.f32\b", ptx)),
        "div_inexact": len(re.findall(r"\bdiv\.(full|approx)(\.ftz)?\.f32\b", ptx)),
        # round half to even: (v + 1.5 * 2^23) - 1.5 * 2^23, both steps rounded to nearest
        "magic_add": sum(1 for ln in lines if re.search(r"\badd\.rn\.f32\b", ln) and "0f4B400000" in ln),
        "magic_sub": sum(
            1 for ln in lines if re.search(r"\b(sub\.rn\.f32\b.*0f4B400000|add\.rn\.f32\b.*0fCB400000)", ln)
        ),
        "cvt_rn_f16": len(re.findall(r"\bcvt\.rn\.f16x?2?\.f32\b", ptx)),
        "cvt_rz_16": len(re.findall(r"\bcvt\.rz\.(f16|bf16)", ptx)),
        "vector_loads": len(re.findall(r"\bld\.global(\.\w+)*\.v[24]\.", ptx)),
    }


DTYPES_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _compile_main(jobs: list[str]) -> None:
    """Subprocess entry: for each "cc:dtypes[:one]" job, record the launches for those
    dtypes ("+agg": with aggregate), compile every distinct variant for sm_cc ("one":
    the first variant of each kernel only) and print one JSON record per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import fedhq_kernels.triton as backend

    records = [{"backend": {"devices": list(backend.DEVICES), "unavailable": backend.UNAVAILABLE}}]
    for job in jobs:
        cc, kinds, *mode = job.split(":")
        dtypes = [DTYPES_BY_NAME[k] for k in kinds.split("+") if k in DTYPES_BY_NAME]
        seen = set()
        for kernel, args, constexprs, num_warps in _recorded_launches(dtypes, "agg" in kinds.split("+")):
            name = kernel.fn.__name__
            signature, values, attrs = _specialization(kernel, args, constexprs)
            key = (name, tuple(signature.items()), tuple(sorted(map(str, values.items()))), tuple(attrs), num_warps)
            if key in seen or (mode == ["one"] and any(k[0] == name for k in seen)):
                continue
            seen.add(key)
            shown = {
                k: v
                for k, v in values.items()
                if k in ("KIND", "WRITE", "MODE", "BR", "BW", "BF16", "SYMMETRIC", "BS", "EVEN")
            }
            record = {
                "name": f"{name} {shown} {signature}",
                "kernel": name,
                "cc": int(cc),
                "expect": _expectations(name, signature, values, attrs),
            }
            try:
                compiled = triton.compile(
                    ASTSource(kernel, signature, values, attrs),
                    target=GPUTarget("cuda", int(cc), 32),
                    options={"num_warps": num_warps, "enable_fp_fusion": False},
                )
                record.update(_ptx_stats(compiled.asm["ptx"]), cubin_bytes=len(compiled.asm["cubin"]))
            except Exception as error:  # reported per kernel by the test
                record["error"] = f"{type(error).__name__}: {error}"
            records.append(record)
    print(json.dumps(records))


@pytest.fixture(scope="module")
def gpu_builds():
    """Compiles, in two subprocesses side by side (2 cores), every distinct kernel
    variant the recorded calls launch: all of them for sm_90, one per kernel for sm_80
    and sm_86. Triton's cache (~/.triton/cache) makes later runs near free."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    jobs = [
        subprocess.Popen(
            [sys.executable, __file__, "--compile", *job],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent,
        )
        for job in (["90:fp32+agg"], ["90:fp16+bf16", "80:fp32+agg:one", "86:fp32+agg:one"])
    ]
    records = []
    for job in jobs:
        out, err = job.communicate(timeout=900)
        assert job.returncode == 0, err[-4000:]
        records += json.loads(out.strip().splitlines()[-1])
    return records


def test_every_kernel_compiles_for_sm80_sm86_sm90(gpu_builds):
    builds = [r for r in gpu_builds if "name" in r]
    errors = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in builds if "error" in r]
    assert not errors, "\n".join(errors)
    assert {r["cc"] for r in builds} == set(ARCHS)
    # every kernel the backend defines was launched by the recorded calls, for every arch
    defined = {
        name
        for module in _triton_modules()
        for name, value in vars(module).items()
        if name.endswith("_kernel") and hasattr(value, "arg_names")
    }
    for cc in ARCHS:
        assert {r["kernel"] for r in builds if r["cc"] == cc} == defined, cc
    for r in builds:
        assert r["cubin_bytes"] > 0, r["name"]
    # the specializations a GPU run meets were among them: 16-bit floats, an unaligned
    # view, a per-tensor launch (one row: a constant), both observer schemes
    sm90 = [r for r in builds if r["cc"] == 90]
    assert any("'*fp16'" in r["name"] for r in sm90) and any("'BF16': True" in r["name"] for r in sm90)
    assert any(not r["expect"]["aligned"] for r in sm90)
    assert any("'nrows': 'constexpr'" in r["name"] for r in sm90)
    assert {"'SYMMETRIC': True", "'SYMMETRIC': False"} <= {
        p for r in sm90 for p in re.findall(r"'SYMMETRIC': \w+", r["name"])
    }


def test_ptx_keeps_the_arithmetic_exact(gpu_builds):
    """FMA contraction of x * inv + magic, or Triton's approximate division, would change
    codes; so would losing the round-half-even steps or truncating float16 casts."""
    problems = []
    for r in (r for r in gpu_builds if "name" in r and "error" not in r):
        what, expect = f"{r['name']} sm_{r['cc']}", r["expect"]
        if r["fma_f32"] or r["contractible"]:
            problems.append(f"{what}: {r['fma_f32']} fma.rn.f32, {r['contractible']} unrounded mul/add/sub.f32")
        if r["div_inexact"]:
            problems.append(f"{what}: {r['div_inexact']} approximate float32 divisions")
        if expect["rounds"] and not (r["magic_add"] and r["magic_sub"] and r["div_rn"]):
            problems.append(f"{what}: round-half-even steps or the exact 1 / scale missing ({r})")
        if expect["f16"] and not r["cvt_rn_f16"]:
            problems.append(f"{what}: no cvt.rn.f16.f32 (round to nearest even) for the float16 output")
        if r["cvt_rz_16"]:
            problems.append(f"{what}: a truncating 16-bit float conversion")
        if expect["vector"] and not r["vector_loads"]:
            problems.append(f"{what}: no vector loads on the per-tensor path")
    assert not problems, "\n".join(problems)


def test_backend_without_gpu_or_interpreter_says_why(gpu_builds):
    """The subprocesses ran without TRITON_INTERPRET on a machine without a GPU (CI):
    the backend imports, keeps its kernels, and is unavailable with a reason."""
    info = gpu_builds[0]["backend"]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert info["devices"] == ["cuda"]
    assert "no CUDA device" in info["unavailable"] and "TRITON_INTERPRET" in info["unavailable"]


# ---------------------------------------------------------------------------------
# Under the interpreter: tiles, blocks, splits, the small-tensor path
# ---------------------------------------------------------------------------------


@pytest.fixture
def triton_backend(monkeypatch):
    if "triton" not in dispatch.backends() or "cpu" not in dispatch._module("triton").DEVICES:
        pytest.skip("the triton backend does not run on CPU tensors here (needs TRITON_INTERPRET=1)")
    monkeypatch.setenv("FEDHQ_BACKEND", "triton")
    return dispatch._module("triton").KERNELS


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 256 elements, pass 1 split over up to 3 programs per row / column block,
    and the one-program path off unless a test turns it on: the multi-tile, multi-split
    code paths of a GPU launch on tensors of a few thousand elements."""
    cm, _, _, ag = _triton_modules()
    monkeypatch.setattr(cm, "BLOCK", 256)
    monkeypatch.setattr(cm, "FINALIZE_BLOCK", 16)
    monkeypatch.setattr(cm, "SMALL_NUMEL", 0)
    monkeypatch.setattr(cm, "range_splits", lambda device, programs, n_loop: min(n_loop, 3))
    monkeypatch.setattr(ag, "AGG_BR", 4)
    monkeypatch.setattr(ag, "AGG_BW", 32)
    return cm


# (shape, axis), with 256-element tiles: per-tensor over 3 tiles (the last partial);
# axis 0 with rows longer than a tile; a middle axis (ROW with outer > 1, channels
# repeating down the rows); last axis with more channels than a tile (COL); last axis
# with few channels and many rows; one column per channel
LAYOUTS = [((600,), -1), ((5, 300), 0), ((3, 7, 20), 1), ((3, 300), 1), ((100, 3), 1), ((9, 1), 0)]
FLAT_ROW_COL = [((600,), -1), ((3, 7, 20), 1), ((3, 300), 1)]


def _sample(shape, gen, dtype):
    x = torch.randn(shape, generator=gen) * 3
    ties = (torch.randint(-140, 140, shape, generator=gen) + 0.5) * 0.05
    return torch.where(torch.rand(shape, generator=gen) < 0.3, ties, x).to(dtype)


def _params(x, axis, gen):
    channels = 1 if axis < 0 else x.shape[axis]
    scale = (torch.rand(channels, generator=gen) * 0.1 + 1e-3).reshape(() if axis < 0 else (channels,))
    zero_point = torch.randint(-8, 8, scale.shape, generator=gen, dtype=torch.int32)  # valid for 4 bits too
    return scale, zero_point


def _check_all_ops(kernels, x, axis, gen):
    """Every single-tensor op of the triton backend against the reference, bit for bit."""
    scale, zero_point = _params(x, axis, gen)
    assert_equal(
        kernels["fake_quant"](x, scale, zero_point, -128, 127, axis),
        reference.fake_quant(x, scale, zero_point, -128, 127, axis),
        "fake_quant",
    )
    grad = torch.randn(x.shape, generator=gen).to(x.dtype)
    assert_equal(
        kernels["fake_quant_backward"](grad, x, scale, zero_point, -8, 7, axis),
        reference.fake_quant_backward(grad, x, scale, zero_point, -8, 7, axis),
        "backward",
    )
    for symmetric in (True, False):
        for op in ("fake_quant_observed", "quantize"):
            got = kernels[op](x, -128, 127, symmetric, axis)
            for g, e, what in zip(got, getattr(reference, op)(x, -128, 127, symmetric, axis), ("out", "scale", "zp")):
                assert_equal(g, e, f"{op} symmetric={symmetric} {what}")
    codes, s, z = reference.quantize(x, -128, 127, False, axis)
    assert_equal(
        kernels["dequantize"](codes, s, z, axis, x.dtype),
        reference.dequantize(codes, s, z, axis, x.dtype),
        "dequantize",
    )


def test_real_block_boundary(triton_backend, gen):
    """One full tile (run unmasked) plus one element, at the interpreter's real BLOCK."""
    cm = _triton_modules()[0]
    _check_all_ops(triton_backend, _sample((cm.BLOCK + 1,), gen, torch.float32), -1, gen)


@pytest.mark.parametrize("size", [255, 256, 257, 513])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_boundaries(triton_backend, small_tiles, gen, size, dtype):
    """Per-tensor sizes around 256-element tiles: full tiles run unmasked, the last masked."""
    _check_all_ops(triton_backend, _sample((size,), gen, dtype), -1, gen)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_many_tiles_and_split_reductions(triton_backend, small_tiles, gen, shape, axis):
    _check_all_ops(triton_backend, _sample(shape, gen, torch.float32), axis, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axis", FLAT_ROW_COL)
def test_many_tiles_16_bit(triton_backend, small_tiles, gen, shape, axis, dtype):
    _check_all_ops(triton_backend, _sample(shape, gen, dtype), axis, gen)


@pytest.mark.parametrize("shape,axis", LAYOUTS + [((), -1), ((1,), 0)])
def test_one_program_path(triton_backend, small_tiles, monkeypatch, gen, shape, axis):
    """The observed ops' one-launch path (View.small_tile), where the layout allows it."""
    cm = small_tiles
    monkeypatch.setattr(cm, "SMALL_NUMEL", 1 << 20)
    monkeypatch.setattr(cm, "BLOCK", 1024)
    view = cm.View.of(shape, axis)
    expected_small = view.mode == cm.FLAT.value or view.mode == cm.COL.value or view.nrows == view.channels
    assert (view.small_tile() is not None) == expected_small
    _check_all_ops(triton_backend, _sample(shape, gen, torch.float32), axis, gen)


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("shape,axis", FLAT_ROW_COL)
@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_non_finite_in_any_tile(triton_backend, small_tiles, monkeypatch, shape, axis, bad, small):
    if small:
        monkeypatch.setattr(small_tiles, "SMALL_NUMEL", 1 << 20)
        monkeypatch.setattr(small_tiles, "BLOCK", 1024)
    x = torch.randn(shape)
    x.view(-1)[-1] = bad  # in the last, partial tile
    for op in ("fake_quant_observed", "quantize"):
        name = "fake_quant" if op == "fake_quant_observed" else op
        with pytest.raises(ValueError, match=f"{name}: the input contains NaN or Inf"):
            triton_backend[op](x, -128, 127, True, axis)
    x = torch.randn(shape)
    x.view(-1)[0] = bad
    with pytest.raises(ValueError, match="quantize: the input contains NaN or Inf"):
        triton_backend["quantize"](x, -128, 127, False, axis)


def _aggregate_inputs(gen, shapes_axes, clients, bits=8, symmetric=True):
    """The op's arguments; ``bits`` "mixed": each entry at a width drawn from 2..8, the
    output at 8 bits."""
    codes, scales, zero_points, widths = [], [], [], []
    for _ in range(clients):
        for shape, axis in shapes_axes:
            x = torch.randn(shape, generator=gen) * (1 + torch.rand((), generator=gen))
            width = int(torch.randint(2, 9, (), generator=gen)) if bits == "mixed" else bits
            c, s, z = reference.quantize(x, *quant_range(width), symmetric, axis)
            for out, value in zip((codes, scales, zero_points, widths), (c, s, z, width)):
                out.append(value)
    w = torch.rand(clients, generator=gen) + 0.1
    axes, out_range = [a for _, a in shapes_axes], quant_range(8 if bits == "mixed" else bits)
    return codes, scales, zero_points, (w / w.sum()).float(), axes, widths, *out_range, symmetric


@pytest.mark.parametrize("clients,symmetric,trim", [(1, True, -1), (3, False, -1), (4, True, 1), (5, False, 2)])
@pytest.mark.parametrize("mixed", [False, True])
def test_aggregate_many_tiles(triton_backend, small_tiles, gen, clients, symmetric, trim, mixed):
    """Tiles of 4 x 32 codes: every tensor spans several tiles, rows and channels cross
    tile edges, per-tensor matrices end mid-row, and one launch covers all of them."""
    model = [
        ((300,), -1),
        ((33,), -1),
        ((5, 70), 0),
        ((3, 5, 9), 1),
        ((3, 70), 1),
        ((40, 3), 1),
        ((), -1),
        ((0, 4), 1),
        ((0, 3), -1),
        ((9, 1), 0),
    ]
    bits = "mixed" if mixed else 4 if symmetric else 8
    args = _aggregate_inputs(gen, model, clients, bits=bits, symmetric=symmetric)
    names = [f"t{i}" for i in range(len(model))]
    for got, expected, what in zip(
        triton_backend["aggregate"](*args, names, trim),
        reference.aggregate(*args, names, trim),
        ("codes", "scales", "zero points"),
    ):
        assert_equal(got, expected, what)


def test_aggregate_names_the_first_non_finite_tensor(triton_backend, small_tiles, gen):
    model = [((40,), -1), ((6, 20), 0), ((5, 40), 1)]
    codes, scales, zero_points, *rest = _aggregate_inputs(gen, model, 2)
    for k in range(2):  # tensors 1 and 2 overflow float32 when averaged
        for t in (1, 2):
            codes[k * 3 + t] = codes[k * 3 + t].clone().fill_(127)
            scales[k * 3 + t] = torch.full_like(scales[k * 3 + t], 3e38)
    with pytest.raises(ValueError, match="aggregate: the weighted average of 'b' is not finite"):
        triton_backend["aggregate"](codes, scales, zero_points, *rest, ["a", "b", "c"])


def test_bfloat16_rounding_is_half_to_even(triton_backend):
    """The interpreter's own float32 -> bfloat16 cast truncates; ours rounds half to even.
    259 lies halfway between the bfloat16 values 258 and 260: half to even gives 260,
    truncation 258."""
    codes = torch.tensor([1, -1, 3, 2, 127, 0], dtype=torch.int8)
    scale, zero = torch.tensor(259.0), torch.tensor(0, dtype=torch.int32)
    out = triton_backend["dequantize"](codes, scale, zero, -1, torch.bfloat16)
    assert out[0].item() == 260.0 and out[1].item() == -260.0
    assert_equal(out, (codes.float() * scale).to(torch.bfloat16))


# ---------------------------------------------------------------------------------
# On a GPU: the compiled kernels (a subprocess: this one runs the interpreter)
# ---------------------------------------------------------------------------------

_GPU_SCRIPT = """
import torch
from fedhq_kernels import reference
import fedhq_kernels.triton as backend
assert backend.UNAVAILABLE is None, backend.UNAVAILABLE
K = backend.KERNELS
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape, axis in [(((1 << 22) + 3,), -1), ((1000,), -1), ((64, 576), 0), ((3, 7, 40), 1), ((33, 1000), 1)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        c = 1 if axis < 0 else shape[axis]
        s = (torch.rand(c, generator=g) * 0.1 + 1e-3).reshape(() if axis < 0 else (c,))
        z = torch.randint(-8, 8, s.shape, generator=g, dtype=torch.int32)
        xc, sc, zc = x.cuda(), s.cuda(), z.cuda()
        def same(a, b, what):
            a = a.cpu()
            ok = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
            assert bool(ok.all()), (what, dtype, shape, axis, int((~ok).sum()))
        same(K["fake_quant"](xc, sc, zc, -128, 127, axis), reference.fake_quant(x, s, z, -128, 127, axis), "fwd")
        same(K["fake_quant_backward"](xc, xc, sc, zc, -8, 7, axis),
             reference.fake_quant_backward(x, x, s, z, -8, 7, axis), "bwd")
        for sym in (True, False):
            for op in ("fake_quant_observed", "quantize"):
                for a, b in zip(K[op](xc, -128, 127, sym, axis), getattr(reference, op)(x, -128, 127, sym, axis)):
                    same(a, b, op)
print("ok")
"""


@pytest.mark.gpu
def test_compiled_kernels_match_reference_on_gpu():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FEDHQ_BACKEND")}
    result = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--compile":
    _compile_main(sys.argv[2:])
