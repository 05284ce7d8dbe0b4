"""The fedhq ops (``torch.ops.fedhq.*``, schemas from optable.py): fake (meta)
implementations for torch.compile / export, straight-through autograd, and a real
implementation that hands the call to the backend dispatch.py picks. Shape and dtype
checks live here (they hold for fake tensors too); value checks need the data and live
in the backends. Conventions: docs/kernels.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fedhq_kernels import dispatch
from fedhq_kernels.checks import check_float_dtype
from fedhq_kernels.optable import MUTATED_ARGS, SCHEMAS
from fedhq_kernels.quantized_tensor import input_ranges


# Plain comparisons, not torch._check_*: these run on every eager call, where building
# torch._check's lazy messages cost ~15 us; on fake tensors they add shape guards.
def check_float_input(op: str, x: Tensor) -> None:
    check_float_dtype(op, x.dtype)


def check_axis(op: str, x: Tensor, axis: int) -> None:
    if axis >= x.dim():
        raise ValueError(f"{op}: axis {axis} is out of range for a {x.dim()}-d tensor")


def qparams_shape(x: Tensor, axis: int) -> tuple[int, ...]:
    return () if axis < 0 else (x.shape[axis],)


def check_qparams_shape(op: str, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> None:
    check_axis(op, x, axis)
    if scale.dtype != torch.float32:
        raise TypeError(f"{op}: scale must be float32, got {scale.dtype}")
    if zero_point.dtype != torch.int32:
        raise TypeError(f"{op}: zero_point must be int32, got {zero_point.dtype}")
    channels = 1 if axis < 0 else x.shape[axis]
    if scale.numel() != channels or zero_point.numel() != channels:
        raise ValueError(
            f"{op}: expected {channels} scale and zero_point value(s) for axis={axis}, "
            f"got {scale.numel()} and {zero_point.numel()}"
        )


def check_given(op: str, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> None:
    """The checks of the ops that take a scale and zero point."""
    check_float_input(op, x)
    check_qparams_shape(op, x, scale, zero_point, axis)


def check_observed(op: str, x: Tensor, axis: int) -> None:
    """The checks of the ops that observe the range of x."""
    check_float_input(op, x)
    check_axis(op, x, axis)


def check_out(op: str, out: Tensor, like: Tensor, dtype: torch.dtype, inputs: dict[str, Tensor]) -> None:
    """The ``out`` of an out= op (the rules of csrc/binding.h's check_out): ``like``'s
    shape and device, ``dtype``, contiguous, sharing no memory with any of ``inputs``."""
    if out.shape != like.shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: out is {out.dtype}, expected {dtype}")
    if out.device != like.device:
        raise ValueError(f"{op}: out is on {out.device}, expected {like.device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    for name, t in inputs.items():
        if torch._C._is_alias_of(out, t):  # same storage: any overlap, views included
            raise ValueError(f"{op}: out shares memory with {name}")


def _custom_op(name: str):
    return torch.library.custom_op(f"fedhq::{name}", mutates_args=MUTATED_ARGS[name], schema=SCHEMAS[name])


def _empty_qparams(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    shape = qparams_shape(x, axis)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


# ---- fake_quant with given scale / zero point ----


@_custom_op("fake_quant")
def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: int) -> Tensor:
    check_given("fake_quant", x, scale, zero_point, axis)
    return dispatch.kernel("fake_quant", x.device)(x, scale, zero_point, quant_min, quant_max, axis)


@fake_quant.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis):
    check_given("fake_quant", x, scale, zero_point, axis)
    return x.new_empty(x.shape)


def check_fake_quant_out(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, out: Tensor) -> None:
    check_given("fake_quant", x, scale, zero_point, axis)
    check_out("fake_quant", out, x, x.dtype, {"x": x, "scale": scale, "zero_point": zero_point})


@_custom_op("fake_quant_out")
def fake_quant_out(
    x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: int, out: Tensor
) -> None:
    check_fake_quant_out(x, scale, zero_point, axis, out)
    dispatch.kernel("fake_quant_out", x.device)(x, scale, zero_point, quant_min, quant_max, axis, out)


@fake_quant_out.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, out):
    check_fake_quant_out(x, scale, zero_point, axis, out)


@_custom_op("fake_quant_backward")
def fake_quant_backward(
    grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: int
) -> Tensor:
    check_given("fake_quant_backward", x, scale, zero_point, axis)
    return dispatch.kernel("fake_quant_backward", x.device)(grad, x, scale, zero_point, quant_min, quant_max, axis)


@fake_quant_backward.register_fake
def _(grad, x, scale, zero_point, quant_min, quant_max, axis):
    return x.new_empty(x.shape)


def _fake_quant_setup_context(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qrange_axis = (quant_min, quant_max, axis)


def _fake_quant_backward(ctx, grad):
    # Straight-through estimator: the mask is recomputed from the saved input and
    # parameters instead of keeping a byte per element between forward and backward.
    x, scale, zero_point = ctx.saved_tensors
    return fake_quant_backward(grad, x, scale, zero_point, *ctx.qrange_axis), None, None, None, None, None


torch.library.register_autograd("fedhq::fake_quant", _fake_quant_backward, setup_context=_fake_quant_setup_context)


# ---- fake_quant with the range observed in the same kernel ----


@_custom_op("fake_quant_observed")
def fake_quant_observed(
    x: Tensor, quant_min: int, quant_max: int, symmetric: bool, axis: int
) -> tuple[Tensor, Tensor, Tensor]:
    check_observed("fake_quant", x, axis)
    return dispatch.kernel("fake_quant_observed", x.device)(x, quant_min, quant_max, symmetric, axis)


@fake_quant_observed.register_fake
def _(x, quant_min, quant_max, symmetric, axis):
    check_observed("fake_quant", x, axis)
    return (x.new_empty(x.shape), *_empty_qparams(x, axis))


def check_observed_out(x: Tensor, axis: int, out: Tensor) -> None:
    check_observed("fake_quant", x, axis)
    check_out("fake_quant", out, x, x.dtype, {"x": x})


@_custom_op("fake_quant_observed_out")
def fake_quant_observed_out(
    x: Tensor, quant_min: int, quant_max: int, symmetric: bool, axis: int, out: Tensor
) -> tuple[Tensor, Tensor]:
    check_observed_out(x, axis, out)
    return dispatch.kernel("fake_quant_observed_out", x.device)(x, quant_min, quant_max, symmetric, axis, out)


@fake_quant_observed_out.register_fake
def _(x, quant_min, quant_max, symmetric, axis, out):
    check_observed_out(x, axis, out)
    return _empty_qparams(x, axis)


def _observed_setup_context(ctx, inputs, output):
    x, quant_min, quant_max, _, axis = inputs
    _, scale, zero_point = output
    ctx.mark_non_differentiable(scale, zero_point)
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qrange_axis = (quant_min, quant_max, axis)


def _observed_backward(ctx, grad, _grad_scale, _grad_zero_point):
    x, scale, zero_point = ctx.saved_tensors
    return fake_quant_backward(grad, x, scale, zero_point, *ctx.qrange_axis), None, None, None, None


torch.library.register_autograd("fedhq::fake_quant_observed", _observed_backward, setup_context=_observed_setup_context)


# ---- the eager fast path of fake_quant ----
# A Python custom op costs ~100 us per call on a CPU in eager mode (dispatcher round
# trip, autograd wrapper, dynamo-disable frame), and a QAT model calls fake_quant twice
# per layer per step. Outside tracing, the public API runs the same checks and kernels
# through these autograd Functions; torch.compile, export, fake tensors, tensor
# subclasses and dispatch modes (profilers) still go through the registered ops.

_PLAIN_TENSORS = (Tensor, nn.Parameter)


def eager_fast_path(x: Tensor) -> bool:
    return type(x) in _PLAIN_TENSORS and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def _ste_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    return dispatch.kernel("fake_quant_backward", x.device)(grad, x, scale, zero_point, *ctx.qrange_axis)


# With ``out`` (None: a fresh output) these run the out= form and return ``out``,
# marked dirty: it carries the straight-through gradient to x, which the registered
# out= ops (no autograd formula) cannot.


class FakeQuantEager(torch.autograd.Function):
    """fedhq::fake_quant (or fake_quant_out) and its straight-through backward, without the dispatcher."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, out):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange_axis = (quant_min, quant_max, axis)
        if out is None:
            check_given("fake_quant", x, scale, zero_point, axis)
            return dispatch.kernel("fake_quant", x.device)(x, scale, zero_point, quant_min, quant_max, axis)
        check_fake_quant_out(x, scale, zero_point, axis, out)
        dispatch.kernel("fake_quant_out", x.device)(x, scale, zero_point, quant_min, quant_max, axis, out)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _ste_backward(ctx, grad), None, None, None, None, None, None


class FakeQuantObservedEager(torch.autograd.Function):
    """fedhq::fake_quant_observed (or its out= form) and its straight-through backward, without the dispatcher."""

    @staticmethod
    def forward(ctx, x, quant_min, quant_max, symmetric, axis, out):
        if out is None:
            check_observed("fake_quant", x, axis)
            y, scale, zero_point = dispatch.kernel("fake_quant_observed", x.device)(
                x, quant_min, quant_max, symmetric, axis
            )
        else:
            check_observed_out(x, axis, out)
            scale, zero_point = dispatch.kernel("fake_quant_observed_out", x.device)(
                x, quant_min, quant_max, symmetric, axis, out
            )
            y = out
            ctx.mark_dirty(out)
        ctx.mark_non_differentiable(scale, zero_point)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange_axis = (quant_min, quant_max, axis)
        return y, scale, zero_point

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_scale, _grad_zero_point):
        return _ste_backward(ctx, grad), None, None, None, None, None


# ---- quantize / dequantize ----


@_custom_op("quantize")
def quantize(x: Tensor, quant_min: int, quant_max: int, symmetric: bool, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    check_observed("quantize", x, axis)
    return dispatch.kernel("quantize", x.device)(x, quant_min, quant_max, symmetric, axis)


@quantize.register_fake
def _(x, quant_min, quant_max, symmetric, axis):
    check_observed("quantize", x, axis)
    return (x.new_empty(x.shape, dtype=torch.int8), *_empty_qparams(x, axis))


@_custom_op("dequantize")
def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    torch._check_type(codes.dtype == torch.int8, lambda: f"dequantize: codes must be int8, got {codes.dtype}")
    check_qparams_shape("dequantize", codes, scale, zero_point, axis)
    return dispatch.kernel("dequantize", codes.device)(codes, scale, zero_point, axis, dtype)


@dequantize.register_fake
def _(codes, scale, zero_point, axis, dtype):
    check_qparams_shape("dequantize", codes, scale, zero_point, axis)
    return codes.new_empty(codes.shape, dtype=dtype)


def check_dequantize_out(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, out: Tensor) -> None:
    if codes.dtype != torch.int8:
        raise TypeError(f"dequantize: codes must be int8, got {codes.dtype}")
    check_qparams_shape("dequantize", codes, scale, zero_point, axis)
    check_float_dtype("dequantize", out.dtype, "out must be a {} tensor")
    check_out("dequantize", out, codes, out.dtype, {"codes": codes, "scale": scale, "zero_point": zero_point})


@_custom_op("dequantize_out")
def dequantize_out(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, out: Tensor) -> None:
    check_dequantize_out(codes, scale, zero_point, axis, out)
    dispatch.kernel("dequantize_out", codes.device)(codes, scale, zero_point, axis, out)


@dequantize_out.register_fake
def _(codes, scale, zero_point, axis, out):
    check_dequantize_out(codes, scale, zero_point, axis, out)


# ---- aggregate: whole models, packed ----


def _packed_sizes(codes: list[Tensor], axes: list[int]) -> tuple[int, int]:
    """Elements and quantization segments of one client's tensors."""
    elements = sum(c.numel() for c in codes[: len(axes)])
    segments = sum(1 if a < 0 else c.shape[a] for c, a in zip(codes, axes))
    return elements, segments


def _check_aggregate(codes, scales, zero_points, weights, axes, bits, names, trim) -> None:
    """trim < 0: weighted mean; trim >= 0: values cut from each end (docs/kernels.md);
    ``bits``: each entry's bit width."""
    tensors = len(axes)
    torch._check_value(
        weights.dim() == 1 and weights.numel() > 0, lambda: "aggregate: weights must be a non-empty 1-d tensor"
    )
    clients = weights.numel()
    if trim >= 0 and not 2 * trim < clients:
        raise ValueError(f"aggregate: trimming {trim} of {clients} clients from each end leaves none")
    torch._check_value(
        len(codes) == len(scales) == len(zero_points) == clients * tensors and len(names) == tensors,
        lambda: (
            f"aggregate: expected {clients} clients x {tensors} tensors of codes, scales and zero points "
            f"and {tensors} names, got {len(codes)}, {len(scales)}, {len(zero_points)} and {len(names)}"
        ),
    )
    input_ranges("aggregate", bits, len(codes), names)
    _check_entries("aggregate", codes, scales, zero_points, axes, names, weights.device, "the weights'")


def _check_entries(op, codes, scales, zero_points, axes, names, device, whose) -> None:
    """Client-major lists of int8 codes (entry e: client e // T's tensor e % T, shaped as
    entry e % T) with their scales and zero points, all on ``device`` (``whose``)."""
    tensors = len(axes)
    for t, axis in enumerate(axes):
        check_axis(f"{op}: '{names[t]}'", codes[t], axis)
    # Plain comparisons first: this runs for every client x tensor (620 entries for 10
    # ResNet-18s), and building torch._check messages for all of them cost ~10 ms.
    for e, c in enumerate(codes):
        t = e % tensors
        owner = f"{op}: client {e // tensors}'s '{names[t]}'"
        if c.dtype != torch.int8 or c.shape != codes[t].shape:
            raise ValueError(
                f"{owner} must be int8 codes of shape {tuple(codes[t].shape)}, got {c.dtype} {tuple(c.shape)}"
            )
        channels = 1 if axes[t] < 0 else c.shape[axes[t]]
        s, z = scales[e], zero_points[e]
        # GPU kernels read every client's tensors through a table of raw addresses, so a
        # tensor on another device must be refused here, not dereferenced there
        if c.device != device or s.device != device or z.device != device:
            raise ValueError(
                f"{owner}: codes, scale and zero point must be on {whose} device {device}, "
                f"got {c.device}, {s.device} and {z.device}"
            )
        if s.dtype != torch.float32 or z.dtype != torch.int32 or s.numel() != channels or z.numel() != channels:
            check_qparams_shape(owner, c, s, z, axes[t])


@_custom_op("aggregate")
def aggregate(
    codes: list[Tensor],
    scales: list[Tensor],
    zero_points: list[Tensor],
    weights: Tensor,
    axes: list[int],
    bits: list[int],
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    names: list[str],
    trim: int,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_aggregate(codes, scales, zero_points, weights, axes, bits, names, trim)
    return dispatch.kernel("aggregate", weights.device)(
        codes, scales, zero_points, weights, axes, bits, quant_min, quant_max, symmetric, names, trim
    )


@aggregate.register_fake
def _(codes, scales, zero_points, weights, axes, bits, quant_min, quant_max, symmetric, names, trim):
    _check_aggregate(codes, scales, zero_points, weights, axes, bits, names, trim)
    elements, segments = _packed_sizes(codes, axes)
    return (
        weights.new_empty((elements,), dtype=torch.int8),
        weights.new_empty((segments,), dtype=torch.float32),
        weights.new_empty((segments,), dtype=torch.int32),
    )


# ---- accumulate: one client into a running mean, in place ----


def _check_accumulate(acc, codes, scales, zero_points, axes, fraction, names) -> None:
    tensors = len(axes)
    if not (len(codes) == len(scales) == len(zero_points) == len(names) == tensors):
        raise ValueError(
            f"accumulate: expected {tensors} tensors of codes, scales, zero points and names, "
            f"got {len(codes)}, {len(scales)}, {len(zero_points)} and {len(names)}"
        )
    elements = sum(c.numel() for c in codes)
    if acc.dtype != torch.float32 or acc.dim() != 1 or acc.numel() != elements or not acc.is_contiguous():
        raise ValueError(
            f"accumulate: acc must be a contiguous 1-d float32 tensor of {elements} elements, "
            f"got {acc.dtype} {tuple(acc.shape)}"
        )
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"accumulate: fraction must lie in [0, 1], got {fraction!r}")
    _check_entries("accumulate", codes, scales, zero_points, axes, names, acc.device, "the accumulator's")


@torch.library.custom_op("fedhq::accumulate", mutates_args=("acc",), schema=SCHEMAS["accumulate"])
def accumulate(
    acc: Tensor,
    codes: list[Tensor],
    scales: list[Tensor],
    zero_points: list[Tensor],
    axes: list[int],
    fraction: float,
    names: list[str],
) -> None:
    _check_accumulate(acc, codes, scales, zero_points, axes, fraction, names)
    dispatch.kernel("accumulate", acc.device)(acc, codes, scales, zero_points, axes, fraction, names)


@accumulate.register_fake
def _(acc, codes, scales, zero_points, axes, fraction, names):
    _check_accumulate(acc, codes, scales, zero_points, axes, fraction, names)
