"""Bit packing of quantization codes: what a ``bits``-bit upload costs on the wire.

``pack_codes`` turns int8 codes of ``bits`` bits into a little-endian bit stream of
ceil(n * bits / 8) bytes: code i, offset to unsigned (code - qmin), occupies bits
[i * bits, (i + 1) * bits) of the stream, least significant bit first. ``unpack_codes``
is its exact inverse. Eight codes always fill exactly ``bits`` bytes, so below 8 bits
both work on groups of eight through one int64 word each (at most 56 bits, no
overflow); 8-bit codes are one byte each already.

Plain torch, on any device: this runs once per upload, not in a training step.
"""

from __future__ import annotations

import torch

from fedhq_kernels.checks import check_bits
from fedhq_kernels.quantized_tensor import _describe, packed_size, quant_range

GROUP = 8  # codes per group; a group is exactly ``bits`` bytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The packed bytes (1-D uint8) of ``codes``, an int8 tensor of any shape whose values
    lie in the signed ``bits``-bit range; ValueError names a code outside it."""
    bits = check_bits("pack_codes", bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        raise TypeError(f"pack_codes: codes must be an int8 tensor, got {_describe(codes)}")
    qmin, qmax = quant_range(bits)
    flat = codes.reshape(-1)
    if flat.numel() and not bool(((flat >= qmin) & (flat <= qmax)).all()):
        raise ValueError(f"pack_codes: codes outside the {bits}-bit range [{qmin}, {qmax}]")
    n = flat.numel()
    if bits == 8:
        return (flat.to(torch.int16) - qmin).to(torch.uint8)
    groups = -(-n // GROUP)
    unsigned = torch.zeros(groups * GROUP, dtype=torch.int64, device=codes.device)
    unsigned[:n] = flat.to(torch.int64) - qmin
    shifts = torch.arange(GROUP, device=codes.device, dtype=torch.int64) * bits
    words = (unsigned.view(groups, GROUP) << shifts).sum(dim=1)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    stream = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: packed_size(n, bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The int8 codes of ``shape`` held by ``packed`` (1-D uint8 from ``pack_codes``);
    ValueError if its length is not exactly what ``shape`` needs or its padding bits are set."""
    bits = check_bits("unpack_codes", bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack_codes: packed must be a 1-D uint8 tensor, got {_describe(packed)}")
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.numel() != packed_size(n, bits):
        raise ValueError(
            f"unpack_codes: {n} codes of {bits} bits take {packed_size(n, bits)} bytes, got {packed.numel()}"
        )
    if bits == 8:
        return (packed.to(torch.int16) + quant_range(8)[0]).to(torch.int8).reshape(shape)
    groups = -(-n // GROUP)
    stream = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    stream[: packed.numel()] = packed.to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (stream.view(groups, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(GROUP, device=packed.device, dtype=torch.int64) * bits
    unsigned = ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if bool((unsigned[n:] != 0).any()):
        raise ValueError("unpack_codes: the padding bits after the last code are not zero")
    return (unsigned[:n] + quant_range(bits)[0]).to(torch.int8).reshape(shape)
