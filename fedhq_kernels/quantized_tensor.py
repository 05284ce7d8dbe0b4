"""QuantizedTensor: integer codes plus what it takes to turn them back into floats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedhq_kernels.checks import FLOAT_DTYPES, MAX_BITS, MIN_BITS, check_bits, check_float_dtype, is_int, valid_bits  # noqa: F401  (check_bits: re-exported)


def quant_range(bits: int) -> tuple[int, int]:
    """The signed code range of ``bits``-bit quantization: [-2^(b-1), 2^(b-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def input_ranges(op: str, bits, count: int, names: list[str]) -> list[tuple[int, int]]:
    """The code range of each of the aggregate op's ``count`` client-major entries (entry
    e: client e // T's tensor ``names[e % T]``), from its bit width ``bits[e]``: clients
    may send the same tensor at different widths. ValueError naming a bad entry."""
    if len(bits) != count:
        raise ValueError(f"{op}: expected {count} bit widths (one per client x tensor), got {len(bits)}")
    ranges = []
    for e, b in enumerate(bits):
        if not valid_bits(b):
            owner = f"client {e // len(names)}'s '{names[e % len(names)]}'"
            raise ValueError(f"{op}: {owner} bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
        ranges.append(quant_range(b))
    return ranges


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
        problem = self._metadata_problem("QuantizedTensor", "the")
        if problem is not None:
            raise problem[0](problem[1])

    def _metadata_problem(self, op: str, owner: str) -> tuple[type, str] | None:
        """(error type, message) of the first field that breaks the class's contract."""
        where = f"{op}: {owner}"
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.int8:
            return TypeError, f"{where} data must be an int8 tensor, got {_describe(self.data)}"
        shape = tuple(self.shape) if isinstance(self.shape, tuple) else self.shape
        if tuple(self.data.shape) != shape:
            return ValueError, f"{where} data shape {tuple(self.data.shape)} != shape {shape!r}"
        if not valid_bits(self.bits):
            return ValueError, f"{where} bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}"
        if not isinstance(self.symmetric, bool):
            return TypeError, f"{where} symmetric must be a bool, got {self.symmetric!r}"
        if self.axis is not None and not (is_int(self.axis) and 0 <= self.axis < len(self.shape)):
            return ValueError, f"{where} axis must be None or in [0, {len(self.shape)}), got {self.axis!r}"
        expected = () if self.axis is None else (self.shape[self.axis],)
        for name, value, dtype in (("scale", self.scale, torch.float32), ("zero_point", self.zero_point, torch.int32)):
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != expected:
                return (
                    ValueError,
                    f"{where} {name} must be a {dtype} tensor of shape {expected}, got {_describe(value)}",
                )
        if self.dtype in FLOAT_DTYPES:  # the common case first: the message below costs string work per call
            return None
        try:
            check_float_dtype(op, self.dtype, owner.replace("{", "{{").replace("}", "}}") + " dtype must be {}")
        except TypeError as error:
            return TypeError, str(error)
        return None

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

    def validate(self, op: str = "QuantizedTensor", owner: str = "the") -> None:
        """ValueError (``op: owner ...``, one line) unless every field is what the kernels
        rely on: the construction checks (the object may have been altered since), one
        device, finite scales > 0, zero points and codes in the ``bits`` range. The check
        a server runs on an untrusted update; reads the values back (one sync)."""
        validate_all([self], op, [owner])

    def check_codes(self) -> None:
        """``validate()``, under its older name."""
        self.validate()

    def _raise_bad_values(self, op: str, owner: str) -> None:
        """ValueError naming the first bad scale, zero point or code, if any."""
        qmin, qmax = self.quant_range
        scale, zero_point = self.scale.reshape(-1), self.zero_point.reshape(-1)
        for name, bad, values in (
            ("scale", ~(torch.isfinite(scale) & (scale > 0)), scale),
            ("zero_point", (zero_point < qmin) | (zero_point > qmax), zero_point),
        ):
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                at = f" at channel {i}" if values.numel() > 1 else ""
                rule = "must be finite and > 0" if name == "scale" else f"must lie in [{qmin}, {qmax}]"
                raise ValueError(f"{op}: {owner} {name} {rule}, got {values[i].item():g}{at}")
        if self.data.numel() and bool((self.data.min() < qmin) | (self.data.max() > qmax)):
            raise ValueError(f"{op}: {owner} data holds codes outside the {self.bits}-bit range [{qmin}, {qmax}]")


def validate_all(tensors: list[QuantizedTensor], op: str, owners: list[str]) -> None:
    """QuantizedTensor.validate of each tensor (``owners[i]`` names tensor i), the values
    checked in one batch per bit width with a single read-back."""
    for q, owner in zip(tensors, owners):
        problem = q._metadata_problem(op, owner)
        if problem is not None:
            raise ValueError(problem[1])
        for name, value in (("scale", q.scale), ("zero_point", q.zero_point)):
            if value.device != q.data.device:
                raise ValueError(f"{op}: {owner} {name} is on {value.device}, the data on {q.data.device}")
    by_bits: dict[int, list[QuantizedTensor]] = {}
    for q in tensors:
        by_bits.setdefault(q.bits, []).append(q)
    flags = []
    for bits, group in by_bits.items():
        qmin, qmax = quant_range(bits)
        scale = torch.cat([q.scale.reshape(-1) for q in group])
        zero_point = torch.cat([q.zero_point.reshape(-1) for q in group])
        flags += [(~(torch.isfinite(scale) & (scale > 0))).any(), ((zero_point < qmin) | (zero_point > qmax)).any()]
        if bits < 8:  # every int8 is an 8-bit code; min / max are faster than aminmax on int8
            flags += [(q.data.min() < qmin) | (q.data.max() > qmax) for q in group if q.data.numel()]
    if flags and bool(torch.stack([f.to(flags[0].device) for f in flags]).any()):
        for q, owner in zip(tensors, owners):
            q._raise_bad_values(op, owner)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
