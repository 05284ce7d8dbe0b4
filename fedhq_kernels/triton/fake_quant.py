"""fake_quant in Triton: the forward with given parameters (one pass, no host sync),
the straight-through backward (recomputes the clamp mask from the saved input) and the
forward with the range observed from x. Kernels and the observer: _common.py."""

from __future__ import annotations

import torch

from fedhq_kernels.triton import _common as cm
from fedhq_kernels.triton._common import FAKE_QUANT, FAKE_QUANT_BACKWARD, View, bf16_bits, on_device, write_tiles


def _with_given_params(op, kind, a, x, scale, zero_point, quant_min, quant_max, axis, out):
    """One write_tiles pass of ``kind`` over x's layout (a: x, or the gradient) into out."""
    cm.check_range(op, quant_min, quant_max)
    scale, zero_point = scale.contiguous(), zero_point.contiguous()
    if not x.is_cuda:
        # Free on CPU tensors. On a GPU it would cost a host sync per call on the QAT hot
        # path, so there the parameters are trusted (see the package docstring).
        cm.check_qparams(op, scale, zero_point, quant_min, quant_max)
    with on_device(x):
        write_tiles(
            kind,
            View.of(x.shape, axis),
            bf16_bits(a),
            bf16_bits(x),
            bf16_bits(out),
            scale,
            zero_point,
            quant_min,
            quant_max,
            x.dtype == torch.bfloat16,
        )
    return out


def fake_quant_out(x, scale, zero_point, quant_min, quant_max, axis, out):
    x = x.contiguous()
    _with_given_params("fake_quant", FAKE_QUANT, x, x, scale, zero_point, quant_min, quant_max, axis, out)


def fake_quant(x, scale, zero_point, quant_min, quant_max, axis):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    fake_quant_out(x, scale, zero_point, quant_min, quant_max, axis, out)
    return out


def fake_quant_backward(grad, x, scale, zero_point, quant_min, quant_max, axis):
    x = x.contiguous()
    grad = grad.to(x.dtype).contiguous()
    if grad.shape != x.shape:
        raise ValueError(f"fake_quant_backward: grad shape {list(grad.shape)} differs from input shape {list(x.shape)}")
    out = torch.empty_like(x)
    _with_given_params(
        "fake_quant_backward", FAKE_QUANT_BACKWARD, grad, x, scale, zero_point, quant_min, quant_max, axis, out
    )
    return out


def fake_quant_observed_out(x, quant_min, quant_max, symmetric, axis, out):
    cm.check_range("fake_quant", quant_min, quant_max)
    return cm.run_observed("fake_quant", FAKE_QUANT, x.contiguous(), out, symmetric, quant_min, quant_max, axis)


def fake_quant_observed(x, quant_min, quant_max, symmetric, axis):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, *fake_quant_observed_out(x, quant_min, quant_max, symmetric, axis, y)
