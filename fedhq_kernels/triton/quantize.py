"""quantize (observe the range, then write int8 codes) and dequantize in Triton."""

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
def _quantize_tile(
    x_ptr, codes_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr, EVEN: tl.constexpr,
):
    offs, mask = tile_offsets(rb, cb, nrows, ncols, MODE, BR, BW, EVEN)
    code = unclamped_code(load_f32(x_ptr, offs, mask, BF16), inv_scale, zero_point, qmin, qmax)
    tl.store(codes_ptr + offs, clamp_code(code, qmin, qmax).to(tl.int8), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scale_ptr, zp_ptr, nrows, ncols, C, qmin, qmax,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr,
):
    """Pass 2: one tile per program, parameters observed by pass 1."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(ncols, BW)
    rb = pid // n_cb
    cb = pid % n_cb
    scale, inv_scale, zero_point = tile_qparams(scale_ptr, zp_ptr, rb, cb, nrows, ncols, C, MODE, BR, BW)
    if MODE == FLAT:
        if cb < ncols // BW:
            _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                           MODE, BR, BW, BF16, True)
        else:
            _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                           MODE, BR, BW, BF16, False)
    else:
        _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, rb, cb, nrows, ncols, qmin, qmax,
                       MODE, BR, BW, BF16, False)


@triton.jit
def _quantize_small_kernel(
    x_ptr, codes_ptr, scale_ptr, zp_ptr, flag_ptr, nrows, ncols, qmin, qmax, half_range, span,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr, SYMMETRIC: tl.constexpr,
):
    """Observer and writer in one program, for tensors of View.small_tile."""
    scale, inv_scale, zero_point, n_loop = observe_small(
        x_ptr, scale_ptr, zp_ptr, flag_ptr, nrows, ncols, qmin, qmax, half_range, span, MODE, BR, BW, BF16, SYMMETRIC
    )
    if MODE == COL:
        for i in range(n_loop):
            _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, i, 0, nrows, ncols, qmin, qmax,
                           MODE, BR, BW, BF16, False)
    elif MODE == ROW:
        for i in range(n_loop):
            _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, 0, i, nrows, ncols, qmin, qmax,
                           MODE, BR, BW, BF16, False)
    else:
        full = ncols // BW
        for i in range(full):
            _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, 0, i, nrows, ncols, qmin, qmax,
                           MODE, BR, BW, BF16, True)
        for i in range(full, n_loop):
            _quantize_tile(x_ptr, codes_ptr, inv_scale, zero_point, 0, i, nrows, ncols, qmin, qmax,
                           MODE, BR, BW, BF16, False)


@triton.jit
def _dequantize_tile(
    codes_ptr, y_ptr, scale, zero_point, rb, cb, nrows, ncols,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr, EVEN: tl.constexpr,
):
    offs, mask = tile_offsets(rb, cb, nrows, ncols, MODE, BR, BW, EVEN)
    code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    store_f32(y_ptr, offs, (code - zero_point) * scale, mask, BF16)


@triton.jit
def _dequantize_kernel(
    codes_ptr, y_ptr, scale_ptr, zp_ptr, nrows, ncols, C,
    MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    n_cb = tl.cdiv(ncols, BW)
    rb = pid // n_cb
    cb = pid % n_cb
    scale, inv_scale, zero_point = tile_qparams(scale_ptr, zp_ptr, rb, cb, nrows, ncols, C, MODE, BR, BW)
    if MODE == FLAT:
        if cb < ncols // BW:
            _dequantize_tile(codes_ptr, y_ptr, scale, zero_point, rb, cb, nrows, ncols, MODE, BR, BW, BF16, True)
        else:
            _dequantize_tile(codes_ptr, y_ptr, scale, zero_point, rb, cb, nrows, ncols, MODE, BR, BW, BF16, False)
    else:
        _dequantize_tile(codes_ptr, y_ptr, scale, zero_point, rb, cb, nrows, ncols, MODE, BR, BW, BF16, False)


def quantize(x, quant_min, quant_max, symmetric, axis):
    cm.check_range("quantize", quant_min, quant_max, int8=True)
    x = x.contiguous()
    view = View.of(x.shape, axis)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    bf16 = x.dtype == torch.bfloat16
    small = view.small_tile()
    with on_device(x):
        if small:
            scale, zero_point, flag = cm.empty_qparams(x, view)
            launch(_quantize_small_kernel, (1,), bf16_bits(x), codes, scale, zero_point, flag, view.nrows, view.ncols,
                   *cm.range_constants(quant_min, quant_max),
                   MODE=view.mode, BR=small[0], BW=small[1], BF16=bf16, SYMMETRIC=bool(symmetric))
        else:
            scale, zero_point, flag = cm.observe("quantize", x, view, symmetric, quant_min, quant_max)
            if view.numel:
                br, bw = view.tile()
                n_rb, n_cb = view.tile_count(br, bw)
                launch(_quantize_kernel, (n_rb * n_cb,), bf16_bits(x), codes, scale, zero_point, view.nrows,
                       view.ncols, view.channels, float(quant_min), float(quant_max),
                       MODE=view.mode, BR=br, BW=bw, BF16=bf16)
    cm.raise_if_flagged("quantize", flag)
    shape = cm.qparams_shape(x, axis)
    return codes, scale.view(shape), zero_point.view(shape)


def dequantize(codes, scale, zero_point, axis, dtype):
    if codes.dtype != torch.int8:
        raise TypeError(f"dequantize: codes must be int8, got {codes.dtype}")
    codes, scale, zero_point = codes.contiguous(), scale.contiguous(), zero_point.contiguous()
    # one small device -> host read on a GPU; dequantize is off the training hot path
    cm.check_qparams("dequantize", scale, zero_point, -128, 127)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequantize: expected a float32, float16 or bfloat16 tensor, got {dtype}")
    y = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    view = View.of(codes.shape, axis)
    if view.numel:
        br, bw = view.tile()
        n_rb, n_cb = view.tile_count(br, bw)
        with on_device(codes):
            launch(_dequantize_kernel, (n_rb * n_cb,), codes, bf16_bits(y), scale, zero_point, view.nrows,
                   view.ncols, view.channels, MODE=view.mode, BR=br, BW=bw, BF16=dtype == torch.bfloat16)
    return y
