"""Bandwidth benchmark of the fedhq_kernels ops against their PyTorch baselines.

    python bench/bench_kernels.py [--device cpu|cuda] [--backends a,b] [--size N] [--threads T]
                                  [--repeats R] [--warmup W] [--quick] [--json PATH] [--robust M,M]
                                  [--robust-only] [--mixed-only]

Every case is checked for correctness before it is timed, with the profile's timing
harness and copy bandwidth (fedhq.profile); throughput is logical bandwidth against a
copy measured in the same run, in steady state after W warm-up calls, whose cost is
reported separately. Method and goals: docs/profile.md ("Kernel benchmark").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
)

# this checkout's packages, whether or not (or wherever) fedhq is installed; and bench/
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from resnet18_shapes import RESNET18_CIFAR_PARAMS, RESNET18_CIFAR_TENSORS, count_params, resnet18_cifar_shapes  # noqa: E402

import fedhq_kernels as fk  # noqa: E402
from fedhq.profile import micro, timing  # noqa: E402
from fedhq_kernels import dispatch, reference  # noqa: E402
from fedhq_kernels.functional import running_fractions  # noqa: E402

QMIN, QMAX = -128, 127  # 8-bit signed codes throughout
FULL_SIZE = {"cpu": 16 * 2**20, "cuda": 64 * 2**20}
QUICK_SIZE = 2**20
CHANNELS = 4096  # the per-channel case views the input as (CHANNELS, size / CHANNELS), axis 0
CLIENTS = 10

# torch.quantize_per_tensor is the baseline on purpose; its deprecation notice is noise here.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")


# The project's targets per device: case key -> (speedup over its baseline, % of the
# copy's bandwidth); None where it sets none. The share of the copy is judged on the
# out= row where the case has one (a caller with a buffer), else on the allocating row.
GOALS = {
    "cpu": {
        "fq_tensor": (2.5, 60),
        "fq_channel": (2.5, 60),
        "fq_observed": (3.0, None),
        "quantize": (None, None),
        "dequantize": (1.0, None),
        "aggregate": (4.0, None),
        "mixed_aggregate": (None, None),
        "robust_aggregate": (5.0, None),
    },
    "cuda": {
        "fq_tensor": (None, 85),
        "fq_channel": (None, 85),
        "fq_observed": (2.0, None),
        "quantize": (None, 85),
        "dequantize": (None, 85),
        "aggregate": (None, 80),
        "mixed_aggregate": (None, None),
        "robust_aggregate": (None, None),
    },
}


class Mismatch(AssertionError):
    """Ours and the baseline disagree where they must not: the numbers would be meaningless."""


# ---- timing: the profile's harness (fedhq.profile.timing) ----


# On a GPU, one timed sample queues calls back to back for about this much GPU time.
SAMPLE_MS = 5.0


def calls_per_sample(call_ms: float) -> int:
    """How many calls of ``call_ms`` each make one GPU sample of about SAMPLE_MS."""
    return max(1, min(1000, round(SAMPLE_MS / max(call_ms, 1e-3))))


def warm_up(fn: Callable[[], object], calls: int, device: torch.device) -> list[float]:
    """Seconds of each of the first ``calls`` calls, one by one (synchronized on a GPU):
    first calls pay for page faults on fresh memory, allocator growth, caches, clocks."""
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn()
        timing.synchronize(device)
        seconds.append(time.perf_counter() - start)
        del out  # freed outside the timed region, as in timing.measure
    return seconds


def measure(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int) -> dict:
    """Steady state: ``timing.measure`` of ``fn`` after ``warmup`` calls, which are
    timed one by one and summarized apart (summarize). On the CPU a sample is one call.
    On a GPU a sample queues calls_per_sample calls back to back between two CUDA
    events: a 64M-element op runs ~0.1 ms, and timing single calls would bill the
    host's launch latency."""
    first = warm_up(fn, warmup, device)
    number = 1
    if device.type == "cuda":
        number = calls_per_sample(timing.measure(fn, device=device, repeats=1, warmup=0).median_s * 1e3)
    return summarize(timing.measure(fn, device=device, repeats=repeats, warmup=0, number=number), first)


def summarize(t: timing.Timing, first: list[float]) -> dict:
    """The steady-state figures and the warm-up's: its first call, its median, and its
    extra cost (the warm-up calls' total beyond as many steady-state calls)."""
    steady = {"median_ms": t.median_s * 1e3, "p10_ms": t.p10_s * 1e3, "p90_ms": t.p90_s * 1e3, "repeats": t.repeats}
    if not first:
        return {**steady, "warmup_calls": 0}
    return {
        **steady,
        "warmup_calls": len(first),
        "first_call_ms": first[0] * 1e3,
        "warmup_median_ms": sorted(first)[len(first) // 2] * 1e3,
        "warmup_extra_ms": (sum(first) - len(first) * t.median_s) * 1e3,
    }


# ---- correctness ----


def check_equal(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality (NaN equal to NaN), or Mismatch naming the first differences."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise Mismatch(
            f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
        )
    same = actual == expected
    if actual.is_floating_point():
        same |= torch.isnan(actual) & torch.isnan(expected)
    if not bool(same.all()):
        bad = (~same).flatten().nonzero()[:5].flatten().tolist()
        firsts = ", ".join(f"[{i}] {actual.flatten()[i].item()!r} vs {expected.flatten()[i].item()!r}" for i in bad)
        raise Mismatch(f"{what}: {int((~same).sum())} of {same.numel()} elements differ; first: {firsts}")


# ---- the cases ----


@dataclass
class Baseline:
    name: str  # what it runs, e.g. "torch.fake_quantize_per_tensor_affine"
    backend: str  # the backend column of its row
    run: Callable[[], object]
    validate: Callable[[], None] | None = None  # raises Mismatch; runs before it is timed


@dataclass
class Case:
    key: str  # names the case's goals in GOALS
    op: str
    shape: str  # shown as the row's size
    elements: int
    nbytes: int  # logical bytes read + written per call (each distinct tensor once)
    ours: Callable[[], object]
    baselines: list[Baseline]  # the first is the one the project's target names
    validate: Callable[[], None]  # raises Mismatch; runs, per backend, before any timing
    floor_bytes: int | None = None  # bytes the algorithm must move when more than nbytes
    ours_out: Callable[[], object] | None = None  # the out= form, into a buffer made once


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def check_out_form(case: Case) -> None:
    """The out= form gives the allocating form's bits (which case.validate checks)."""
    got = [t.detach().clone() for t in _as_tuple(case.ours_out())]
    for k, (g, want) in enumerate(zip(got, _as_tuple(case.ours()))):
        check_equal(f"{case.op}, out= form, result {k}", g, want.detach())


def fake_quant_given_scale_cases(x: torch.Tensor, gen: torch.Generator) -> list[Case]:
    """Forward with a given scale, per tensor and per channel: read x, write y (4 + 4
    bytes per float32 element; the per-channel scales and zero points are included)."""
    scale = 0.02  # ~1% of randn's values fall outside 127 * scale: both clamp paths run
    x2 = x.view(CHANNELS, -1)
    scales = (torch.rand(CHANNELS, generator=gen) * 0.02 + 0.01).to(x.device)
    zero_points = torch.zeros(CHANNELS, dtype=torch.int32, device=x.device)

    # Ours takes the parameters as device tensors made once, as a QAT layer holds them;
    # torch's fastest form takes Python numbers, passed straight to its kernel.
    scale_t = torch.tensor(scale, dtype=torch.float32).to(x.device)
    zero_point_t = torch.zeros((), dtype=torch.int32, device=x.device)

    def per_tensor_ours():
        return fk.fake_quant(x, scale_t, zero_point_t)

    def per_tensor_torch():
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)

    def per_channel_ours():
        return fk.fake_quant(x2, scales, zero_points, axis=0)

    def per_channel_torch():
        return torch.fake_quantize_per_channel_affine(x2, scales, zero_points, 0, QMIN, QMAX)

    buffer = torch.empty_like(x)  # the out= forms' buffer, as a QAT layer would keep one
    buffer2 = buffer.view(x2.shape)

    def per_tensor_out():
        return fk.fake_quant(x, scale_t, zero_point_t, out=buffer)

    def per_channel_out():
        return fk.fake_quant(x2, scales, zero_points, axis=0, out=buffer2)

    return [
        Case(
            "fq_tensor",
            "fake_quant fwd, given scale, per-tensor",
            str(tuple(x.shape)),
            x.numel(),
            8 * x.numel(),
            per_tensor_ours,
            [Baseline("torch.fake_quantize_per_tensor_affine", "torch", per_tensor_torch)],
            lambda: check_equal("fake_quant per-tensor", per_tensor_ours(), per_tensor_torch()),
            ours_out=per_tensor_out,
        ),
        Case(
            "fq_channel",
            "fake_quant fwd, given scale, per-channel axis 0",
            str(tuple(x2.shape)),
            x.numel(),
            8 * x.numel() + 8 * CHANNELS,
            per_channel_ours,
            [Baseline("torch.fake_quantize_per_channel_affine", "torch", per_channel_torch)],
            lambda: check_equal("fake_quant per-channel", per_channel_ours(), per_channel_torch()),
            ours_out=per_channel_out,
        ),
    ]


def fake_quant_observed_case(x: torch.Tensor, gen: torch.Generator) -> Case:
    """QAT's step: observe the range, fake-quantize, and the straight-through backward.
    Bytes: each kernel's distinct tensors once: forward reads x and writes y, backward
    reads grad and x and writes grad_x: 5 x 4 = 20 bytes per float32 element. The range
    must be known before the first code is written, so the forward reads x twice: 24
    bytes is the floor. Baselines: torch.ao's FakeQuantize with MinMaxObserver (the
    target's) and its fused observer + fake-quant op (FusedMovingAvgObsFakeQuantize with
    averaging constant 1, so each call's range is its own), torch's fastest QAT path.
    The fused op divides the symmetric range by 128 rather than MinMaxObserver's 127.5,
    a slightly different scale, so it is checked to agree within two quantization steps."""
    leaf = x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=gen).to(x.device)

    # torch.autograd.grad rather than y.backward(grad): same kernels, but nothing
    # accumulates into leaf.grad (which would add a read-add-write pass from call 2 on).
    def ours():
        y = fk.fake_quant(leaf)  # scale=None: range observed, per-tensor symmetric
        return y, torch.autograd.grad(y, leaf, grad)[0]

    buffer = torch.empty_like(x)

    def ours_out():  # the forward into a buffer; the gradient is autograd's, fresh
        y = fk.fake_quant(leaf, out=buffer)
        return y, torch.autograd.grad(y, leaf, grad)[0]

    def fake_quantize_module():
        # On the input's device: a CPU module's scale would be handed to the CUDA kernel.
        return FakeQuantize(
            MinMaxObserver, quant_min=QMIN, quant_max=QMAX, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric
        ).to(x.device)

    # One module reused across calls, as a QAT model reuses it (building one per call
    # would bill torch.ao for module construction and, on a GPU, host-to-device copies).
    # Its MinMaxObserver keeps a running min/max, but every call sees the same x, so the
    # running range is this call's range and the work is that of a fresh observation.
    module = fake_quantize_module()

    def torch_ao():
        y = module(leaf)
        return y, torch.autograd.grad(y, leaf, grad)[0]

    fused = FusedMovingAvgObsFakeQuantize(
        observer=MovingAverageMinMaxObserver,
        averaging_constant=1.0,
        quant_min=QMIN,
        quant_max=QMAX,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    ).to(x.device)

    def torch_ao_fused():
        y = fused(leaf)
        return y, torch.autograd.grad(y, leaf, grad)[0]

    def validate_fused():
        y_ref, g_ref = ours()
        y, g = torch_ao_fused()
        step = max(float(fused.scale), float(leaf.detach().abs().max()) / 127.5)
        if float((y - y_ref).detach().abs().max()) > 2 * step:
            raise Mismatch("torch.ao fused fake_quant: forward further than two steps from MinMaxObserver's")
        if float((g != g_ref).float().mean()) > 1e-3:
            raise Mismatch("torch.ao fused fake_quant: its clamp mask differs from MinMaxObserver's on > 0.1%")

    def validate():
        fresh = fake_quantize_module()
        y_ref = fresh(leaf)
        g_ref = torch.autograd.grad(y_ref, leaf, grad)[0]
        (y, g), (y_timed, g_timed) = ours(), torch_ao()
        check_equal("observed fake_quant forward (torch.ao, reused module)", y_timed, y_ref)
        check_equal("observed fake_quant gradient (torch.ao, reused module)", g_timed, g_ref)
        check_equal("observed fake_quant forward", y, y_ref)
        check_equal("observed fake_quant gradient", g, g_ref)

    return Case(
        "fq_observed",
        "fake_quant fwd+bwd, observed range, per-tensor",
        str(tuple(x.shape)),
        x.numel(),
        20 * x.numel(),
        ours,
        [
            Baseline("torch.ao FakeQuantize(MinMaxObserver) fwd+bwd", "torch.ao", torch_ao),
            Baseline(
                "torch.ao FusedMovingAvgObsFakeQuantize fwd+bwd", "torch.ao-fused", torch_ao_fused, validate_fused
            ),
        ],
        validate,
        floor_bytes=24 * x.numel(),
        ours_out=ours_out,
    )


def quantize_dequantize_cases(x: torch.Tensor) -> list[Case]:
    """quantize with an observed per-tensor range (read 4 + write 1 bytes per element;
    the range is needed before the first code, so x is read twice: 9 is the floor) and
    dequantize (read 1 + write 4), against MinMaxObserver + torch.quantize_per_tensor
    and torch.dequantize."""

    def min_max_observer():
        return MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric).to(x.device)

    # Built once, on x's device, and reused (the input never changes, so its running
    # range is x's range): the timed baseline is the observation and quantization, not
    # the construction of a module.
    observer = min_max_observer()

    def torch_quantize():
        observer(x)
        scale, zero_point = observer.calculate_qparams()
        # the tensor overload: float(scale) / int(zero_point) would wait for the GPU twice
        return torch.quantize_per_tensor(x, scale.reshape(()), zero_point.reshape(()), torch.qint8)

    def ours_quantize():
        return fk.quantize(x)

    def validate_quantize():
        q, theirs = ours_quantize(), torch_quantize()
        fresh = min_max_observer()
        fresh(x)
        scale, zero_point = fresh.calculate_qparams()
        check_equal("quantize scale", q.scale, scale.reshape(()))
        check_equal("quantize zero point", q.zero_point, zero_point.to(torch.int32).reshape(()))
        # The specified codes are PyTorch's fake-quant codes (x * (1 / scale), rounded),
        # so dequantize(quantize(x)) must equal torch's fake quantization exactly...
        expected = torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, QMIN, QMAX)
        check_equal("dequantize(quantize(x))", fk.dequantize(q), expected)
        # ...while torch.quantize_per_tensor rounds x / scale, which may differ by one
        # code, and only within float32 rounding of a .5 tie (tests/test_quantize.py).
        differ = (q.data.int() - theirs.int_repr().int()).abs()
        ratio = x.double() / float(scale)
        near_tie = (ratio - ratio.floor() - 0.5).abs() <= 4e-7 * ratio.abs().clamp(min=1)
        if int(differ.max()) > 1 or not bool(near_tie[differ > 0].all()):
            raise Mismatch("quantize codes differ from torch.quantize_per_tensor away from rounding ties")
        print(
            f"  quantize: {int((differ > 0).sum())} of {x.numel()} codes differ by one from "
            "torch.quantize_per_tensor (allowed only at x/scale ties)"
        )

    # dequantize: both sides read the same codes, those torch produced.
    torch_q = torch_quantize()
    codes = torch_q.int_repr()
    ours_q = fk.QuantizedTensor(
        data=codes,
        scale=torch.tensor(torch_q.q_scale(), dtype=torch.float32, device=x.device),
        zero_point=torch.tensor(torch_q.q_zero_point(), dtype=torch.int32, device=x.device),
        bits=8,
        axis=None,
        symmetric=True,
        dtype=torch.float32,
        shape=x.shape,
    )

    def ours_dequantize():
        return fk.dequantize(ours_q)

    buffer = torch.empty_like(x)

    def ours_dequantize_out():
        return fk.dequantize(ours_q, out=buffer)

    def torch_dequantize():
        return torch.dequantize(torch_q)

    return [
        Case(
            "quantize",
            "quantize, observed range, per-tensor",
            str(tuple(x.shape)),
            x.numel(),
            5 * x.numel() + 8,
            ours_quantize,
            [Baseline("MinMaxObserver + torch.quantize_per_tensor", "torch", torch_quantize)],
            validate_quantize,
            floor_bytes=9 * x.numel() + 8,
        ),
        Case(
            "dequantize",
            "dequantize, per-tensor",
            str(tuple(x.shape)),
            x.numel(),
            5 * x.numel() + 8,
            ours_dequantize,
            [Baseline("torch.dequantize", "torch", torch_dequantize)],
            lambda: check_equal("dequantize", ours_dequantize(), torch_dequantize()),
            ours_out=ours_dequantize_out,
        ),
    ]


def plain_torch_aggregate(codes, scales, zero_points, weights, axes, qmin=QMIN, qmax=QMAX) -> Callable[[], tuple]:
    """The aggregate as one would write it in plain torch, per tensor: the running
    weighted mean of the clients' dequantized codes (``weights``: their fractions; any
    client's width dequantizes alike), its min / max, symmetric MinMax parameters, the
    codes requantized in [qmin, qmax]; outputs packed like the oracle's. Unlike the oracle
    (reference.aggregate) it checks no argument and never waits for the device (the
    oracle's per-entry checks are two host syncs each on a GPU, over 1200 for ResNet-18 x 10
    clients: a baseline slowed down by that would flatter the kernels). It performs
    the oracle's float32 operations in the same order, so its results are identical
    bit for bit (checked before timing). Constants live on the device, made once."""
    tensors, clients = len(axes), weights.numel()
    device = weights.device
    w = weights.float()
    eps = torch.tensor(reference.SCALE_EPS, device=device)
    half_range = torch.tensor((qmax - qmin) / 2, dtype=torch.float32, device=device)

    def run():
        out_codes, out_scales, out_zero_points = [], [], []
        for t in range(tensors):
            axis = axes[t]
            acc = torch.zeros(codes[t].shape, dtype=torch.float32, device=device)
            for k in range(clients):
                e = k * tensors + t
                values = reference._dequantize_float(codes[e], scales[e], zero_points[e], axis)
                acc = (1 - w[k]) * acc + w[k] * values  # the running mean (docs/kernels.md)
            if axis < 0:
                lo, hi = acc.min(), acc.max()
            elif acc.dim() == 1:  # one channel per element
                lo = hi = acc
            else:
                dims = [d for d in range(acc.dim()) if d != axis]
                lo, hi = acc.amin(dim=dims), acc.amax(dim=dims)
            magnitude = torch.maximum(-torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi)))
            scale = torch.maximum(magnitude / half_range, eps)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
            out_codes.append(reference._quantize_float(acc, scale, zero_point, qmin, qmax, axis).flatten())
            out_scales.append(scale.flatten())
            out_zero_points.append(zero_point.flatten())
        return torch.cat(out_codes), torch.cat(out_scales), torch.cat(out_zero_points)

    return run


def aggregate_sizes(width: int, shapes: dict, params: int, segments: int) -> tuple[str, int]:
    """The aggregate cases' size label and bytes: every client's int8 codes read once,
    the result's written once, every scale and zero point read and written."""
    model = "ResNet-18 CIFAR" if width == 64 else f"ResNet-18 CIFAR, width {width}"
    return f"{model}: {len(shapes)} tensors, {params / 1e6:.2f}M params", (CLIENTS + 1) * (params + segments * 8)


MIXED_WIDTHS = (2, 4, 8)  # the mixed-bits case: each client uploads its whole model at one of these


def aggregate_case(width: int, gen: torch.Generator, device: torch.device, mixed: bool = False) -> Case:
    """The server step over a whole model: CLIENTS quantized ResNet-18 (CIFAR) state
    dicts -> dequantize, weighted float32 average, requantize. ``mixed``: each client at
    a width drawn from MIXED_WIDTHS, the result at the widest drawn. Bytes: every
    client's int8 codes read once (in memory a code is a byte at any width), the
    result's codes written once, plus every scale and zero point read (clients x
    segments) and written (segments)."""
    shapes = resnet18_cifar_shapes(width=width)
    params = count_params(shapes)
    if width == 64 and (len(shapes), params) != (RESNET18_CIFAR_TENSORS, RESNET18_CIFAR_PARAMS):
        raise Mismatch(f"ResNet-18 shapes: {len(shapes)} tensors / {params} params, expected 62 / ~11.17M")
    # Fresh random float weights per client, quantized as a client would upload them
    # (per channel along axis 0 for conv / linear weights, per tensor for 1-d ones).
    widths = [8] * CLIENTS
    if mixed:
        widths = [MIXED_WIDTHS[int(i)] for i in torch.randint(len(MIXED_WIDTHS), (CLIENTS,), generator=gen)]
    state_dicts = [
        fk.quantize_state_dict(
            {name: (torch.randn(shape, generator=gen) * 0.1).to(device) for name, shape in shapes.items()}, bits=bits
        )
        for bits in widths
    ]
    sample_counts = torch.randint(100, 1000, (CLIENTS,), generator=gen).tolist()
    out_range = fk.quant_range(max(widths))

    # The oracle's arguments, built as functional._aggregate_quantized builds them for
    # ops.aggregate (client-major entries, the weights' running fractions):
    # ours and the timed plain-torch baseline are both checked against the oracle.
    names = list(shapes)
    entries = [sd[name] for sd in state_dicts for name in names]
    args = (
        [q.data for q in entries],
        [q.scale for q in entries],
        [q.zero_point for q in entries],
        running_fractions("bench", sample_counts, CLIENTS, device),
        [-1 if state_dicts[0][name].axis is None else state_dicts[0][name].axis for name in names],
        [q.bits for q in entries],
        *out_range,
        True,
        names,
    )
    segments = sum(q.scale.numel() for q in entries[: len(names)])

    def ours():
        return fk.aggregate_state_dicts(state_dicts, sample_counts)

    torch_loop = plain_torch_aggregate(*args[:5], *out_range)
    size, nbytes = aggregate_sizes(width, shapes, params, segments)

    def validate():
        expected = reference.aggregate(*args)  # the oracle the test-suite holds the kernels to
        result = ours()
        ours_packed = [
            torch.cat([getattr(result[n], field).flatten() for n in names]) for field in ("data", "scale", "zero_point")
        ]
        for what, got, baseline, want in zip(("codes", "scales", "zero points"), ours_packed, torch_loop(), expected):
            check_equal(f"aggregate {what}", got, want)
            check_equal(f"aggregate {what} (plain torch baseline vs the oracle)", baseline, want)

    drawn = f" at {'/'.join(map(str, MIXED_WIDTHS))} bits ({', '.join(map(str, widths))})" if mixed else ""
    return Case(
        "mixed_aggregate" if mixed else "aggregate",
        f"aggregate_state_dicts, {CLIENTS} clients{drawn}",
        size,
        params,
        nbytes,
        ours,
        [Baseline("plain torch loop, per tensor (no checks)", "torch", torch_loop)],
        validate,
    )


def flower_numpy_aggregate(state_dicts: list[dict], names: list[str], method: str, trim: float) -> Callable[[], list]:
    """Flower's FedMedian / FedTrimmedAvg on the clients' dequantized float arrays, layer
    by layer: np.median(np.asarray(layer), axis=0), or flwr's _trim_mean (np.partition
    at the cut ranks, np.mean of the rest). Float results, not requantized."""

    def run():
        out = []
        for name in names:
            layer = np.asarray([fk.dequantize(sd[name]).cpu().numpy() for sd in state_dicts])
            if method == "median":
                out.append(np.median(layer, axis=0))
            else:
                low = int(trim * layer.shape[0])
                high = layer.shape[0] - low
                out.append(np.mean(np.partition(layer, (low, high - 1), axis=0)[low:high], axis=0))
        return out

    return run


def robust_aggregate_case(method: str, width: int, gen: torch.Generator, device: torch.device) -> Case:
    """aggregate_state_dicts(method=...) over CLIENTS quantized ResNet-18s against the
    NumPy coordinate-wise median / trimmed mean Flower uses, both from the quantized
    updates (the baseline's dequantize included; ours also requantizes). Bytes as the
    mean aggregate's."""
    trim = 0.2
    shapes = resnet18_cifar_shapes(width=width)
    params = count_params(shapes)
    state_dicts = [
        fk.quantize_state_dict(
            {name: (torch.randn(shape, generator=gen) * 0.1).to(device) for name, shape in shapes.items()}
        )
        for _ in range(CLIENTS)
    ]
    names = list(shapes)
    cut = (CLIENTS - 1) // 2 if method == "median" else int(trim * CLIENTS)
    entries = [sd[name] for sd in state_dicts for name in names]
    args = (
        [q.data for q in entries],
        [q.scale for q in entries],
        [q.zero_point for q in entries],
        torch.full((CLIENTS,), 1.0 / CLIENTS, device=device),
        [-1 if state_dicts[0][name].axis is None else state_dicts[0][name].axis for name in names],
        [8] * len(entries),
        QMIN,
        QMAX,
        True,
        names,
        cut,
    )
    segments = sum(q.scale.numel() for q in entries[: len(names)])

    def ours():
        return fk.aggregate_state_dicts(state_dicts, [1] * CLIENTS, method=method, trim=trim)

    flower = flower_numpy_aggregate(state_dicts, names, method, trim)

    def validate():
        expected = reference.aggregate(*args)
        result = ours()
        ours_packed = [
            torch.cat([getattr(result[n], field).flatten() for n in names]) for field in ("data", "scale", "zero_point")
        ]
        for what, got, want in zip(("codes", "scales", "zero points"), ours_packed, expected):
            check_equal(f"{method} aggregate {what}", got, want)

    def validate_flower():  # the same coordinate-wise values, up to float32 summation order
        got = flower()[0]
        first = [fk.dequantize(sd[names[0]]).cpu().float() for sd in state_dicts]
        want = reference._trimmed_mean(first, cut).numpy()
        if not np.allclose(got, want, rtol=1e-6, atol=1e-7):
            raise Mismatch(f"Flower's NumPy {method} differs from the reference on '{names[0]}'")

    label = "median" if method == "median" else f"trimmed-mean {trim}"
    size, nbytes = aggregate_sizes(width, shapes, params, segments)
    return Case(
        "robust_aggregate",
        f"aggregate_state_dicts {label}, {CLIENTS} clients",
        size,
        params,
        nbytes,
        ours,
        [Baseline(f"Flower-style NumPy {method} (np.median / np.partition)", "numpy", flower, validate_flower)],
        validate,
    )


# ---- running and reporting ----


def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "machine": torch.cuda.get_device_name(device),
            "cores": torch.cuda.get_device_properties(device).multi_processor_count,
        }
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"machine": model or "unknown", "cores": os.cpu_count()}


def make_row(op, shape, elements, backend, impl, nbytes, stats, **extra) -> dict:
    return {
        "op": op,
        "size": shape,
        "elements": elements,
        "dtype": "float32",
        "backend": backend,
        "impl": impl,
        "bytes": nbytes,
        **stats,
        "gbps": nbytes / (stats["median_ms"] * 1e-3) / 1e9,
        **extra,
    }


def runnable_backends(device: torch.device) -> list[str]:
    """fedhq_kernels backends that run on ``device`` here, reference excluded (and, on
    the CPU, triton: its interpreter is a correctness tool, far too slow to time)."""
    names = [n for n in fk.backends() if n != "reference" and device.type in dispatch._module(n).DEVICES]
    return [n for n in names if not (device.type == "cpu" and n == "triton")]


def forced(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with FEDHQ_BACKEND set to ``backend`` (dispatch reads it at every call)."""

    def call():
        previous = os.environ.get("FEDHQ_BACKEND")
        os.environ["FEDHQ_BACKEND"] = backend
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["FEDHQ_BACKEND"]
            else:
                os.environ["FEDHQ_BACKEND"] = previous

    return call


def time_case(case: Case, args, device: torch.device) -> tuple[list[dict], list[str]]:
    """(rows, failed checks) of one case: its baselines, then each backend of ours. A side
    whose check fails is reported and not timed; the others still are."""
    rows, failures, timed = [], [], []
    same = (case.op, case.shape, case.elements)

    def checked(what: str, validate: Callable[[], None] | None) -> bool:
        try:
            if validate is not None:
                validate()
            return True
        except Mismatch as error:
            failures.append(f"{case.op} [{what}]: {error}")
            print(f"  MISMATCH [{what}]: {error}", flush=True)
            return False

    for baseline in case.baselines:
        if checked(baseline.backend, baseline.validate):
            timed.append((baseline, measure(baseline.run, args.baseline_repeats, device, args.warmup)))
    if not timed:
        return rows, failures
    strongest, strongest_stats = min(timed, key=lambda pair: pair[1]["median_ms"])
    for baseline, stats in timed:
        rows.append(
            make_row(
                *same,
                baseline.backend,
                baseline.name,
                case.nbytes,
                stats,
                baseline=strongest.name,
                speedup=strongest_stats["median_ms"] / stats["median_ms"],
            )
        )
    named = next((st for b, st in timed if b is case.baselines[0]), None)  # the goal's baseline, if checked
    target, aim = GOALS[device.type][case.key]
    for backend in args.backends:
        if not checked(f"fedhq-{backend}", forced(backend, case.validate)):
            continue
        forms = [(f"fedhq-{backend}", f"fedhq_kernels ({backend})", case.ours)]
        if case.ours_out is not None and checked(
            f"fedhq-{backend} out=", forced(backend, lambda: check_out_form(case))
        ):
            forms.append((f"fedhq-{backend} out=", f"fedhq_kernels ({backend}), out= buffer", case.ours_out))
        for label, impl, fn in forms:
            ours = measure(forced(backend, fn), args.repeats, device, args.warmup)
            row = make_row(
                *same,
                label,
                impl,
                case.nbytes,
                ours,
                baseline=strongest.name,
                speedup=strongest_stats["median_ms"] / ours["median_ms"],
            )
            if target is not None and named is not None and fn is case.ours:
                row["target"] = f">= {target}x {case.baselines[0].backend}"
                row["target_speedup"] = named["median_ms"] / ours["median_ms"]
                row["target_met"] = row["target_speedup"] >= target
            if aim is not None and fn is forms[-1][2]:  # the out= form where there is one
                row["aim"], row["aim_pct"] = f">= {aim}% of copy", aim
                if case.floor_bytes:
                    row["aim_ceiling_pct"] = 100 * case.nbytes / case.floor_bytes
            rows.append(row)
    return rows, failures


def run(args) -> tuple[list[dict], list[str]]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.size, generator=gen).to(device)

    # Reference bandwidth (the profile's copy and clone, fedhq.profile.micro): the ceiling
    # for a one-read-one-write op, with and without allocating the output; the copy again
    # at the end, in case clocks moved.
    copies = micro.bandwidth_calls(x)
    copy_name = "device-to-device copy_" if device.type == "cuda" else "copy_ into a preallocated tensor"
    timing.warm_up_clocks(copies["copy"][0], device=device)

    def reference_row(op, impl, name):
        fn, nbytes = copies[name]
        return make_row(
            op, str(tuple(x.shape)), x.numel(), "torch", impl, nbytes, measure(fn, args.repeats, device, args.warmup)
        )

    rows = [
        reference_row(f"{copy_name} (reference)", "Tensor.copy_", "copy"),
        reference_row("clone, allocating (reference)", "Tensor.clone", "clone"),
    ]

    width = 16 if args.quick else 64
    robust = [robust_aggregate_case(m, width, gen, device) for m in args.robust]
    if args.robust_only:
        cases = robust
    elif args.mixed_only:
        cases = [aggregate_case(width, gen, device, mixed=True)]
    else:
        cases = [
            *fake_quant_given_scale_cases(x, gen),
            fake_quant_observed_case(x, gen),
            *quantize_dequantize_cases(x),
            aggregate_case(width, gen, device),
            aggregate_case(width, gen, device, mixed=True),
            *robust,
        ]
    failures = []
    for case in cases:
        print(f"checking, then timing: {case.op} ...", flush=True)
        case_rows, case_failures = time_case(case, args, device)
        rows.extend(case_rows)
        failures.extend(case_failures)
    rows.append(reference_row(f"{copy_name} (reference, end of run)", "Tensor.copy_", "copy"))
    copy_gbps = max(rows[0]["gbps"], rows[-1]["gbps"])

    context = {
        **machine(device),
        "device": device.type,
        "torch": torch.__version__,
        "fedhq_backends": fk.backends(),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for row in rows:
        row.setdefault("baseline", None)
        row.setdefault("speedup", None)
        row["copy_gbps"] = copy_gbps
        row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        if "aim" in row:
            row["aim_met"] = row["pct_of_copy"] >= row["aim_pct"]
        row.update(context)
    return rows, failures


def print_table(rows: list[dict]) -> None:
    header = [
        "op",
        "size",
        "backend",
        "median ms",
        "p10-p90 ms",
        "GB/s",
        "% copy",
        "vs strongest baseline",
        "warm-up: first / median ms",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        cells = [
            r["op"],
            r["size"],
            r["backend"],
            f"{r['median_ms']:.2f}",
            f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}",
            f"{r['gbps']:.1f}",
            f"{r['pct_of_copy']:.0f}%",
            speedup,
            f"{r['first_call_ms']:.2f} / {r['warmup_median_ms']:.2f}" if r["warmup_calls"] else "",
        ]
        print("| " + " | ".join(cells) + " |")
    r = rows[0]
    print(
        f"\nfloat32 on {r['device']}; {r['machine']}, {r['cores']} cores/SMs, {r['threads']} threads; "
        f"torch {r['torch']}; fedhq backends {r['fedhq_backends']}. "
        f"Steady state after {r['warmup_calls']} warm-up calls, timed apart (first call / their median). "
        "GB/s = logical bytes (each tensor read or written once) / median; % copy is against the faster copy_ "
        "row of this run; 'vs strongest baseline' is the case's fastest baseline's time over the row's. "
        "Op rows allocate their output (compare with clone), except 'out=' rows, which write a buffer made once."
    )
    if r["quick"]:
        print("--quick is a smoke test: its inputs fit in the caches, so these are not memory bandwidths.")


def print_targets(rows: list[dict]) -> None:
    print("\nTargets (the project's):")
    for r in rows:
        if "target" in r:
            met = "MET" if r["target_met"] else "NOT MET"
            print(f"  {r['op']} [{r['backend']}]: {r['target']}: {r['target_speedup']:.2f}x -> {met}")
        if "aim" in r:
            met = "MET" if r["aim_met"] else "not met"
            ceiling = ""
            if "aim_ceiling_pct" in r:
                ceiling = f" (the algorithm moves more than the logical bytes: at most {r['aim_ceiling_pct']:.0f}%)"
            print(f"  {r['op']} [{r['backend']}]: aim {r['aim']}: {r['pct_of_copy']:.0f}% -> {met}{ceiling}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the tensors live (default cpu)")
    parser.add_argument(
        "--backends", help="comma-separated fedhq_kernels backends to time (default: all that run there)"
    )
    parser.add_argument(
        "--size", type=int, help=f"float32 elements per input (default {FULL_SIZE}; --quick: {QUICK_SIZE})"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the C++ kernels share its pool)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 30; --quick: 3)")
    parser.add_argument(
        "--warmup", type=int, help="calls before the timed ones, reported apart (default 20; --quick: 2)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test (< 30 s)")
    parser.add_argument(
        "--robust",
        default="median,trimmed-mean",
        help="robust aggregation methods to time against Flower's NumPy versions ('' for none)",
    )
    parser.add_argument("--robust-only", action="store_true", help="only the copy and the robust aggregation cases")
    parser.add_argument("--mixed-only", action="store_true", help="only the copy and the mixed-bits aggregation case")
    parser.add_argument(
        "--json", type=Path, help="where to write the rows (default bench/results/kernels-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver)")
    device = torch.device(args.device)
    available = runnable_backends(device)
    args.backends = args.backends.split(",") if args.backends else available
    unknown = [b for b in args.backends if b not in available]
    if unknown or not args.backends:
        parser.error(
            f"--backends {','.join(args.backends)}: runnable on {args.device} here: {', '.join(available) or 'none'}"
        )
    args.robust = [m for m in args.robust.split(",") if m]
    if any(m not in ("median", "trimmed-mean") for m in args.robust):
        parser.error(f"--robust {','.join(args.robust)}: choose among median, trimmed-mean")
    args.json = args.json or Path(__file__).resolve().parent / "results" / f"kernels-{args.device}.json"
    args.size = args.size or (QUICK_SIZE if args.quick else FULL_SIZE[args.device])
    args.repeats = args.repeats or (3 if args.quick else 30)
    if args.warmup is None:
        args.warmup = 2 if args.quick else 20
    # The slow baselines (80-400 ms a call at 16M) get at most 15 repeats: ~25 s in all.
    args.baseline_repeats = min(args.repeats, 15)
    if args.size <= 0 or args.size % CHANNELS:
        parser.error(f"--size must be a positive multiple of {CHANNELS}: the per-channel case uses {CHANNELS} channels")
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, failures = run(args)
    print()
    print_table(rows)
    print_targets(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {len(rows)} rows to {args.json} ({time.perf_counter() - start:.0f} s)")
    if failures:
        print(f"\n{len(failures)} check(s) failed; those sides were not timed:")
        for failure in failures:
            print(f"  {failure}")
        sys.exit(1)


if __name__ == "__main__":
    main()
