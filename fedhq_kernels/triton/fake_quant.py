"""fake_quant in Triton: forward with given parameters (one pass, no host sync), the
straight-through backward (recomputes the clamp mask from the saved input: reading x
again costs less than writing and re-reading a mask, and keeps no extra memory between
forward and backward), and the forward with the range observed from x (pass 1: range
and qparams, see _common.observe; pass 2: the given-parameter kernel)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedhq_kernels.triton import _common as cm
from fedhq_kernels.triton._common import (
    COL,
    FLAT,
    ROW,
    View,
    bf16_bits,
    clamp_code,
    launch,
    load_f32,
    observe_small,
    on_device,
    store_f32,
    tile_offsets,
    tile_qparams,
    unclamped_code,
)


@triton.jit
def _fake_quant_tile(
    x_ptr, y_ptr, scale, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr, EVEN: tl.constexpr,
):
    offs, mask = tile_offsets(rb, cb, nrows, ncols, MODE, BR, BW, EVEN)
    code = clamp_code(unclamped_code(load_f32(x_ptr, offs, mask, BF16), inv_scale, zero_point, qmin, qmax), qmin, qmax)
    store_f32(y_ptr, offs, (code - zero_point) * scale, mask, BF16)


@triton.jit
def _fake_quant_fwd_kernel(
    x_ptr, y_ptr, scale_ptr, zp_ptr, nrows, ncols, C, qmin, qmax,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr,
):
    """One tile per program, parameters from scale_ptr / zp_ptr (given, or observed by
    pass 1)."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(ncols, BW)
    rb = pid // n_cb
    cb = pid % n_cb
    scale, inv_scale, zero_point = tile_qparams(scale_ptr, zp_ptr, rb, cb, nrows, ncols, C, MODE, BR, BW)
    if MODE == FLAT:
        if cb < ncols // BW:
            _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, True)
        else:
            _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, False)
    else:
        _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                         MODE, BR, BW, BF16, False)


@triton.jit
def _fake_quant_observed_small_kernel(
    x_ptr, y_ptr, scale_ptr, zp_ptr, flag_ptr, nrows, ncols, qmin, qmax, half_range, span,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr, SYMMETRIC: tl.constexpr,
):
    """Observer and writer in one program, for tensors of View.small_tile."""
    scale, inv_scale, zero_point, n_loop = observe_small(
        x_ptr, scale_ptr, zp_ptr, flag_ptr, nrows, ncols, qmin, qmax, half_range, span, MODE, BR, BW, BF16, SYMMETRIC
    )
    if MODE == COL:
        for i in range(n_loop):
            _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, i, 0, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, False)
    elif MODE == ROW:
        for i in range(n_loop):
            _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, 0, i, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, False)
    else:
        full = ncols // BW
        for i in range(full):
            _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, 0, i, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, True)
        for i in range(full, n_loop):
            _fake_quant_tile(x_ptr, y_ptr, scale, inv_scale, zero_point, 0, i, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, False)


@triton.jit
def _fake_quant_bwd_tile(
    grad_ptr, x_ptr, out_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr, EVEN: tl.constexpr,
):
    offs, mask = tile_offsets(rb, cb, nrows, ncols, MODE, BR, BW, EVEN)
    code = unclamped_code(load_f32(x_ptr, offs, mask, BF16), inv_scale, zero_point, qmin, qmax)
    inside = ((code >= qmin) & (code <= qmax)).to(tl.float32)
    # grad * mask as PyTorch computes it: a NaN gradient stays NaN even where masked
    store_f32(out_ptr, offs, load_f32(grad_ptr, offs, mask, BF16) * inside, mask, BF16)


@triton.jit
def _fake_quant_bwd_kernel(
    grad_ptr, x_ptr, out_ptr, scale_ptr, zp_ptr, nrows, ncols, C, qmin, qmax,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    n_cb = tl.cdiv(ncols, BW)
    rb = pid // n_cb
    cb = pid % n_cb
    scale, inv_scale, zero_point = tile_qparams(scale_ptr, zp_ptr, rb, cb, nrows, ncols, C, MODE, BR, BW)
    if MODE == FLAT:
        if cb < ncols // BW:
            _fake_quant_bwd_tile(grad_ptr, x_ptr, out_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                                 MODE, BR, BW, BF16, True)
        else:
            _fake_quant_bwd_tile(grad_ptr, x_ptr, out_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                                 MODE, BR, BW, BF16, False)
    else:
        _fake_quant_bwd_tile(grad_ptr, x_ptr, out_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                             MODE, BR, BW, BF16, False)


def _write(kernel, view: View, tensors: tuple, scale, zero_point, quant_min, quant_max, bf16: bool) -> None:
    """One program per tile; every tensor argument has the same contiguous layout."""
    if view.numel == 0:
        return
    br, bw = view.tile()
    n_rb, n_cb = view.tile_count(br, bw)
    launch(kernel, (n_rb * n_cb,), *tensors, scale, zero_point, view.nrows, view.ncols, view.channels,
           float(quant_min), float(quant_max), MODE=view.mode, BR=br, BW=bw, BF16=bf16)


def fake_quant(x, scale, zero_point, quant_min, quant_max, axis):
    cm.check_range("fake_quant", quant_min, quant_max)
    x, scale, zero_point = x.contiguous(), scale.contiguous(), zero_point.contiguous()
    if not x.is_cuda:
        # Free on CPU tensors. On a GPU it would cost a host sync per call on the QAT hot
        # path, so there the parameters are trusted (see the package docstring).
        cm.check_qparams("fake_quant", scale, zero_point, quant_min, quant_max)
    y = torch.empty_like(x)
    with on_device(x):
        _write(_fake_quant_fwd_kernel, View.of(x.shape, axis), (bf16_bits(x), bf16_bits(y)), scale, zero_point,
               quant_min, quant_max, x.dtype == torch.bfloat16)
    return y


def fake_quant_backward(grad, x, scale, zero_point, quant_min, quant_max, axis):
    cm.check_range("fake_quant_backward", quant_min, quant_max)
    x, scale, zero_point = x.contiguous(), scale.contiguous(), zero_point.contiguous()
    grad = grad.to(x.dtype).contiguous()
    if grad.shape != x.shape:
        raise ValueError(
            f"fake_quant_backward: grad shape {list(grad.shape)} differs from input shape {list(x.shape)}"
        )
    if not x.is_cuda:
        cm.check_qparams("fake_quant_backward", scale, zero_point, quant_min, quant_max)
    out = torch.empty_like(x)
    with on_device(x):
        _write(_fake_quant_bwd_kernel, View.of(x.shape, axis), (bf16_bits(grad), bf16_bits(x), bf16_bits(out)),
               scale, zero_point, quant_min, quant_max, x.dtype == torch.bfloat16)
    return out


def fake_quant_observed(x, quant_min, quant_max, symmetric, axis):
    """Pass 1 observes the range (and NaN / Inf), pass 2 fake-quantizes with it. The
    non-finite flag is read once, after both passes are queued."""
    cm.check_range("fake_quant", quant_min, quant_max)
    x = x.contiguous()
    view = View.of(x.shape, axis)
    y = torch.empty_like(x)
    bf16 = x.dtype == torch.bfloat16
    small = view.small_tile()
    with on_device(x):
        if small:
            scale, zero_point, flag = cm.empty_qparams(x, view)
            launch(_fake_quant_observed_small_kernel, (1,), bf16_bits(x), bf16_bits(y), scale, zero_point, flag,
                   view.nrows, view.ncols, *cm.range_constants(quant_min, quant_max),
                   MODE=view.mode, BR=small[0], BW=small[1], BF16=bf16, SYMMETRIC=bool(symmetric))
        else:
            scale, zero_point, flag = cm.observe("fake_quant", x, view, symmetric, quant_min, quant_max)
            _write(_fake_quant_fwd_kernel, view, (bf16_bits(x), bf16_bits(y)), scale, zero_point, quant_min,
                   quant_max, bf16)
    cm.raise_if_flagged("fake_quant", flag)
    shape = cm.qparams_shape(x, axis)
    return y, scale.view(shape), zero_point.view(shape)
