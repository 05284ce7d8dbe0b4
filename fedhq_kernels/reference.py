"""Plain-torch twin of every fedhq_kernels op: the oracle the tests compare the
compiled backends against, and the ``reference`` backend that runs anywhere. Written
for clarity, with the kernels' float32 operations in the same order, so results are
bit-identical (docs/kernels.md, "Exactness").
"""

from __future__ import annotations

import sys

import torch

from fedhq_kernels.optable import op_table
from fedhq_kernels.qparams import SCALE_EPS, qparams_from_range  # noqa: F401  (SCALE_EPS: re-exported)
from fedhq_kernels.quantized_tensor import input_ranges

DEVICES = ("cpu", "cuda")
UNAVAILABLE = None


def _along(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-tensor (0-d) or per-channel ([C]) parameter shaped to broadcast against x."""
    if axis < 0:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def check_qparams(
    op: str, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, owner: str = "the"
) -> None:
    """Values the kernels rely on: finite positive scales, zero points inside the range.
    ``owner`` says whose parameters they are in the message."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        where = f" at channel {i}" if scale.numel() > 1 else ""
        raise ValueError(f"{op}: {owner} scale must be finite and > 0, got {scale.flatten()[i].item()}{where}")
    bad = (zero_point < quant_min) | (zero_point > quant_max)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        where = f" at channel {i}" if zero_point.numel() > 1 else ""
        raise ValueError(
            f"{op}: {owner} zero_point must lie in [{quant_min}, {quant_max}], "
            f"got {zero_point.flatten()[i].item()}{where}"
        )


def _unclamped_code(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int):
    """zero_point + round(x / scale) in float32, saturated to [qmin - 1, qmax + 1]
    (NaN -> qmin - 1), as the kernels compute it."""
    v = x.float() * torch.reciprocal(scale)
    lo, hi = quant_min - zero_point - 1, quant_max - zero_point + 1
    v = torch.where(v > lo, v, lo)
    v = torch.where(v < hi, v, hi)
    return torch.round(v) + zero_point


def _fake_quant_float(x, scale, zero_point, quant_min, quant_max):
    code = _unclamped_code(x, scale, zero_point, quant_min, quant_max)
    return (code.clamp(quant_min, quant_max) - zero_point) * scale


def fake_quant(x, scale, zero_point, quant_min, quant_max, axis):
    check_qparams("fake_quant", scale, zero_point, quant_min, quant_max)
    s, z = _along(scale.float(), x.dim(), axis), _along(zero_point.float(), x.dim(), axis)
    return _fake_quant_float(x, s, z, quant_min, quant_max).to(x.dtype)


def fake_quant_out(x, scale, zero_point, quant_min, quant_max, axis, out):
    out.copy_(fake_quant(x, scale, zero_point, quant_min, quant_max, axis))


def fake_quant_backward(grad, x, scale, zero_point, quant_min, quant_max, axis):
    check_qparams("fake_quant_backward", scale, zero_point, quant_min, quant_max)
    s, z = _along(scale.float(), x.dim(), axis), _along(zero_point.float(), x.dim(), axis)
    code = _unclamped_code(x, s, z, quant_min, quant_max)
    mask = (code >= quant_min) & (code <= quant_max)
    # grad * mask, as PyTorch computes it: a NaN gradient stays NaN where masked
    return (grad.to(x.dtype) * mask).contiguous()


def observe_range(op: str, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of x (per channel along axis, or of the whole tensor)."""
    xf = x.float()
    if axis < 0:
        lo, hi = (xf.min(), xf.max()) if x.numel() else (torch.zeros(()), torch.zeros(()))
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        if not dims:  # 1-d, one channel per element (amin over no dims would reduce all)
            lo = hi = xf
        elif x.numel():
            lo, hi = xf.amin(dim=dims), xf.amax(dim=dims)
        else:
            lo = hi = torch.zeros(x.shape[axis], device=x.device)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError(f"{op}: the input contains NaN or Inf, so its range cannot be observed")
    return lo, hi


def fake_quant_observed(x, quant_min, quant_max, symmetric, axis):
    scale, zero_point = qparams_from_range(*observe_range("fake_quant", x, axis), symmetric, quant_min, quant_max)
    return fake_quant(x, scale, zero_point, quant_min, quant_max, axis), scale, zero_point


def fake_quant_observed_out(x, quant_min, quant_max, symmetric, axis, out):
    y, scale, zero_point = fake_quant_observed(x, quant_min, quant_max, symmetric, axis)
    out.copy_(y)
    return scale, zero_point


def _quantize_float(x, scale, zero_point, quant_min, quant_max, axis):
    s, z = _along(scale, x.dim(), axis), _along(zero_point.float(), x.dim(), axis)
    return _unclamped_code(x, s, z, quant_min, quant_max).clamp(quant_min, quant_max).to(torch.int8)


def quantize(x, quant_min, quant_max, symmetric, axis):
    scale, zero_point = qparams_from_range(*observe_range("quantize", x, axis), symmetric, quant_min, quant_max)
    return _quantize_float(x, scale, zero_point, quant_min, quant_max, axis), scale, zero_point


def _dequantize_float(codes, scale, zero_point, axis):
    s, z = _along(scale.float(), codes.dim(), axis), _along(zero_point.float(), codes.dim(), axis)
    return (codes.float() - z) * s


def dequantize(codes, scale, zero_point, axis, dtype):
    check_qparams("dequantize", scale, zero_point, -128, 127)
    return _dequantize_float(codes, scale, zero_point, axis).to(dtype)


def dequantize_out(codes, scale, zero_point, axis, out):
    out.copy_(dequantize(codes, scale, zero_point, axis, out.dtype))


def _trimmed_mean(values: list[torch.Tensor], trim: int) -> torch.Tensor:
    """Coordinate-wise over the clients: sort, drop ``trim`` values from each end, sum
    the rest in ascending order in float32 from +0, divide by their count."""
    ordered = torch.sort(torch.stack(values), dim=0).values
    acc = torch.zeros_like(values[0])
    for r in range(trim, len(values) - trim):
        acc = acc + ordered[r]
    return acc / float(len(values) - 2 * trim)


def _blend(acc: torch.Tensor, values: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """One step of the running weighted mean, in float32: (1 - b) * acc + b * values,
    b the client's fraction of the weight seen so far (docs/kernels.md, "The weighted
    mean")."""
    return (1 - fraction) * acc + fraction * values


def accumulate(acc, codes, scales, zero_points, axes, fraction, names):
    """One client's update blended into the packed float32 running mean ``acc`` (every
    tensor's elements one after another), in place: acc = _blend(acc, dequantized
    codes, fraction). Every parameter is checked before acc is touched."""
    for t in range(len(axes)):
        check_qparams("accumulate", scales[t], zero_points[t], -128, 127, f"the update's '{names[t]}'")
    b = torch.tensor(fraction, dtype=torch.float32)
    start = 0
    for t, axis in enumerate(axes):
        part = acc[start : start + codes[t].numel()].view(codes[t].shape)
        part.copy_(_blend(part, _dequantize_float(codes[t], scales[t], zero_points[t], axis), b.to(acc.device)))
        start += codes[t].numel()


def aggregate(codes, scales, zero_points, weights, axes, bits, quant_min, quant_max, symmetric, names, trim=-1):
    """Entry e = k * T + t (client k's tensor t) holds ``bits[e]``-bit codes, its zero
    points checked against that width's range: clients may quantize a tensor at
    different widths. Per tensor t: with trim < 0, the running weighted mean: acc = 0, then for each
    client k in order acc = _blend(acc, dequantize(client k's codes), weights[k]), the
    weights being the clients' running fractions (functional.running_fractions), as
    successive ``accumulate`` calls compute it; with trim >= 0, the unweighted trimmed
    mean of the dequantized values (_trimmed_mean; the median is trim = (K - 1) // 2).
    Then acc is requantized with its freshly observed range in [quant_min, quant_max]
    (one output range for every tensor of the call). Outputs are packed: every
    tensor's codes flattened one after another, and its scales / zero points likewise."""
    if trim >= 0 and not 2 * trim < weights.numel():
        raise ValueError(f"aggregate: trimming {trim} of {weights.numel()} clients from each end leaves none")
    tensors, clients = len(axes), weights.numel()
    ranges = input_ranges("aggregate", bits, clients * tensors, names)
    w = weights.float()
    out_codes, out_scales, out_zero_points = [], [], []
    for t in range(tensors):
        axis = axes[t]
        acc = torch.zeros(codes[t].shape, dtype=torch.float32, device=codes[t].device)
        values = []
        for k in range(clients):
            e = k * tensors + t
            owner = f"client {k}'s '{names[t]}'"
            check_qparams("aggregate", scales[e], zero_points[e], *ranges[e], owner)
            values.append(_dequantize_float(codes[e], scales[e], zero_points[e], axis))
            if trim < 0:
                acc = _blend(acc, values[-1], w[k])
        if trim >= 0:
            acc = _trimmed_mean(values, trim)
        try:
            lo, hi = observe_range("aggregate", acc, axis)
        except ValueError:
            raise ValueError(
                f"aggregate: the weighted average of '{names[t]}' is not finite (client scales too large for float32)"
            ) from None
        scale, zero_point = qparams_from_range(lo, hi, symmetric, quant_min, quant_max)
        out_codes.append(_quantize_float(acc, scale, zero_point, quant_min, quant_max, axis).flatten())
        out_scales.append(scale.flatten())
        out_zero_points.append(zero_point.flatten())
    device = weights.device
    empty = torch.empty(0, device=device)
    return (
        torch.cat(out_codes) if out_codes else empty.to(torch.int8),
        torch.cat(out_scales) if out_scales else empty.float(),
        torch.cat(out_zero_points) if out_zero_points else empty.to(torch.int32),
    )


KERNELS = op_table(sys.modules[__name__])
