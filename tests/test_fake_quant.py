"""fake_quant against PyTorch's own ops, bit for bit, forward and gradient, on every
CPU backend: given scale (torch.fake_quantize_per_{tensor,channel}_affine) and
observed range (torch.ao FakeQuantize with MinMaxObserver / PerChannelMinMaxObserver)."""

import pytest
import torch
from conftest import assert_equal
from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver

import fedhq_kernels as fk
from fedhq_kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes, a 0-d tensor, and one larger than a parallel task (65536 elements)
SHAPES = [(), (1,), (7,), (33, 17), (3, 5, 7, 2), (70001,)]
# (shape, axis): constant-parameter rows longer than a run (4096), short rows,
# channel-cycling layouts (last axis) with more channels than a run, odd sizes
# axis 0 with rows that fit in cache takes the CPU kernel's one-pass observed path;
# (2, 20000) along axis 0 has rows longer than it takes
PER_CHANNEL = [
    ((6, 5000), 0),
    ((4, 7, 9), 1),
    ((3, 4100), 1),
    ((2, 3, 11000), 2),
    ((70, 1100), 0),
    ((33, 7, 3, 3), 0),
    ((2, 20000), 0),
    ((5,), 0),
]


def sample(shape, scale, gen, dtype=torch.float32):
    """Values spread over the code range and past it (to exercise the clamp), with
    exact ties (k + 0.5) * scale mixed in to exercise round-half-to-even."""
    x = torch.randn(shape, generator=gen) * (60 * scale)
    ties = (torch.randint(-140, 140, shape, generator=gen) + 0.5) * scale
    pick = torch.rand(shape, generator=gen) < 0.3
    return torch.where(pick, ties, x).to(dtype)


def random_qparams(gen, channels=None, zp_range=(-20, 20)):
    shape = () if channels is None else (channels,)
    scale = torch.rand(shape, generator=gen) * 0.1 + 1e-3
    zero_point = torch.randint(*zp_range, shape, generator=gen, dtype=torch.int32)
    return scale, zero_point


def check_forward_and_grad(ours, theirs, x, gen):
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert_equal(ya, yb, "forward")
    grad = torch.randn(ya.shape, generator=gen).to(ya.dtype)
    ya.backward(grad)
    yb.backward(grad)
    assert_equal(xa.grad, xb.grad, "gradient")


# ---- given scale / zero point ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_tensor_matches_torch(backend, gen, dtype, shape):
    scale, zero_point = random_qparams(gen)
    s, z = float(scale), int(zero_point)
    x = sample(shape, s, gen, dtype)
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, s, z), lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, -128, 127), x, gen
    )
    # tensor-valued parameters give the same result as Python numbers
    assert_equal(fk.fake_quant(x, scale, zero_point), fk.fake_quant(x, s, z), "tensor qparams")


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width_matches_torch(backend, gen, bits):
    qmin, qmax = fk.quant_range(bits)
    scale, zero_point = random_qparams(gen, zp_range=(qmin, qmax + 1))
    s, z = float(scale), int(zero_point)
    x = sample((3001,), s / 16, gen)  # fewer codes: keep values near the range
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, s, z, bits=bits),
        lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, qmin, qmax),
        x,
        gen,
    )


def test_custom_unsigned_range_matches_torch(backend, gen):
    x = sample((2049,), 0.05, gen) + 3
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, 0.05, 128, quant_min=0, quant_max=255),
        lambda t: torch.fake_quantize_per_tensor_affine(t, 0.05, 128, 0, 255),
        x,
        gen,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", PER_CHANNEL)
def test_per_channel_matches_torch(backend, gen, dtype, shape, axis):
    scale, zero_point = random_qparams(gen, shape[axis])
    x = sample(shape, 0.05, gen, dtype)
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, scale, zero_point, axis=axis),
        lambda t: torch.fake_quantize_per_channel_affine(t, scale, zero_point, axis, -128, 127),
        x,
        gen,
    )
    negative = fk.fake_quant(x, scale, zero_point, axis=axis - len(shape))
    assert_equal(negative, fk.fake_quant(x, scale, zero_point, axis=axis), "negative axis")


@pytest.mark.parametrize("view", ["transpose", "stride", "expand"])
def test_non_contiguous_input(backend, gen, view):
    base = sample((40, 30), 0.02, gen)
    x = {"transpose": base.t(), "stride": base[::3, 1::2], "expand": base[:1].expand(40, 30)}[view]
    assert not x.is_contiguous()
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, 0.02, 3),
        lambda t: torch.fake_quantize_per_tensor_affine(t, 0.02, 3, -128, 127),
        x,
        gen,
    )
    scale, zero_point = random_qparams(gen, x.shape[1])
    assert_equal(
        fk.fake_quant(x, scale, zero_point, axis=1),
        torch.fake_quantize_per_channel_affine(x, scale, zero_point, 1, -128, 127),
        "per-channel",
    )


def test_half_subnormal_outputs(backend, gen):
    # scales this small put the dequantized values among float16's subnormals,
    # exercising the float -> half rounding of the kernels
    x = sample((5000,), 3e-7, gen, torch.float16)
    assert_equal(fk.fake_quant(x, 3e-7, 1), torch.fake_quantize_per_tensor_affine(x, 3e-7, 1, -128, 127))


def test_gradient_passes_nan_like_torch(backend, gen):
    x = sample((1000,), 0.01, gen)
    grad = torch.randn(1000, generator=gen)
    grad[::7] = float("nan")
    ours = torch.ops.fedhq.fake_quant_backward(
        grad, x, torch.tensor(0.01), torch.tensor(0, dtype=torch.int32), -128, 127, -1
    )
    xt = x.clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(xt, 0.01, 0, -128, 127).backward(grad)
    assert_equal(ours, xt.grad)


# ---- observed range ----


def torch_ao_fake_quant(x, bits, symmetric, axis):
    """A fresh torch.ao FakeQuantize per call: its observer keeps a running range."""
    qmin, qmax = fk.quant_range(bits)
    if axis is None:
        scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        module = FakeQuantize(MinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=torch.qint8, qscheme=scheme)
    else:
        scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        module = FakeQuantize(
            PerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=torch.qint8, qscheme=scheme, ch_axis=axis
        )
    return module(x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (70001,)])
def test_observed_per_tensor_matches_torch_ao(backend, gen, symmetric, dtype, shape):
    x = (torch.randn(shape, generator=gen) * 3 + torch.randn((), generator=gen)).to(dtype)
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, symmetric=symmetric), lambda t: torch_ao_fake_quant(t, 8, symmetric, None), x, gen
    )


@pytest.mark.parametrize("symmetric", [True, False])
# torch.ao's per-channel observer cannot take 1-d tensors; the reference test covers them
@pytest.mark.parametrize("shape,axis", [case for case in PER_CHANNEL if len(case[0]) > 1])
def test_observed_per_channel_matches_torch_ao(backend, gen, symmetric, shape, axis):
    x = torch.randn(shape, generator=gen) * torch.rand(shape[axis], generator=gen).reshape(
        [-1 if d == axis else 1 for d in range(len(shape))]
    )
    check_forward_and_grad(
        lambda t: fk.fake_quant(t, symmetric=symmetric, axis=axis),
        lambda t: torch_ao_fake_quant(t, 8, symmetric, axis),
        x,
        gen,
    )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", PER_CHANNEL)
def test_observed_matches_reference(backend, gen, symmetric, dtype, shape, axis):
    x = torch.randn(shape, generator=gen).to(dtype)
    ours = torch.ops.fedhq.fake_quant_observed(x, -128, 127, symmetric, axis)
    for got, expected in zip(ours, reference.fake_quant_observed(x, -128, 127, symmetric, axis)):
        assert_equal(got, expected)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_observed_every_bit_width(backend, gen, bits, symmetric):
    x = torch.randn(4099, generator=gen) + 0.5
    assert_equal(fk.fake_quant(x, bits=bits, symmetric=symmetric), torch_ao_fake_quant(x, bits, symmetric, None))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_observed_qparams_match_observer(backend, gen, symmetric, axis):
    x = torch.randn(9, 300, generator=gen) * 2 + 1
    _, scale, zero_point = torch.ops.fedhq.fake_quant_observed(x, -128, 127, symmetric, -1 if axis is None else axis)
    if axis is None:
        observer = MinMaxObserver(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        )
    else:
        scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        observer = PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.qint8, qscheme=scheme)
    observer(x)
    expected_scale, expected_zero_point = observer.calculate_qparams()
    assert_equal(scale, expected_scale.reshape(scale.shape), "scale")
    assert_equal(zero_point, expected_zero_point.to(torch.int32).reshape(zero_point.shape), "zero point")


def test_observed_equals_quantize_then_dequantize(backend, gen):
    for axis in (None, 0, 1):
        for symmetric in (True, False):
            x = torch.randn(64, 130, generator=gen).to(torch.bfloat16)
            q = fk.quantize(x, symmetric=symmetric, axis=axis)
            assert_equal(fk.fake_quant(x, symmetric=symmetric, axis=axis), fk.dequantize(q), f"axis={axis}")


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_range_tensor(backend, value, symmetric):
    x = torch.full((100,), value)
    y = fk.fake_quant(x, symmetric=symmetric)
    assert torch.isfinite(y).all()
    assert_equal(y, torch_ao_fake_quant(x, 8, symmetric, None))
    _, scale, _ = torch.ops.fedhq.fake_quant_observed(x, -128, 127, symmetric, -1)
    if value == 0.0:
        assert scale.item() == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_empty_tensor(backend, axis):
    x = torch.empty(0, 4)
    assert fk.fake_quant(x, axis=axis).shape == (0, 4)
    if axis is None:
        assert fk.fake_quant(x, 0.1).shape == (0, 4)
    q = fk.quantize(x, axis=axis)
    assert fk.dequantize(q).shape == (0, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_observed_rejects_non_finite(backend, bad, axis):
    x = torch.randn(3, 5000)
    x[2, 4321] = bad
    with pytest.raises(ValueError, match="fake_quant: the input contains NaN or Inf"):
        fk.fake_quant(x, axis=axis)
    with pytest.raises(ValueError, match="quantize: the input contains NaN or Inf"):
        fk.quantize(x, axis=axis)


# ---- bad arguments ----

BAD_CALLS = [
    (dict(bits=1), ValueError, "bits must be an int in \\[2, 8\\], got 1"),
    (dict(bits=9), ValueError, "got 9"),
    (dict(bits=8.0), ValueError, "got 8.0"),
    (dict(bits=True), ValueError, "got True"),
    (dict(axis=2), ValueError, "axis 2 is out of range"),
    (dict(axis=-3), ValueError, "axis -3 is out of range"),
    (dict(axis=1.0), TypeError, "axis must be None or an int"),
    (dict(scale=0.0), ValueError, "scale must be finite and > 0, got 0.0"),
    (dict(scale=-1), ValueError, "got -1"),
    (dict(scale=float("nan")), ValueError, "got nan"),
    (dict(scale=float("inf")), ValueError, "got inf"),
    (dict(scale=1e39), ValueError, "scale must be at most float32's max \\(3.402823e\\+38\\), got 1e\\+39"),
    (dict(scale=torch.tensor(-0.5)), ValueError, "scale must be finite and > 0, got -0.5"),
    (dict(scale=torch.tensor(float("nan"))), ValueError, "scale must be finite and > 0, got nan"),
    (
        dict(scale=torch.tensor([0.1, 0.0, 0.1]), zero_point=torch.zeros(3, dtype=torch.int32), axis=0),
        ValueError,
        "got 0(\\.0)? at channel 1",
    ),
    (dict(scale=0.1, zero_point=200), ValueError, "zero_point must lie in \\[-128, 127\\], got 200"),
    (dict(scale=0.1, zero_point=torch.tensor(-129)), ValueError, "got -129"),
    (dict(scale=0.1, zero_point=0.5), TypeError, "zero_point must be an int"),
    (dict(scale=0.1, zero_point=2**40), ValueError, "zero_point must fit in int32, got 1099511627776"),
    (dict(scale=0.1, zero_point=torch.tensor(2**40)), ValueError, "zero_point must fit in int32, got 1099511627776"),
    (dict(scale=0.1, zero_point=torch.tensor(-(2**40))), ValueError, "must fit in int32, got -1099511627776"),
    (dict(symmetric="yes"), TypeError, "symmetric must be a bool, got 'yes'"),
    (dict(scale=0.1, zero_point=torch.tensor(1.0)), TypeError, "zero_point must hold integers"),
    (dict(scale=torch.tensor(1)), TypeError, "scale must be a floating-point tensor"),
    (dict(scale=torch.tensor([0.1, 0.2])), ValueError, "scale needs 1 value"),
    (dict(scale=torch.ones(4), axis=0), ValueError, "scale needs 3 value"),
    (dict(scale=0.1, axis=0), ValueError, "per-channel quantization \\(axis=0\\) needs a scale tensor"),
    (dict(zero_point=3), ValueError, "zero_point was given without a scale"),
    (dict(quant_min=0), ValueError, "give both quant_min and quant_max"),
    (dict(quant_min=5, quant_max=5), ValueError, "need quant_min < quant_max"),
    (dict(quant_min=0, quant_max=300), ValueError, "spanning at most 2\\^8 codes"),
    (dict(quant_min=0, quant_max=15, bits=3), ValueError, "spanning at most 2\\^3 codes"),
    (dict(quant_min=0.0, quant_max=255), TypeError, "must be ints"),
    (dict(quant_min=0, quant_max=255), ValueError, "symmetric range needs quant_min < 0 < quant_max"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS)
def test_bad_arguments(backend, kwargs, error, message):
    with pytest.raises(error, match=message):
        fk.fake_quant(torch.randn(3, 4), **kwargs)


@pytest.mark.parametrize(
    "x,error,message",
    [
        (torch.randn(3).double(), TypeError, "expected a float32, float16 or bfloat16 tensor, got torch.float64"),
        (torch.arange(3), TypeError, "got torch.int64"),
        ([1.0, 2.0], TypeError, "expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_tensor(backend, x, error, message):
    with pytest.raises(error, match=message):
        fk.fake_quant(x, 0.1)
    with pytest.raises(error, match=message.replace("fake_quant", "quantize")):
        fk.quantize(x)


def test_reference_is_the_plain_torch_twin(gen):
    """The reference twin, called directly, equals torch too (the oracle is checked)."""
    x = sample((999,), 0.03, gen)
    scale, zero_point = torch.tensor(0.03), torch.tensor(-7, dtype=torch.int32)
    assert_equal(
        reference.fake_quant(x, scale, zero_point, -128, 127, -1),
        torch.fake_quantize_per_tensor_affine(x, 0.03, -7, -128, 127),
    )


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observed_range_wider_than_float32(backend, axis, dtype):
    # max - min overflows float32: the scale is still finite, the same on every backend
    x = torch.tensor([[3e38, -3e38], [-3e38, 1.0]]).to(dtype).requires_grad_(True)
    schema_axis = -1 if axis is None else axis
    y, scale, zero_point = fk.ops.fake_quant_observed(x, -128, 127, False, schema_axis)
    ref_y, ref_scale, ref_zero_point = reference.fake_quant_observed(x.detach(), -128, 127, False, schema_axis)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert_equal(scale, ref_scale, "scale")
    assert_equal(zero_point, ref_zero_point, "zero point")
    assert_equal(y, ref_y, "output")
    out = fk.fake_quant(x, symmetric=False, axis=axis)
    assert bool(torch.isfinite(out).all())
    out.sum().backward()  # used to raise about a scale the user never gave
    assert bool(torch.isfinite(x.grad).all())
