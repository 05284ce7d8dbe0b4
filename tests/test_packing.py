"""Bit packing of codes (fedhq_kernels.packing) against a bit-by-bit reference in plain
Python, every width, odd sizes, non-contiguous input, and bad input."""

import dataclasses

import pytest
import torch

import fedhq_kernels as fk
from fedhq_kernels.packing import packed_size

SIZES = (0, 1, 7, 8, 9, 63, 1001)


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The stream written one bit at a time: code i's two's complement at bits
    [i*bits, (i+1)*bits), LSB first."""
    stream = [(c >> k) & 1 for c in codes for k in range(bits)]  # Python ints: bit k of c's two's complement
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8))


def random_codes(gen, bits: int, shape) -> torch.Tensor:
    qmin, qmax = fk.quant_range(bits)
    return torch.randint(qmin, qmax + 1, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", SIZES)
def test_pack_matches_the_bitwise_reference_and_unpacks_exactly(gen, bits, n):
    codes = random_codes(gen, bits, (n,))
    packed = fk.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_size(n, bits),)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    assert torch.equal(fk.unpack_codes(packed, bits, (n,)), codes)


@pytest.mark.parametrize("bits", (3, 4, 8))
def test_shapes_and_non_contiguous_codes(gen, bits):
    codes = random_codes(gen, bits, (5, 7, 3)).transpose(0, 2)  # non-contiguous
    packed = fk.pack_codes(codes, bits)
    assert bytes(packed.tolist()) == reference_pack(codes.reshape(-1).tolist(), bits)
    assert torch.equal(fk.unpack_codes(packed, bits, codes.shape), codes)
    scalar = random_codes(gen, bits, ())
    assert torch.equal(fk.unpack_codes(fk.pack_codes(scalar, bits), bits, ()), scalar)


def test_eight_bit_codes_are_read_without_a_copy_and_packed_into_a_new_tensor(gen):
    codes = random_codes(gen, 8, (33,))
    packed = fk.pack_codes(codes, 8)
    assert packed.data_ptr() != codes.data_ptr()  # the caller may reuse its codes
    codes_back = fk.unpack_codes(packed, 8, (3, 11))
    assert codes_back.data_ptr() == packed.data_ptr()  # a server reads uploads in place
    assert torch.equal(codes_back, codes.view(3, 11))


def test_every_byte_unpacks_to_a_code_in_range():
    every = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    for bits in range(2, 9):
        qmin, qmax = fk.quant_range(bits)
        stream = every.repeat(bits)  # 256 * bits bytes hold exactly 2048 codes: no padding
        codes = fk.unpack_codes(stream, bits, (2048,))
        assert int(codes.min()) == qmin and int(codes.max()) == qmax, bits
        assert torch.equal(fk.pack_codes(codes, bits), stream), bits


def test_extremes_of_the_range_survive(gen):
    for bits in range(2, 9):
        qmin, qmax = fk.quant_range(bits)
        codes = torch.tensor([qmin, qmax, qmin, qmax, 0, -1, qmax, qmin, qmin], dtype=torch.int8)
        assert torch.equal(fk.unpack_codes(fk.pack_codes(codes, bits), bits, (9,)), codes), bits


@pytest.mark.parametrize("bits, symmetric, axis", [(8, True, 0), (4, True, 0), (3, False, None), (2, True, None)])
def test_nbytes_is_what_travels(gen, bits, symmetric, axis):
    q = fk.quantize(torch.randn(6, 13, generator=gen), bits=bits, symmetric=symmetric, axis=axis)
    channels = 6 if axis == 0 else 1
    assert q.nbytes == fk.pack_codes(q.data, bits).numel() + 8 * channels
    assert q.nbytes == -(-78 * bits // 8) + 8 * channels


def test_a_mixed_bits_state_dict_travels_per_tensor_and_aggregates_after_the_trip(backend, gen):
    """Each tensor packs at its own width (nbytes is its packed codes plus 8 bytes per
    channel); unpacked, the clients aggregate exactly as before the round trip."""
    shapes = {"conv": (8, 3, 3, 3), "fc": (10, 33), "bias": (10,), "odd": (7, 1)}
    sds = []
    for _ in range(3):
        widths = {name: int(torch.randint(2, 9, (), generator=gen)) for name in shapes}
        floats = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        sds.append(fk.quantize_state_dict({**floats, "count": torch.tensor(4)}, bits=widths))
    travelled = []
    for sd in sds:
        received = {}
        for name, q in sd.items():
            if not isinstance(q, fk.QuantizedTensor):
                received[name] = q
                continue
            packed = fk.pack_codes(q.data, q.bits)
            channels = q.scale.numel()
            assert packed.numel() == -(-q.data.numel() * q.bits // 8), name
            assert q.nbytes == packed.numel() + 8 * channels, name
            received[name] = dataclasses.replace(q, data=fk.unpack_codes(packed, q.bits, q.shape))
        travelled.append(received)
    for bits in (None, 4):
        before = fk.aggregate_state_dicts(sds, [1, 2, 3], bits=bits)
        after = fk.aggregate_state_dicts(travelled, [1, 2, 3], bits=bits)
        for name in shapes:
            assert after[name].bits == (max(sd[name].bits for sd in sds) if bits is None else bits)
            for field in ("data", "scale", "zero_point"):
                assert torch.equal(getattr(after[name], field), getattr(before[name], field)), (name, field)


def test_bad_input_is_refused(gen):
    with pytest.raises(TypeError, match="int8 tensor"):
        fk.pack_codes(torch.zeros(4), 4)
    with pytest.raises(ValueError, match=r"4-bit range \[-8, 7\]"):
        fk.pack_codes(torch.tensor([0, 8], dtype=torch.int8), 4)
    for bits in (1, 9, True, 4.0):
        with pytest.raises(ValueError, match="bits must be an int"):
            fk.pack_codes(torch.zeros(4, dtype=torch.int8), bits)
    packed = fk.pack_codes(random_codes(gen, 5, (10,)), 5)
    with pytest.raises(ValueError, match="take 7 bytes, got 6"):
        fk.unpack_codes(packed[:6], 5, (10,))
    with pytest.raises(TypeError, match="1-D uint8"):
        fk.unpack_codes(packed.to(torch.int8), 5, (10,))
    with pytest.raises(TypeError, match="1-D uint8"):
        fk.unpack_codes(packed.view(1, 7), 5, (10,))
    with pytest.raises(ValueError, match="padding bits"):
        fk.unpack_codes(torch.tensor([0, 0x80], dtype=torch.uint8), 3, (5,))  # 15 bits used, bit 15 set


@pytest.mark.gpu
def test_on_a_gpu_the_bytes_are_the_cpus(gen):
    for bits in range(2, 9):
        codes = random_codes(gen, bits, (4099,))
        packed = fk.pack_codes(codes.cuda(), bits)
        assert packed.is_cuda and torch.equal(packed.cpu(), fk.pack_codes(codes, bits)), bits
        assert torch.equal(fk.unpack_codes(packed, bits, codes.shape).cpu(), codes), bits


def test_unpacking_allocates_only_the_int8_codes():
    """Issue 15: 16 MB of 2-bit codes cost +1.3 GB through int64 temporaries. Measured in
    a fresh process: peak memory grows by the int8 result (32 MB here) and little more."""
    import subprocess
    import sys

    script = (
        "import resource, torch\n"
        "from fedhq_kernels.packing import unpack_codes\n"
        "packed = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8)\n"
        "unpack_codes(packed[:64], 2, (256,))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "codes = unpack_codes(packed, 2, (32 << 20,))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    grown_mb = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 32 + 16, grown_mb
