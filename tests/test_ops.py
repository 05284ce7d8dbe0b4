"""The torch.library registration: opcheck on every op (schema, fake kernel,
autograd registration, AOT dispatch), and torch.compile without graph breaks."""

import pytest
import torch
from conftest import assert_equal

import fedhq_kernels as fk

I32 = torch.int32


def op_samples():
    """(op, args) per op, per-tensor and per-channel, float32 and bfloat16."""
    samples = []

    def add(op, args, note):
        samples.append(pytest.param(op, args, id=f"{op._qualified_op_name.split('::')[1]}-{note}"))

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 33).to(dtype)
        per_tensor = (torch.tensor(0.02), torch.tensor(3, dtype=I32), -1)
        per_channel = (torch.rand(33) * 0.05 + 0.01, torch.randint(-4, 4, (33,), dtype=I32), 1)
        for scale, zero_point, axis in (per_tensor, per_channel):
            note = f"{str(dtype)[6:]}-axis{axis}"
            add(torch.ops.fedhq.fake_quant, (x.clone().requires_grad_(), scale, zero_point, -128, 127, axis), note)
            grad = torch.randn(6, 33).to(dtype)
            add(torch.ops.fedhq.fake_quant_out, (x, scale, zero_point, -128, 127, axis, torch.empty_like(x)), note)
            add(torch.ops.fedhq.fake_quant_backward, (grad, x, scale, zero_point, -8, 7, axis), note)
            add(torch.ops.fedhq.fake_quant_observed, (x.clone().requires_grad_(), -128, 127, axis < 0, axis), note)
            add(torch.ops.fedhq.fake_quant_observed_out, (x, -128, 127, axis < 0, axis, torch.empty_like(x)), note)
            add(torch.ops.fedhq.quantize, (x, -8, 7, False, axis), note)
            codes = torch.randint(-128, 128, (6, 33), dtype=torch.int8)
            add(torch.ops.fedhq.dequantize, (codes, scale, zero_point, axis, dtype), note)
            add(torch.ops.fedhq.dequantize_out, (codes, scale, zero_point, axis, torch.empty_like(x)), note)
    q = [fk.quantize(torch.randn(5, 7), axis=0) for _ in range(3)] + [fk.quantize(torch.randn(9)) for _ in range(3)]
    agg_args = (
        [t.data for t in q],
        [t.scale for t in q],
        [t.zero_point for t in q],
        torch.tensor([0.2, 0.3, 0.5]),
        [0, -1],
        [8, 4, 8, 8, 2, 8],  # each entry's width: the op checks its zero points (0 here) against it
        -128,
        127,
        True,
        ["w", "b"],
        -1,
    )
    # client-major order: client k's tensors are entries k * 2 + t
    order = [0, 3, 1, 4, 2, 5]
    agg_args = tuple([a[i] for i in order] for a in agg_args[:3]) + agg_args[3:]
    add(torch.ops.fedhq.aggregate, agg_args, "2-tensors")
    add(torch.ops.fedhq.aggregate, agg_args[:-1] + (1,), "2-tensors, median")
    acc_args = (torch.randn(5 * 7 + 9), agg_args[0][:2], agg_args[1][:2], agg_args[2][:2], [0, -1], 0.375, ["w", "b"])
    add(torch.ops.fedhq.accumulate, acc_args, "2-tensors")
    return samples


@pytest.mark.parametrize("op,args", op_samples())
def test_opcheck(backend, op, args):
    torch.library.opcheck(op, args)


def test_compiled_training_step_has_no_graph_break(backend):
    def step(w, x):
        wq = fk.fake_quant(w, axis=0)  # observed per-channel weights
        xq = fk.fake_quant(x, 0.05, 2)  # given-scale activations
        return (xq @ wq.t()).square().mean()

    w = torch.randn(16, 32, requires_grad=True)
    x = torch.randn(8, 32)
    loss = step(w, x)
    (grad,) = torch.autograd.grad(loss, w)
    # fullgraph=True fails on any graph break
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(w, x)
    (grad_c,) = torch.autograd.grad(loss_c, w)
    assert_equal(loss_c, loss)
    assert_equal(grad_c, grad)


def test_inductor_compiles_fake_quant():
    def f(x):
        return fk.fake_quant(x, symmetric=False).relu() * 2

    x = torch.randn(64, 65)
    torch._dynamo.reset()
    assert_equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_compile_quantize_and_dequantize(backend):
    def roundtrip(x):
        codes, scale, zero_point = torch.ops.fedhq.quantize(x, -128, 127, True, 0)
        return torch.ops.fedhq.dequantize(codes, scale, zero_point, 0, x.dtype)

    x = torch.randn(12, 40)
    assert_equal(torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x), roundtrip(x))


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("observed", [False, True], ids=["given", "observed"])
def test_eager_fast_path_equals_registered_op(backend, gen, observed):
    """Eager calls skip the dispatcher (fedhq_kernels.ops.eager_fast_path); under a
    dispatch mode they go through torch.ops.fedhq, and both give the same bits,
    forward and gradient."""
    x = torch.randn(6, 5, 7, generator=gen).mul(3)[:, ::2]  # non-contiguous
    grad = torch.randn(x.shape, generator=gen)
    kwargs = (
        {"axis": 1}
        if observed
        else {"scale": torch.rand(3, generator=gen) + 0.05, "zero_point": torch.tensor([0, 3, -2]), "axis": 1}
    )

    def run(recorder):
        leaf = x.clone().requires_grad_(True)
        if recorder is None:
            y = fk.fake_quant(leaf, **kwargs)
        else:
            with recorder:
                y = fk.fake_quant(leaf, **kwargs)
        y.backward(grad)
        return y.detach(), leaf.grad

    recorder = _OpRecorder()
    eager, registered = run(None), run(recorder)
    expected = "fedhq.fake_quant_observed.default" if observed else "fedhq.fake_quant.default"
    assert expected in recorder.ops
    for a, b in zip(eager, registered):
        assert_equal(a, b)


def test_op_table_drives_every_backend():
    """optable.SCHEMAS is the one list of ops: torch.ops.fedhq, the C++ namespaces and
    every backend's KERNELS follow it."""
    from fedhq_kernels import cpu, dispatch, optable

    for name, schema in optable.SCHEMAS.items():
        assert str(getattr(torch.ops.fedhq, name).default._schema) == f"fedhq::{name}{schema}"
    for backend in fk.backends():
        assert tuple(dispatch._module(backend).KERNELS) == optable.OP_NAMES, backend
    if cpu.UNAVAILABLE is None:
        for name in optable.OP_NAMES:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fedhq_cpu::{name}", "CPU"), name
