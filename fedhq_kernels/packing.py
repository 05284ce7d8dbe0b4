"""Bit packing of quantization codes: what a ``bits``-bit upload costs on the wire.

``pack_codes`` turns int8 codes of ``bits`` bits into a little-endian bit stream of
ceil(n * bits / 8) bytes: code i, as its ``bits``-bit two's complement (its low ``bits``
bits), occupies bits [i * bits, (i + 1) * bits) of the stream, least significant bit
first. ``unpack_codes`` is its exact inverse. 8-bit codes are their own bytes, so a
server reads them without a copy (``unpack_codes`` returns a view). Eight codes always
fill exactly ``bits`` bytes, so below 8 bits both work on groups of eight:
``pack_codes`` through one int64 word each (at most 56 bits, no overflow),
``unpack_codes`` one code position at a time in uint8 (it reads untrusted uploads: no
temporaries wider than the codes).

Plain torch, on any device: this runs once per upload, not in a training step.
"""

from __future__ import annotations

import math

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
        return flat.view(torch.uint8).clone()
    groups = -(-n // GROUP)
    unsigned = torch.zeros(groups * GROUP, dtype=torch.int64, device=codes.device)
    unsigned[:n] = flat.to(torch.int64) & ((1 << bits) - 1)
    shifts = torch.arange(GROUP, device=codes.device, dtype=torch.int64) * bits
    words = (unsigned.view(groups, GROUP) << shifts).sum(dim=1)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    stream = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: packed_size(n, bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The int8 codes of ``shape`` held by ``packed`` (1-D uint8 from ``pack_codes``);
    ValueError if its length is not exactly what ``shape`` needs or its padding bits are set.
    The length is checked before anything is allocated. At 8 bits the result is a view of
    ``packed`` (no copy); below, the only allocation the size of the codes is the int8
    result (the work is done one code position of a group at a time)."""
    bits = check_bits("unpack_codes", bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack_codes: packed must be a 1-D uint8 tensor, got {_describe(packed)}")
    dims = tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise ValueError(f"unpack_codes: shape must hold ints >= 0, got {dims}")
    n = math.prod(dims)  # a Python int: torch.Size.numel() wraps around past 2**63
    if packed.numel() != packed_size(n, bits):
        raise ValueError(
            f"unpack_codes: {n} codes of {bits} bits take {packed_size(n, bits)} bytes, got {packed.numel()}"
        )
    if bits == 8:
        return packed.view(torch.int8).reshape(dims)
    groups = -(-n // GROUP)
    stream = packed
    if groups * bits != packed.numel():  # the last group's missing bytes read as zero
        stream = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
        stream[: packed.numel()] = packed
    stream = stream.view(groups, bits)
    mask = (1 << bits) - 1
    out = torch.empty(groups, GROUP, dtype=torch.int8, device=packed.device)
    for j in range(GROUP):  # code j of a group: bits [j * bits, (j + 1) * bits) of its bytes
        byte, shift = divmod(j * bits, 8)
        value = stream[:, byte] >> shift
        if shift + bits > 8:  # it runs on into the next byte (uint8 shifts drop the high bits)
            value = value | (stream[:, byte + 1] << (8 - shift))
        out[:, j] = value & mask
    out = out.view(-1)
    if bool((out[n:] != 0).any()):
        raise ValueError("unpack_codes: the padding bits after the last code are not zero")
    sign = 1 << (bits - 1)  # sign extension of a bits-bit two's complement v: (v ^ sign) - sign
    return out[:n].bitwise_xor_(sign).sub_(sign).reshape(dims)
