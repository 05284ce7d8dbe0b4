"""The out= forms (fake_quant given and observed, dequantize): on every backend, the
bits of the allocating op (itself checked against torch and the reference elsewhere)
and of the reference computed here, the gradient through ``out`` in eager mode, and
every bad ``out`` refused with a message naming what is wrong, by the public API and
by the C++ binding called directly (its checks guard the kernels' memory)."""

import pytest
import torch
from conftest import assert_equal

import fedhq_kernels as fk
from fedhq_kernels import cpu, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes, a 1-d per-channel case and a channel axis that is not the first
CASES = [((1,), None), ((7,), None), ((70001,), None), ((37,), 0), ((5, 33), 1), ((17, 3, 5), 0), ((4, 9, 11), 2)]


def _params(gen, shape, axis):
    if axis is None:
        return torch.rand((), generator=gen) * 0.05 + 0.01, torch.randint(-5, 5, (), generator=gen, dtype=torch.int32)
    c = shape[axis]
    return torch.rand(c, generator=gen) * 0.05 + 0.01, torch.randint(-5, 5, (c,), generator=gen, dtype=torch.int32)


def _stale(x: torch.Tensor) -> torch.Tensor:
    """A buffer full of values the op must overwrite (NaN: any element left shows)."""
    return torch.full(x.shape, float("nan"), dtype=x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_fake_quant_out_matches_reference(backend, gen, dtype, shape, axis):
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    scale, zero_point = _params(gen, shape, axis)
    out = _stale(x)
    assert fk.fake_quant(x, scale, zero_point, axis=axis, out=out) is out
    schema_axis = -1 if axis is None else axis
    assert_equal(out, reference.fake_quant(x, scale, zero_point, -128, 127, schema_axis), "fake_quant out=")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_fake_quant_observed_out_matches_reference(backend, gen, symmetric, dtype, shape, axis):
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    out = _stale(x)
    assert fk.fake_quant(x, symmetric=symmetric, axis=axis, bits=5, out=out) is out
    expected, _, _ = reference.fake_quant_observed(x, -16, 15, symmetric, -1 if axis is None else axis)
    assert_equal(out, expected, "observed fake_quant out=")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_dequantize_out_matches_reference(backend, gen, dtype, shape, axis):
    q = fk.quantize((torch.randn(shape, generator=gen) * 2).to(dtype), axis=axis, symmetric=False)
    out = _stale(torch.empty(shape, dtype=dtype))
    assert fk.dequantize(q, out=out) is out
    expected = reference.dequantize(q.data, q.scale, q.zero_point, -1 if axis is None else axis, dtype)
    assert_equal(out, expected, "dequantize out=")


def test_non_contiguous_input_into_out(backend, gen):
    x = torch.randn(6, 10, 7, generator=gen).transpose(0, 2)[:, ::3]
    scale, zero_point = _params(gen, x.shape, 1)
    out = torch.empty(x.shape)
    fk.fake_quant(x, scale, zero_point, axis=1, out=out)
    assert_equal(out, reference.fake_quant(x.contiguous(), scale, zero_point, -128, 127, 1))


@pytest.mark.parametrize("observed", [False, True], ids=["given", "observed"])
def test_gradient_flows_through_out(backend, gen, observed):
    """In eager mode the returned ``out`` carries the straight-through gradient to x,
    the same as the allocating op's, and can be filled again on the next step."""
    kwargs = {"axis": 0} if observed else {"scale": torch.rand(4, generator=gen) + 0.05, "zero_point": 0, "axis": 0}
    if not observed:
        kwargs["zero_point"] = torch.zeros(4, dtype=torch.int32)
    out = torch.empty(4, 3, 5)
    for step in range(2):
        x = (torch.randn(4, 3, 5, generator=gen) * 3).requires_grad_()
        grad = torch.randn(4, 3, 5, generator=gen)
        y = fk.fake_quant(x, out=out, **kwargs)
        assert y is out and y.requires_grad
        y.backward(grad)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = fk.fake_quant(x_ref, **kwargs)
        y_ref.backward(grad)
        assert_equal(out.detach(), y_ref.detach(), f"step {step} forward")
        assert_equal(x.grad, x_ref.grad, f"step {step} gradient")


def test_out_gradient_refused_outside_eager(backend, gen):
    """Under a dispatch mode (or torch.compile) the registered out= op runs, which has
    no autograd formula: asking for a gradient through it is an error, not a silent zero."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, generator=gen).requires_grad_()
    with Passthrough(), pytest.raises(RuntimeError, match="out= is differentiable in eager mode only"):
        fk.fake_quant(x, out=torch.empty(8))
    with Passthrough(), torch.no_grad():
        out = torch.empty(8)
        fk.fake_quant(x, out=out)
    assert_equal(out, fk.fake_quant(x.detach()))


def _bad_outs(x):
    return [
        ("shape", torch.empty(x.numel() + 1), r"out has shape"),
        ("dtype", torch.empty(x.shape, dtype=torch.float16), r"out is (torch\.float16|Half)"),
        ("device", torch.empty(x.shape, device="meta"), r"out is on meta"),
        ("strided", torch.empty(x.numel() * 2)[::2], r"out must be contiguous"),
        ("x itself", x, r"out shares memory with x"),
        ("a view of x", x.view(x.shape), r"out shares memory with x"),
    ]


@pytest.mark.parametrize("observed", [False, True], ids=["given", "observed"])
@pytest.mark.parametrize("what", ["shape", "dtype", "device", "strided", "x itself", "a view of x"])
def test_bad_out_is_refused(backend, gen, observed, what):
    x = torch.randn(12, generator=gen)
    before = x.clone()
    _, out, message = next(case for case in _bad_outs(x) if case[0] == what)
    scale = {} if observed else {"scale": 0.05}
    with pytest.raises((ValueError, TypeError), match="fake_quant: " + message):
        fk.fake_quant(x, out=out, **scale)
    assert_equal(x, before, "x after a refused call")


def test_dequantize_bad_out_is_refused(backend, gen):
    q = fk.quantize(torch.randn(12, generator=gen))
    for what, out, message in _bad_outs(torch.empty(12))[:4]:
        if what == "dtype":
            message = r"out is torch\.float16, expected the tensor's dtype torch\.float32"
        with pytest.raises((ValueError, TypeError), match="dequantize: " + message):
            fk.dequantize(q, out=out)
    with pytest.raises(TypeError, match="dequantize: out must be a torch.Tensor or None, got list"):
        fk.dequantize(q, out=[0.0] * 12)
    buffer = torch.zeros(48, dtype=torch.int8)  # 12 codes and 12 float32 over the same bytes
    with pytest.raises(ValueError, match="dequantize: out shares memory with codes"):
        torch.ops.fedhq.dequantize_out(buffer[:12], q.scale, q.zero_point, -1, buffer.view(torch.float32))


def test_out_sharing_the_scale_is_refused(backend):
    storage = torch.rand(13) + 0.1
    x, scale, out = torch.randn(12), storage[12], storage[:12]
    with pytest.raises(ValueError, match="fake_quant: out shares memory with scale"):
        torch.ops.fedhq.fake_quant_out(x, scale, torch.zeros((), dtype=torch.int32), -128, 127, -1, out)


@pytest.mark.skipif(cpu.UNAVAILABLE is not None, reason="the C++ extension is not built")
@pytest.mark.parametrize("what", ["shape", "dtype", "strided", "x itself", "a view of x"])
def test_cpu_binding_refuses_bad_out(gen, what):
    """torch.ops.fedhq_cpu.*_out skips the Python checks: the binding's own keep a bad
    ``out`` from the kernels (which would write past its end or through its strides)."""
    x = torch.randn(12, generator=gen)
    _, out, message = next(case for case in _bad_outs(x) if case[0] == what)
    zero = torch.zeros((), dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match="fake_quant: " + message):
        torch.ops.fedhq_cpu.fake_quant_out(x, torch.tensor(0.05), zero, -128, 127, -1, out)
    with pytest.raises((ValueError, TypeError), match="fake_quant: " + message):
        torch.ops.fedhq_cpu.fake_quant_observed_out(x, -128, 127, True, -1, out)
    codes = torch.zeros(12, dtype=torch.int8)
    if what in ("shape", "strided"):  # x is not dequantize's input; any float dtype is a valid out
        with pytest.raises(ValueError, match="dequantize: " + message):
            torch.ops.fedhq_cpu.dequantize_out(codes, torch.tensor(0.05), zero, -1, out)
    with pytest.raises(TypeError, match="dequantize: expected a float32, float16 or bfloat16 tensor, got Int"):
        torch.ops.fedhq_cpu.dequantize_out(codes, torch.tensor(0.05), zero, -1, torch.empty(12, dtype=torch.int32))


def test_out_with_history_or_requiring_grad(backend, gen):
    """A leaf that requires grad cannot be overwritten (torch's in-place rule); a view
    carrying autograd history cannot drop it in place, and says so."""
    x = torch.randn(6, generator=gen)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fk.fake_quant(x.requires_grad_(), out=torch.zeros(6, requires_grad=True))
    base = torch.zeros(2, 6, requires_grad=True) * 1
    with pytest.raises(ValueError, match="fake_quant: out is a view with autograd history"):
        fk.fake_quant(x, out=base[0])
