"""The deployed model (fedhq.quant.deploy): INT weights as uploaded, activations
fake-quantized with ranges calibrated on a seeded training subset.

Its forward must equal the same quantized forward written with PyTorch's own
fake-quantize ops, stay close to the float model at 8 bits, fall below it at 2-3
bits, and refuse bad input with a clear message."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import single_thread

from fedhq.data import load_dataset
from fedhq.fl import RunConfig, engine, seeds
from fedhq.fl.client import quantize_upload, quantized_names
from fedhq.models import small_cnn
from fedhq.quant import (
    CALIBRATION_SAMPLES,
    calibrate,
    calibration_split,
    deployed_model,
    evaluate_deployed,
    float_state_dict,
    prepare_qat,
)
from fedhq.quant.deploy import score
from fedhq_kernels import quant_range

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN trained in float on digits: 6 epochs, 95.8% test accuracy."""
    torch.manual_seed(0)
    with torch.random.fork_rng(), single_thread():
        model = small_cnn(in_channels=1, image_size=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        generator = torch.Generator().manual_seed(0)
        for _ in range(6):
            order = torch.randperm(len(digits.train), generator=generator)
            for start in range(0, len(order), 32):
                idx = order[start : start + 32]
                optimizer.zero_grad()
                F.cross_entropy(model(digits.train.x[idx]), digits.train.y[idx]).backward()
                optimizer.step()
    return model.eval()


def uploaded(model, bits):
    return quantize_upload(float_state_dict(model), quantized_names(model), bits)


def reference_logits(model, x_cal, x, bits):
    """SmallCNN's deployed forward in plain torch: weights symmetric per output channel
    and biases symmetric per tensor (the upload's quantization), every Conv/Linear input
    affine per tensor with MinMaxObserver qparams of its calibrated range."""
    qmin, qmax = quant_range(bits)
    eps = torch.finfo(torch.float32).eps
    params = {}
    for name, p in model.named_parameters():
        p = p.detach()
        if p.dim() >= 2:
            scale = (p.flatten(1).abs().amax(1) / ((qmax - qmin) / 2)).clamp(min=eps)
            zero = torch.zeros_like(scale, dtype=torch.int32)
            params[name] = torch.fake_quantize_per_channel_affine(p, scale, zero, 0, qmin, qmax)
        else:
            scale = float((p.abs().max() / ((qmax - qmin) / 2)).clamp(min=eps))
            params[name] = torch.fake_quantize_per_tensor_affine(p, scale, 0, qmin, qmax)

    def forward(inp, ranges=None, observed=None):
        def layer(name, v, op):
            if observed is not None:
                observed.setdefault(name, []).append(v)
            if ranges is not None:
                lo, hi = (torch.tensor(r, dtype=torch.float32) for r in ranges[name])
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
                scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
                zero = int((qmin - torch.round(lo / scale)).clamp(qmin, qmax))
                # contiguous: torch's op keeps a channels-last input's layout, and a
                # convolution sums in another order on it (measured: 7e-6 apart, enough
                # to move an activation code by one step)
                v = torch.fake_quantize_per_tensor_affine(v, float(scale), zero, qmin, qmax).contiguous()
            return op(v, params[f"{name}.weight"], params[f"{name}.bias"])

        conv = lambda v, w, b: F.conv2d(v, w, b, padding=1)  # noqa: E731
        h = F.max_pool2d(F.relu(layer("conv1", inp, conv)), 2)
        h = F.max_pool2d(F.relu(layer("conv2", h, conv)), 2)
        h = F.relu(layer("fc1", h.flatten(1), F.linear))
        return layer("fc2", h, F.linear)

    observed = {}
    forward(x_cal, observed=observed)  # calibration: float activations, deployed weights
    ranges = {k: (float(torch.cat(v).min()), float(torch.cat(v).max())) for k, v in observed.items()}
    return forward(x, ranges=ranges)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_deployed_forward_equals_a_plain_torch_reference(trained, digits, bits):
    x_cal = calibration_split(digits.train, seeds.generator(1, "calibration"))
    deployed = deployed_model(trained, uploaded(trained, bits), x_cal, bits)
    with torch.no_grad():
        ours, theirs = deployed(digits.test.x), reference_logits(trained, x_cal, digits.test.x, bits)
    assert torch.equal(ours, theirs)  # same ops on the same values: bit for bit
    accuracy, _ = evaluate_deployed(trained, uploaded(trained, bits), x_cal, digits.test, bits=bits)
    assert accuracy == int((theirs.argmax(1) == digits.test.y).sum()) / len(digits.test)
    # the activations really are quantized: not the float model's logits
    assert not torch.allclose(ours, trained(digits.test.x), atol=1e-3)


def test_accuracy_is_close_to_float_at_8_bits_and_lower_at_2_and_3(trained, digits):
    x_cal = calibration_split(digits.train, seeds.generator(1, "calibration"))
    float_accuracy, _ = score(trained, digits.test)
    deployed = {b: evaluate_deployed(trained, uploaded(trained, b), x_cal, digits.test, bits=b)[0] for b in (8, 3, 2)}
    assert float_accuracy > 0.9
    assert abs(deployed[8] - float_accuracy) <= 0.01, (float_accuracy, deployed)
    # measured: 95.8% float, 95.8% at 8 bits, 93.6% at 3, 87.8% at 2
    assert deployed[3] < float_accuracy - 0.01 and deployed[2] < deployed[3] - 0.03, (float_accuracy, deployed)


def test_a_qat_model_deploys_as_its_float_twin(trained, digits):
    x_cal = calibration_split(digits.train, seeds.generator(1, "calibration"))
    qat = prepare_qat(trained, bits=4)
    weights = uploaded(trained, 4)
    a = evaluate_deployed(qat, weights, x_cal, digits.test, bits=4)
    assert a == evaluate_deployed(trained, weights, x_cal, digits.test, bits=4)
    assert calibrate(qat, x_cal, 4) == calibrate(trained, x_cal, 4)


def test_calibration_split_is_seeded_and_the_same_for_every_caller(digits):
    def draw(seed, split=digits.train, **kw):
        return calibration_split(split, seeds.generator(seed, "calibration"), **kw)

    a, b = draw(3), draw(3)
    assert a.shape == (CALIBRATION_SAMPLES, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, draw(4))
    # the same images as before the stream moved into fedhq.fl.seeds (default_rng([seed, 0xCA1B]))
    before = np.sort(np.random.default_rng([3, 0xCA1B]).permutation(len(digits.train))[:CALIBRATION_SAMPLES])
    assert torch.equal(a, digits.train.x[torch.as_tensor(before)])
    config = RunConfig(dataset="digits", seed=3).validated()
    data = engine.load_data(config)
    assert torch.equal(engine.calibration_images(config, data), draw(3, data.train))  # both engines' draw
    assert draw(3, digits.train.subset(range(10))).shape[0] == 10  # all of a small split
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        draw(3, size=0)
    with pytest.raises(TypeError, match="rng must be a numpy Generator, got int"):
        calibration_split(digits.train, 3)


def test_calibration_ranges_cover_every_layer_input(trained, digits):
    x_cal = calibration_split(digits.train, seeds.generator(1, "calibration"))
    calibration = calibrate(trained, x_cal, 4)
    assert list(calibration.ranges) == ["conv1", "conv2", "fc1", "fc2"]
    assert calibration.ranges["conv1"] == (float(x_cal.min()), float(x_cal.max()))
    assert calibration.ranges["conv2"][0] == 0.0  # after a ReLU
    scale, zero_point = calibration.qparams("fc1")
    assert scale > 0 and zero_point == -8  # [0, max]: the range starts at the lowest code
    assert trained.training is False and not trained._forward_pre_hooks and not trained.fc1._forward_pre_hooks


def test_bad_input_is_refused_with_a_clear_message(trained, digits):
    x_cal = calibration_split(digits.train, seeds.generator(1, "calibration"))
    with pytest.raises(ValueError, match=r"calibrate: bits must be an int in \[2, 8\], got 9"):
        calibrate(trained, x_cal, 9)
    with pytest.raises(ValueError, match=r"non-empty batch, got shape \(0, 1, 8, 8\)"):
        calibrate(trained, x_cal[:0], 8)
    with pytest.raises(ValueError, match="calibration_x must be a float tensor, got a torch.int64 tensor"):
        calibrate(trained, x_cal.long(), 8)
    with pytest.raises(ValueError, match="calibration_x contains NaN or Inf"):
        calibrate(trained, torch.full_like(x_cal, float("nan")), 8)
    with pytest.raises(TypeError, match="expected an nn.Module, got dict"):
        calibrate({}, x_cal, 8)
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear layer"):
        calibrate(torch.nn.ReLU(), x_cal, 8)
    huge = small_cnn(in_channels=1, image_size=8)
    torch.nn.init.constant_(huge.conv1.weight, 3e38)
    with pytest.raises(ValueError, match="the input of layer 'conv2' is not finite"):
        calibrate(huge, x_cal, 8)
    with pytest.raises(ValueError, match="'conv1.weight' must be a 4-bit QuantizedTensor as uploaded, got a torch"):
        deployed_model(trained, float_state_dict(trained), x_cal, 4)
    with pytest.raises(ValueError, match="'conv1.weight' must be a 4-bit QuantizedTensor as uploaded, got a 8-bit"):
        deployed_model(trained, uploaded(trained, 8), x_cal, 4)
