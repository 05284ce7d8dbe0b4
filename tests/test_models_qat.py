"""The project's models and QAT preparation (fedhq.models, fedhq.quant).

QAT layers must: fake-quantize what the convolution / matmul sees (weights per channel
on their grid, inputs per tensor with a running range), pass gradients to every
weight, keep the float model's state-dict names, use the stored range in eval, and
never produce NaN from all-zero inputs."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedhq_kernels as fk
from fedhq.models import ModelSpec, ResNet18, SmallCNN, build_model, count_parameters, resnet18, small_cnn
from fedhq.quant import (
    OBSERVER_BUFFERS,
    QATConfig,
    QATConv2d,
    QATLinear,
    float_state_dict,
    load_float_state_dict,
    observer_keys,
    prepare,
    prepare_ptq,
    prepare_qat,
    qparams_from_range,
    strip_qat,
)
from fedhq_kernels import reference

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # correctness: one thread is as good and steadier (conftest.py)


# ---- models ----


def test_resnet18_is_the_cifar_model():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from resnet18_shapes import RESNET18_CIFAR_PARAMS, resnet18_cifar_shapes
    finally:
        sys.path.remove(str(ROOT / "bench"))
    model = resnet18()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == dict(resnet18_cifar_shapes())  # names, order-free, and shapes
    assert count_parameters(model) == RESNET18_CIFAR_PARAMS == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)  # CIFAR stem
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3)])
def test_small_cnn_sizes(size, channels):
    model = small_cnn(num_classes=7, in_channels=channels, image_size=size)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)
    with pytest.raises(ValueError, match=f"built for {size}x{size}"):
        model(torch.randn(3, channels, size + 4, size + 4))


def test_model_spec():
    spec = ModelSpec.parse("small_cnn@8x8x1")
    assert (spec.name, spec.image_size, spec.in_channels, spec.num_classes) == ("small_cnn", 8, 1, 10)
    assert spec.key == "small_cnn@8x8x1:10" and ModelSpec.parse(spec.key) == spec
    assert ModelSpec.parse("resnet18:100").key == "resnet18@32x32x3:100"
    assert isinstance(spec.build(), SmallCNN) and isinstance(build_model("resnet18"), ResNet18)
    for bad, match in [("vgg16", "unknown model"), ("small_cnn@8x9x1", "square"), ("small cnn", "expected name")]:
        with pytest.raises(ValueError, match=match):
            ModelSpec.parse(bad)


# ---- QAT preparation ----


def _tiny_resnet():
    return resnet18(width=4)


def test_prepare_swaps_every_conv_and_linear_and_copies():
    model = _tiny_resnet()
    qat = prepare_qat(model)
    kinds = [type(m) for m in qat.modules()]
    assert nn.Conv2d not in kinds and nn.Linear not in kinds
    assert kinds.count(QATConv2d) == 20 and kinds.count(QATLinear) == 1
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert qat.conv1.weight is not model.conv1.weight  # a copy by default
    same = prepare_qat(model, inplace=True)
    assert same is model and isinstance(model.conv1, QATConv2d)
    assert prepare_qat(same, inplace=True).conv1 is same.conv1  # idempotent


def test_prepare_keeps_subclasses_and_shared_modules():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.MultiheadAttention(4, 1))
    qat = prepare_qat(model)
    assert qat[0] is qat[2] and isinstance(qat[0], QATLinear)  # converted once, still shared
    assert type(qat[3].out_proj) is not QATLinear  # a Linear subclass, read directly by attention


def test_gradients_reach_every_weight():
    for model, x in [
        (small_cnn(in_channels=1, image_size=8), torch.randn(4, 1, 8, 8)),
        (_tiny_resnet(), torch.randn(2, 3, 16, 16)),
    ]:
        qat = prepare_qat(model)
        F.cross_entropy(qat(x), torch.tensor([1, 2, 3, 4][: x.shape[0]])).backward()
        for name, p in qat.named_parameters():
            assert p.grad is not None, name
            assert bool(torch.isfinite(p.grad).all()), name
            assert p.grad.abs().sum() > 0, name


def test_fake_quant_is_applied_on_the_grid(monkeypatch):
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, image_size=8)
    qat = prepare_qat(model)
    x = torch.randn(8, 1, 8, 8)
    seen = []
    real_conv2d = F.conv2d

    def spy(inp, weight, *args, **kwargs):
        seen.append((inp.detach(), weight.detach()))
        return real_conv2d(inp, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    out_q = qat(x)
    monkeypatch.undo()
    assert not torch.equal(out_q, model(x))  # the outputs differ from the float model's
    assert len(seen) == 2
    for (inp, weight), layer in zip(seen, [qat.conv1, qat.conv2]):
        # weights: symmetric per output channel, scale = max|w| / 127.5, integer codes
        w = layer.weight.detach()
        scale = (w.abs().amax(dim=(1, 2, 3)) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        codes = weight / scale.view(-1, 1, 1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 128
        assert weight.unique(dim=None).numel() <= 256 * w.shape[0]
        assert not torch.equal(weight, w)
        # input: affine per tensor over the observed range, on its grid
        lo, hi = layer.act_range
        s = (hi.clamp(min=0) - lo.clamp(max=0)) / 255
        z = -128 - torch.round(lo.clamp(max=0) / s)
        q = inp / s + z
        assert torch.allclose(q, q.round(), atol=1e-2) and q.min() >= -128.01 and q.max() <= 127.01
    # the weight quantization is fedhq_kernels' per-channel fake quant, bit for bit
    assert torch.equal(qat.conv2.quantize_weight(), fk.fake_quant(qat.conv2.weight, axis=0))


def test_state_dict_names_match_the_float_model():
    model = _tiny_resnet()
    qat = prepare_qat(model)
    float_keys = list(model.state_dict())
    assert list(float_state_dict(qat)) == float_keys
    assert list(float_state_dict(model)) == float_keys  # PTQ clients: unchanged
    extra = set(qat.state_dict()) - set(float_keys)
    assert extra == set(observer_keys(qat)) and len(extra) == len(OBSERVER_BUFFERS) * 21
    # a QAT and a PTQ client's uploads aggregate together
    uploads = [fk.quantize_state_dict(float_state_dict(m)) for m in (model, qat)]
    merged = fk.dequantize_state_dict(fk.aggregate_state_dicts(uploads, [1, 3]))
    assert list(merged) == float_keys
    # and the global model loads back into both, the QAT one keeping its observers
    qat(torch.randn(2, 3, 16, 16))
    ranges = {k: v.clone() for k, v in qat.state_dict().items() if k in extra}
    load_float_state_dict(qat, merged)
    load_float_state_dict(model, merged)
    assert all(torch.equal(qat.state_dict()[k], v) for k, v in ranges.items())
    assert torch.equal(qat.conv1.weight, merged["conv1.weight"])
    with pytest.raises(KeyError, match="conv1.weight"):
        load_float_state_dict(qat, {k: v for k, v in merged.items() if k != "conv1.weight"})


def test_running_range_ema_and_eval_uses_stored_range():
    layer = prepare_qat(nn.Linear(16, 4), averaging_constant=0.25, observer="ema")
    a = torch.linspace(-1, 2, 32).view(2, 16)
    layer(a)  # first batch sets the range
    assert torch.equal(layer.act_range, torch.tensor([-1.0, 2.0])) and bool(layer.act_observed)
    layer(a * 3)  # then an exponential moving average
    assert torch.allclose(layer.act_range, torch.tensor([-1.0 + 0.25 * -2, 2.0 + 0.25 * 4]))
    stored = layer.act_range.clone()
    layer.eval()
    seen = []
    layer.register_forward_hook(lambda m, inp, out: seen.append(m.quantize_input(inp[0])))
    with torch.no_grad():
        layer(a * 10)
    assert torch.equal(layer.act_range, stored)  # not updated in eval
    assert seen[0].max() <= stored[1] + 1e-6 and seen[0].min() >= stored[0] - 1e-6  # clamped to it
    # a layer that never trained quantizes eval inputs with their own range
    fresh = prepare_qat(nn.Linear(16, 4)).eval()
    with torch.no_grad():
        assert torch.allclose(fresh.quantize_input(a), a, atol=3 / 255)
    assert not bool(fresh.act_observed)


def test_envelope_range_widens_at_once_and_shrinks_by_the_average():
    layer = prepare_qat(nn.Linear(16, 4), averaging_constant=0.25)
    assert layer.qat_config.observer == "envelope" and QATConfig().averaging_constant == 0.1
    a = torch.linspace(-1, 2, 32).view(2, 16)
    layer(a)
    layer(a * 3)  # a wider batch: the range takes in its extremes at once
    assert torch.equal(layer.act_range, torch.tensor([-3.0, 6.0]))
    layer(a)  # a narrower one: the range shrinks by the moving average
    assert torch.allclose(layer.act_range, torch.tensor([-3.0 + 0.25 * 2, 6.0 - 0.25 * 4]))
    layer(torch.linspace(-0.5, 8.0, 32).view(2, 16))  # each end on its own: min decays, max widens
    assert torch.allclose(layer.act_range, torch.tensor([-2.5 + 0.25 * 2, 8.0]))
    with pytest.raises(ValueError, match=r"observer must be one of \('envelope', 'ema'\), got 'minmax'"):
        prepare_qat(nn.Linear(2, 2), observer="minmax")


def test_all_zero_inputs_give_no_nan():
    qat = prepare_qat(small_cnn(in_channels=1, image_size=8))
    with torch.no_grad():
        for p in qat.parameters():  # zero weights too: zero ranges everywhere
            p.zero_()
    x = torch.zeros(4, 1, 8, 8, requires_grad=True)
    out = qat(x)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(x.grad).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in qat.parameters())
    assert all(bool(torch.isfinite(m.act_range).all()) for m in qat.modules() if isinstance(m, QATLinear))
    qat.eval()
    with torch.no_grad():
        assert bool(torch.isfinite(qat(torch.zeros(2, 1, 8, 8))).all())


def test_non_finite_activations_raise_and_keep_the_range():
    layer = prepare_qat(nn.Linear(4, 2))
    layer(torch.ones(3, 4))
    before = layer.act_range.clone()
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
    assert torch.equal(layer.act_range, before)


def test_qparams_match_the_reference(gen):
    lo = torch.randn(64, generator=gen) * 3 - torch.rand(64, generator=gen)
    hi = lo + torch.rand(64, generator=gen) * 5
    lo[:4], hi[:4] = 0.0, 0.0  # zero range: eps scale
    hi[4:8] = lo[4:8]
    for symmetric in (True, False):
        for qmin, qmax in [(-128, 127), (-8, 7)]:
            ours = qparams_from_range(lo, hi, symmetric, qmin, qmax)
            theirs = reference.qparams_from_range(lo, hi, symmetric, qmin, qmax)
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_bfloat16_and_float32_inputs():
    for dtype in (torch.float32, torch.bfloat16):
        qat = prepare_qat(small_cnn(in_channels=1, image_size=8)).to(dtype)
        out = qat(torch.randn(2, 1, 8, 8, dtype=dtype))
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        out.float().sum().backward()
        assert qat.conv1.weight.grad.dtype == dtype


def test_bits_sets_weight_and_activation_bits():
    torch.manual_seed(0)
    qat = prepare_qat(small_cnn(in_channels=1, image_size=8), bits=4)
    layers = [m for m in qat.modules() if isinstance(m, (QATConv2d, QATLinear))]
    assert len(layers) == 4
    for layer in layers:
        assert layer.qat_config.weight_bits == 4 and layer.qat_config.act_bits == 4
        w = layer.quantize_weight().detach().flatten(1)
        # 4-bit symmetric codes: at most 16 distinct values in every output channel
        assert max(row.unique().numel() for row in w) <= 16
    assert prepare_qat(small_cnn(), bits=3, averaging_constant=0.5).conv1.qat_config == QATConfig(3, 3, 0.5)
    assert prepare_qat(small_cnn(), bits=3, observer="ema").conv1.qat_config == QATConfig(3, 3, observer="ema")
    with pytest.raises(ValueError, match="give bits, or weight_bits / act_bits, not both"):
        prepare_qat(small_cnn(), bits=4, weight_bits=8)
    with pytest.raises(ValueError, match=r"weight_bits must be an int in \[2, 8\], got 9"):
        prepare_qat(small_cnn(), bits=9)


def test_strip_and_ptq():
    torch.manual_seed(1)
    model = small_cnn(in_channels=1, image_size=8)
    qat = prepare_qat(model, weight_bits=4, act_bits=6)
    assert qat.fc1.qat_config == QATConfig(weight_bits=4, act_bits=6)
    plain = strip_qat(qat)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert list(plain.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(plain(x), model(x))
    assert prepare_ptq(model) is model
    assert isinstance(prepare(model, "qat").conv1, QATConv2d)
    assert type(prepare_ptq(prepare(model, "qat")).conv1) is nn.Conv2d
    with pytest.raises(ValueError, match="strategy"):
        prepare(model, "int4")
    for bad in [dict(weight_bits=1), dict(act_bits=9), dict(averaging_constant=0.0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            prepare_qat(model, **bad)


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any .item() / data-dependent Python branch: a proxy for
    'no host synchronization in the forward'."""
    layer = prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8)
    out = compiled(x)
    out.sum().backward()
    assert bool(layer[0].act_observed) and torch.allclose(out, layer(x))


# ---- the weight buffer (fake_quant's out= form in the QAT layers) ----


def _allocating(model: nn.Module) -> nn.Module:
    """The model with every QAT layer fake-quantizing its weight into a fresh tensor."""
    for m in model.modules():
        if isinstance(m, (QATConv2d, QATLinear)):
            m.quantize_weight = lambda m=m: fk.fake_quant(m.weight, bits=m.qat_config.weight_bits, axis=0)
    return model


class _Twice(nn.Module):
    """One QAT conv called twice per forward (shared weights), as a loop would."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


@pytest.mark.parametrize("shape", ["model", "shared layer"])
def test_weight_buffer_training_equals_allocating(gen, shape):
    """Steps through the buffered layers give the allocating layers' weights bit for
    bit, also with a layer called twice before its backward and a forward whose graph
    is dropped without a backward."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    base = (
        small_cnn(in_channels=1, num_classes=4, image_size=8)
        if shape == "model"
        else _Twice(nn.Conv2d(3, 3, 3, padding=1))
    )
    models = [prepare_qat(base, bits=4), _allocating(prepare_qat(base, bits=4))]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    x_shape = (5, 1, 8, 8) if shape == "model" else (2, 3, 6, 6)
    for step in range(4):
        x = torch.randn(x_shape, generator=gen)
        for m, opt in zip(models, opts):
            if step == 2:
                m(x).sum()  # a graph dropped without a backward
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), name


def test_weight_buffer_is_reused_and_left_out_of_copies(gen):
    layer = prepare_qat(nn.Sequential(nn.Linear(6, 5)))[0]
    pointers = []
    for _ in range(3):
        y = layer(torch.randn(4, 6, generator=gen))
        pointers.append(layer._weight_buffer.tensor.data_ptr())
        y.sum().backward()
    assert len(set(pointers)) == 1  # one buffer, written each step
    with torch.no_grad():
        assert torch.equal(layer.quantize_weight(), fk.fake_quant(layer.weight, axis=0))
    assert "_weight_buffer" not in str(layer.state_dict().keys())
    import copy

    assert copy.deepcopy(layer)._weight_buffer.tensor is None
    frozen = copy.deepcopy(layer).requires_grad_(False)
    y = frozen.quantize_weight()  # a recorded graph with nothing to hook: a fresh tensor
    assert frozen._weight_buffer.tensor is None and torch.equal(y, fk.fake_quant(layer.weight, axis=0))
