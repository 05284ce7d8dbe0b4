"""QuantizedTensor: integer codes plus what it takes to turn them back into floats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedhq_kernels.checks import MAX_BITS, MIN_BITS, check_bits, check_float_dtype, is_int  # noqa: F401  (re-exported)


def quant_range(bits: int) -> tuple[int, int]:
    """The signed code range of ``bits``-bit quantization: [-2^(b-1), 2^(b-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take packed (``fedhq_kernels.packing``)."""
    return -(-numel * check_bits("packed_size", bits) // 8)


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor quantized with ``bits`` bits, per-tensor (``axis`` None) or per channel
    along ``axis``; ``dequantize`` gives back (code - zero_point) * scale as ``dtype``.

    In memory every code takes one int8; on the wire (``nbytes``, Flower records) codes
    are packed to ``bits`` bits each (``fedhq_kernels.packing``).
    """

    data: torch.Tensor  # int8 codes, shape == self.shape
    scale: torch.Tensor  # float32: 0-d per-tensor, [C] per-channel
    zero_point: torch.Tensor  # int32, same shape as scale
    bits: int
    axis: int | None  # normalized to 0 <= axis < ndim
    symmetric: bool  # how the range was chosen; aggregation requantizes the same way
    dtype: torch.dtype  # the original float dtype
    shape: torch.Size

    def __post_init__(self):
        # Metadata only: checking values would read the data (and sync a GPU).
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.int8:
            raise TypeError(f"QuantizedTensor: data must be an int8 tensor, got {_describe(self.data)}")
        if tuple(self.data.shape) != tuple(self.shape):
            raise ValueError(f"QuantizedTensor: data shape {tuple(self.data.shape)} != shape {tuple(self.shape)}")
        check_bits("QuantizedTensor", self.bits)
        if self.axis is not None and not (is_int(self.axis) and 0 <= self.axis < len(self.shape)):
            raise ValueError(f"QuantizedTensor: axis must be None or in [0, {len(self.shape)}), got {self.axis!r}")
        expected = () if self.axis is None else (self.shape[self.axis],)
        for name, value, dtype in (("scale", self.scale, torch.float32), ("zero_point", self.zero_point, torch.int32)):
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != expected:
                raise ValueError(
                    f"QuantizedTensor: {name} must be a {dtype} tensor of shape {expected}, got {_describe(value)}"
                )
        check_float_dtype("QuantizedTensor", self.dtype, "dtype must be {}")

    @property
    def quant_range(self) -> tuple[int, int]:
        return quant_range(self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the codes packed to ``bits`` bits each, scales and zero points."""
        return packed_size(self.data.numel(), self.bits) + sum(
            t.numel() * t.element_size() for t in (self.scale, self.zero_point)
        )

    def dequantize(self) -> torch.Tensor:
        from fedhq_kernels.functional import dequantize

        return dequantize(self)

    def check_codes(self) -> None:
        """Raises ValueError if a code lies outside the ``bits`` range or a scale or zero
        point is invalid: the check a server runs on an untrusted update. Reads the data."""
        qmin, qmax = self.quant_range
        if self.data.numel() and not bool(((self.data >= qmin) & (self.data <= qmax)).all()):
            raise ValueError(f"QuantizedTensor: codes outside the {self.bits}-bit range [{qmin}, {qmax}]")
        if not bool((torch.isfinite(self.scale) & (self.scale > 0)).all()):
            raise ValueError("QuantizedTensor: scales must be finite and > 0")
        if not bool(((self.zero_point >= qmin) & (self.zero_point <= qmax)).all()):
            raise ValueError(f"QuantizedTensor: zero points outside [{qmin}, {qmax}]")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
