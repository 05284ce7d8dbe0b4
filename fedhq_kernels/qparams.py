"""MinMaxObserver's scale / zero point from an observed range: the one Python home of
the formula (docs/kernels.md), used by the reference backend, the observers and the
QAT layer. Tensor ops only: nothing is read back or copied from the host, so it never
synchronizes a GPU."""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_EPS = torch.finfo(torch.float32).eps  # the smallest scale
FLOAT32_MAX = torch.finfo(torch.float32).max  # the largest scale


def qparams_from_range(lo: Tensor, hi: Tensor, symmetric: bool, quant_min: int, quant_max: int):
    """float32 scale and int32 zero point of the range [lo, hi] (widened to take in 0).
    A non-finite range gives a non-finite scale, which the ops reject. An affine range
    wider than float32's max (hi - lo overflows) is divided piecewise, hi/span - lo/span,
    and the scale capped at float32's max, so a finite range gives a finite scale."""
    lo_neg = torch.clamp(lo, max=0.0)
    hi_pos = torch.clamp(hi, min=0.0)
    # Divisors as 0-d device tensors (a fill kernel, no host copy): dividing by a Python
    # scalar would multiply by its reciprocal on a GPU, which is not bit-exact.
    if symmetric:
        half_range = torch.full((), (quant_max - quant_min) / 2, dtype=torch.float32, device=lo.device)
        scale = torch.clamp(torch.maximum(-lo_neg, hi_pos) / half_range, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        span = torch.full((), float(quant_max - quant_min), dtype=torch.float32, device=lo.device)
        width = hi_pos - lo_neg
        scale = torch.where(torch.isinf(width), hi_pos / span - lo_neg / span, width / span)
        scale = torch.clamp(scale, min=SCALE_EPS, max=FLOAT32_MAX)
        zero_point = (quant_min - torch.round(lo_neg / scale)).clamp(quant_min, quant_max).to(torch.int32)
    return scale, zero_point
