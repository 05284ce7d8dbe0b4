"""quantize (observe the range, then write int8 codes) and dequantize in Triton.
Kernels and the observer: _common.py."""

from __future__ import annotations

import torch

from fedhq_kernels.checks import check_float_dtype
from fedhq_kernels.triton import _common as cm
from fedhq_kernels.triton._common import DEQUANTIZE, QUANTIZE, View, bf16_bits, on_device, write_tiles


def quantize(x, quant_min, quant_max, symmetric, axis):
    cm.check_range("quantize", quant_min, quant_max, int8=True)
    x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale, zero_point = cm.run_observed("quantize", QUANTIZE, x, codes, symmetric, quant_min, quant_max, axis)
    return codes, scale, zero_point


def dequantize_out(codes, scale, zero_point, axis, out):
    if codes.dtype != torch.int8:
        raise TypeError(f"dequantize: codes must be int8, got {codes.dtype}")
    check_float_dtype("dequantize", out.dtype)
    codes, scale, zero_point = codes.contiguous(), scale.contiguous(), zero_point.contiguous()
    # one small device -> host read on a GPU; dequantize is off the training hot path
    cm.check_qparams("dequantize", scale, zero_point, -128, 127)
    with on_device(codes):
        write_tiles(
            DEQUANTIZE,
            View.of(codes.shape, axis),
            codes,
            codes,
            bf16_bits(out),
            scale,
            zero_point,
            -128,
            127,
            out.dtype == torch.bfloat16,
        )


def dequantize(codes, scale, zero_point, axis, dtype):
    check_float_dtype("dequantize", dtype)
    y = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    dequantize_out(codes, scale, zero_point, axis, y)
    return y
