"""The weighted mean's arithmetic, one home for the one-shot call
(``aggregate_state_dicts``) and the streaming ``Aggregator``: a running mean that never
needs the total weight in advance (docs/kernels.md, "The weighted mean").

Client k, with weight w_k, enters with its fraction b_k = w_k / (w_1 + ... + w_k) of the
weight seen so far (the total kept exactly, as a Fraction: no overflow, no rounding),
rounded once to float32; the mean becomes (1 - b_k) * mean + b_k * x_k.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from fedhq_kernels.checks import is_int, is_real


class WeightTotal:
    """The exact running total of the clients' weights (immutable: ``add`` returns the
    new total, so a refused client leaves it as it was)."""

    def __init__(self, total: Fraction = Fraction(0)):
        self.total = total

    def add(self, op: str, weight) -> tuple[float, WeightTotal]:
        """The new client's fraction b (a float32 value; 0 while the total is 0) and the
        total with ``weight`` (a finite number >= 0) added."""
        if not (is_real(weight) and weight >= 0):
            raise ValueError(f"{op}: a weight must be a finite number >= 0, got {weight!r}")
        w = Fraction(int(weight)) if is_int(weight) else Fraction(float(weight))
        total = self.total + w
        return (to_float32(w / total) if total else 0.0), WeightTotal(total)


def to_float32(value) -> float:
    return torch.tensor(float(value), dtype=torch.float32).item()


class PlainMean:
    """The running weighted mean of one unquantized entry: floats (e.g. BatchNorm
    statistics) in float32, as the quantized kernels blend; integers (e.g.
    num_batches_tracked) in float64, rounded half to even and saturated to their dtype,
    and a value every client shares is kept exactly."""

    def __init__(self, template: Tensor, device: torch.device):
        self.dtype, self.device = template.dtype, template.device
        floating = template.is_floating_point()
        self.acc = torch.zeros(template.shape, dtype=torch.float32 if floating else torch.float64, device=device)
        self.first: Tensor | None = None  # integers: the first client's value
        self.shared: Tensor | None = None  # integers: where every client so far had that value

    def add(self, value: Tensor, fraction: float) -> None:
        value = value.to(device=self.acc.device)
        if fraction:  # a client of weight 0 leaves the mean as it is (0 * a NaN would not)
            b = torch.tensor(fraction, dtype=self.acc.dtype, device=self.acc.device)
            self.acc = (1 - b) * self.acc + b * value.to(self.acc.dtype)
        if not self.dtype.is_floating_point:
            if self.first is None:
                self.first, self.shared = value.clone(), torch.ones_like(value, dtype=torch.bool)
            else:
                self.shared &= value == self.first

    def result(self) -> Tensor:
        if self.dtype.is_floating_point:
            return self.acc.to(device=self.device, dtype=self.dtype, copy=True)  # never the accumulator itself
        out = torch.where(self.shared, self.first, saturate(self.acc, self.dtype))
        return out.to(device=self.device)


def saturate(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 values rounded, then clamped to ``dtype``'s range (no wrap-around)."""
    info = torch.iinfo(dtype)
    r = torch.round(values)
    above, below = r >= float(info.max) + 1, r < info.min  # both bounds exact in float64
    out = torch.where(above | below, 0.0, r).to(torch.int64)
    out = torch.where(above, info.max, torch.where(below, info.min, out))
    return out.to(dtype)
