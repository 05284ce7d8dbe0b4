"""quantize / dequantize against torch.quantize_per_{tensor,channel} and
torch.dequantize, QuantizedTensor's checks, and the state-dict helpers."""

import dataclasses

import pytest
import torch
from conftest import assert_equal
from test_fake_quant import DTYPES, PER_CHANNEL

import fedhq_kernels as fk
from fedhq_kernels import reference


def torch_codes(x, q: fk.QuantizedTensor):
    """The codes PyTorch's fake quantization implies for q's parameters: recovered
    exactly from its float32 output, (code - zero_point) * scale."""
    if q.axis is None:
        out = torch.fake_quantize_per_tensor_affine(x.float(), q.scale, q.zero_point, -128, 127)
        scale, zero_point = q.scale, q.zero_point
    else:
        out = torch.fake_quantize_per_channel_affine(x.float(), q.scale, q.zero_point, q.axis, -128, 127)
        shape = [-1 if d == q.axis else 1 for d in range(x.dim())]
        scale, zero_point = q.scale.reshape(shape), q.zero_point.reshape(shape)
    return (torch.round(out / scale) + zero_point).to(torch.int8)


def torch_quantized(codes, q: fk.QuantizedTensor):
    """A PyTorch quantized tensor holding ``codes`` with q's parameters."""
    if q.axis is None:
        return torch._make_per_tensor_quantized_tensor(codes, q.scale.item(), int(q.zero_point))
    return torch._make_per_channel_quantized_tensor(codes, q.scale.double(), q.zero_point.long(), q.axis)


def torch_quantize(x, q: fk.QuantizedTensor):
    if q.axis is None:
        return torch.quantize_per_tensor(x.float(), q.scale.item(), int(q.zero_point), torch.qint8)
    return torch.quantize_per_channel(x.float(), q.scale.double(), q.zero_point.long(), q.axis, torch.qint8)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((), None), ((1,), None), ((70001,), None), ((9, 31), None)] + PER_CHANNEL)
def test_quantize_matches_torch(backend, gen, symmetric, dtype, shape, axis):
    x = (torch.randn(shape, generator=gen) * 4 + 1).to(dtype)
    q = fk.quantize(x, symmetric=symmetric, axis=axis)
    assert (q.bits, q.axis, q.symmetric, q.dtype, q.shape) == (8, axis, symmetric, dtype, x.shape)
    expected_scale, expected_zero_point = reference.qparams_from_range(
        *reference.observe_range("quantize", x, -1 if axis is None else axis), symmetric, -128, 127
    )
    assert_equal(q.scale, expected_scale, "scale")
    assert_equal(q.zero_point, expected_zero_point, "zero point")
    # codes: exactly those of PyTorch's fake quantization (so that dequantize(quantize(x))
    # == fake_quant(x)); torch.quantize_per_* may differ by one code, and only where
    # x / scale is within float32 rounding of a tie (it rounds x / scale, not x * (1 / scale))
    assert_equal(q.data, torch_codes(x, q), "codes")
    if not (len(shape) == 1 and axis == 0):  # torch.quantize_per_channel cannot take 1-d tensors
        theirs = torch_quantize(x, q).int_repr()
        differ = (q.data.int() - theirs.int()).abs()
        shape_c = [-1 if d == axis else 1 for d in range(x.dim())] if axis is not None else []
        ratio = x.double() / q.scale.double().reshape(shape_c)
        near_tie = (ratio - ratio.floor() - 0.5).abs() <= 4e-7 * ratio.abs().clamp(min=1)
        assert int(differ.max()) <= 1 and bool(near_tie[differ > 0].all())
    # dequantize is (code - zero_point) * scale in float32, like torch.dequantize
    assert_equal(fk.dequantize(q), torch_quantized(q.data, q).dequantize().to(dtype), "dequantized")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [None, 1])
def test_low_bit_codes_stay_in_range(backend, gen, bits, axis):
    x = torch.randn(17, 500, generator=gen) * 10
    q = fk.quantize(x, bits=bits, symmetric=False, axis=axis)
    qmin, qmax = fk.quant_range(bits)
    assert int(q.data.min()) >= qmin and int(q.data.max()) <= qmax
    q.check_codes()
    # the extremes of the range are used: the observed range maps onto the code range
    assert int(q.data.min()) == qmin and int(q.data.max()) == qmax


def test_quantize_does_not_track_gradients(backend, gen):
    x = torch.randn(10, generator=gen, requires_grad=True)
    q = fk.quantize(x)
    assert not q.data.requires_grad and not q.scale.requires_grad


def test_quantize_non_contiguous(backend, gen):
    base = torch.randn(50, 40, generator=gen)
    for x in (base.t(), base[::2, ::3]):
        for axis in (None, 0, 1):
            assert_equal(fk.quantize(x, axis=axis).data, fk.quantize(x.contiguous(), axis=axis).data)


def test_dequantize_per_channel_last_axis(backend, gen):
    x = torch.randn(5, 6000, generator=gen)
    q = fk.quantize(x, axis=1, symmetric=False)
    assert_equal(fk.dequantize(q), torch_quantized(q.data, q).dequantize())


def test_dequantize_rejects_bad_input(backend):
    with pytest.raises(TypeError, match="dequantize: expected a QuantizedTensor, got Tensor"):
        fk.dequantize(torch.zeros(3))
    q = fk.quantize(torch.randn(4))
    bad = fk.QuantizedTensor(q.data, torch.tensor(-1.0), q.zero_point, 8, None, True, torch.float32, q.shape)
    with pytest.raises(ValueError, match="dequantize: the scale must be finite and > 0"):
        fk.dequantize(bad)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(data=torch.zeros(4)), TypeError, "data must be an int8 tensor, got torch.float32"),
        (dict(shape=torch.Size([5])), ValueError, "data shape \\(4,\\) != shape \\(5,\\)"),
        (dict(bits=9), ValueError, "bits must be an int in \\[2, 8\\], got 9"),
        (dict(axis=1), ValueError, "axis must be None or in \\[0, 1\\), got 1"),
        (dict(scale=torch.tensor([1.0])), ValueError, "scale must be a torch.float32 tensor of shape \\(\\)"),
        (dict(zero_point=torch.tensor(0)), ValueError, "zero_point must be a torch.int32 tensor"),
        (dict(dtype=torch.float64), TypeError, "dtype must be float32, float16 or bfloat16"),
    ],
)
def test_quantized_tensor_metadata_checks(change, error, message):
    fields = dict(
        data=torch.zeros(4, dtype=torch.int8),
        scale=torch.tensor(0.1),
        zero_point=torch.tensor(0, dtype=torch.int32),
        bits=8,
        axis=None,
        symmetric=True,
        dtype=torch.float32,
        shape=torch.Size([4]),
    )
    fields.update(change)
    with pytest.raises(error, match=message):
        fk.QuantizedTensor(**fields)


def test_quantized_tensor_rejects_non_bool_symmetric_and_bool_axis():
    q = fk.quantize(torch.randn(4))
    fields = dict(data=q.data, scale=q.scale, zero_point=q.zero_point, bits=8, dtype=torch.float32, shape=q.shape)
    with pytest.raises(TypeError, match="symmetric must be a bool, got 'yes'"):
        fk.QuantizedTensor(**fields, axis=None, symmetric="yes")
    with pytest.raises(ValueError, match="axis must be None or in \\[0, 1\\), got True"):
        fk.QuantizedTensor(**fields, axis=True, symmetric=True)


def test_quantize_range_wider_than_float32(backend):
    # max - min overflows float32: a finite scale, codes that pass validation
    x = torch.tensor([3e38, -3e38, 1.0])
    q = fk.quantize(x, symmetric=False)
    q.validate()
    expected = reference.qparams_from_range(torch.tensor(-3e38), torch.tensor(3e38), False, -128, 127)
    assert_equal(q.scale, expected[0], "scale")
    assert_equal(q.zero_point, expected[1], "zero point")
    y = fk.dequantize(q)
    assert bool(torch.isfinite(y).all()) and bool(((y - x).abs() <= q.scale).all())


def test_scale_is_capped_at_float32_max():
    # a 1-code span cannot hold hi/span - lo/span either: the scale is float32's max
    scale, _ = reference.qparams_from_range(torch.tensor(-3e38), torch.tensor(3e38), False, 0, 1)
    assert float(scale) == torch.finfo(torch.float32).max


def fields_of(q, **change):
    """q's constructor arguments, some changed."""
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q)} | change


def test_dequantize_checks_zero_points_against_the_bits(backend):
    q = fk.quantize(torch.randn(6), bits=4, symmetric=False)
    bad = fk.QuantizedTensor(**fields_of(q, zero_point=torch.tensor(100, dtype=torch.int32)))
    with pytest.raises(ValueError, match="dequantize: the zero_point must lie in \\[-8, 7\\], got 100"):
        fk.dequantize(bad)
    codes = fk.QuantizedTensor(**fields_of(q, data=q.data.clone().fill_(-100)))
    with pytest.raises(ValueError, match="dequantize: the data holds codes outside the 4-bit range"):
        fk.dequantize(codes)


def tampered(what):
    """A valid QuantizedTensor altered after construction in one way."""
    q = fk.quantize(torch.randn(3, 5), bits=4, axis=0)
    if what == "bits":
        object.__setattr__(q, "bits", 9)
    elif what == "symmetric":
        object.__setattr__(q, "symmetric", "yes")
    elif what == "axis":
        object.__setattr__(q, "axis", True)
    elif what == "dtype":
        object.__setattr__(q, "dtype", torch.float64)
    elif what == "data":
        object.__setattr__(q, "data", q.data.float())
    elif what == "shape":
        q.data.resize_(15)
    elif what == "scale_shape":
        q.scale.resize_(2)
    elif what == "zero_point_dtype":
        object.__setattr__(q, "zero_point", q.zero_point.long())
    elif what == "scale_value":
        q.scale[1] = float("inf")
    elif what == "zero_point_value":
        q.zero_point[2] = 50
    elif what == "codes":
        q.data[0, 0] = 100
    return q


TAMPERED = {
    "bits": "bits must be an int in \\[2, 8\\], got 9",
    "symmetric": "symmetric must be a bool, got 'yes'",
    "axis": "axis must be None or in \\[0, 2\\), got True",
    "dtype": "dtype must be float32, float16 or bfloat16, got torch.float64",
    "data": "data must be an int8 tensor",
    "shape": "data shape \\(15,\\) != shape \\(3, 5\\)",
    "scale_shape": "scale must be a torch.float32 tensor of shape \\(3,\\)",
    "zero_point_dtype": "zero_point must be a torch.int32 tensor",
    "scale_value": "scale must be finite and > 0, got inf at channel 1",
    "zero_point_value": "zero_point must lie in \\[-8, 7\\], got 50 at channel 2",
    "codes": "codes outside the 4-bit range",
}


@pytest.mark.parametrize("what", TAMPERED)
def test_validate_rejects_an_altered_quantized_tensor(backend, what):
    q = tampered(what)
    for check in (q.validate, q.check_codes, lambda: fk.dequantize(q)):
        with pytest.raises(ValueError, match=TAMPERED[what]):
            check()


def test_check_codes_finds_out_of_range_codes():
    q = fk.quantize(torch.randn(100), bits=4)
    q.check_codes()
    tampered = fk.QuantizedTensor(
        q.data.clone().fill_(100), q.scale, q.zero_point, 4, None, True, torch.float32, q.shape
    )
    with pytest.raises(ValueError, match="codes outside the 4-bit range \\[-8, 7\\]"):
        tampered.check_codes()


def test_state_dict_round_trip(backend, gen):
    sd = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "bn.weight": torch.rand(8, generator=gen),
        "bn.num_batches_tracked": torch.tensor(12),
        "fc.weight": torch.randn(10, 72, generator=gen).to(torch.bfloat16),
    }
    q = fk.quantize_state_dict(sd, bits=8)
    assert q["conv.weight"].axis == 0 and q["bn.weight"].axis is None and q["fc.weight"].axis == 0
    assert q["bn.num_batches_tracked"] is sd["bn.num_batches_tracked"]
    back = fk.dequantize_state_dict(q)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        if value.is_floating_point():
            # within half a quantization step of the original, plus the rounding to its dtype
            step = q[key].scale.reshape([-1] + [1] * (value.dim() - 1)) if q[key].axis == 0 else q[key].scale
            error = (back[key].float() - value.float()).abs()
            bound = step * 0.5 + back[key].float().abs() * torch.finfo(value.dtype).eps
            assert bool((error <= bound).all()), key
    per_tensor = fk.quantize_state_dict(sd, per_channel=False)
    assert per_tensor["conv.weight"].axis is None


def test_state_dict_names_the_bad_tensor(backend):
    sd = {"ok": torch.randn(3), "broken": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match="quantize_state_dict: 'broken': quantize: the input contains NaN or Inf"):
        fk.quantize_state_dict(sd)
